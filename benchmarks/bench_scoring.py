"""Benchmark of the block-scoring engine on SmolLM2-135M (10 x 128 calibration tokens by default).

Measures, in one run, and writes benchmarks/results/scoring.md:

1. ``ppl`` with the engine against the paper's algorithm (rebuild each (L-1)-block model from its
   config, copy the weights, run the samples one at a time): time and the largest score difference;
2. the engine against the compute floor: L(L-1)/2 single-block passes + L head passes (final norm and
   vocabulary projection, no loss), each pass timed on the same captured data in this run;
3. ``taylor`` peak memory against a plain ``loss.backward()`` keeping every gradient (fresh processes,
   peak RSS above the loaded model);
4. the offloaded mode's peak memory against the normal mode (fresh processes, same measure), with the
   blocks in memory and with the blocks on disk (read from the safetensors files one visit at a time).

Usage: python benchmarks/bench_scoring.py [--model smollm2-135m] [--calib PATH|self] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "gutenberg"


def load(args):
    from shortened import load_model
    from shortened.data import calibration_data

    model, tok = load_model(args.model, dtype="float32", device="cpu")
    cal = calibration_data(args.calib, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                           model=model)
    return model, cal


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())[1])  # kB


def child(args) -> None:
    """One memory measurement in a fresh process; prints a JSON line."""
    from shortened.archs import get_blocks
    from shortened.criteria import score_blocks

    if args.child == "disk":  # blocks stay in the safetensors files; the tokenizer alone makes the windows
        from shortened import load_model
        from shortened.data import calibration_data

        model, tok = load_model(args.model, dtype="float32", device="cpu", blocks_on_disk=True)
        ids = calibration_data(args.calib, tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed).ids
    else:
        model, cal = load(args)
        ids = cal.ids
        with torch.no_grad():
            model(ids[:1, :8], use_cache=False)  # warm up allocator and kernels
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    t = time.perf_counter()
    if args.child == "backward":
        for p in model.parameters():
            p.requires_grad_(True)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()  # every parameter's gradient is kept, as in the paper's code
        scores = [float(sum((p.detach() * p.grad).abs().sum() for p in b.parameters())) for b in get_blocks(model)]
    elif args.child == "taylor":
        scores = score_blocks(model, ids, "taylor", progress=False).scores
    elif args.child in ("normal", "offload", "disk"):
        scores = score_blocks(model, ids, "ppl", offload=args.child == "offload", device="cpu", progress=False).scores
    else:
        raise SystemExit(f"unknown child {args.child}")
    elapsed = time.perf_counter() - t
    peak = _status("VmHWM")
    print(json.dumps({"child": args.child, "base_mb": base / 1024, "peak_extra_mb": (peak - base) / 1024,
                      "seconds": elapsed, "scores": scores}))


def run_child(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--calib", str(args.calib),
           "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def paper_ppl(model, ids) -> tuple[list[float], float]:
    """The paper's algorithm: for each block, build a fresh (L-1)-block model from the config, copy the
    weights of the kept blocks, and run the calibration samples one at a time."""
    from transformers import AutoModelForCausalLM

    from shortened.archs import get_arch, num_blocks

    spec = get_arch(model)
    n = num_blocks(model, spec)
    state = model.state_dict()
    prefix = spec.blocks + "."
    t = time.perf_counter()
    scores = []
    for i in range(n):
        cfg = model.config.__class__.from_dict(model.config.to_dict())
        setattr(cfg, spec.layer_count_field, n - 1)
        for name in spec.per_layer_config_lists:
            if getattr(cfg, name, None) is not None:
                setattr(cfg, name, [v for k, v in enumerate(getattr(cfg, name)) if k != i])
        pruned = AutoModelForCausalLM.from_config(cfg, attn_implementation=model.config._attn_implementation,
                                                  dtype=torch.float32).eval()
        new_state = {}
        for key, value in state.items():
            if key.startswith(prefix):
                idx, rest = key[len(prefix):].split(".", 1)
                k = int(idx)
                if k == i:
                    continue
                key = f"{prefix}{k - (k > i)}.{rest}"
            new_state[key] = value
        pruned.load_state_dict(new_state, strict=True)
        nll = []
        with torch.no_grad():
            for s in range(ids.shape[0]):
                nll.append(pruned(ids[s:s + 1], labels=ids[s:s + 1], use_cache=False).loss.item())
        scores.append(math.exp(sum(nll) / len(nll)))  # equal lengths: mean of sample means = token mean
        del pruned
    return scores, time.perf_counter() - t


def floor_seconds(model, ids, reps: int = 3) -> tuple[float, dict]:
    """Time every single-block pass and the head pass on the captured calibration batch."""
    from shortened.engine import Engine, call_block

    eng = Engine(model, ids, workers=1, progress=False)  # one micro-batch: every sample in each pass
    cap = eng.captures[0]
    assert cap.batch == ids.shape[0]
    n = eng.num_blocks
    block_t = []
    with torch.inference_mode():
        h = cap.inputs[0]
        for j in range(n):
            x = cap.inputs[j] if cap.inputs[j] is not None else h
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                y = call_block(eng.blocks[j], cap.calls[j], x, cap.batch)
                best = min(best, time.perf_counter() - t)
            block_t.append(best)
            h = y
        flat = cap.inputs[n - 1].reshape(-1, cap.inputs[n - 1].shape[-1])
        head_best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for s in range(0, flat.shape[0], eng.loss_chunk):
                eng.head(flat[s:s + eng.loss_chunk])
            head_best = min(head_best, time.perf_counter() - t)
    blocks = sum(j * t for j, t in enumerate(block_t))  # block j serves the j streams that removed 0..j-1
    return blocks + n * head_best, {"block_pass_s": sum(block_t) / n, "head_pass_s": head_best,
                                    "blocks_total_s": blocks, "heads_total_s": n * head_best}


def engine_seconds(model, ids, workers: int | None = None) -> tuple[list[float], float]:
    from shortened.criteria import score_blocks

    t = time.perf_counter()
    scores = score_blocks(model, ids, "ppl", workers=workers, progress=False).scores
    return scores, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=str(DEFAULT_CALIB) if DEFAULT_CALIB.is_dir() else "self")
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--repeats", type=int, default=2, help="engine and floor timings: best of this many")
    p.add_argument("--paper-runs", type=int, default=3,
                   help="runs of the paper's algorithm, each bracketed by engine runs (the speed-up is their total "
                        "over the bracketing engine runs' total)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scoring.md"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    print(f"$ {command}", flush=True)

    model, cal = load(args)
    ids = cal.ids
    with torch.no_grad():
        model(ids, use_cache=False)  # warm-up

    # Interleaved, so load changes hit all alike. "serial": one stream at a time, every matrix product
    # on all threads (what the floor measures); default: independent streams on parallel workers.
    engine_runs, serial_runs, floor_runs = [], [], []
    for r in range(args.repeats):
        f, parts = floor_seconds(model, ids)
        floor_runs.append((f, parts))
        _, e1 = engine_seconds(model, ids, workers=1)
        serial_runs.append(e1)
        scores, e = engine_seconds(model, ids)
        engine_runs.append(e)
        print(f"run {r}: engine {e:.1f} s, engine one stream at a time {e1:.1f} s, floor {f:.1f} s, "
              f"ratios {e / f:.3f} / {e1 / f:.3f}", flush=True)
    e_best, e1_best = min(engine_runs), min(serial_runs)
    f_best, parts = min(floor_runs, key=lambda x: x[0])
    from shortened.engine import default_workers

    workers = default_workers(torch.device("cpu"))

    # The paper's run takes minutes, long enough for this machine's speed to drift (identical runs minutes
    # apart differ by up to ~20%): each paper run is bracketed by engine runs, and its speed-up taken
    # against the mean of the two engine runs just before and just after it.
    chain = [engine_runs[-1]]
    paper_runs, ratios = [], []
    for k in range(args.paper_runs):
        paper, t_paper = paper_ppl(model, ids)
        _, e_after = engine_seconds(model, ids)
        paper_runs.append(t_paper)
        ratios.append(t_paper / ((chain[-1] + e_after) / 2))
        chain.append(e_after)
        print(f"paper's algorithm run {k}: {t_paper:.1f} s between engine runs of {chain[-2]:.1f} s and "
              f"{e_after:.1f} s: {ratios[-1]:.2f}x", flush=True)
    brackets = [(a + b) / 2 for a, b in zip(chain, chain[1:])]
    speedup = sum(paper_runs) / sum(brackets)  # total paper time over total bracketing-engine time
    max_rel = max(abs(a - b) / b for a, b in zip(scores, paper))
    print(f"speed-up {speedup:.2f}x (per paper run: {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"max rel diff {max_rel:.2e}", flush=True)
    del model

    children = ("backward", "taylor", "normal", "offload") + (("disk",) if args.calib != "self" else ())
    mem = {name: run_child(args, name) for name in children}
    taylor_rel = max(abs(a - b) / abs(b) for a, b in zip(mem["taylor"]["scores"], mem["backward"]["scores"]))
    same_offload = mem["offload"]["scores"] == mem["normal"]["scores"]
    disk = mem.get("disk")
    for k, v in mem.items():
        print(f"{k}: peak +{v['peak_extra_mb']:.0f} MB above {v['base_mb']:.0f} MB, {v['seconds']:.1f} s", flush=True)

    from shortened.io import library_versions

    v = library_versions()
    L = len(scores)
    lines = [
        "## Block scoring (issue 3)",
        "",
        f"SmolLM2-135M-Instruct ({L} blocks), {args.n_samples} x {args.seq_len} calibration tokens from "
        f"`{Path(args.calib).name if args.calib != 'self' else 'self'}` (seed {args.seed}), fp32, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, shared machine; "
        f"torch {v.get('torch')}, transformers {v.get('transformers')}. Times are wall-clock; engine and floor "
        f"are the best of {args.repeats} interleaved runs.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| `ppl` engine (default: {workers} streams at a time, {max(1, torch.get_num_threads() // workers)} "
        f"thread(s) each) | {e_best:.1f} s (runs: {', '.join(f'{x:.1f}' for x in engine_runs)}) | |",
        f"| `ppl` engine, one stream at a time on all threads (`workers=1`) | {e1_best:.1f} s "
        f"(runs: {', '.join(f'{x:.1f}' for x in serial_runs)}) | |",
        f"| paper's algorithm (rebuild each (L-1)-block model, samples one by one), {len(paper_runs)} run(s) | "
        f"{', '.join(f'{x:.1f}' for x in paper_runs)} s | |",
        f"| `ppl` engine runs bracketing them (the first is the last interleaved run above) | "
        f"{', '.join(f'{x:.1f}' for x in chain)} s | |",
        f"| speed-up over the paper's algorithm: total paper time over the total of the bracketing engine "
        f"means | **{speedup:.2f}x** (per paper run: {', '.join(f'{r:.2f}' for r in ratios)}) | >= 3.5x |",
        f"| largest relative difference of the scores | {max_rel:.1e} | same scores |",
        f"| compute floor: {L * (L - 1) // 2} block passes + {L} head passes | {f_best:.1f} s "
        f"(blocks {parts['blocks_total_s']:.1f} s, heads {parts['heads_total_s']:.1f} s) | |",
        f"| engine / floor | **{e_best / f_best:.3f}x** (per run: "
        f"{', '.join(f'{e / f[0]:.3f}' for e, f in zip(engine_runs, floor_runs))}) | <= 1.10x |",
        f"| engine one stream at a time / floor (the engine's own overhead) | {e1_best / f_best:.3f}x (per run: "
        f"{', '.join(f'{e / f[0]:.3f}' for e, f in zip(serial_runs, floor_runs))}) | |",
        f"| `taylor` peak memory above the loaded model | {mem['taylor']['peak_extra_mb']:.0f} MB | |",
        f"| plain `loss.backward()` keeping all gradients | {mem['backward']['peak_extra_mb']:.0f} MB | |",
        f"| taylor / plain backward | **{mem['taylor']['peak_extra_mb'] / mem['backward']['peak_extra_mb']:.2f}x** "
        f"(scores agree to {taylor_rel:.1e}) | <= 0.6x |",
        f"| `ppl` peak memory, normal mode | {mem['normal']['peak_extra_mb']:.0f} MB above "
        f"{mem['normal']['base_mb']:.0f} MB | |",
        f"| `ppl` peak memory, offloaded mode (execution device = CPU) | {mem['offload']['peak_extra_mb']:.0f} MB "
        f"above {mem['offload']['base_mb']:.0f} MB; scores identical: {same_offload} | |",
        *([f"| `ppl` with the blocks on disk (`--offload disk`): resident after loading, peak | "
           f"{disk['base_mb']:.0f} MB, {disk['base_mb'] + disk['peak_extra_mb']:.0f} MB (normal mode: "
           f"{mem['normal']['base_mb']:.0f} MB, {mem['normal']['base_mb'] + mem['normal']['peak_extra_mb']:.0f} MB: "
           f"**{(disk['base_mb'] + disk['peak_extra_mb']) / (mem['normal']['base_mb'] + mem['normal']['peak_extra_mb']):.2f}x**); "
           f"{disk['seconds']:.1f} s against {mem['normal']['seconds']:.1f} s; scores identical: "
           f"{disk['scores'] == mem['normal']['scores']} | |"] if disk else []),
        "",
        "The floor times every pass alone, each matrix product split over all threads, as the issue defines "
        "it. The engine's default computes independent candidate streams concurrently, one per thread, which "
        "keeps both cores busier than splitting each product between them; so it can come in under the floor. "
        "The `workers=1` row is the engine doing exactly the floor's work: its ratio is the engine's own "
        "overhead (capture pass, loss over the vocabulary, bookkeeping).",
        "",
        "Peak memory is the peak resident set size (VmHWM, reset after loading) minus the resident size "
        "after loading, each in a fresh process. On this CPU-only machine the offloaded mode's execution "
        "device is the CPU itself, so it cannot show the accelerator saving (one block's weights on the "
        "accelerator instead of all); it shows that the path costs no extra host memory and gives identical "
        "scores. With the blocks on disk the process holds no block weights, and its peak resident size is "
        "the figure to compare: its peak above loading also holds one-time allocations (thread pools, "
        "matrix-product buffers) that the other modes make in a warm-up forward before their measure starts, "
        "which a model without block weights cannot run.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
