"""Block-local reconstruction: the kept blocks next to each removed run learn to do the run's work.

After depth pruning, the residual stream entering the block after a gap misses the contribution of the
removed blocks. Here the kept blocks around the gap (the *bridge*: the block before it and the block
after it; by default, ``auto``, one more after it for every two removed blocks beyond four, see
:data:`AUTO_WIDTH`) are trained, all their weights, so that on the unpruned model's own input they output
the unpruned model's hidden state after them:

    loss = mean over bridges and tokens of ||bridge(h_start) - h_end||^2 / ||h_end||^2

where ``h_start`` and ``h_end`` come from one forward of the teacher (the unpruned model), stopped at the
last block needed. Only the bridges run forward and backward, a few blocks instead of the whole model
and its 49k-word head, so many more tokens fit in a time budget than with distillation; every other
weight is left as it was. Width 2 beat width 1 at equal time on SmolLM2-135M (WikiText-2 116 vs 123 on
40 chunks, 4 minutes on one core, lr 3e-3, which beat 1e-3 and 1e-2); the benchmark is in
benchmarks/results/healing.md. A long run needs more: one bridge of two blocks for six removed ones
healed 8% worse than a bridge of three (``auto``).

The first position of every sequence, where decoder LMs park a huge activation (the attention sink)
that every later token attends to, is in the loss too (per-token relative error, so its size does not
dominate). Left out (``--no-reconstruct-first-token``), nothing holds the bridges to it: on SmolLM2-135M,
780 steps at lr 3e-3 took the first bridge's relative error there from 0.04 to 0.997 between steps 300 and
400 and WikiText-2 (first 20 chunks) from 82 to 158, while the error on the other tokens barely moved
(benchmarks/results/linear.md, "bf16 autocast and the attention sink"). Weighted like any other token it
is 1/128 of the loss, and that is not always enough: a run on Block Influence's blocks (seed 1, 825 steps)
lost the sink by step 206 (relative error 0.94 there, norm 850 against the teacher's 23,800) while the
mean validation error looked normal (0.033), and the healed model was as bad as the unhealed one
(WikiText-2 151). So by default (``--reconstruct-first-token-weight rest``) the first position weighs as
much as the rest of its text together: losing the sink then costs as much as failing every other token.

The teacher's forward is most of a step's time (SmolLM2-135M, Block Influence's blocks, 8 x 128 tokens,
one core: 2.1 of 3.3 s), and its result for an example never changes, so when the run sees an example
more than once the states it gives are kept per example (:class:`TeacherCache`, up to
``--teacher-cache-gb``): with ``--passes`` the run goes over a smaller random subset of the data several
times, and every pass after the first skips the teacher.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..archs import get_arch, get_blocks
from ..engine import BlockCall, block_hidden, call_block, split_block_call, without_cache
from ..errors import ShortenedError
from .registry import HealContext, HealMethod, Prepared


@dataclass(frozen=True)
class Bridge:
    """Student blocks ``index .. index + count - 1`` stand for the teacher's blocks ``start .. end - 1``."""

    index: int
    count: int
    start: int
    end: int  # == teacher's block count: the target is the last block's output

    @property
    def blocks(self) -> range:
        return range(self.index, self.index + self.count)

    def to_dict(self, kept: Sequence[int]) -> dict[str, Any]:
        """For the healing record: the teacher's indices of the trained blocks and of the blocks they stand for."""
        return {"trained": [kept[i] for i in self.blocks], "replaces": [self.start, self.end - 1]}


#: ``--bridge-width auto``: a removed run of ``n`` blocks gets the block before it and ``ceil(n / 2) - 1``
#: after it, at least one: one trained block per two removed, at least two. Runs of up to four blocks get
#: the fixed width 2 (so Block Influence's scattered choice trains the same blocks as before), a run of six
#: gets three. On SmolLM2-135M with blocks 13-18 removed (600 CPU-s, WikiText-2 first 100 chunks) the
#: trained blocks 12, 19, 20 reached 84.7 and 85.0 where 12, 19 reached 91.9; a fourth block after (21)
#: gave 85.5, a second block before the run 93.0 (11, 12, 19) and 87.9 (11, 12, 19, 20), and
#: the blocks after alone 86.4 (19, 20) and 87.4 (19, 20, 21) (BENCHMARKS.md, block-set search, session 11).
AUTO_WIDTH = "auto"


def run_width(width: int | str, removed: int) -> int:
    """Kept blocks trained for a run of ``removed`` blocks: ``width``, or by the ``auto`` rule above."""
    return max(2, math.ceil(removed / 2)) if width == AUTO_WIDTH else int(width)


def find_bridges(kept: Sequence[int], num_teacher_blocks: int, width: int | str = 1) -> list[Bridge]:
    """The bridges of a pruned model whose block ``i`` is the teacher's block ``kept[i]``.

    Each removed run goes to the ``width`` kept blocks around it (``auto``: by the run's length, see
    :func:`run_width`): the one before it and the next ``width - 1`` after it (a run at the very start: the
    first ``width`` kept blocks, the first of which then also covers the blocks before it). Bridges that
    would share blocks are merged into one.
    """
    kept = list(kept)
    if not kept or sorted(set(kept)) != kept or kept[0] < 0 or kept[-1] >= num_teacher_blocks:
        raise ShortenedError(f"kept blocks {kept} do not describe a pruned copy of a {num_teacher_blocks}-block model")
    check_options(width)

    def start(i: int) -> int:
        return 0 if i == 0 else kept[i]

    def end(i: int) -> int:
        return kept[i + 1] if i + 1 < len(kept) else num_teacher_blocks

    spans: list[list[int]] = []
    for i in range(len(kept)):
        removed = end(i) - start(i) - 1  # the removed blocks between this kept block and the next
        if removed > 0:
            first, last = i, min(i + run_width(width, removed) - 1, len(kept) - 1)
            if spans and first <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], last)
            else:
                spans.append([first, last])
    if not spans:
        raise ShortenedError("no block was removed: there is nothing to reconstruct")
    return [Bridge(a, b - a + 1, start(a), end(b)) for a, b in spans]


def make_bridges_trainable(model: nn.Module, bridges: Sequence[Bridge]) -> nn.Module:
    """Freeze ``model`` except the bridge blocks (all their weights)."""
    model.requires_grad_(False)
    blocks = get_blocks(model)
    for b in bridges:
        for i in b.blocks:
            blocks[i].requires_grad_(True)
    return model


class _Stop(Exception):
    pass


def capture_teacher(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    inputs_at: set[int], calls_at: set[int]) -> tuple[dict[int, torch.Tensor], dict[int, BlockCall]]:
    """One teacher forward, stopped as early as possible: the hidden states entering the blocks of
    ``inputs_at`` (index ``L`` = the last block's output) and the call arguments of those of ``calls_at``."""
    blocks = get_blocks(teacher)
    n = len(blocks)
    hidden: dict[int, torch.Tensor] = {}
    calls: dict[int, BlockCall] = {}
    last = max(inputs_at | calls_at)
    handles = []

    def pre(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h, call = split_block_call(args, kwargs)
            if i in inputs_at:
                hidden[i] = h.detach()
            if i in calls_at:
                calls[i] = without_cache(call)
            if i == last:
                raise _Stop

        return hook

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        hidden[n] = block_hidden(output).detach()
        raise _Stop

    for i in sorted(inputs_at | calls_at):
        if i < n:
            handles.append(blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True))
    if last == n:
        handles.append(blocks[n - 1].register_forward_hook(post))
    from ..offload import disk_blocks, streamed

    # a teacher with its blocks on disk reads each one as the forward reaches it (none past the stop)
    reading = streamed(teacher, input_ids.shape[0]) if disk_blocks(teacher) is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), reading:
            teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted((inputs_at - hidden.keys()) | (calls_at - calls.keys()))
    if missing:
        raise ShortenedError(f"the teacher's forward did not reach block(s) {missing}")
    return hidden, calls


class TeacherCache:
    """The teacher's hidden states per example (and its block calls per batch shape), up to ``max_bytes``.

    A training example's states do not depend on the other examples of its batch, so a batch whose
    examples were all seen before is assembled from the cache instead of running the teacher. The block
    calls (position embeddings, masks) depend only on the batch's attention mask, and are kept per mask.
    States are kept on the CPU, so a GPU run spends host memory, not device memory, on them.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self.full = False
        self.hits = self.misses = 0
        self._rows: dict[bytes, dict[int, torch.Tensor]] = {}
        self._calls: dict[bytes, dict[int, BlockCall]] = {}

    @staticmethod
    def _row_keys(input_ids: torch.Tensor, mask: torch.Tensor) -> list[bytes]:
        ids, m = input_ids.cpu().numpy(), mask.cpu().numpy()
        return [ids[r].tobytes() + m[r].tobytes() for r in range(ids.shape[0])]

    @staticmethod
    def _call_key(mask: torch.Tensor) -> bytes:
        return str(tuple(mask.shape)).encode() + mask.cpu().numpy().tobytes()

    def get(self, input_ids: torch.Tensor, mask: torch.Tensor,
            device: torch.device) -> tuple[dict[int, torch.Tensor], dict[int, BlockCall]] | None:
        """The batch's states and calls, or None (counted as a miss) unless every example is cached."""
        calls = self._calls.get(self._call_key(mask))
        rows = [self._rows.get(k) for k in self._row_keys(input_ids, mask)]
        if calls is None or any(r is None for r in rows):
            self.misses += 1
            return None
        self.hits += 1
        return {i: torch.stack([r[i] for r in rows]).to(device) for i in rows[0]}, calls

    def put(self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: dict[int, torch.Tensor],
            calls: dict[int, BlockCall]) -> None:
        """Keep the batch's states while they fit in ``max_bytes`` (the first examples seen win)."""
        key = self._call_key(mask)
        if key not in self._calls:
            self._calls[key] = calls  # a few small tensors per batch shape: not counted
        for r, row_key in enumerate(self._row_keys(input_ids, mask)):
            if row_key in self._rows:
                continue
            row = {i: h[r].detach().to("cpu", copy=True) for i, h in hidden.items()}
            size = sum(t.numel() * t.element_size() for t in row.values())
            if self.bytes + size > self.max_bytes:
                self.full = True
                return
            self._rows[row_key] = row
            self.bytes += size

    def stats(self) -> dict[str, Any]:
        return {"examples": len(self._rows), "gb": round(self.bytes / 2**30, 3), "full": self.full,
                "max_gb": round(self.max_bytes / 2**30, 3), "batches_from_cache": self.hits,
                "batches_from_teacher": self.misses}


#: ``token``: mean over tokens of ||error||^2 / ||target||^2; ``total``: the summed squared error over the
#: summed squared target norm (per micro-batch), which weighs large-norm tokens more.
LOSSES = ("token", "total")


#: What a bridge after the first gets as input: ``teacher``: the unpruned model's hidden state (every bridge
#: learns on its own); ``student``: the pruned model's own, the previous bridge's output carried through
#: the kept blocks between them without gradient, as the bridge will see it once healed (a few more block
#: forwards a step).
BRIDGE_INPUTS = ("teacher", "student")


#: ``first_token_weight``: the first position weighs as much as the rest of its text together.
FIRST_TOKEN_REST = "rest"


def check_first_token_weight(weight: float | str) -> None:
    """A one-line error unless ``weight`` is "rest" or a positive number."""
    if weight == FIRST_TOKEN_REST:
        return
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ShortenedError(f"the first token's weight must be '{FIRST_TOKEN_REST}' or a positive number, got {weight!r}")


def check_options(width: int | str, loss: str = "token", inputs: str = "teacher") -> None:
    """Refuse a bridge width below 1 (other than ``auto``), an unknown loss or input (CLI names in the messages)."""
    if width != AUTO_WIDTH and not (isinstance(width, int) and not isinstance(width, bool) and width >= 1):
        raise ShortenedError(f"--bridge-width must be at least 1, or {AUTO_WIDTH}, got {width}")
    if loss not in LOSSES:
        raise ShortenedError(f"--reconstruct-loss must be one of {', '.join(LOSSES)}, got '{loss}'")
    if inputs not in BRIDGE_INPUTS:
        raise ShortenedError(f"--bridge-inputs must be one of {', '.join(BRIDGE_INPUTS)}, got '{inputs}'")


class ReconstructObjective:
    """Relative squared error of every bridge's output against the teacher's hidden state after its gap.

    Runs in one process: the bridges are called directly, past any data-parallel wrapper.
    """

    names = ("recon",)
    weights = (1.0,)

    def __init__(self, teacher: nn.Module, kept: Sequence[int], width: int | str = AUTO_WIDTH, loss: str = "token",
                 cache_bytes: int = 0, inputs: str = "teacher", first_token: bool = True,
                 first_token_weight: float | str = FIRST_TOKEN_REST):
        check_options(width, loss, inputs)
        check_first_token_weight(first_token_weight)
        self.loss = loss
        self.first_token = first_token
        self.first_token_weight = first_token_weight
        self.inputs = inputs
        self.cache = TeacherCache(cache_bytes) if cache_bytes > 0 else None
        self.teacher = teacher.eval().requires_grad_(False)
        self.num_teacher_blocks = len(get_blocks(teacher, get_arch(teacher)))
        self.kept = list(kept)
        #: every bridge of the pruned model: the loss is the mean over all of them, and the teacher's states
        #: are taken for all of them (one forward, cached, serves every bridge when they train one at a time)
        self.all_bridges = find_bridges(self.kept, self.num_teacher_blocks, width)
        #: the bridges trained now (:func:`train_bridges_on_disk` narrows it to one)
        self.bridges = list(self.all_bridges)

    def _mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each token's weight in the loss: the attention mask, with the first position (the attention
        sink, module docstring) left out or weighted by ``first_token_weight``."""
        mask = batch["attention_mask"].to(torch.float32)
        if not self.first_token:
            mask[:, 0] = 0
        elif self.first_token_weight == FIRST_TOKEN_REST:
            mask[:, 0] = mask[:, 0] * mask[:, 1:].sum(1).clamp_min(1)
        else:
            mask[:, 0] = mask[:, 0] * float(self.first_token_weight)
        return mask

    def counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self._mask(batch).sum() * len(self.all_bridges)).float().reshape(1)

    def _between(self) -> list[range]:
        """The student's kept blocks between each bridge and the next."""
        return [range(a.index + a.count, b.index) for a, b in zip(self.bridges, self.bridges[1:])]

    def teacher_states(self, batch: dict[str, torch.Tensor], inputs_at: set[int],
                       calls_at: set[int]) -> tuple[dict[int, torch.Tensor], dict[int, BlockCall]]:
        """:func:`capture_teacher` on the batch, through the cache when there is one."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        cached = self.cache.get(ids, mask, ids.device) if self.cache is not None else None
        if cached is not None:
            return cached
        hidden, calls = capture_teacher(self.teacher, ids, mask, inputs_at, calls_at)
        if self.cache is not None:
            self.cache.put(ids, mask, hidden, calls)
        return hidden, calls

    def sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        student = getattr(model, "module", model)  # past a DDP wrapper: see the class docstring
        blocks = get_blocks(student)
        starts = {b.start for b in self.all_bridges}
        ends = {b.end for b in self.all_bridges}
        between = self._between() if self.inputs == "student" else []
        hidden, calls = self.teacher_states(batch, starts | ends, {self.kept[i] for b in self.all_bridges for i in b.blocks}
                                            | {self.kept[i] for run in between for i in run})
        mask = self._mask(batch)
        total = torch.zeros((), dtype=torch.float32, device=mask.device)
        previous = None
        for n, b in enumerate(self.bridges):
            out = hidden[b.start]
            if previous is not None:  # "student" inputs: the previous bridge's output, through the kept blocks
                with torch.no_grad():
                    out = previous.detach()
                    for i in between[n - 1]:
                        out = call_block(blocks[i], calls[self.kept[i]], out, out.shape[0])
            for i in b.blocks:
                out = call_block(blocks[i], calls[self.kept[i]], out, out.shape[0])
            if self.inputs == "student":
                previous = out
            target = hidden[b.end].float()
            sq_err, sq_norm = (out.float() - target).pow(2).sum(-1), target.pow(2).sum(-1)
            if self.loss == "token":
                total = total + (sq_err / sq_norm.clamp_min(1e-12) * mask).sum()
            else:  # "total": sums / counts = sum ||error||^2 / sum ||target||^2 over the micro-batch
                scale = (sq_norm * mask).sum() / mask.sum().clamp_min(1)
                total = total + (sq_err * mask).sum() / scale.clamp_min(1e-12)
        return total.reshape(1)


def train_bridges_on_disk(model: nn.Module, objective: ReconstructObjective,
                          train_one: Callable[[nn.Module, ReconstructObjective, str], Any],
                          folder: str | os.PathLike) -> tuple[Any, list[dict[str, Any]]]:
    """Train the bridges of a model whose blocks are on disk (``--offload disk``) one after another, each with
    only its own blocks (and their optimizer state) in memory.

    With the teacher's hidden states as inputs every bridge's term of the loss (the mean over all bridges)
    depends on its own blocks only, so training the terms one after another computes the joint run's
    gradients; what differs is that gradient clipping and the best step are per bridge. ``train_one(model,
    objective, name)`` runs the loop on ``objective`` (one bridge) and returns its TrainResult; each bridge's
    best weights go to a safetensors file in ``folder``, from which the model's store reads those blocks from
    then on (so the save, block by block, writes them). Returns the runs combined (per step, the sum of the
    terms: the joint objective's value) and a summary per bridge (its loss as its own mean).
    """
    from safetensors.torch import save_file

    from ..offload import disk_blocks, loaded_device
    from .loop import TrainResult, load_trainable_state

    if objective.inputs != "teacher":
        raise ShortenedError("with the blocks on disk the bridges learn from the teacher's states "
                             "(--bridge-inputs teacher): the student's own would run its blocks in between")
    store = disk_blocks(model)
    blocks = get_blocks(model, get_arch(model))
    device = loaded_device(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bridges, runs, summary = objective.all_bridges, [], []
    model.requires_grad_(False)
    try:
        for n, bridge in enumerate(bridges):
            for i in bridge.blocks:
                store.fetch(blocks[i], i, device)
                blocks[i].requires_grad_(True)
            objective.bridges = [bridge]
            run = train_one(model, objective, f"bridge-{n}")
            if run.best_state is not None and run.best_step != run.step:
                load_trainable_state(model, run.best_state)
            path = folder / f"bridge-{n}.safetensors"
            tensors = {f"{store.prefix}.{i}.{name}": t.detach().cpu().contiguous()
                       for i in bridge.blocks for name, t in blocks[i].state_dict().items()}
            save_file(tensors, str(path))
            store.names.update({name: (path, name) for name in tensors})
            for i in bridge.blocks:
                blocks[i].requires_grad_(False)
                store.release(blocks[i], i)
            runs.append(run)
            own = None if run.best_val_loss is None else run.best_val_loss * len(bridges)
            summary.append({**bridge.to_dict(objective.kept), "best_step": run.best_step, "best_val_loss": own,
                            "steps_done": run.step})
    finally:
        objective.bridges = list(bridges)
    combined = TrainResult(step=min(r.step for r in runs), seconds=sum(r.seconds for r in runs),
                           stopped_early=any(r.stopped_early for r in runs))
    combined.train_log = _summed_logs([r.train_log for r in runs])
    combined.val_log = _summed_logs([r.val_log for r in runs])
    bests = [r.best_val_loss for r in runs]
    combined.best_val_loss = sum(bests) if all(b is not None for b in bests) else None
    combined.best_step = max((r.best_step or 0) for r in runs)  # the latest step any bridge keeps
    return combined, summary


def _summed_logs(logs: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per step present in every log, each number summed (the joint loss from its terms), but the learning
    rate, which is the same in every log."""
    steps = set.intersection(*({e["step"] for e in log} for log in logs)) if logs else set()
    out = []
    for step in sorted(steps):
        entries = [next(e for e in log if e["step"] == step) for log in logs]
        merged: dict[str, Any] = {"step": step}
        for key in entries[0]:
            if key == "step" or not all(isinstance(e.get(key), (int, float)) for e in entries):
                continue
            values = [e[key] for e in entries]
            merged[key] = values[0] if key == "lr" else sum(values)
        out.append(merged)
    return out


def _data_repeats(ctx: HealContext) -> bool:
    """Whether the run sees an example more than once (only then is the teacher cache worth its memory)."""
    s = ctx.settings
    if s.passes is not None:
        return s.passes > 1
    if s.steps is None:
        return s.epochs > 1
    return s.steps * s.batch_size * s.grad_accum > len(ctx.data.train)


def _prepare(ctx: HealContext) -> Prepared:
    from ..offload import disk_blocks

    s = ctx.settings
    # bridges trained one after another (blocks on disk) see every example once per bridge
    cache_gb = s.teacher_cache_gb if _data_repeats(ctx) or disk_blocks(ctx.model) is not None else 0.0
    objective = ReconstructObjective(ctx.teacher, ctx.kept, s.bridge_width, s.reconstruct_loss,
                                     cache_bytes=int(cache_gb * 2**30), inputs=s.bridge_inputs,
                                     first_token=s.reconstruct_first_token,
                                     first_token_weight=s.reconstruct_first_token_weight)
    extra: dict[str, Any] = {"trained_bridges": [b.to_dict(objective.kept) for b in objective.bridges]}
    if objective.cache is not None:
        extra["teacher_cache"] = objective.cache.stats  # read after training
    return Prepared(make_bridges_trainable(ctx.model, objective.bridges), objective, "bridges", extra=extra)


METHOD = HealMethod(
    name="reconstruct",
    summary="block-local: the kept blocks around each removed run learn the unpruned model's hidden state "
            "after it (fastest per token)",
    prepare=_prepare,
    # its best measured run (benchmarks/results/healing.md): many short steps
    defaults={"lr": 3e-3, "batch_size": 8, "grad_accum": 1, "seq_len": 128, "warmup_steps": 10},
    needs_teacher=True,
    needs_kept=True,
    one_process=True,
    on_disk=True,
    check=lambda settings: check_options(settings.bridge_width, settings.reconstruct_loss, settings.bridge_inputs),
)
