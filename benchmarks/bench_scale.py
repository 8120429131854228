"""Scale: models with real shapes (random bf16 weights, SmolLM2's tokenizer) through the stages of a run, the
cost of each stage measured as models grow (issue 31).

Each shape's config is written by this script and its weights generated tensor by tensor straight into
sharded bf16 safetensors (no download, never a whole model in memory). Each stage is the CLI command a
user runs, in its own process; per stage: wall time, CPU time (user + system, the process and the children
it waited for), peak RSS (the largest single process), and bytes read from / written to disk by the stage's
main process (the page cache is dropped before each stage where this machine allows it, so the reads are
cold). Forward-only stages get a bound: their FLOPs over the fp32 GEMM rate measured in the same run.

    .venv/bin/python benchmarks/bench_scale.py --shapes llama-3.2-1b,llama-3.1-8b --work /tmp/scale \\
        --section benchmarks/results/scale.md

Stages a shape does not fit on this machine (24 GB RAM, 2 cores) are skipped with the memory they need.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
GIB = 2**30

#: name -> (model_type, config fields): the published configs' shapes (rope scaling and other fields that do
#: not change the cost are left out).
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "qwen3-4b": ("qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                               max_position_embeddings=40960, rms_norm_eps=1e-6,
                               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
}
N_SAMPLES, SEQ_LEN = 10, 128       # calibration: the paper's sizes
EVAL_CHUNKS = 8                    # perplexity: the first 8 chunks of 128 tokens
HEAL_STEPS = 3


def write_model(name: str, folder: Path, shard_bytes: int = 2 * GIB) -> dict[str, Any]:
    """Config, tokenizer and random bf16 weights of shape ``name`` in ``folder``; one shard in memory at a time."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from shortened.loading import resolve_local_folder
    from transformers import AutoTokenizer

    model_type, fields = SHAPES[name]
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_local_folder("smollm2-135m")))
    config = AutoConfig.for_model(model_type, **fields, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = {k: v for k, v in skeleton.state_dict().items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}
    params = sum(v.numel() for v in tensors.values())
    if (folder / "config.json").is_file() and (folder / "model.safetensors.index.json").is_file():
        return {"params": params, "bytes": 2 * params}  # written by an earlier run
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        index += 1
        file = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        shard, size = {}, 0

    for key, meta in tensors.items():
        if meta.dim() == 1:  # norms
            t = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(meta.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g).to(torch.bfloat16)
        if shard and size + t.numel() * 2 > shard_bytes:
            flush()
        shard[key] = t
        size += t.numel() * 2
    flush()
    total = index
    renamed = {}
    for i in range(1, total + 1):  # the Hub's names: model-0000i-of-0000n.safetensors
        old, new = f"model-{i:05d}.safetensors", f"model-{i:05d}-of-{total:05d}.safetensors"
        os.replace(folder / old, folder / new)
        renamed[old] = new
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * params}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}},
        indent=2))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"params": params, "bytes": 2 * params}


def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """fp32 matrix-multiply FLOP/s of this process's torch threads (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd``; its wall and CPU time, peak RSS and disk bytes (see the module docstring)."""
    cold = drop_caches()
    io: dict[str, int] = {}
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll() -> None:  # /proc/PID/io vanishes with the process: keep the last reading
            while not done.is_set():
                try:
                    for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines():
                        key, value = line.split(":")
                        io[key] = int(value)
                except (OSError, ValueError):
                    pass
                done.wait(0.2)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": shlex.join(cmd), "rc": proc.returncode, "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss * 1024 / GIB,
            "read_gib": io.get("read_bytes", 0) / GIB, "written_gib": io.get("write_bytes", 0) / GIB,
            "cold_cache": cold}


def block_params(folder: Path) -> tuple[int, int, int]:
    """(parameters of one block, of the embedding, of the head) from the config."""
    config = json.loads((folder / "config.json").read_text())
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    attn = h * d * (config["num_attention_heads"] * 2 + config["num_key_value_heads"] * 2)
    return attn + 3 * h * f, v * h, v * h


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--work", type=Path, default=Path("/tmp/shortened-scale"), help="models and outputs (deleted "
                    "at the end unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--ram-gib", type=float, default=None, help="memory a stage may use (default: this machine's)")
    ap.add_argument("--section", type=Path, help="write the BENCHMARKS.md section here")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = ap.parse_args()

    exe = str(Path(sys.executable).with_name("shortened"))
    ram = args.ram_gib or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    calib = DATA / "gutenberg" if (DATA / "gutenberg").is_dir() else None
    args.work.mkdir(parents=True, exist_ok=True)
    if calib is None:  # text written here: the benchmark measures cost, not quality
        calib = args.work / "text.txt"
        calib.write_text(" ".join(f"word{i % 997} and the {i % 31} of it." for i in range(60000)))
    rate = gemm_rate()
    print(f"fp32 GEMM rate {rate / 1e9:.1f} GFLOP/s", flush=True)
    log = args.work / "log.txt"
    results: list[dict[str, Any]] = []
    try:
        for name in args.shapes.split(","):
            model = args.work / name
            start = time.perf_counter()
            info = write_model(name, model)
            print(f"{name}: {info['params'] / 1e9:.2f}B parameters, {info['bytes'] / GIB:.1f} GiB bf16 "
                  f"({time.perf_counter() - start:.0f} s to write)", flush=True)
            per_block, embed, head = block_params(model)
            layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
            remove = round(0.2 * layers)
            fp32_gib = 4 * info["params"] / GIB
            pruned, healed = args.work / f"{name}-pruned", args.work / f"{name}-healed"
            scores = args.work / f"{name}-bi.json"
            tokens = N_SAMPLES * SEQ_LEN
            stages: list[tuple[str, list[str], float | None, float | None]] = [
                # (stage, command, forward FLOPs or None, memory it needs in GiB where it loads the whole model)
                ("score bi (--offload disk)", [exe, "score", str(model), "--criterion", "bi", "--offload", "disk",
                                               "--calib", str(calib), "--n-samples", str(N_SAMPLES), "--seq-len",
                                               str(SEQ_LEN), "--no-progress", "--out", str(scores), "--overwrite"],
                 2 * per_block * layers * tokens, None),
                ("prune (--offload disk)", [exe, "prune", str(model), "--scores", str(scores), "--num-blocks",
                                            str(remove), "--offload", "disk", "--out", str(pruned), "--overwrite"],
                 None, None),
            ]
            if info["params"] < 2e9:
                stages.insert(1, ("score ppl (--offload disk)",
                                  [exe, "score", str(model), "--criterion", "ppl", "--offload", "disk", "--calib",
                                   str(calib), "--n-samples", str(N_SAMPLES), "--seq-len", str(SEQ_LEN),
                                   "--no-progress", "--out", str(args.work / f"{name}-ppl.json"), "--overwrite"],
                                  None, None))
            pruned_fp32 = 4 * (info["params"] - remove * per_block) / GIB
            stages += [
                ("heal reconstruct", [exe, "heal", str(pruned), "--method", "reconstruct", "--data", str(calib),
                                      "--steps", str(HEAL_STEPS), "--batch-size", "1", "--grad-accum", "1",
                                      "--seq-len", str(SEQ_LEN), "--device", "cpu", "--no-progress", "--out",
                                      str(healed), "--overwrite"], None, pruned_fp32 + fp32_gib),
                ("eval perplexity", [exe, "eval", str(pruned), "--ppl", str(calib), "--tasks", "none", "--limit",
                                     str(EVAL_CHUNKS), "--seq-len", str(SEQ_LEN), "--no-progress", "--out",
                                     str(args.work / f"{name}-eval.json"), "--overwrite"],
                 2 * (per_block * (layers - remove) + head) * EVAL_CHUNKS * SEQ_LEN, pruned_fp32),
                ("bench (b1, 16 tokens)", [exe, "bench", str(pruned), "--baseline", str(model), "--batch-sizes", "1",
                                           "--output-lens", "16", "--repeats", "1", "--sequential", "--overwrite", "--out",
                                           str(args.work / f"{name}-bench.json")], None, fp32_gib),
            ]
            for stage, cmd, flops, needs in stages:
                row: dict[str, Any] = {"shape": name, "params": info["params"], "stage": stage}
                if needs is not None and needs > 0.85 * ram:
                    row.update(skipped=f"needs ~{needs:.0f} GiB in float32, this machine has {ram:.0f}")
                    print(row, flush=True)
                    results.append(row)
                    continue
                row.update(measure(cmd, log))
                if flops is not None:
                    row["flops"] = flops
                    row["bound_s"] = flops / rate
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "command"},
                      flush=True)
                results.append(row)
                if row["rc"] != 0:
                    print(f"  failed: see {log}", flush=True)
            shutil.rmtree(pruned, ignore_errors=True)
            shutil.rmtree(healed, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(model, ignore_errors=True)
    finally:
        if not args.keep:
            for p in args.work.glob("*"):
                if p.name != "log.txt":
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    args.json.write_text(json.dumps({"gemm_gflops": rate / 1e9, "ram_gib": ram, "results": results}, indent=1))
    text = section(results, rate, args)
    if args.section:
        args.section.write_text(text)
        plot(results, args.section.with_suffix(".png"))
    print(text)
    return 0


def section(results: list[dict[str, Any]], rate: float, args: argparse.Namespace) -> str:
    lines = ["## Scale: real shapes through every stage (issue 31)", "",
             f"Random bf16 weights in the published shapes, SmolLM2's tokenizer, on this machine "
             f"({platform.machine()}, {os.cpu_count()} cores, {args.ram_gib or round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB)} GiB RAM, no GPU); "
             f"fp32 GEMM rate measured in the run: {rate / 1e9:.0f} GFLOP/s. Calibration and evaluation text: "
             f"{N_SAMPLES} x {SEQ_LEN} tokens; 20% of the blocks removed; healing {HEAL_STEPS} steps of 1 x "
             f"{SEQ_LEN} tokens; perplexity on {EVAL_CHUNKS} chunks. Peak RSS: the largest single process of the "
             "stage; read/written: the stage's main process, page cache dropped before each stage. Bound: the "
             "stage's forward FLOPs over the GEMM rate (forward-only stages).", "",
             "| shape | parameters | stage | wall s | CPU s | peak RSS GiB | read GiB | written GiB | bound s | "
             "wall / bound |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        head = f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {r['stage']} |"
        if "skipped" in r:
            lines.append(f"{head} not run: {r['skipped']} | | | | | | |")
            continue
        bound = f"{r['bound_s']:.1f} | {r['wall_s'] / r['bound_s']:.2f}" if "bound_s" in r else " | "
        failed = "" if r["rc"] == 0 else " (failed)"
        lines.append(f"{head} {r['wall_s']:.1f}{failed} | {r['cpu_s']:.1f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['read_gib']:.2f} | {r['written_gib']:.2f} | {bound} |")
    lines += ["", f"Written by `{shlex.join(['.venv/bin/python', 'benchmarks/bench_scale.py', *sys.argv[1:]])}`."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in dict.fromkeys(r["stage"] for r in results):
        rows = sorted((r for r in results if r["stage"] == stage and "wall_s" in r and r["rc"] == 0),
                      key=lambda r: r["params"])
        if not rows:
            continue
        x = [r["params"] / 1e9 for r in rows]
        ax_t.plot(x, [r["wall_s"] for r in rows], "-o", label=stage)
        ax_m.plot(x, [r["peak_rss_gib"] for r in rows], "-o", label=stage)
    for ax, label in ((ax_t, "wall time (s)"), (ax_m, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle("Cost of each stage against model size (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
