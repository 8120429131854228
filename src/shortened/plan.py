"""``shortened plan``: the memory and time each stage of a run will need, from the model's config alone.

The estimates are a cost model, not a measurement: a model is built on the meta device from its config (no
weight is read) to count its parameters, and each stage's peak memory and time are summed from what the
stage holds and computes: weights in the compute dtype, the calibration activations the scoring engine
caches, a shard being written, a teacher, the optimizer state of what is trained; FLOPs over the machine's
matrix-multiply rate (measured on the spot, or given), bytes over its disk rate. The constants that are not
physics (the process's own footprint, how much of the GEMM rate a stage sustains) were fitted on this
project's measurements (BENCHMARKS.md, "Scale"), and ``tests/test_plan.py`` checks every estimate against
those measurements (within 25%).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .engine.workers import DEFAULT_BATCH_TOKENS
from .errors import ShortenedError
from .offload import SHARD_BYTES

#: The stages ``--offload disk`` streams (the rest hold the whole model).
OFFLOADED_STAGES = ("score", "prune", "eval perplexity", "heal reconstruct")

GIB = 2**30
#: Resident memory of a shortened process besides what the cost model counts: Python, torch, transformers,
#: the tokenizer, allocator slack.
BASE_BYTES = 0.7 * GIB
#: The same for a process that computes nothing (prune with the blocks chosen): no calibration text, no engine.
IDLE_BASE_BYTES = 0.45 * GIB
#: Seconds a command spends before its work: imports and argument checks.
STARTUP_S = 2.5
#: Share of the GEMM rate the scoring engine's capture pass sustains (blocks read from disk and converted one at
#: a time, hooks, norms and activations in float32); the replayed streams and the head run at the full rate.
CAPTURE_EFFICIENCY = 0.55
#: Share of the GEMM rate perplexity batches (8 x 128 tokens, eager attention, float32 log-softmax) sustain.
EVAL_EFFICIENCY = 0.75
#: Share of the GEMM rate healing sustains on the FLOPs counted below (fitted: the count is an upper bound).
TRAIN_EFFICIENCY = 1.2
#: Bytes/s at which safetensors are serialized in memory before they are written.
SERIALIZE_BYTES_S = 1.0e9
#: Seconds a save spends besides the weights: tokenizer, config, the checks of the written files.
SAVE_OVERHEAD_S = 3.0
#: Share of the memory a write may leave dirty in the page cache before it waits for the disk (Linux's
#: default ``vm.dirty_ratio``).
DIRTY_SHARE = 0.2
#: Bytes/s at which ``from_pretrained`` converts a bf16 checkpoint to float32 weights.
CONVERT_BYTES_S = 0.8e9
#: Bytes/s (float32 out) at which blocks on disk are read from the page cache and converted, a block at a time.
STREAM_CONVERT_BYTES_S = 1.4e9


@dataclass(frozen=True)
class Shape:
    """What the cost model needs of a model, counted on the meta device from its config."""

    params: int          # every parameter once (a tied head counted with the embedding)
    block_params: int    # all blocks together
    num_blocks: int
    head_params: int     # the output matrix, tied or not: every scored or evaluated token goes through it
    hidden: int
    intermediate: int    # the MLP's width (4 x hidden where the config does not say)
    vocab: int
    checkpoint_bytes: int  # per parameter as stored (the config's dtype; 4 when it does not say)
    tied: bool = False     # the head is the embedding

    @property
    def table_params(self) -> int:
        """The input embedding's parameters (vocabulary x hidden)."""
        return self.vocab * self.hidden

    @property
    def untied_head_params(self) -> int:
        return 0 if self.tied else self.head_params

    @property
    def other_params(self) -> int:
        """Parameters outside the blocks (embedding, untied head, final norm)."""
        return self.params - self.block_params

    def kept_params(self, remove: int) -> int:
        return self.params - remove * self.block_params // self.num_blocks

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        from .archs import get_arch, get_blocks, get_submodule
        from .loading import meta_model

        model = meta_model(config)
        spec = get_arch(model)
        blocks = get_blocks(model, spec)
        head = get_submodule(model, spec.head[-1])
        text = getattr(config, "text_config", None) or config
        stored = getattr(text, "dtype", None) or getattr(config, "dtype", None)
        if isinstance(stored, str):
            stored = getattr(torch, stored, None)
        embedding = model.get_input_embeddings()
        tied = head is not None and embedding is not None and getattr(head, "weight", None) is embedding.weight
        return cls(params=sum(p.numel() for p in model.parameters()),
                   block_params=sum(p.numel() for b in blocks for p in b.parameters()),
                   num_blocks=len(blocks),
                   head_params=sum(p.numel() for p in head.parameters() if p.dim() >= 2) if head is not None else 0,
                   hidden=int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0)),
                   intermediate=int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 0)
                   or 4 * int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0)),
                   vocab=int(getattr(text, "vocab_size", 0)),
                   checkpoint_bytes=stored.itemsize if isinstance(stored, torch.dtype) else 4, tied=tied)


@dataclass(frozen=True)
class Machine:
    """The rates and memory the estimates are made for."""

    device: str
    gemm_flops: float      # float32 (CPU) or bfloat16 (CUDA) matrix-multiply FLOP/s
    read_bytes_s: float    # sequential disk read
    write_bytes_s: float   # sequential disk write
    memory_bytes: float | None  # RAM (CPU) or the GPU's memory (CUDA)
    memory_bytes_s: float = 10e9  # memory bandwidth: decoding one token reads every weight once

    def write_seconds(self, written: float) -> float:
        """Seconds a save waits for the disk: the page cache takes writes up to the kernel's dirty limit
        (:data:`DIRTY_SHARE` of the memory) at memory speed, the rest goes at the disk's rate."""
        room = DIRTY_SHARE * (self.memory_bytes or 0) if self.device == "cpu" else 0.0
        return max(0.0, written - room) / self.write_bytes_s

    @classmethod
    def measure(cls, device: str = "cpu", *, read_mbps: float | None = None, write_mbps: float | None = None,
                gemm_gflops: float | None = None) -> Machine:
        """This machine: a short matrix multiply for the GEMM rate (unless given); disk rates as given, else a
        typical NVMe's (2 GB/s read, 1 GB/s write)."""
        if device not in ("cpu", "cuda"):
            raise ShortenedError(f"--device must be cpu or cuda, got '{device}'")
        if device == "cuda" and not torch.cuda.is_available():
            memory = None
        elif device == "cuda":
            memory = torch.cuda.get_device_properties(0).total_memory
        else:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        rate = gemm_gflops * 1e9 if gemm_gflops else _gemm_rate(device)
        return cls(device=device, gemm_flops=rate, read_bytes_s=(read_mbps or 2000) * 2**20,
                   write_bytes_s=(write_mbps or 1000) * 2**20, memory_bytes=memory,
                   memory_bytes_s=_memory_rate(device))


def _memory_rate(device: str, n: int = 64 * 2**20) -> float:
    """Bytes/s of a large copy (read and write counted), best of three; 2 TB/s for a CUDA device not present."""
    if device == "cuda" and not torch.cuda.is_available():
        return 2e12
    a = torch.empty(n // 4, dtype=torch.float32, device=device).fill_(1.0)
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a.clone()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n / best


def _gemm_rate(device: str, n: int = 1024, repeats: int = 5) -> float:
    if device == "cuda" and not torch.cuda.is_available():
        return 400e12  # an H100's bf16 dense rate, for planning a GPU run from a machine without one
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


@dataclass(frozen=True)
class Request:
    """The stages of a run to plan and their settings (the CLI's names and defaults)."""

    criterion: str = "bi"
    n_samples: int = 10
    seq_len: int = 128
    remove: int = 1
    offload: str | None = None         # None, "cpu" or "disk" (score and prune; "disk": perplexity too)
    heal: str | None = "reconstruct"
    heal_steps: int = 30
    heal_batch: int = 4
    heal_seq_len: int = 128
    heal_examples: int | None = None   # examples read (validation is 5% of them)
    # reconstruct with --offload disk: the bridges and the blocks the largest trains, when the removed blocks are
    # known (find_bridges); None: the worst case, a bridge of two blocks for every removed block
    heal_bridges: int | None = None
    heal_bridge_blocks: int | None = None
    eval_chunks: int = 256             # perplexity chunks of eval_seq_len tokens
    eval_seq_len: int = 128
    eval_batch: int = 8
    bench_batch: int = 8
    bench_tokens: int = 128
    dtype: str = "auto"


@dataclass
class Estimate:
    stage: str
    memory_bytes: float
    seconds: float
    flops: float = 0.0
    read_bytes: float = 0.0
    written_bytes: float = 0.0
    fits: bool = True
    advice: str = ""
    parts: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_bytes(request: Request, machine: Machine) -> int:
    if request.dtype == "auto":
        return 2 if machine.device == "cuda" else 4
    from .loading import resolve_dtype

    return resolve_dtype(request.dtype).itemsize


def criterion_flops(shape: Shape, criterion: str, tokens: int) -> tuple[float, float]:
    """(block FLOPs, head FLOPs) a criterion spends on ``tokens`` calibration tokens, by its registered cost."""
    from .criteria import get_criterion

    cost = get_criterion(criterion).cost
    pass_ = 2.0 * shape.block_params * tokens  # one forward through every block
    L = shape.num_blocks
    if cost == "weights":
        return 0.0, 0.0
    if cost == "forward":
        return pass_, 0.0
    if cost == "each_removal":  # capture pass, then block i's input through the later blocks and the head
        return pass_ + pass_ * (L - 1) / 2, 2.0 * shape.head_params * tokens * L
    if cost == "gradient":  # forward and backward through everything
        return 3 * pass_, 3 * 2.0 * shape.head_params * tokens
    raise ShortenedError(f"plan has no cost model for --criterion {criterion}: its cost is set by its own "
                         "options (the search's generations); plan a run with the criterion it starts from")


def visited_block_bytes(shape: Shape, c: int) -> float:
    """A block read from disk for its visit: its weights in ``c``, and one tensor (at most an MLP matrix) as
    stored while it is converted."""
    return shape.block_params / shape.num_blocks * c + shape.hidden * shape.intermediate * shape.checkpoint_bytes


def disk_rest_bytes(shape: Shape, c: int, *, head: bool) -> float:
    """What a model with its blocks on disk holds (:mod:`shortened.offload`): the embedding and (when the loss
    is read) an untied head in the narrower of the checkpoint's and the compute dtype, the rest in ``c``."""
    table = min(shape.checkpoint_bytes, c)
    small = shape.other_params - shape.table_params - shape.untied_head_params
    return shape.table_params * table + (shape.untied_head_params * table if head else 0) + small * c


def _heal_on_disk(shape: Shape, machine: Machine, request: Request, c: int, kept: float) -> Estimate:
    """``heal --method reconstruct --offload disk``: the teacher's blocks read for each of its forwards (one
    per batch of examples, cached for every bridge), the bridges trained one after another, the save block by
    block (heal.reconstruct.train_bridges_on_disk)."""
    s = shape.checkpoint_bytes
    per_block = shape.block_params / shape.num_blocks
    bridge = (request.heal_bridge_blocks or 2) * per_block  # --bridge-width 2 (auto for runs of up to four)
    bridges = request.heal_bridges or max(1, request.remove)  # scattered removals: a bridge each
    train_tokens = request.heal_steps * request.heal_batch * request.heal_seq_len
    val = max(1, round(0.05 * (request.heal_examples or 1000)))
    forwards = request.heal_steps + -(-val // request.heal_batch)  # teacher batches: training, one validation
    teacher_tokens = train_tokens + val * request.heal_seq_len
    flops = 2.0 * shape.block_params * teacher_tokens + bridges * (
        3 * 2.0 * bridge * train_tokens + 2.0 * bridge * val * request.heal_seq_len * (min(request.heal_steps, 10) + 1))
    weights = disk_rest_bytes(shape, c, head=False) + visited_block_bytes(shape, c) + bridge * (c + 12)
    written = kept * s
    read = forwards * shape.block_params * s + kept * s
    # the first read is cold; later forwards find the blocks in the page cache and only convert them
    seconds = (STARTUP_S + kept * s / machine.read_bytes_s + forwards * shape.block_params * c / STREAM_CONVERT_BYTES_S
               + flops / (machine.gemm_flops * TRAIN_EFFICIENCY) + written / SERIALIZE_BYTES_S
               + machine.write_seconds(written))
    return Estimate("heal reconstruct", BASE_BYTES + weights, seconds, flops, read, written,
                    parts={"teacher (blocks on disk)": disk_rest_bytes(shape, c, head=False) + visited_block_bytes(shape, c),
                           "a bridge trained": bridge * (c + 12)})


def plan(shape: Shape, machine: Machine, request: Request) -> list[Estimate]:
    """Peak memory and time of score, prune, heal, eval and bench for ``request`` on ``machine``."""
    c = compute_bytes(request, machine)
    s = shape.checkpoint_bytes
    per_block = shape.block_params / shape.num_blocks
    kept = shape.kept_params(request.remove)
    rate = machine.gemm_flops
    converts = c != s  # from_pretrained holds the checkpoint's tensors while it converts them

    def load_s(params: float) -> float:
        return params * s / machine.read_bytes_s + (params * c / CONVERT_BYTES_S if converts else 0.0)

    out: list[Estimate] = []

    # score: the capture pass (one forward through every block), then what the criterion replays
    tokens = request.n_samples * request.seq_len
    block_f, head_f = criterion_flops(shape, request.criterion, tokens)
    capture_f = min(block_f, 2.0 * shape.block_params * tokens)
    activations = (shape.num_blocks + 2) * tokens * shape.hidden * c  # every block's input is cached
    streams = shape.num_blocks if head_f else 1  # the removals' streams go through a block together
    activations += min(DEFAULT_BATCH_TOKENS, tokens * streams) * shape.intermediate * c * 2  # one block call
    # (the head's loss runs in small token x vocabulary slices: nothing to count)
    # converted one tensor at a time: the largest (the embedding) is briefly held twice
    transient = shape.table_params * s if converts else 0
    if request.offload == "disk":  # plus the block being run, read in the checkpoint's dtype and converted
        weights = disk_rest_bytes(shape, c, head=bool(head_f)) + visited_block_bytes(shape, c)
    else:
        weights = shape.params * c + transient
    read = shape.params * s
    seconds = (STARTUP_S + read / machine.read_bytes_s + capture_f / (rate * CAPTURE_EFFICIENCY)
               + (block_f - capture_f + head_f) / rate)
    out.append(Estimate("score", BASE_BYTES + weights + activations, seconds, block_f + head_f, read,
                        parts={"weights": weights, "activations": activations}))

    # prune (blocks chosen: nothing is computed; loaded and saved in the checkpoint's dtype)
    written = kept * s
    if request.offload == "disk":  # no table loaded: a block read while a shard is pending
        weights = per_block * s + min(SHARD_BYTES, written)
    else:
        weights = shape.params * s
    out.append(Estimate("prune", IDLE_BASE_BYTES + weights, STARTUP_S + read / machine.read_bytes_s + SAVE_OVERHEAD_S
                        + written / SERIALIZE_BYTES_S + machine.write_seconds(written), 0.0, read, written,
                        parts={"weights": weights}))

    # heal: the pruned model and (methods that learn from it) the dense teacher, trained, saved, reloaded to
    # verify the saved folder
    if request.heal == "reconstruct" and request.offload == "disk":
        out.append(_heal_on_disk(shape, machine, request, c, kept))
    elif request.heal:
        train_tokens = request.heal_steps * request.heal_batch * request.heal_seq_len
        val = max(1, round(0.05 * (request.heal_examples or 1000)))
        val_tokens = val * request.heal_seq_len * (min(request.heal_steps, 10) + 1)  # before, then ~10 times
        needs_teacher = request.heal in ("reconstruct", "distill", "linear")
        teacher = shape.params * c if needs_teacher else 0
        # grads and two Adam moments of what is trained (LoRA's adapters: next to nothing)
        trained = {"reconstruct": per_block, "lora": 0}.get(request.heal, kept) * 4 * 3
        transient = (shape.params if needs_teacher else kept) * s if converts else 0
        memory = 2 * kept * c + teacher + trained + transient
        flops = (2.0 * (shape.params if needs_teacher else 0) + 3 * 2.0 * kept) * train_tokens \
            + 2.0 * (shape.params + kept) * val_tokens
        seconds = (STARTUP_S + load_s(kept) + (load_s(shape.params) if needs_teacher else 0)
                   + flops / (rate * TRAIN_EFFICIENCY) + written / SERIALIZE_BYTES_S
                   + machine.write_seconds(written) + load_s(kept))
        out.append(Estimate(f"heal {request.heal}", BASE_BYTES + memory, seconds, flops,
                            kept * s + (shape.params * s if needs_teacher else 0), written,
                            parts={"model and its reload": 2 * kept * c, "teacher": teacher, "trained": trained}))

    # eval (perplexity)
    eval_tokens = request.eval_chunks * request.eval_seq_len
    flops = 2.0 * (kept - shape.other_params + shape.head_params) * eval_tokens
    if request.offload == "disk":  # the blocks streamed, each read once per pass over many chunks
        from .evaluation.perplexity import PASS_BYTES, POSITIONS_PER_SLICE

        passes = -(-(3 * eval_tokens * shape.hidden * 4) // PASS_BYTES)
        hidden = min(PASS_BYTES, 3 * eval_tokens * shape.hidden * 4)
        batch = request.eval_batch * request.eval_seq_len * shape.intermediate * c * 2  # one block call
        # one slice of one chunk's logits, float32 and float64
        logits = min(POSITIONS_PER_SLICE, request.eval_seq_len) * shape.vocab * (4 + 8)
        weights = disk_rest_bytes(shape, c, head=True) + visited_block_bytes(shape, c)
        memory = weights + hidden + batch + logits
        read = passes * (kept - shape.other_params) * s + (shape.other_params * s)
        seconds = STARTUP_S + read / machine.read_bytes_s + (kept - shape.other_params) * passes * c / STREAM_CONVERT_BYTES_S \
            + flops / (rate * EVAL_EFFICIENCY)
        parts = {"weights": weights, "hidden states": hidden, "block call": batch, "logits": logits}
    else:
        logits = request.eval_batch * request.eval_seq_len * shape.vocab * 4
        memory = kept * c + (kept * s if converts else 0) + logits
        read = kept * s
        seconds = STARTUP_S + load_s(kept) + flops / (rate * EVAL_EFFICIENCY)
        parts = {"weights": kept * c, "logits": logits}
    out.append(Estimate("eval perplexity", BASE_BYTES + memory, seconds, flops, read, parts=parts))

    # bench: the models one after the other (the larger one is the peak); decoding reads every weight per step
    steps = 2 * (1 + request.bench_tokens)  # a warm-up and a timed run, each a prefill and the new tokens
    decode = sum(p * c * steps / machine.memory_bytes_s for p in (shape.params, kept))
    out.append(Estimate("bench", BASE_BYTES + shape.params * (c + (s if converts else 0)), 2 * STARTUP_S + load_s(shape.params) + load_s(kept)
                        + decode, 2.0 * (shape.params + kept) * request.bench_batch * request.bench_tokens,
                        (shape.params + kept) * s, parts={"weights": shape.params * c}))

    for e in out:
        e.fits = machine.memory_bytes is None or e.memory_bytes <= 0.9 * machine.memory_bytes
    if not all(e.fits for e in out) and (request.offload != "disk" or compute_bytes(request, machine) == 4):
        _advise(out, shape, machine, request)
    return out


def _advise(out: list[Estimate], shape: Shape, machine: Machine, request: Request) -> None:
    """For each stage that does not fit: the options that make it fit, found by planning with them."""
    import dataclasses

    options = []
    if request.offload != "disk":
        options.append(("--offload disk", dataclasses.replace(request, offload="disk")))
    if compute_bytes(request, machine) == 4:
        options.append(("--dtype bfloat16", dataclasses.replace(request, dtype="bfloat16")))
        if request.offload != "disk":
            options.append(("--offload disk --dtype bfloat16",
                            dataclasses.replace(request, offload="disk", dtype="bfloat16")))
    alternatives = [(flags, {e.stage: e for e in plan(shape, machine, alt)}) for flags, alt in options]
    for e in out:
        if e.fits:
            continue
        fitting = [f"{flags} ({alt[e.stage].memory_bytes / GIB:.1f} GiB)" for flags, alt in alternatives
                   if alt[e.stage].fits and (e.stage in OFFLOADED_STAGES or "--offload" not in flags)]
        e.advice = ("fits with " + fitting[0]) if fitting else \
            f"needs a machine with {e.memory_bytes / 0.9 / GIB:.0f} GiB (or GPUs: --device-map auto)"


#: Set (to anything) to run a stage that :func:`check_memory` would refuse.
NO_CHECK_ENV = "SHORTENED_NO_MEMORY_CHECK"


def check_memory(stage: str, config: Any, request: Request, device: str | None = None, *,
                 memory_bytes: float | None = None) -> None:
    """Refuse, before any weight is read, a stage whose planned peak memory is more than the machine has (the
    RAM, or the GPU's memory): one line with what it needs and the option that makes it fit. Nothing is
    checked without a local config (a Hub id), for a model the cost model cannot build, or with
    ``$SHORTENED_NO_MEMORY_CHECK`` set. ``memory_bytes``: the memory to check against (default: the device's)."""
    if config is None or os.environ.get(NO_CHECK_ENV):
        return
    kind = "cuda" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    if memory_bytes is not None:
        memory = memory_bytes
    elif kind == "cuda":
        if not torch.cuda.is_available():
            return
        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        shape = Shape.from_config(config)
    except Exception:  # the check is advice: a model the cost model cannot count is loaded as before
        return
    # the rates play no part in memory: nominal ones, so no matrix multiply is timed here
    machine = Machine(kind, gemm_flops=1e11, read_bytes_s=2e9, write_bytes_s=1e9, memory_bytes=memory)
    estimate = next(e for e in plan(shape, machine, request) if e.stage == stage)
    if estimate.memory_bytes <= memory:
        return
    advice = estimate.advice.replace("fits with", "it fits with") if estimate.advice.startswith("fits") else \
        "use a larger machine or GPUs (--device-map auto)"
    raise ShortenedError(f"{stage} of this {shape.params / 1e9:.1f}B-parameter model needs about "
                         f"{estimate.memory_bytes / GIB:.0f} GiB and this {kind} has {memory / GIB:.0f} GiB: {advice} "
                         f"(see 'shortened plan'; {NO_CHECK_ENV}=1 tries anyway)")


def format_plan(estimates: list[Estimate], shape: Shape, machine: Machine) -> str:
    lines = [f"{shape.params / 1e9:.2f}B parameters, {shape.num_blocks} blocks; {machine.device}: "
             f"{machine.gemm_flops / 1e9:.0f} GFLOP/s GEMM, disk {machine.read_bytes_s / 2**20:.0f} / "
             f"{machine.write_bytes_s / 2**20:.0f} MiB/s read / write"
             + (f", {machine.memory_bytes / GIB:.0f} GiB memory" if machine.memory_bytes else ""), "",
             "| stage | memory GiB | time | fits | |", "|---|---:|---:|---|---|"]
    for e in estimates:
        lines.append(f"| {e.stage} | {e.memory_bytes / GIB:.1f} | {_duration(e.seconds)} | "
                     f"{'yes' if e.fits else 'no'} | {e.advice} |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
