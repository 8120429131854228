"""Generation speed and memory, measured honestly: warm-up runs discarded, the device synchronised around
every timed region, repeats summarised by median and spread, and each model measured in its own process
so that peak memory is that model's alone.

Prefill is timed as ``generate(max_new_tokens=1)`` (prompt forward + first token); decode is the rest of a
full ``generate`` with ``min_new_tokens == max_new_tokens`` (output length forced).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .archs import get_arch, get_blocks, get_submodule


@dataclass
class Timing:
    median: float
    min: float
    max: float
    runs: list[float] = field(default_factory=list)


def summarize(values: Sequence[float]) -> Timing:
    return Timing(median=statistics.median(values), min=min(values), max=max(values), runs=list(values))


@dataclass
class BenchPoint:
    """One (batch size, output length) measurement of one model."""

    batch_size: int
    prompt_len: int
    output_len: int
    latency_s: Timing            # full generation, prompt to last token
    prefill_s: Timing            # prompt forward + first token
    decode_s: float              # median latency - median prefill
    throughput_tok_s: float      # generated tokens / median latency
    decode_tok_s: float          # tokens after the first / decode time
    peak_memory_mb: float        # CUDA peak allocated, or process peak RSS on CPU
    memory_kind: str


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakRSS:
    """Peak resident set size of this process over a ``with`` block (CPU has no allocator peak counter).

    On Linux the kernel's high-water mark (``VmHWM``) is reset on entry (``/proc/self/clear_refs``) and read
    on exit: exact, and nothing runs beside the timed code. Elsewhere a thread samples the RSS; it competes
    with the timed code for the interpreter and the cores, which is why it is only the fallback.
    """

    _STATUS = "/proc/self/status"
    _CLEAR = "/proc/self/clear_refs"

    def __init__(self, interval: float = 0.002):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = self._reset_high_water_mark()

    def _reset_high_water_mark(self) -> bool:
        try:
            with open(self._CLEAR, "w") as f:
                f.write("5")
            return self._high_water_mark() is not None
        except OSError:
            return False

    def _high_water_mark(self) -> int | None:
        try:
            with open(self._STATUS) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> "_PeakRSS":
        if not self._kernel:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        hwm = self._high_water_mark() if self._kernel else None
        self.peak = max(self.peak, self._proc.memory_info().rss, hwm or 0)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def bench_model(
    model: nn.Module,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    output_lens: Sequence[int] = (128, 512),
    prompt_len: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[BenchPoint]:
    """Measure greedy generation of ``model`` for every batch size and output length."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    # A fixed random prompt avoids tokenizer differences and early EOS (output length is forced anyway).
    prompt = torch.randint(10, vocab, (max(batch_sizes), prompt_len), generator=g).to(device)
    points = []
    for bs in batch_sizes:
        ids = prompt[:bs]
        mask = torch.ones_like(ids)
        for out_len in output_lens:
            if progress:
                progress(f"batch {bs}, {out_len} tokens")

            def gen(n: int) -> None:
                with torch.inference_mode():
                    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, use_cache=True, pad_token_id=model.config.eos_token_id)

            for _ in range(warmup):
                gen(1)
                gen(out_len)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            prefill, total = [], []
            with _PeakRSS() as rss:
                for _ in range(repeats):  # interleaved, so slow drifts of the machine hit both alike
                    prefill.append(_timed(lambda: gen(1), device))
                    total.append(_timed(lambda: gen(out_len), device))
            if device.type == "cuda":
                peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
            else:
                peak, kind = rss.peak / 2**20, "process_peak_rss"
            lat, pre = summarize(total), summarize(prefill)
            decode = max(lat.median - pre.median, 1e-9)
            points.append(BenchPoint(
                batch_size=bs, prompt_len=prompt_len, output_len=out_len, latency_s=lat, prefill_s=pre,
                decode_s=decode, throughput_tok_s=bs * out_len / lat.median,
                decode_tok_s=bs * (out_len - 1) / decode, peak_memory_mb=peak, memory_kind=kind,
            ))
    return points


def flops_per_token(model: nn.Module, context_len: int) -> float:
    """Forward FLOPs for one token at a given context length: 2 per weight of every matrix in the blocks
    and the output head, plus the attention scores and weighted sum over the context. Embedding lookups
    and norms are counted as free."""
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    matmul_weights = sum(p.numel() for b in blocks for p in b.parameters() if p.dim() >= 2)
    head = get_submodule(model, spec.head[-1])
    head_weights = sum(p.numel() for p in head.parameters() if p.dim() >= 2) if head is not None else 0
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    attention = 2 * 2 * heads * head_dim * context_len * len(blocks)
    return 2.0 * (matmul_weights + head_weights) + attention


def compare(pruned: list[BenchPoint], baseline: list[BenchPoint]) -> list[dict[str, float]]:
    """Pruned over baseline ratios for each point measured on both."""
    base = {(p.batch_size, p.output_len): p for p in baseline}
    rows = []
    for p in pruned:
        b = base.get((p.batch_size, p.output_len))
        if b is None:
            continue
        rows.append({
            "batch_size": p.batch_size, "output_len": p.output_len,
            "throughput_ratio": p.throughput_tok_s / b.throughput_tok_s,
            "latency_ratio": p.latency_s.median / b.latency_s.median,
            "decode_speedup": b.decode_s / p.decode_s,
            "prefill_speedup": b.prefill_s.median / p.prefill_s.median,
            "memory_ratio": p.peak_memory_mb / b.peak_memory_mb,
        })
    return rows


def points_to_dicts(points: list[BenchPoint]) -> list[dict[str, Any]]:
    return [asdict(p) for p in points]


def _bench_child(spec: str, load_kwargs: dict[str, Any], bench_kwargs: dict[str, Any],
                 threads: int | None = None) -> dict[str, Any]:
    """Load one model and measure it (runs in a fresh process, so memory figures are its own)."""
    from .loading import load_model

    if threads:
        torch.set_num_threads(threads)
    model, _ = load_model(spec, **load_kwargs)
    context = bench_kwargs.get("prompt_len", 32) + max(bench_kwargs.get("output_lens", (128,))) / 2
    points = bench_model(model, **bench_kwargs)
    return {
        "model": spec,
        "num_blocks": len(get_blocks(model)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token(model, int(context)),
        "flops_context_len": int(context),
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(),
        "points": points_to_dicts(points),
    }


def run_benchmark(
    model: str,
    baseline: str | None = None,
    *,
    load_kwargs: dict[str, Any] | None = None,
    isolate: bool = True,
    threads: int | None = None,
    **bench_kwargs: Any,
) -> dict[str, Any]:
    """Benchmark ``model`` (and ``baseline``, each in its own process when ``isolate``) and compare them.

    The result holds every raw measurement, the pruned/baseline ratios and the FLOP-ratio bound:
    the speed-up that per-token compute alone predicts (baseline FLOPs / pruned FLOPs). ``threads`` sets
    torch's CPU threads in each measuring process (default: torch's choice).
    """
    load_kwargs = load_kwargs or {}
    specs = {"model": model} | ({"baseline": baseline} if baseline else {})
    results: dict[str, Any] = {}
    for role, spec in specs.items():
        if isolate:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(1) as pool:
                results[role] = pool.apply(_bench_child, (spec, load_kwargs, bench_kwargs, threads))
        else:
            results[role] = _bench_child(spec, load_kwargs, bench_kwargs, threads)
    out: dict[str, Any] = {"settings": dict(bench_kwargs, isolate=isolate, threads=threads, **load_kwargs),
                           "models": results}
    if baseline:
        pruned_pts = [BenchPoint(**_points_from_dict(d)) for d in results["model"]["points"]]
        base_pts = [BenchPoint(**_points_from_dict(d)) for d in results["baseline"]["points"]]
        ratio = results["model"]["flops_per_token"] / results["baseline"]["flops_per_token"]
        rows = compare(pruned_pts, base_pts)
        for row in rows:
            row["fraction_of_flop_bound"] = row["throughput_ratio"] * ratio
        out.update(flop_ratio=ratio, flop_speedup_bound=1 / ratio, ratios=rows)
    return out


def _points_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    d["latency_s"] = Timing(**d["latency_s"])
    d["prefill_s"] = Timing(**d["prefill_s"])
    return d


def format_bench(result: dict[str, Any]) -> str:
    """A Markdown table of the measurements (and ratios when a baseline was measured)."""
    lines = ["| model | blocks | batch | out len | latency s (min-max) | tok/s | decode tok/s | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for role, r in result["models"].items():
        for p in r["points"]:
            lat = p["latency_s"]
            lines.append(
                f"| {role} | {r['num_blocks']} | {p['batch_size']} | {p['output_len']} | "
                f"{lat['median']:.3f} ({lat['min']:.3f}-{lat['max']:.3f}) | {p['throughput_tok_s']:.1f} | "
                f"{p['decode_tok_s']:.1f} | {p['peak_memory_mb']:.0f} |"
            )
    if "ratios" in result:
        lines += ["", f"FLOP ratio pruned/baseline {result['flop_ratio']:.4f} -> speed-up bound "
                      f"{result['flop_speedup_bound']:.3f}x", "",
                  "| batch | out len | throughput ratio | of FLOP bound | decode speed-up | prefill speed-up | memory ratio |",
                  "|---|---|---|---|---|---|---|"]
        for row in result["ratios"]:
            lines.append(
                f"| {row['batch_size']} | {row['output_len']} | {row['throughput_ratio']:.3f} | "
                f"{row['fraction_of_flop_bound']:.3f} | {row['decode_speedup']:.3f} | "
                f"{row['prefill_speedup']:.3f} | {row['memory_ratio']:.3f} |"
            )
    return "\n".join(lines)


def plot_bench(result: dict[str, Any], path: str) -> None:
    """Throughput and peak memory against batch size, one line per model and output length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for role, r in result["models"].items():
        for out_len in sorted({p["output_len"] for p in r["points"]}):
            pts = sorted((p for p in r["points"] if p["output_len"] == out_len), key=lambda p: p["batch_size"])
            label = f"{role} ({r['num_blocks']} blocks), {out_len} tokens"
            style = "-o" if role == "model" else "--s"
            ax_t.plot([p["batch_size"] for p in pts], [p["throughput_tok_s"] for p in pts], style, label=label)
            ax_m.plot([p["batch_size"] for p in pts], [p["peak_memory_mb"] for p in pts], style, label=label)
    for ax, ylabel in ((ax_t, "generated tokens / s"), (ax_m, "peak memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle("Generation throughput and memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
