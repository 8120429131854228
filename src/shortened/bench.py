"""Generation speed and memory, measured honestly: warm-up runs discarded, the device synchronised around
every timed region, repeats summarised by median and spread, each model measured in its own process so
that peak memory is that model's alone, and the models' runs interleaved so that a shared machine's drifts
do not bias their ratio.

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
from .errors import ShortenedError


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
    decode_s: float | None       # median latency - median prefill; None when not measurable (see _decode)
    throughput_tok_s: float      # generated tokens / median latency
    decode_tok_s: float | None   # tokens after the first / decode time
    peak_memory_mb: float        # CUDA peak allocated, or process peak RSS on CPU
    memory_kind: str


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakRSS:
    """Peak resident set size of this process (or of process ``pid``) over a ``with`` block (CPU has no
    allocator peak counter).

    On Linux the kernel's high-water mark (``VmHWM``) is reset on entry (``/proc/self/clear_refs``) and read
    on exit: exact, and nothing runs beside the timed code. Elsewhere a thread samples the RSS; it competes
    with the timed code for the interpreter and the cores, which is why it is only the fallback.
    """

    _STATUS = "/proc/self/status"
    _CLEAR = "/proc/self/clear_refs"

    def __init__(self, interval: float = 0.002, pid: int | None = None):
        import psutil

        self._proc = psutil.Process(pid)
        if pid is not None:  # another process (an engine's server or worker): its own /proc entries
            self._STATUS, self._CLEAR = f"/proc/{pid}/status", f"/proc/{pid}/clear_refs"
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

    def __enter__(self) -> "PeakRSS":
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


def random_prompt(vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """The benchmark's prompts: fixed random token ids (no tokenizer differences, no early EOS; the output
    length is forced anyway), the same for every model and engine."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab_size, (batch, prompt_len), generator=g)


class _Generator:
    """Times ``generate`` of one model in this process; one timing point at a time, so peak memory can be
    read over exactly the timed runs of a point."""

    def __init__(self, model: nn.Module, *, max_batch: int, prompt_len: int = 32, seed: int = 0):
        self.model = model
        self.device = next(model.parameters()).device
        self.prompt = random_prompt(model.config.vocab_size, max_batch, prompt_len, seed).to(self.device)
        self._batch = 1
        self._rss: PeakRSS | None = None

    def _generate(self, new_tokens: int) -> None:
        ids = self.prompt[: self._batch]
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=self.model.config.eos_token_id)

    def start_point(self, batch_size: int, output_len: int, warmup: int) -> None:
        """Warm up at this batch size, then start the peak-memory window."""
        self._batch = batch_size
        for _ in range(warmup):
            self._generate(1)
            self._generate(output_len)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss = PeakRSS().__enter__()

    def time(self, new_tokens: int) -> float:
        """Seconds for one ``generate`` of ``new_tokens`` tokens at the current batch size."""
        return _timed(lambda: self._generate(new_tokens), self.device)

    def end_point(self) -> tuple[float, str]:
        """Peak memory (MiB) since ``start_point`` and what kind of peak it is."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        assert self._rss is not None
        self._rss.__exit__(None, None, None)
        return self._rss.peak / 2**20, "process_peak_rss"


def _measure(
    runners: dict[str, Any],
    *,
    batch_sizes: Sequence[int],
    output_lens: Sequence[int],
    prompt_len: int,
    warmup: int,
    repeats: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[BenchPoint]]:
    """Measure every point on every runner, the models' runs interleaved repeat by repeat (ABBA order), so
    that slow drifts of a shared machine's speed hit all models alike instead of biasing their ratio."""
    roles = list(runners)
    points: dict[str, list[BenchPoint]] = {role: [] for role in roles}
    for bs in batch_sizes:
        for out_len in output_lens:
            if progress:
                progress(f"batch {bs}, {out_len} tokens")
            for role in roles:
                runners[role].start_point(bs, out_len, warmup)
            prefill: dict[str, list[float]] = {role: [] for role in roles}
            total: dict[str, list[float]] = {role: [] for role in roles}
            for rep in range(repeats):
                for role in roles if rep % 2 == 0 else roles[::-1]:
                    prefill[role].append(runners[role].time(1))
                    total[role].append(runners[role].time(out_len))
            for role in roles:
                peak, kind = runners[role].end_point()
                lat, pre = summarize(total[role]), summarize(prefill[role])
                decode = _decode(lat.median, pre.median, out_len)
                points[role].append(BenchPoint(
                    batch_size=bs, prompt_len=prompt_len, output_len=out_len, latency_s=lat, prefill_s=pre,
                    decode_s=decode, throughput_tok_s=bs * out_len / lat.median,
                    decode_tok_s=None if decode is None else bs * (out_len - 1) / decode,
                    peak_memory_mb=peak, memory_kind=kind,
                ))
    return points


def _decode(latency: float, prefill: float, out_len: int) -> float | None:
    """Decode time, the difference of two medians; None when there is nothing to decode or the difference
    is lost in the noise (below 10% of the latency: a prefill timed slower than most whole runs)."""
    if out_len < 2 or latency - prefill < 0.1 * latency:
        return None
    return latency - prefill


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
    runner = _Generator(model, max_batch=max(batch_sizes), prompt_len=prompt_len, seed=seed)
    return _measure({"model": runner}, batch_sizes=batch_sizes, output_lens=output_lens, prompt_len=prompt_len,
                    warmup=warmup, repeats=repeats, progress=progress)["model"]


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
            "decode_speedup": None if b.decode_s is None or p.decode_s is None else b.decode_s / p.decode_s,
            "prefill_speedup": b.prefill_s.median / p.prefill_s.median,
            "memory_ratio": p.peak_memory_mb / b.peak_memory_mb,
            # Interleaved (the default), repeat k of each model ran back to back: these show the run-to-run noise.
            "throughput_ratio_per_repeat": [bl / pl for bl, pl in zip(b.latency_s.runs, p.latency_s.runs)],
        })
    return rows


def points_to_dicts(points: list[BenchPoint]) -> list[dict[str, Any]]:
    return [asdict(p) for p in points]


def _model_info(model: nn.Module, context_len: int) -> dict[str, Any]:
    return {
        "num_blocks": len(get_blocks(model)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token(model, context_len),
        "flops_context_len": context_len,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(),
    }


class _LocalRunner(_Generator):
    """A model loaded in this process (``isolate=False``)."""

    def __init__(self, spec: str, load_kwargs: dict[str, Any], threads: int | None, gen_kwargs: dict[str, Any],
                 context_len: int):
        from .loading import load_model

        if threads:
            torch.set_num_threads(threads)
        model, _ = load_model(spec, **load_kwargs)
        super().__init__(model, **gen_kwargs)
        self.info = _model_info(model, context_len)

    def close(self) -> None:
        pass


def _serve(conn: Any, *args: Any) -> None:
    """Child process: load one model, then run the parent's calls on it until told to stop."""
    try:
        runner = _LocalRunner(*args)
        conn.send(("ok", runner.info))
        while (call := conn.recv()) is not None:
            name, call_args = call
            conn.send(("ok", getattr(runner, name)(*call_args)))
    except BaseException as exc:  # handed to the parent, which raises it
        try:
            conn.send(("error", exc))
        except Exception:  # an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
    finally:
        conn.close()


class _ProcessRunner:
    """A model loaded and timed in its own process, so that its peak memory is its own. It idles while
    the other model runs, so interleaving the two does not make them compete for the cores."""

    def __init__(self, *args: Any):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, *args), daemon=True)
        self._proc.start()
        child.close()
        self.info = self._reply()

    def _reply(self) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"benchmark process exited with code {self._proc.exitcode}") from None
        if status == "error":
            raise value
        return value

    def _call(self, name: str, *args: Any) -> Any:
        self._conn.send((name, args))
        return self._reply()

    def start_point(self, batch_size: int, output_len: int, warmup: int) -> None:
        self._call("start_point", batch_size, output_len, warmup)

    def time(self, new_tokens: int) -> float:
        return self._call("time", new_tokens)

    def end_point(self) -> tuple[float, str]:
        return tuple(self._call("end_point"))

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


#: Where generation can be timed: transformers in this environment, or a serving engine of its own.
ENGINES = ("hf", "vllm", "llamacpp")
#: Each engine's weight type when none is asked for: what users serve on a CPU with bf16 support, and
#: the same for both engines, so their figures compare.
DEFAULT_ENGINE_DTYPE = {"vllm": "bfloat16", "llamacpp": "bf16"}


def _engine_runner(engine: str, folder: str, *, dtype: str | None, threads: int | None,
                   gen_kwargs: dict[str, Any], max_tokens: int) -> Any:
    """A runner timing the saved model ``folder`` in a serving engine (see ``_measure`` for the interface)."""
    if engine == "llamacpp":
        from .engines.llamacpp import LlamaCppRunner

        return LlamaCppRunner(folder, outtype=dtype or DEFAULT_ENGINE_DTYPE[engine], threads=threads,
                              max_tokens=max_tokens, **gen_kwargs)
    from .engines.vllm_engine import VllmRunner

    return VllmRunner(folder, dtype=dtype or DEFAULT_ENGINE_DTYPE[engine], threads=threads, max_tokens=max_tokens,
                      **gen_kwargs)


def folder_info(folder: str, context_len: int) -> dict[str, Any]:
    """What ``_model_info`` says of a loaded model, for a saved folder: the model is built on the meta device
    from its config, so no weight is read."""
    from .loading import meta_model

    model = meta_model(folder)
    return {"num_blocks": len(get_blocks(model)), "parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_token": flops_per_token(model, context_len), "flops_context_len": context_len}


#: The weight types each serving engine takes.
ENGINE_DTYPES = {"llamacpp": ("f32", "f16", "bf16", "q8_0"), "vllm": ("float32", "bfloat16", "float16")}


def check_settings(batch_sizes: Sequence[int], output_lens: Sequence[int], *, prompt_len: int = 32,
                   repeats: int = 3, warmup: int = 1, threads: int | None = None, engine: str = "hf",
                   engine_dtype: str | None = None) -> None:
    """Refuse benchmark settings that cannot be measured, with one line, before any model is loaded."""
    if engine not in ENGINES:
        raise ShortenedError(f"unknown engine '{engine}': choose from {', '.join(ENGINES)}")
    if engine_dtype is not None:
        if engine == "hf":
            raise ShortenedError("--engine-dtype is for --engine vllm or llamacpp; transformers takes --dtype")
        if engine_dtype not in ENGINE_DTYPES[engine]:
            raise ShortenedError(f"--engine-dtype for {engine} must be one of {', '.join(ENGINE_DTYPES[engine])}, "
                                 f"got '{engine_dtype}'")
    for name, values in (("batch size", batch_sizes), ("output length", output_lens), ("prompt length", [prompt_len]),
                         ("repeats", [repeats]), ("threads", [1 if threads is None else threads])):
        if not values:
            raise ShortenedError(f"no {name} given")
        if min(values) < 1:
            raise ShortenedError(f"{name} must be at least 1, got {min(values)}")
    if warmup < 0:
        raise ShortenedError(f"warm-up runs must be >= 0, got {warmup}")


def check_context(spec: str, tokens: int, load_kwargs: dict[str, Any] | None = None) -> None:
    """Refuse a prompt plus output longer than the position limit of the local model ``spec`` (read from
    its config: generation would fail or crawl far into the run). Hub ids are left to the load."""
    from .archs import config_position_limit
    from .loading import LoadOptions, local_config

    kwargs = load_kwargs or {}
    config = local_config(spec, LoadOptions(cache_dir=kwargs.get("cache_dir"),
                                            trust_remote_code=kwargs.get("trust_remote_code", False)))
    limit = config_position_limit(config) if config is not None else None
    if limit is not None and tokens > limit:
        raise ShortenedError(f"the prompt and the longest output need {tokens} positions, more than the model's "
                             f"limit of {limit} ({spec}); shorten --prompt-len or the output lengths")


def run_benchmark(
    model: str,
    baseline: str | None = None,
    *,
    load_kwargs: dict[str, Any] | None = None,
    isolate: bool = True,
    interleave: bool = True,
    threads: int | None = None,
    batch_sizes: Sequence[int] = (1, 8, 32),
    output_lens: Sequence[int] = (128, 512),
    prompt_len: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    engine: str = "hf",
    engine_dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark ``model`` (and ``baseline``) and compare them.

    Each model is loaded in its own process when ``isolate`` (its peak memory is then its own). With
    ``interleave`` both are loaded at once and their timed runs alternate repeat by repeat, so that a
    shared machine's slow drifts do not bias the ratio; ``interleave=False`` measures one model after the
    other, for when both do not fit in memory together. The result holds every raw measurement, the
    pruned/baseline ratios and the FLOP-ratio bound: the speed-up that per-token compute alone predicts
    (baseline FLOPs / pruned FLOPs). ``threads`` sets torch's CPU threads in each measuring process.

    ``engine`` times generation where the model is served instead: ``vllm`` or ``llamacpp`` (each model a
    saved local folder; ``engine_dtype`` the weight type there, default ``DEFAULT_ENGINE_DTYPE``), with the
    same prompts, interleaving, medians and FLOP bound.
    """
    load_kwargs = load_kwargs or {}
    check_settings(batch_sizes, output_lens, prompt_len=prompt_len, repeats=repeats, warmup=warmup, threads=threads,
                   engine=engine, engine_dtype=engine_dtype)
    specs = {"model": model} | ({"baseline": baseline} if baseline else {})
    for spec in specs.values():
        check_context(spec, prompt_len + max(output_lens), load_kwargs)
    gen_kwargs = dict(max_batch=max(batch_sizes), prompt_len=prompt_len, seed=seed)
    context_len = int(prompt_len + max(output_lens) / 2)
    schedule = dict(batch_sizes=batch_sizes, output_lens=output_lens, prompt_len=prompt_len, warmup=warmup,
                    repeats=repeats, progress=progress)
    if engine == "hf":
        runner_cls: Any = _ProcessRunner if isolate else _LocalRunner
    else:
        from .engines import served_folder

        specs = {role: str(served_folder(spec, f"--engine {engine}", load_kwargs.get("cache_dir")))
                 for role, spec in specs.items()}

        def runner_cls(spec: str, *_: Any) -> Any:
            runner = _engine_runner(engine, spec, dtype=engine_dtype, threads=threads, gen_kwargs=gen_kwargs,
                                    max_tokens=prompt_len + max(output_lens))
            runner.info = {**folder_info(spec, context_len), **runner.info}
            return runner

    groups = [list(specs)] if interleave else [[role] for role in specs]
    results: dict[str, Any] = {}
    for group in groups:
        runners: dict[str, Any] = {}
        try:
            for role in group:
                runners[role] = runner_cls(specs[role], load_kwargs, threads, gen_kwargs, context_len)
            points = _measure(runners, **schedule)
        finally:
            for r in runners.values():
                r.close()
        for role in group:
            results[role] = {"model": specs[role], **runners[role].info, "points": points_to_dicts(points[role])}
    settings = dict(batch_sizes=list(batch_sizes), output_lens=list(output_lens), prompt_len=prompt_len,
                    warmup=warmup, repeats=repeats, seed=seed, isolate=isolate, interleave=interleave,
                    threads=threads, engine=engine, **load_kwargs)
    if engine != "hf":
        settings["engine_dtype"] = engine_dtype or DEFAULT_ENGINE_DTYPE[engine]
    out: dict[str, Any] = {"settings": settings, "models": {role: results[role] for role in specs}}
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
    lines = []
    settings = result.get("settings", {})
    if settings.get("engine", "hf") != "hf":
        versions = sorted({str(r.get("engine_version")) for r in result["models"].values()})
        memory = sorted({p["memory_kind"] for r in result["models"].values() for p in r["points"]})
        lines += [f"engine {settings['engine']} ({', '.join(versions)}), dtype {settings.get('engine_dtype')}"
                  + (f", peak memory = {', '.join(memory)}" if memory else ""), ""]
    lines += ["| model | blocks | batch | out len | latency s (min-max) | tok/s | decode tok/s | peak MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for role, r in result["models"].items():
        for p in r["points"]:
            lat = p["latency_s"]
            lines.append(
                f"| {role} | {r['num_blocks']} | {p['batch_size']} | {p['output_len']} | "
                f"{lat['median']:.3f} ({lat['min']:.3f}-{lat['max']:.3f}) | {p['throughput_tok_s']:.1f} | "
                f"{_num(p['decode_tok_s'], '.1f')} | {p['peak_memory_mb']:.0f} |"
            )
    if "ratios" in result:
        lines += ["", f"FLOP ratio pruned/baseline {result['flop_ratio']:.4f} -> speed-up bound "
                      f"{result['flop_speedup_bound']:.3f}x", "",
                  "| batch | out len | throughput ratio | per-repeat range | of FLOP bound | decode speed-up | "
                  "prefill speed-up | memory ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in result["ratios"]:
            per_repeat = row.get("throughput_ratio_per_repeat") or [row["throughput_ratio"]]
            lines.append(
                f"| {row['batch_size']} | {row['output_len']} | {row['throughput_ratio']:.3f} | "
                f"{min(per_repeat):.3f}-{max(per_repeat):.3f} | "
                f"{row['fraction_of_flop_bound']:.3f} | {_num(row['decode_speedup'], '.3f')} | "
                f"{row['prefill_speedup']:.3f} | {row['memory_ratio']:.3f} |"
            )
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def plot_bench(result: dict[str, Any], path: str) -> None:
    """Throughput and peak memory against batch size, one line per model and output length."""
    from .plots import plot_two_panels

    lines = []
    for role, r in result["models"].items():
        for out_len in sorted({p["output_len"] for p in r["points"]}):
            pts = sorted((p for p in r["points"] if p["output_len"] == out_len), key=lambda p: p["batch_size"])
            lines.append((f"{role} ({r['num_blocks']} blocks), {out_len} tokens", "-o" if role == "model" else "--s",
                          [p["batch_size"] for p in pts], [p["throughput_tok_s"] for p in pts],
                          [p["peak_memory_mb"] for p in pts]))
    plot_two_panels(lines, path, xlabel="batch size", ylabels=("generated tokens / s", "peak memory (MiB)"),
                    title="Generation throughput and memory", log_base=2)
