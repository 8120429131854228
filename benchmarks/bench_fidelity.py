"""How close each pruned or healed model stays to the dense one, next to its perplexity (issue 15).

For each saved model (``NAME=FOLDER``): the mean per-token KL(dense || model) of the next-token
distributions and the model's perplexity, on the first ``--limit`` 128-token chunks of WikiText-2 (test),
PTB (validation) and Tiny Shakespeare (``shortened.evaluation.fidelity``, what ``shortened eval
--reference`` reports). The block-set search minimises that KL on book text; this shows whether a lower
KL still holds after healing, and whether it comes with a lower perplexity.

    OMP_NUM_THREADS=2 python benchmarks/bench_fidelity.py --limit 200 \\
        --model "span healed=/tmp/h/span-s0/reconstruct-books-p4-bf16-first" \\
        --model "bi healed=/tmp/h/bi-s0/reconstruct-books-p4-bf16-first" \\
        --json benchmarks/results/fidelity.json

(The healed folders come from ``bench_heal.py --save-dir``.)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TEXTS = {"WikiText-2": "wikitext2", "PTB": "ptb", "Tiny Shakespeare": "tinyshakespeare/input.txt"}


def main() -> int:
    from shortened.evaluation.fidelity import fidelity_on
    from shortened.io import library_versions, now_iso
    from shortened.loading import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER", help="a model to measure")
    p.add_argument("--reference", default="smollm2-135m", help="the dense model")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--limit", type=int, default=200, help="first N chunks of 128 tokens of each text")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "fidelity.json")
    args = p.parse_args()
    if not args.data_dir.is_dir():
        print(f"error: data folder not found: {args.data_dir} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    models = dict(m.split("=", 1) for m in args.model)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    reference, tokenizer = load_model(args.reference)
    reference.eval()
    texts = {title: name if name in ("wikitext2", "ptb") else str(args.data_dir / name) for title, name in TEXTS.items()}
    rows: dict[str, dict] = {}
    for label, folder in models.items():
        model = load_model(folder)[0].eval()
        rows[label] = {"folder": folder}
        for title, name in texts.items():
            r = fidelity_on(model, reference, tokenizer, name, data_dir=args.data_dir, limit=args.limit, progress=False)
            rows[label][title] = {k: r[k] for k in ("kl", "ppl", "reference_ppl", "n_chunks", "n_tokens", "seconds")}
            print(f"{label} / {title}: KL {r['kl']:.4f}, PPL {r['ppl']:.2f} (dense {r['reference_ppl']:.2f})",
                  flush=True)
        del model
    result = {"created": now_iso(), "command": command, "reference": args.reference, "limit": args.limit,
              "threads": args.threads, "versions": library_versions(), "models": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    first = next(iter(rows.values()))
    dense = " | ".join(f"{first[t]['reference_ppl']:.2f}" for t in TEXTS)
    print(f"\n| model | {' | '.join(f'KL {t}' for t in TEXTS)} | {' | '.join(f'PPL {t}' for t in TEXTS)} |")
    print("|---|" + "---:|" * (2 * len(TEXTS)))
    print(f"| dense | {' | '.join('0' for _ in TEXTS)} | {dense} |")
    for label, row in rows.items():
        kls = " | ".join(f"{row[t]['kl']:.4f}" for t in TEXTS)
        ppls = " | ".join(f"{row[t]['ppl']:.2f}" for t in TEXTS)
        print(f"| {label} | {kls} | {ppls} |")
    print(f"\n{command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
