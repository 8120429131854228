"""Block importance criteria behind one registry, and :func:`score_blocks`, the entry point.

Every criterion returns one score per block, lower = less important (the block to remove first):

- ``ppl``: perplexity of the calibration set with that single block removed (Shortened LLaMA).
- ``taylor``: sum over the block's parameters of ``|w * dL/dw|`` (Shortened LLaMA, after LLM-Pruner).
- ``magnitude``: sum of ``|w|`` (or the L2 norm) of the block's parameters.
- ``bi``: Block Influence, ``1 - cos(input, output)`` averaged over tokens (ShortGPT).
- ``angular``: ``arccos(cos(h_l, h_(l+n))) / pi`` (Gromov et al.); per-span scores for every n too.
- ``random``: seeded uniform scores, the baseline.
- ``search``: not a per-block score but an evolutionary search for the whole set (EvoPress-style, fitness
  KL to the dense model); it takes the selection request as options, see :mod:`shortened.criteria.search`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..archs import block_config, check_seq_len, get_arch, suffix_only
from ..engine import Engine
from ..errors import ShortenedError
from ..scores import BlockScores


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: ``fn(engine, **options) -> (scores per active block, extra)``."""

    name: str
    fn: Callable[..., tuple[list[float], dict[str, Any]]]
    needs_data: bool
    #: Default (protect_first, protect_last) for selection: the paper's "+" heuristic where it needed it.
    protect: tuple[int, int]
    description: str
    #: Samples per micro-batch when the caller does not say (None: one micro-batch per worker); the search
    #: measures candidates on a growing number of samples, so it wants them one by one.
    micro_batch: int | None = None
    #: Whether the scores read the logits through the model's head (then a discovered head is checked first).
    uses_head: bool = False
    #: What scoring computes, for ``shortened plan``: "forward" (one pass through the blocks), "each_removal"
    #: (every block's removal run on to the head), "gradient" (forward and backward), "weights" (no data),
    #: "search" (set by its generations).
    cost: str = "forward"

    def options(self) -> dict[str, Any]:
        """The criterion's options and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params}

    @property
    def takes_seed(self) -> bool:
        """Whether the criterion draws random numbers (an option ``seed``): callers pass their --seed."""
        return "seed" in self.options()


def _registry() -> dict[str, Criterion]:
    from . import angular, bi, magnitude, ppl, random, search, taylor

    return {c.name: c for c in (m.CRITERION for m in (ppl, taylor, magnitude, bi, angular, random, search))}


CRITERIA: dict[str, Criterion] = _registry()


def criterion_names() -> list[str]:
    """The registered criteria, in the order above."""
    return list(CRITERIA)


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``; a one-line error listing the valid names otherwise."""
    try:
        return CRITERIA[name]
    except KeyError:
        raise ShortenedError(f"unknown criterion '{name}': choose one of {', '.join(CRITERIA)}") from None


def default_protection(criterion: str) -> tuple[int, int]:
    """(protect_first, protect_last) used when the user does not say: 4/2 for taylor and magnitude."""
    return get_criterion(criterion).protect


def score_blocks(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    criterion: str,
    *,
    skip: Sequence[int] = (),
    batch_size: int | None = None,
    offload: bool = False,
    device: str | torch.device | None = None,
    batch_tokens: int | None = None,
    loss_chunk: int | None = None,
    vocab_chunk: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    **options: Any,
) -> BlockScores:
    """Score every block of ``model`` on ``calib_ids`` (LongTensor[n_samples, seq_len]).

    ``skip`` treats those blocks as already removed (used by the iterative driver); their score is None.
    ``batch_size`` splits the samples into micro-batches for the capture pass; ``offload`` keeps the
    blocks where they are (CPU) and moves one at a time to ``device``; a model loaded with its blocks on
    disk (``load_model(..., blocks_on_disk=True)``) is always scored so, each block read when visited. ``workers`` candidate streams are
    computed concurrently (default: one per CPU thread on a CPU, one on an accelerator). ``loss_chunk`` tokens
    and ``vocab_chunk`` words (0: all) are the slices of the loss computation. Remaining ``options`` go to the
    criterion (e.g. ``norm="l2"`` for magnitude, ``seed`` for random, ``tokens`` for angular).
    """
    crit = get_criterion(criterion)
    allowed = crit.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) or "none"
        raise ShortenedError(f"criterion '{criterion}' has no option '{unknown[0]}' (its options: {valid})")
    if crit.needs_data and calib_ids is None:
        raise ShortenedError(f"criterion '{criterion}' needs calibration data (calib_ids)")
    _check_engine_numbers(batch_size=batch_size, batch_tokens=batch_tokens, workers=workers, loss_chunk=loss_chunk,
                          vocab_chunk=vocab_chunk)
    from ..loading import check_device

    check_device(device)
    spec = get_arch(model)
    why = suffix_only(block_config(model.config, spec))
    if why is not None:  # also: some run a block more than once (Dory's loop), so one pass is no score
        raise ShortenedError(f"{why}, so its blocks are not scored for removal: only the last blocks can be "
                             "removed exactly; name them with prune --blocks")
    if crit.needs_data and isinstance(calib_ids, torch.Tensor) and calib_ids.dim() == 2:
        check_seq_len(model, int(calib_ids.shape[1]), flag="calibration length")
    engine_kw: dict[str, Any] = {}
    if batch_tokens is not None:
        engine_kw["batch_tokens"] = batch_tokens
    if loss_chunk is not None:
        engine_kw["loss_chunk"] = loss_chunk
    if vocab_chunk is not None:
        engine_kw["vocab_chunk"] = vocab_chunk
    if workers is not None:
        engine_kw["workers"] = workers
    mode = _offload_mode(model, offload)
    was_training = model.training
    model.eval()  # dropout off: scores are of the model's function, the same on every call
    try:
        with _offloaded(model, spec, mode, device) as exec_device:
            engine = Engine(model, calib_ids if crit.needs_data else None, skip=skip,
                            batch_size=batch_size or crit.micro_batch, offload=bool(mode), device=exec_device,
                            progress=progress, spec=spec, **engine_kw)
            if crit.uses_head and spec.generic and not mode and calib_ids is not None:
                engine.loss.check_against(model, spec, engine.calib_ids[:1, :32].to(engine.device))
            values, extra = crit.fn(engine, **options)
            ran_on = str(engine.device)
    finally:
        model.train(was_training)
    if len(values) != len(engine.active):
        raise AssertionError(f"criterion {criterion} returned {len(values)} scores for {len(engine.active)} blocks")
    scores: list[float | None] = [None] * engine.num_blocks
    for i, v in zip(engine.active, values):
        scores[i] = float(v)
    settings: dict[str, Any] = {**allowed, **options}
    if crit.needs_data and calib_ids is not None:
        settings.update(n_samples=int(calib_ids.shape[0]), seq_len=int(calib_ids.shape[1]),
                        batch_size=engine.batch_size)
    # dtype and device change the scores in their last digits, and sometimes the order: recorded with them.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    settings.update(skip=list(engine.skip), offload=mode, dtype=str(dtype).removeprefix("torch."), device=ran_on)
    span = extra.pop("span_scores", None)
    return BlockScores(criterion=criterion, scores=scores, settings=settings, span_scores=span, extra=extra)


def _check_engine_numbers(**values: int | None) -> None:
    """Engine sizes are positive (the chunks may be 0: all at once); None leaves the default."""
    for name, value in values.items():
        least = 0 if name.endswith("_chunk") else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ShortenedError(f"{name} must be an integer of at least {least}, got {value!r}")


def _offload_mode(model: nn.Module, offload: bool) -> str | bool:
    """What the scores file records: False, "cpu" (blocks moved from memory) or "disk"."""
    from ..offload import disk_blocks

    return "disk" if disk_blocks(model) is not None else "cpu" if offload else False


@contextlib.contextmanager
def _offloaded(model: nn.Module, spec: Any, mode: str | bool, device: Any) -> Iterator[Any]:
    """In offloaded mode (``mode``: "cpu" or "disk"), put everything but the blocks on the execution device
    for the duration."""
    if not mode:
        yield device
        return
    from ..surgery import set_submodule
    from ..archs import get_blocks

    exec_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks = get_blocks(model, spec)
    # The rest goes back where it was: the device of a parameter outside the blocks.
    block_ids = {id(p) for p in blocks.parameters()}
    home = next((p.device for p in model.parameters() if id(p) not in block_ids), torch.device("cpu"))

    def move_rest(to: torch.device) -> None:
        set_submodule(model, spec.blocks, nn.ModuleList())  # detach the blocks so the move leaves them
        try:  # tables left unloaded (on meta) stay there; ties survive (_apply converts in place, as .to())
            model._apply(lambda t: t if t.is_meta else t.to(to))
        finally:
            set_submodule(model, spec.blocks, blocks)

    if mode == "cpu":
        blocks.to(home)
    move_rest(exec_device)
    try:
        yield exec_device
    finally:
        move_rest(home)


__all__ = ["BlockScores", "CRITERIA", "Criterion", "criterion_names", "default_protection",
           "get_criterion", "score_blocks"]
