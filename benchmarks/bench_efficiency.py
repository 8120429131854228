"""Efficiency benchmark: SmolLM2-135M with 20% of its blocks removed against the dense model.

Prunes 6 of 30 blocks (4,5,13,14,17,18: the PPL criterion's choice on book text; which blocks does not
change the cost), then runs `shortened bench` (each model in its own process, warm-up discarded, the two
models' runs interleaved) and writes the figures and the exact command to benchmarks/results/efficiency.md.

    .venv/bin/python benchmarks/bench_efficiency.py [--batch-sizes 1,8] [--output-lens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = "4,5,13,14,17,18"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--output-lens", default="128")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per measuring process")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "efficiency.md"))
    args = ap.parse_args()

    exe = str(Path(sys.executable).with_name("shortened"))
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / "pruned"
        subprocess.run([exe, "prune", "smollm2-135m", "--blocks", BLOCKS, "--out", str(pruned)], check=True)
        bench_json = Path(tmp) / "bench.json"
        cmd = [exe, "bench", str(pruned), "--baseline", "smollm2-135m", "--batch-sizes", args.batch_sizes,
               "--output-lens", args.output_lens, "--prompt-len", str(args.prompt_len),
               "--repeats", str(args.repeats), "--out", str(bench_json)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True)
        result = json.loads(bench_json.read_text())
        from shortened.bench import format_bench

        table = format_bench(result)
    device = result["models"]["model"]["device"]
    processor = platform.processor() or platform.machine()
    text = f"""## Efficiency: SmolLM2-135M, 6 of 30 blocks (20%) removed

Command: `{shlex.join([sys.executable.replace(str(ROOT) + '/', ''), 'benchmarks/bench_efficiency.py', *sys.argv[1:]])}`
(prunes blocks {BLOCKS}, then `shortened bench PRUNED --baseline smollm2-135m --batch-sizes {args.batch_sizes}
--output-lens {args.output_lens} --prompt-len {args.prompt_len} --repeats {args.repeats}{' --threads ' + str(args.threads) if args.threads else ''}`).
Device: {device} ({processor}, {result['models']['model']['dtype']}, {result['models']['model'].get('cpu_threads')} torch thread(s)); each model measured in its own process, the two
processes' runs interleaved (A B B A ...); greedy generation with forced output length; 1 warm-up; medians of
{args.repeats} runs.

{table}

The FLOP-ratio bound counts 2 FLOPs per weight of every block matrix and of the output head, plus attention
over the mean context ({result['models']['model']['flops_context_len']} tokens); "of FLOP bound" = measured
throughput ratio x FLOP ratio (1.0 = the speed-up that compute alone predicts).
"""
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
