"""The scoring engine: one capture pass, then every "model without block i" from cached block inputs.

A calibration batch is run through the model once with ``use_cache=False``; forward pre-hooks keep each
block's input hidden states and its call arguments (attention mask, position embeddings: they can differ
per block, e.g. sliding-window layers in Gemma 2/3). The model with block ``i`` removed is then block
``i``'s cached input run through the later blocks only (each with its own cached arguments), then the
head. Blocks are visited once, in order, each applied to every candidate stream that needs it (batched
together), so only one block's weights must be on the accelerator at a time: that is the offloaded mode.

Everything here is exact: the streams compute the same function as a pruned copy of the model (the
reference tests check it to 1e-4 against :func:`shortened.surgery.remove_blocks` and a full forward).

The package, one concern per module: :mod:`.capture` (recording and replaying block calls),
:mod:`.loss` (the token NLL and the head run in slices), :mod:`.workers` (how many streams per call and
on which threads); here the :class:`Engine` that puts them together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..archs import ArchSpec, get_arch, get_blocks
from ..errors import ShortenedError
from ..offload import BlockHome, MemoryHome, disk_blocks
from .capture import (BlockCall, Capture, block_hidden, call_block, capture_blocks, check_calib_ids,
                      split_block_call, without_cache)
from .loss import (DEFAULT_LOSS_CHUNK, DEFAULT_VOCAB_CHUNK, DenseTargets, HeadLoss, ppl_from_mean_nll,
                   token_nll)
from .workers import DEFAULT_BATCH_TOKENS, WorkerPool, call_groups, default_workers

__all__ = [
    "DEFAULT_BATCH_TOKENS", "DEFAULT_LOSS_CHUNK", "DEFAULT_VOCAB_CHUNK", "BlockCall", "Capture",
    "BlockVariants", "DenseTargets", "Engine", "HeadLoss", "WorkerPool", "block_hidden", "call_block", "call_groups",
    "capture_blocks",
    "check_calib_ids", "default_workers", "ppl_from_mean_nll", "split_block_call", "token_nll", "without_cache",
]


class Engine:
    """Cached block inputs and arguments of a calibration set, and the computations built on them.

    ``skip`` lists blocks that are treated as already removed (they are bypassed, which computes exactly
    what the pruned model computes); ``offload`` keeps blocks off ``device`` and brings one at a time
    (always so for a model whose blocks are on disk, see :func:`shortened.offload.load_blocks_on_disk`).
    """

    def __init__(
        self,
        model: nn.Module,
        calib_ids: torch.Tensor | None,
        *,
        skip: Sequence[int] = (),
        batch_size: int | None = None,
        offload: bool = False,
        device: str | torch.device | None = None,
        batch_tokens: int | None = None,
        loss_chunk: int = DEFAULT_LOSS_CHUNK,
        vocab_chunk: int | None = None,
        workers: int | None = None,
        progress: bool = True,
        spec: ArchSpec | None = None,
    ) -> None:
        self.model = model
        self.spec = spec or get_arch(model)
        self.blocks = get_blocks(model, self.spec)
        self.num_blocks = len(self.blocks)
        bad = [i for i in skip if not 0 <= i < self.num_blocks]
        if bad:
            raise ShortenedError(f"block {bad[0]} to skip is out of range (the model has {self.num_blocks} blocks)")
        self.skip = sorted(set(skip))
        self.active = [i for i in range(self.num_blocks) if i not in set(self.skip)]
        if not self.active:
            raise ShortenedError("every block is skipped: nothing to score")
        disk = disk_blocks(model)
        self.offload = offload or disk is not None
        self.progress = progress
        self._home: BlockHome | None = None
        if self.offload:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self._home = disk or MemoryHome(next(self.blocks[0].parameters()).device)
        else:
            self.device = _module_device(model) if device is None else torch.device(device)
        if batch_tokens is None:
            batch_tokens = DEFAULT_BATCH_TOKENS if self.device.type != "cpu" else 1
        self.batch_tokens = max(1, batch_tokens)
        self.pool = WorkerPool(workers if workers is not None else default_workers(self.device))
        if vocab_chunk is None:
            vocab_chunk = DEFAULT_VOCAB_CHUNK if self.device.type == "cpu" else 0
        self.loss = HeadLoss.of(model, self.spec, loss_chunk=loss_chunk, vocab_chunk=vocab_chunk)
        self.calib_ids = None if calib_ids is None else check_calib_ids(
            calib_ids, getattr(model.config, "vocab_size", None))
        n_samples = self.calib_ids.shape[0] if self.calib_ids is not None else 1
        # One micro-batch per worker, so every block visit has a multiple of `workers` equal calls to share
        # out (one batch of 10 samples leaves a core idle for half a call at every odd stream count).
        if batch_size is not None and batch_size < 1:
            raise ShortenedError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = batch_size if batch_size is not None else -(-n_samples // self.workers)
        self._captures: list[Capture] | None = None

    @property
    def workers(self) -> int:
        """Candidate streams computed concurrently (see :mod:`shortened.engine.workers`)."""
        return self.pool.workers

    @property
    def loss_chunk(self) -> int:
        """Tokens per head call in the loss (see :class:`HeadLoss`)."""
        return self.loss.loss_chunk

    @property
    def vocab_chunk(self) -> int:
        """Vocabulary slice of the loss (0: the whole vocabulary; see :class:`HeadLoss`)."""
        return self.loss.vocab_chunk

    @vocab_chunk.setter
    def vocab_chunk(self, value: int) -> None:
        self.loss.vocab_chunk = max(0, value)

    # ----------------------------------------------------------------- capture
    @property
    def captures(self) -> list[Capture]:
        if self._captures is None:
            if self.calib_ids is None:
                raise ShortenedError("this criterion needs calibration data")
            self._captures = [capture_blocks(self.model, self.blocks, chunk, self.device, self._home)
                              for chunk in self.calib_ids.split(self.batch_size)]
        return self._captures

    # ----------------------------------------------------------------- blocks
    @contextlib.contextmanager
    def on_device(self, index: int) -> Iterator[nn.Module]:
        """Block ``index``, on the execution device for the duration (offloaded mode moves it back)."""
        block = self.blocks[index]
        if self._home is not None:
            self._home.fetch(block, index, self.device)
        try:
            yield block
        finally:
            if self._home is not None:
                self._home.release(block, index)

    def run_streams(self, block: nn.Module, index: int, cap: Capture, streams: list[torch.Tensor]) -> list[torch.Tensor]:
        """Apply one block to several streams of the same micro-batch, batched up to ``batch_tokens``."""
        return self.run_block(block, index, [(cap, streams)])[0]

    def run_block(self, block: nn.Module | Sequence[nn.Module], index: int,
                  work: Sequence[tuple[Capture, list[torch.Tensor]]]) -> list[list[torch.Tensor]]:
        """Apply one block to the streams of several micro-batches (``work``: pairs of a capture and its
        streams), all calls in one :meth:`map` so the workers share them out with no barrier in between;
        streams of one micro-batch are batched together up to ``batch_tokens``. ``block`` is one module, or
        one per item of ``work``."""
        jobs = [(k, group) for k, (cap, streams) in enumerate(work) for group in self.call_groups(cap, streams)]

        def run(job: tuple[int, list[torch.Tensor]]) -> list[torch.Tensor]:
            cap, group = work[job[0]][0], job[1]
            x = group[0] if len(group) == 1 else torch.cat(group, 0)
            module = block if isinstance(block, nn.Module) else block[job[0]]
            y = call_block(module, cap.calls[index], x, cap.batch)
            return list(y.split(cap.batch, 0)) if len(group) > 1 else [y]

        outs: list[list[torch.Tensor]] = [[] for _ in work]
        for (k, _), ys in zip(jobs, self.map(run, jobs)):
            outs[k] += ys
        return outs

    def call_groups(self, cap: Capture, items: list[Any]) -> list[list[Any]]:
        """``items`` (streams of micro-batch ``cap``) in groups of at most ``batch_tokens`` tokens per call."""
        return call_groups(items, cap.ids.numel(), self.batch_tokens)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(x) for x in items]``; inside :meth:`parallel`, on the worker threads (:class:`WorkerPool`)."""
        return self.pool.map(fn, items)

    def parallel(self) -> contextlib.AbstractContextManager[None]:
        """For the duration, :meth:`map` runs on ``workers`` threads sharing the intra-op threads out."""
        return self.pool.parallel()

    def progress_bar(self, total: int, desc: str):
        """A tqdm bar over ``total`` block visits (off when the engine was made with ``progress=False``)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="block", disable=not self.progress, leave=False)

    # ----------------------------------------------------------------- loss (see HeadLoss)
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's head on final hidden states: logits, soft-cap included."""
        return self.loss.head(hidden)

    def nll_sum(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Summed next-token NLL per stream of ``hidden`` [r*b, seq, h] against ``ids`` [b, seq] ([r])."""
        return self.loss.nll_sum(hidden, ids)

    def dense_targets(self, hidden: torch.Tensor) -> DenseTargets:
        """What :meth:`kl_sum` needs of the dense model's final hidden states ``hidden`` [b, seq, h]."""
        return self.loss.dense_targets(hidden)

    def kl_sum(self, hidden: torch.Tensor, target: DenseTargets) -> torch.Tensor:
        """Summed KL(dense || candidate) per stream of ``hidden`` [r*b, seq, h] ([r])."""
        return self.loss.kl_sum(hidden, target)

    # ----------------------------------------------------------------- computations
    def removal_nll(self, candidates: Sequence[int] | None = None) -> dict[int, float]:
        """Mean next-token NLL of the model with each candidate block (one at a time) also removed.

        Streams: candidate ``i`` starts from block ``i``'s input and runs the later active blocks. One
        visit per block applies it to every stream that needs it.
        """
        cands = set(self.active if candidates is None else candidates)
        caps = self.captures
        use_captured = not self.skip  # the dense stream is the captured inputs themselves
        streams: list[dict[int, torch.Tensor]] = [{} for _ in caps]
        dense: list[torch.Tensor | None] = [c.inputs[0] for c in caps]
        last = self.active[-1]
        with torch.inference_mode(), self.parallel(), self.progress_bar(len(self.active), "ppl") as bar:
            for j in self.active:
                with self.on_device(j) as block:
                    need_dense = not use_captured and j != last
                    keys = [sorted(s) for s in streams]
                    work = [(cap, [streams[m][i] for i in keys[m]] + ([dense[m]] if need_dense else []))
                            for m, cap in enumerate(caps)]
                    h_in = [cap.inputs[j] if use_captured else dense[m] for m, cap in enumerate(caps)]
                    for m, outs in enumerate(self.run_block(block, j, work)):
                        for i, y in zip(keys[m], outs):
                            streams[m][i] = y
                        if need_dense:
                            dense[m] = outs[-1]
                        if j in cands:
                            streams[m][j] = h_in[m]
                bar.update()
        totals = {i: 0.0 for i in cands}
        count = sum(cap.ids.shape[0] * (cap.ids.shape[1] - 1) for cap in caps)
        # (micro-batch, candidates whose losses one call computes)
        jobs = [(m, group) for m, cap in enumerate(caps) for group in self.call_groups(cap, sorted(streams[m]))]

        def nll(job: tuple[int, list[int]]) -> list[float]:
            m, group = job
            return self.nll_sum(torch.cat([streams[m][i] for i in group], 0), caps[m].ids).tolist()

        with torch.inference_mode(), self.parallel():
            # in rounds of `workers` calls, freeing each round's streams as soon as it is done
            for r in range(0, len(jobs), self.workers):
                batch = jobs[r:r + self.workers]
                for (m, group), sums in zip(batch, self.map(nll, batch)):
                    for i, v in zip(group, sums):
                        totals[i] += v
                        del streams[m][i]
        return {i: totals[i] / count for i in sorted(totals)}

    def removal_set_outputs(self, sets: Sequence[Sequence[int]], captures: Sequence[int],
                            variants: BlockVariants | None = None) -> list[list[torch.Tensor]]:
        """Final hidden states (before the head) of the model with each set of blocks removed, for the
        micro-batches ``captures`` (indices into :attr:`captures`): ``out[c][s]`` for set ``s``.

        Blocks are visited once, in order. Streams are shared while sets agree on the blocks so far: at
        block ``j`` the candidates whose removals before ``j`` are the same have one stream, the dense
        prefix is the captured inputs themselves, and a stream splits only where one candidate keeps
        ``j`` and another removes it; so a set is computed from its first removed block on, and
        offspring of one parent share the parent's stream up to their first change.

        ``variants`` (optional) replaces kept blocks per set: where ``variants.key(j, set)`` is not None,
        block ``j`` of that set runs as ``variants.make(block, j, key, captures)`` (one module per micro-batch,
        e.g. with a linear bridge folded in, :mod:`shortened.search_bridges`), and its stream splits from the
        plain one there.
        """
        if self.skip:
            raise ShortenedError("removal sets are computed on an engine with no skipped blocks")
        removed = [frozenset(s) for s in sets]
        caps = [self.captures[m] for m in captures]
        # A stream's key: what its set did so far, removed block indices and (block, variant key) pairs.
        prefix: list[tuple[Any, ...]] = [() for _ in sets]
        streams: list[dict[tuple[Any, ...], torch.Tensor]] = [{} for _ in caps]  # () = captured input
        last = self.num_blocks - 1
        with torch.inference_mode(), self.parallel():
            for j in range(self.num_blocks):
                keys = [None if j in r or variants is None else variants.key(j, r) for r in removed]
                drop = list(dict.fromkeys(p for p, r in zip(prefix, removed) if j in r))
                # (stream in, variant key): the plain block runs the key-None streams, but not the dense one
                # (its output is the next captured input) unless this is the last block
                run = list(dict.fromkeys((p, v) for p, r, v in zip(prefix, removed, keys)
                                         if j not in r and (p or v is not None or j == last)))
                inputs = [{p: cap.inputs[j] if not p else streams[m][p] for p in {*(p for p, _ in run), *drop}}
                          for m, cap in enumerate(caps)]
                new: list[dict[tuple[Any, ...], torch.Tensor]] = [{p + (j,): inputs[m][p] for p in drop}
                                                                  for m in range(len(caps))]
                if run:
                    with self.on_device(j) as block:
                        for v in dict.fromkeys(v for _, v in run):
                            ins = [p for p, w in run if w == v]
                            module = block if v is None else variants.make(block, j, v, captures)
                            outs = self.run_block(module, j, [(cap, [inputs[m][p] for p in ins])
                                                              for m, cap in enumerate(caps)])
                            for m in range(len(caps)):
                                new[m].update({(p if v is None else p + ((j, v),)): y for p, y in zip(ins, outs[m])})
                streams = new
                prefix = [p + (j,) if j in r else p if v is None else p + ((j, v),)
                          for p, r, v in zip(prefix, removed, keys)]
        return [[streams[m][p] for p in prefix] for m in range(len(caps))]

    def dense_hiddens(self, reduce: str = "all") -> list[list[torch.Tensor]]:
        """Per micro-batch, the residual stream at every active block boundary: inputs of the active
        blocks in order, then the last active block's output (``len(active) + 1`` tensors).

        ``reduce="last"`` keeps only the last token of each sample ([b, h]) to save memory.
        """
        caps = self.captures
        use_captured = not self.skip
        out: list[list[torch.Tensor]] = [[] for _ in caps]
        pick = (lambda t: t[:, -1]) if reduce == "last" else (lambda t: t)
        h = [c.inputs[0] for c in caps]
        with torch.no_grad(), self.progress_bar(len(self.active), "hidden states") as bar:
            for k, j in enumerate(self.active):
                need_run = (not use_captured) or j == self.active[-1]
                with contextlib.ExitStack() as stack:
                    block = stack.enter_context(self.on_device(j)) if need_run else None
                    for m, cap in enumerate(caps):
                        h_in = cap.inputs[j] if use_captured else h[m]
                        out[m].append(pick(h_in))
                        if need_run:
                            h[m] = self.run_streams(block, j, cap, [h_in])[0]
                bar.update()
        for m in range(len(caps)):
            out[m].append(pick(h[m]))
        return out

    def num_targets(self) -> int:
        return sum(c.ids.shape[0] * (c.ids.shape[1] - 1) for c in self.captures)


class BlockVariants(Protocol):
    """Per-set replacements of kept blocks in :meth:`Engine.removal_set_outputs`."""

    def key(self, index: int, removed: frozenset[int]) -> Hashable | None:
        """Which variant block ``index`` is in the model without ``removed`` (None: the block itself)."""

    def make(self, block: nn.Module, index: int, key: Hashable, captures: Sequence[int]) -> list[nn.Module]:
        """The variant ``key`` of ``block`` (block ``index``, on the execution device) for each micro-batch of
        ``captures`` (indices into :attr:`Engine.captures`; they may differ, e.g. fitted without it)."""


def _module_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
