"""Which removal sets meet the one-shot target at all? A screen of sets shaped like Block Influence's (issue 15)

Block Influence's set on SmolLM2-135M (12-15, 17, 25: a run of four plus two more blocks) heals better
than the searched span 13-18 with out-of-domain healing text, but misses the one-shot target (WikiText-2
<= 128.4, 15% below BI's 151.1). Is there a set of that shape that meets the one-shot target and might heal
like BI's? This script measures:

1. the search's fitness (mean KL(dense || pruned) on the calibration text, 10 x 128 book tokens, seed 1234)
   of every 6-block set made of a run of ``--run`` blocks starting in ``--run-starts`` plus any two
   other blocks in ``--others``;
2. the one-shot WikiText-2 perplexity (the evaluation's protocol: first 100 chunks of 128 tokens, no BOS)
   of the ``--top`` sets with the lowest fitness, and of the span and BI's set.

Both use the search's engine (:class:`shortened.search.SetFitness`: the fitness ``ppl`` on WikiText-2's
chunks is the one-shot perplexity). This is a benchmark-side exploration: it looks at the evaluation text,
which the search never does.

    OMP_NUM_THREADS=1 python benchmarks/bench_set_screen.py --json benchmarks/results/set-screen-s16.json
    # one-shot PTB of chosen sets:
    OMP_NUM_THREADS=1 python benchmarks/bench_set_screen.py --text ptb \\
        --json benchmarks/results/set-screen-s16-ptb.json --ppl-of "13,14,15,16,17,18;12,13,14,15,17,25;12,13,14,15,16,17"
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
REFERENCE = {"span 13-18": (13, 14, 15, 16, 17, 18), "bi": (12, 13, 14, 15, 17, 25)}


def span(text: str) -> range:
    a, b = (int(x) for x in text.split("-"))
    return range(a, b + 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--run", type=int, default=4, help="length of the run every set contains")
    p.add_argument("--run-starts", type=span, default=span("10-16"), help="where the run may start (A-B)")
    p.add_argument("--others", type=span, default=span("8-27"), help="where the other blocks may be (A-B)")
    p.add_argument("--num-blocks", type=int, default=6)
    p.add_argument("--top", type=int, default=40, help="sets (lowest fitness) whose WikiText-2 is measured")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "set-screen.json")
    p.add_argument("--ppl-of", default=None, metavar="B,B,...;B,B,...",
                   help="only measure the one-shot perplexity of these sets on --text (first 100 chunks)")
    p.add_argument("--text", default="ptb", help="the perplexity set of --ppl-of: wikitext2, ptb or a text file")
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    if not args.ppl_of and not (args.data_dir / "gutenberg").is_dir():
        print(f"error: no book text under {args.data_dir} (see ../shared/data/README.md)", file=sys.stderr)
        return 2

    from shortened import load_model
    from shortened.data import calibration_data
    from shortened.engine import Engine
    from shortened.evaluation.perplexity import set_chunks
    from shortened.io import library_versions, now_iso, write_json
    from shortened.search import SetFitness

    model, tok = load_model(args.model, dtype="float32", device="cpu")
    model.requires_grad_(False)

    def key(s: tuple[int, ...]) -> str:
        return ",".join(map(str, s))

    def write(out: dict) -> None:
        write_json(args.json, {"command": command, "created": now_iso(), "versions": library_versions(),
                               "threads": torch.get_num_threads(), **out})

    if args.ppl_of:
        chosen = [tuple(sorted(int(b) for b in item.split(","))) for item in args.ppl_of.split(";") if item]
        _, chunks, _ = set_chunks(tok, args.text, data_dir=str(args.data_dir), seq_len=128, bos=False, limit=100)
        fit = SetFitness(Engine(model, chunks, batch_size=8, progress=False), "ppl")
        values = {key(s): round(v, 2) for s, v in zip(chosen, fit.measure(chosen, len(fit.caps)))}
        write({"text": args.text, "first100": values})
        for k, v in values.items():
            print(f"| {k} | {v:.1f} |")
        return 0
    books = calibration_data(str(args.data_dir / "gutenberg"), tok, n_samples=10, seq_len=128, seed=1234).ids
    sets: set[tuple[int, ...]] = set()
    for a in args.run_starts:
        run = set(range(a, a + args.run))
        for extra in itertools.combinations([b for b in args.others if b not in run], args.num_blocks - args.run):
            sets.add(tuple(sorted(run | set(extra))))
    ordered = sorted(sets)
    print(f"{len(ordered)} sets", flush=True)
    t = time.perf_counter()
    fit = SetFitness(Engine(model, books, batch_size=1, progress=False), "kl")
    kl = dict(zip(ordered, fit.measure(ordered, len(fit.caps))))
    kl.update(zip(REFERENCE.values(), fit.measure(list(REFERENCE.values()), len(fit.caps))))
    kl_seconds = time.perf_counter() - t
    best = sorted(ordered, key=kl.__getitem__)[:args.top]
    _, chunks, _ = set_chunks(tok, "wikitext2", data_dir=str(args.data_dir), seq_len=128, bos=False, limit=100)
    t = time.perf_counter()
    wiki = SetFitness(Engine(model, chunks, batch_size=8, progress=False), "ppl")
    measured = list(dict.fromkeys([*REFERENCE.values(), *best]))
    ppl = dict(zip(measured, wiki.measure(measured, len(wiki.caps))))
    ppl_seconds = time.perf_counter() - t

    write({"sets": len(ordered), "kl_seconds": round(kl_seconds, 1),
           "wikitext2_seconds": round(ppl_seconds, 1), "reference": {n: key(s) for n, s in REFERENCE.items()},
           "kl": {key(s): round(v, 4) for s, v in sorted(kl.items(), key=lambda kv: kv[1])},
           "wikitext2_first100": {key(s): round(v, 2) for s, v in ppl.items()}})
    print("| set | KL (books, 10 x 128) | WikiText-2 one-shot |\n|---|---:|---:|")
    for s in measured:
        print(f"| {key(s)} | {kl[s]:.4f} | {ppl[s]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
