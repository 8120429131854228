"""Does a set that heals well on the calibration text heal well on the evaluation text? (issue 15)

A probe for a heal-aware search fitness. For each removal set on SmolLM2-135M:

1. capture the dense model's block inputs on ``--n-train`` book samples (128 tokens, the search's
   calibration text) with the search's engine;
2. train each of the set's ``reconstruct`` bridges (``--width``, 2 by default: the blocks around each
   removed run) alone, ``--steps`` steps of 8 samples, lr ``--lr`` (3e-3; 10 warm-up steps, then linear decay),
   bfloat16 autocast, the reconstruct loss (per-token relative squared error to the dense state after the
   run, first position included): what ``shortened heal --method reconstruct`` does, on the captured
   states instead of the teacher's forward. A bridge several sets share is trained once;
3. measure KL(dense || pruned) of the next-token distributions and the perplexity, before and after that
   healing, on 16 held-out samples of each of four texts: more books (not trained on), Tiny Shakespeare,
   the PTB *test* split (the evaluation uses the validation split) and text the model generated itself;
   with ``--wikitext``, a fifth: WikiText-2 test text past the benchmark's first 100 chunks and a
   512-token margin (never scored by the benchmarks, but the evaluation's own text: a diagnostic).

    OMP_NUM_THREADS=1 python benchmarks/bench_healed_kl.py --steps 100 --n-train 64 \\
        --json benchmarks/results/healed-kl.json
    # session 16: bridges as wide as the healing's default, perplexity and WikiText-2 too
    OMP_NUM_THREADS=1 python benchmarks/bench_healed_kl.py --steps 100 --n-train 64 --width auto --wikitext \\
        --only --set bi=12,13,14,15,17,25 --set span=13,14,15,16,17,18 \\
        --json benchmarks/results/healed-ppl-s16-a.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

SETS = {  # the sets of benchmarks/results/search-reading.md
    "bi": (12, 13, 14, 15, 17, 25),
    "search (13-18)": (13, 14, 15, 16, 17, 18),
    "search max-run 3": (12, 13, 14, 16, 17, 18),
    "search max-run 2": (4, 13, 14, 16, 17, 25),
}
HELD_OUT = {"books": None, "shakespeare": "tinyshakespeare/input.txt", "ptb test": "ptb/ptb.test.txt",
            "self-generated": "self"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--n-train", type=int, default=64, help="book samples the bridges train on (a multiple of 8)")
    p.add_argument("--n-held", type=int, default=16, help="held-out samples per text (a multiple of 8)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=B,B,...", help="more sets to probe")
    p.add_argument("--only", action="store_true", help="probe only the --set sets")
    p.add_argument("--width", default="2", help="bridge width: a number or auto (as --bridge-width)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--wikitext", action="store_true",
                   help="also measure on WikiText-2 test text past the benchmark's first 100 chunks (+512 tokens)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "healed-kl.json")
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    if not (args.data_dir / "gutenberg").is_dir():
        print(f"error: no book text under {args.data_dir} (see ../shared/data/README.md)", file=sys.stderr)
        return 2

    from shortened import load_model
    from shortened.data import _self_generated, calibration_data
    from shortened.engine import Engine, call_block
    from shortened.heal.reconstruct import find_bridges
    from shortened.io import library_versions, now_iso

    sets = {} if args.only else dict(SETS)
    width = int(args.width) if args.width.isdigit() else args.width
    for item in args.set:
        name, blocks = item.split("=", 1)
        sets[name] = tuple(sorted(int(b) for b in blocks.split(",")))
    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    model.requires_grad_(False)
    books = calibration_data(str(args.data_dir / "gutenberg"), tok, n_samples=args.n_train + args.n_held,
                             seq_len=128, seed=0).ids
    train_engine = Engine(model, books[:args.n_train], batch_size=8, progress=False)
    train = train_engine.captures
    blocks, L = train_engine.blocks, train_engine.num_blocks

    def final(cap):
        return call_block(blocks[L - 1], cap.calls[L - 1], cap.inputs[L - 1], cap.batch)

    held = {}  # text -> (captures, dense targets)
    held_out = dict(HELD_OUT)
    if args.wikitext:
        held_out["wikitext-2 rest"] = "wikitext"
    for name, rel in held_out.items():
        if rel is None:
            ids = books[args.n_train:]
        elif rel == "wikitext":
            from shortened.evaluation.perplexity import load_ppl_text, tokenize_text
            rest = tokenize_text(tok, load_ppl_text("wikitext2", args.data_dir))[100 * 128 + 512:]
            n = min(args.n_held, rest.numel() // 128)
            ids = rest[:n * 128].view(n, 128)
        elif rel == "self":
            ids = _self_generated(model, tok, args.n_held, 128, 0)
        else:
            ids = calibration_data(str(args.data_dir / rel), tok, n_samples=args.n_held, seq_len=128, seed=0).ids
        caps = Engine(model, ids, batch_size=8, progress=False).captures
        with torch.no_grad():
            held[name] = (caps, [train_engine.dense_targets(final(c)) for c in caps])

    trained: dict[tuple, dict[int, torch.nn.Module]] = {}
    bridge_log = []

    def heal_bridge(kept: list[int], b) -> dict[int, torch.nn.Module]:
        key = (b.start, b.end, tuple(kept[i] for i in b.blocks))
        if key in trained:
            return trained[key]
        t0 = time.process_time()
        copies = [copy.deepcopy(blocks[kept[i]]).requires_grad_(True) for i in b.blocks]
        opt = torch.optim.AdamW([q for c in copies for q in c.parameters()], lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / args.steps))
        errors = []
        for s in range(args.steps):
            cap = train[s % len(train)]
            x = cap.inputs[b.start]
            with torch.no_grad():
                y = cap.inputs[b.end] if b.end < L else final(cap)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = x
                for c, i in zip(copies, b.blocks):
                    out = call_block(c, cap.calls[kept[i]], out, cap.batch)
            err = ((out.float() - y).pow(2).sum(-1) / y.pow(2).sum(-1).clamp_min(1e-12)).mean()
            errors.append(err.item())
            opt.zero_grad()
            err.backward()
            opt.step()
            sched.step()
        for c in copies:
            c.requires_grad_(False)
        trained[key] = {kept[i]: c for c, i in zip(copies, b.blocks)}
        bridge_log.append({"teacher_blocks": [b.start, b.end], "trained": list(key[2]), "error_first": errors[0],
                           "error_last": errors[-1], "cpu_seconds": round(time.process_time() - t0, 1)})
        print(f"  bridge {key}: error {errors[0]:.4f} -> {errors[-1]:.4f}", flush=True)
        return trained[key]

    def measure(removed: tuple[int, ...], healed: dict[int, torch.nn.Module], caps, targets) -> tuple[float, float]:
        """Mean KL(dense || pruned) and the pruned model's perplexity on one held-out text."""
        kept = [i for i in range(L) if i not in removed]
        total = nll = count = 0.0
        with torch.no_grad():
            for cap, target in zip(caps, targets):
                h = cap.inputs[0]
                for j in kept:
                    h = call_block(healed.get(j, blocks[j]), cap.calls[j], h, cap.batch)
                total += train_engine.kl_sum(h, target).sum().item()
                nll += train_engine.nll_sum(h, cap.ids).sum().item()
                count += cap.ids.shape[0] * (cap.ids.shape[1] - 1)
        return round(total / count, 4), round(math.exp(nll / count), 2)

    rows = {}
    for name, removed in sets.items():
        kept = [i for i in range(L) if i not in removed]
        healed: dict[int, torch.nn.Module] = {}
        for b in find_bridges(kept, L, width):
            healed.update(heal_bridge(kept, b))
        one_shot = {t: measure(removed, {}, *held[t]) for t in held}
        after = {t: measure(removed, healed, *held[t]) for t in held}
        rows[name] = {"removed": list(removed),
                      "one_shot": {t: v[0] for t, v in one_shot.items()},
                      "healed": {t: v[0] for t, v in after.items()},
                      "one_shot_ppl": {t: v[1] for t, v in one_shot.items()},
                      "healed_ppl": {t: v[1] for t, v in after.items()}}
        print(f"{name}: {rows[name]}", flush=True)
    dense_ppl = {t: measure((), {}, *held[t])[1] for t in held}
    out = {"command": command, "created": now_iso(), "versions": library_versions(), "steps": args.steps,
           "width": args.width, "lr": args.lr, "dense_ppl": dense_ppl,
           "n_train": args.n_train, "n_held": args.n_held, "threads": torch.get_num_threads(),
           "sets": rows, "bridges": bridge_log}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.json)
    texts = list(held)
    print(f"\n| set | {' | '.join(f'{t} one-shot' for t in texts)} | {' | '.join(f'{t} healed' for t in texts)} |")
    print("|---|" + "---:|" * (2 * len(texts)))
    for name, r in rows.items():
        cells = [f"{r['one_shot'][t]:.3f}" for t in texts] + [f"{r['healed'][t]:.3f}" for t in texts]
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"\nperplexity (dense: {dense_ppl})")
    print(f"| set | {' | '.join(f'{t} one-shot' for t in texts)} | {' | '.join(f'{t} healed' for t in texts)} |")
    print("|---|" + "---:|" * (2 * len(texts)))
    for name, r in rows.items():
        cells = [f"{r['one_shot_ppl'][t]:.1f}" for t in texts] + [f"{r['healed_ppl'][t]:.1f}" for t in texts]
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
