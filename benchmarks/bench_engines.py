"""Speed where the model is served: SmolLM2-135M with 20% of its blocks removed against the dense model, in
transformers, vLLM (CPU build) and llama.cpp, each beside the FLOP-ratio bound.

Prunes 6 of 30 blocks (4,5,13,14,17,18, as the efficiency section; which blocks does not change the cost),
saves the dense model as a folder too (the engines serve folders), then runs
`shortened bench PRUNED --baseline DENSE --engine E` for each engine and writes one table with the exact
commands to benchmarks/results/engines.md. The engines come from `make llamacpp` and `make vllm`; an engine
that is not installed is reported as such, not skipped silently.

    .venv/bin/python benchmarks/bench_engines.py [--engines hf,vllm,llamacpp] [--batch-sizes 1,8]
        [--output-lens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = "4,5,13,14,17,18"


def installed(engine: str) -> str | None:
    """None when ``engine`` can run here, else why not."""
    if engine == "llamacpp":
        from shortened.engines.llamacpp import find_server

        try:
            find_server()
        except Exception as exc:  # noqa: BLE001 - the message is the report
            return str(exc)
    if engine == "vllm":
        from shortened.engines.vllm_engine import find_vllm_python

        try:
            find_vllm_python()
        except Exception as exc:  # noqa: BLE001
            return str(exc)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="hf,vllm,llamacpp")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--output-lens", default="128")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engines.md"))
    args = ap.parse_args()

    from shortened import load_model, save_model

    exe = str(Path(sys.executable).with_name("shortened"))
    start = time.perf_counter()
    rows, commands, notes, headers = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        pruned, dense = Path(tmp) / "pruned", Path(tmp) / "dense"
        subprocess.run([exe, "prune", "smollm2-135m", "--blocks", BLOCKS, "--out", str(pruned)], check=True)
        model, tokenizer = load_model("smollm2-135m")
        save_model(model, tokenizer, dense)
        del model
        for engine in args.engines.split(","):
            missing = installed(engine)
            if missing:
                notes.append(f"- `{engine}`: not measured, not installed here ({missing})")
                continue
            out = Path(tmp) / f"{engine}.json"
            cmd = [exe, "bench", str(pruned), "--baseline", str(dense), "--engine", engine,
                   "--batch-sizes", args.batch_sizes, "--output-lens", args.output_lens,
                   "--prompt-len", str(args.prompt_len), "--repeats", str(args.repeats), "--out", str(out)]
            subprocess.run(cmd, check=True)
            commands.append(shlex.join(["shortened", *cmd[1:]]).replace(tmp + "/", ""))
            result = json.loads(out.read_text())
            info = result["models"]["model"]
            dtype = result["settings"].get("engine_dtype") or info.get("dtype")
            headers.append(f"- `{engine}`: {info.get('engine_version') or 'transformers'}, weights {dtype}, "
                           f"peak memory = {info['points'][0]['memory_kind']}")
            for row in result["ratios"]:
                per = row.get("throughput_ratio_per_repeat") or [row["throughput_ratio"]]
                pts = {r: next(p for p in result["models"][r]["points"] if p["batch_size"] == row["batch_size"]
                               and p["output_len"] == row["output_len"]) for r in ("model", "baseline")}
                rows.append(f"| {engine} | {row['batch_size']} | {row['output_len']} | "
                            f"{pts['baseline']['throughput_tok_s']:.1f} | {pts['model']['throughput_tok_s']:.1f} | "
                            f"{row['throughput_ratio']:.3f} | {min(per):.3f}-{max(per):.3f} | "
                            f"{result['flop_speedup_bound']:.3f} | {row['fraction_of_flop_bound']:.3f} | "
                            f"{row['memory_ratio']:.3f} |")
    processor = platform.processor() or platform.machine()
    text = "\n".join([
        "## Speed where it is served: transformers, vLLM and llama.cpp (issue 30)", "",
        f"SmolLM2-135M-Instruct with 6 of 30 blocks (20%: {BLOCKS}) removed against the dense model, on this "
        f"machine's CPU ({processor}, 2 cores); per engine, both models loaded at once and their timed runs "
        f"interleaved (A B B A ...), 1 warm-up, medians of {args.repeats} runs, greedy generation of a forced "
        f"length from {args.prompt_len}-token random prompts. Batch > 1 is that many concurrent requests "
        "(vLLM: one `generate` call over the batch; llama.cpp: `llama-server` with as many parallel slots, "
        "its own batched decoding). The bound is the dense/pruned ratio of per-token FLOPs at the mean "
        "context length.", "",
        *headers, *notes, "",
        "| engine | batch | out len | dense tok/s | pruned tok/s | speed-up | per-repeat range | FLOP bound | "
        "of bound | memory ratio |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        *rows, "",
        f"{time.perf_counter() - start:.0f} s. Written by "
        f"`{shlex.join(['.venv/bin/python', 'benchmarks/bench_engines.py', *sys.argv[1:]])}`, which ran:", "",
        *[f"    {c}" for c in commands], ""])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
