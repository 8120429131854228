"""Benchmark of the block-set search (``--criterion search``, issue 15) on SmolLM2-135M, 6 of 30 blocks.

For each calibration size (book text, 128 tokens per sample; 10 and 64 samples by default):

1. the ``ppl`` criterion, timed, and the search (``score_blocks(..., "search")``), timed in the same run:
   the search time against the ppl criterion's;
2. the selections of ppl, bi, taylor (its paper default protection, 4 and 2), angular and the search
   (iterative ppl, SLEB-style, for the calibrations up to ``--iterative-max-samples``): one-shot
   WikiText-2 / PTB perplexity on the first ``--ppl-limit`` chunks (the healing table's protocol);
3. healing (``reconstruct`` on the Gutenberg books, its defaults, the same wall-clock budget each) of the
   searched set and of the BI set, at the first calibration size.

Every step's result is kept in ``--json`` as soon as it is measured and a re-run skips the steps already
there (``--redo`` forgets them); the Markdown section goes to ``--out`` and the fitness plots next to it.

    python benchmarks/bench_search.py --n-samples 10,64 --heal-budget 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_heal import RUNS, data_path, evaluate  # noqa: E402  (same evaluation and healing settings)


class Steps:
    """Results by step name, saved after each step; a step already saved is not measured again."""

    def __init__(self, path: Path, redo: bool) -> None:
        self.path = path
        self.data = {} if redo or not path.is_file() else json.loads(path.read_text())

    def get(self, name: str, fn):
        if name not in self.data:
            t = time.perf_counter()
            value = fn()
            if isinstance(value, dict):  # runs differ in their thread count: each step keeps its own
                value.setdefault("threads", torch.get_num_threads())
            print(f"[{name}] {time.perf_counter() - t:.0f} s: {_short(value)}", flush=True)
            self.data[name] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            os.replace(tmp, self.path)
        return self.data[name]


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) < 300 else text[:300] + "..."


def timed(fn):
    """``fn()``, its wall seconds and its process CPU seconds (all threads): on this shared machine the CPU
    time is the figure that does not depend on what else runs."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=str(DATA / "gutenberg"))
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--n-samples", default="10,64", help="calibration sizes, comma-separated")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-blocks", type=int, default=6)
    p.add_argument("--search", action="append", default=[], metavar="KEY=VALUE",
                   help="a search option (generations=60, offspring=16, stages=1:4,3:1,all:1, ...), repeatable")
    p.add_argument("--iterative-max-samples", type=int, default=10)
    p.add_argument("--ppl-limit", type=int, default=100, help="first N chunks of 128 tokens")
    p.add_argument("--heal-budget", type=float, default=600, help="training seconds per healing run (0: none)")
    p.add_argument("--json", type=Path, default=RESULTS / "search.json")
    p.add_argument("--out", type=Path, default=RESULTS / "search.md")
    p.add_argument("--redo", action="store_true", help="measure every step again")
    p.add_argument("--only-search", action="store_true",
                   help="time ppl and the search and evaluate the searched set only (no other selections, "
                        "healing or iterative run): for variants of the search, with their own --json")
    p.add_argument("--neighbours", default=None, metavar="BLOCKS",
                   help="only measure the fitness of BLOCKS (e.g. 13-18 as 13,14,15,16,17,18) and of every set one "
                        "swap away, on the first --n-samples calibration size, and print them")
    p.add_argument("--fitness-of", default=None, metavar="NAME=BLOCKS;...",
                   help="only print each named set's fitness under every --fitnesses, on all samples of the first "
                        "--n-samples calibration size (e.g. 'bi=12,13,14,15,17,25;span=13,14,15,16,17,18')")
    p.add_argument("--fitnesses", default="kl,linear-kl",
                   help="the fitnesses of --fitness-of; the first is the fitness of --neighbours")
    p.add_argument("--report", action="store_true", help="only write the Markdown section from --json")
    args = p.parse_args()
    if args.report:
        steps = Steps(args.json, False)
        write_report(args, steps, [int(n) for n in args.n_samples.split(",")], steps.data["meta"]["command"])
        return 0
    if args.neighbours:
        return neighbours(args, [int(b) for b in args.neighbours.split(",")])
    if args.fitness_of:
        return fitness_of(args)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    print(f"$ {command}", flush=True)

    from shortened import load_model
    from shortened.criteria import score_blocks
    from shortened.data import calibration_data
    from shortened.io import library_versions, now_iso
    from shortened.plots import plot_search
    from shortened.selection import iterative_select, select_blocks

    steps = Steps(args.json, args.redo)
    steps.data.setdefault("meta", {})
    meta = steps.data["meta"]
    meta.update(command=command, versions=library_versions(), threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), updated=now_iso())
    # a re-run measures only the missing steps: every invocation that added some is listed
    meta["commands"] = [c for c in meta.get("commands", []) if c != command] + [command]
    options = {}
    for item in args.search:
        key, value = item.split("=", 1)
        options[key] = value if key in ("stages", "start", "fitness") else int(value)
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    k = args.num_blocks
    sizes = [int(n) for n in args.n_samples.split(",")]

    def one_shot(removed: list[int]) -> dict:
        """WikiText-2 and PTB of the model without ``removed`` (one step per distinct set)."""
        def run():
            from shortened.loading import load_model as load
            from shortened.surgery import remove_blocks

            pruned, _ = load(args.model, dtype="float32", device="cpu")
            remove_blocks(pruned, removed)
            return evaluate(pruned, tok, args.data_dir, args.ppl_limit, 0)

        return steps.get(f"eval {','.join(map(str, removed))}", run)

    for n in sizes:
        ids = calibration_data(args.calib, tok, n_samples=n, seq_len=args.seq_len, seed=args.seed).ids

        def ppl_step():
            scores, seconds, cpu = timed(lambda: score_blocks(model, ids, "ppl", progress=False))
            return {"removed": select_blocks(scores, num_blocks=k).remove, "seconds": seconds, "cpu_seconds": cpu}

        def search_step():
            scores, seconds, cpu = timed(lambda: score_blocks(model, ids, "search", num_blocks=k, seed=args.seed,
                                                              progress=True, **options))
            return {**scores.extra["search"], "seconds_total": seconds, "cpu_seconds_total": cpu}

        first = n == sizes[0]
        # The ppl criterion is timed before and after the search (this shared machine drifts), and again after
        # it only at the first calibration size (at 64 x 128 it takes ~6x longer).
        ppl = steps.get(f"ppl {n}", ppl_step)
        search = steps.get(f"search {n}", search_step)
        if first:
            steps.get(f"ppl after {n}", ppl_step)
        plot_search(search, args.out.with_name(f"search-{n}.png"),
                    title=f"search, SmolLM2-135M, {k} of 30 blocks, {n} x {args.seq_len} calibration")

        def selections_step():
            out = {name: s["removed"] for name, s in search["starts"].items()}
            if ppl:
                out["ppl"] = ppl["removed"]
                # taylor as the paper uses it (Taylor+: first 4 and last 2 protected)
                taylor = score_blocks(model, ids, "taylor", progress=False)
                out["taylor+ (4/2)"] = select_blocks(taylor, num_blocks=k).remove
            return out

        if args.only_search:
            one_shot(search["removed"])
            write_report(args, steps, sizes, command)
            continue
        sel = steps.get(f"selections {n}", selections_step)
        for removed in [search["removed"], *sel.values()]:
            one_shot(removed)
        if first and args.heal_budget > 0:
            for name, removed in (("search", search["removed"]), ("bi", sel["bi"])):
                steps.get(f"heal {name} {n} {args.heal_budget:g}",
                          lambda removed=removed: heal_and_evaluate(args, tok, removed, args.heal_budget))
        if n <= args.iterative_max_samples:
            def iterative_step():
                (plan, _), seconds, cpu = timed(lambda: iterative_select(model, ids, "ppl", num_blocks=k,
                                                                         progress=False))
                return {"removed": plan.remove, "seconds": seconds, "cpu_seconds": cpu}

            one_shot(steps.get(f"iterative {n}", iterative_step)["removed"])
        write_report(args, steps, sizes, command)
    return 0


def first_calibration(args) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (fp32, CPU) and the calibration ids of the first ``--n-samples`` size."""
    from shortened import load_model
    from shortened.data import calibration_data

    model, tok = load_model(args.model, dtype="float32", device="cpu")
    n = int(args.n_samples.split(",")[0])
    return model, calibration_data(args.calib, tok, n_samples=n, seq_len=args.seq_len, seed=args.seed).ids


def neighbours(args, base: list[int]) -> int:
    """Is ``base`` a local optimum? Its fitness and that of all sets one swap away, on all samples; and how
    well the first stages' budgets (1 and 3 samples) rank them (Spearman)."""
    from scipy.stats import spearmanr

    from shortened.engine import Engine
    from shortened.search import SetFitness

    model, ids = first_calibration(args)
    n = ids.shape[0]
    fitness = args.fitnesses.split(",")[0]
    fit = SetFitness(Engine(model, ids, batch_size=1, progress=False), fitness)
    sets = [tuple(base)] + [tuple(sorted(set(base) - {out} | {back}))
                            for out in base for back in range(len(fit.engine.blocks)) if back not in base]
    full = fit.measure(sets, len(fit.caps))
    better = [(v, s) for v, s in zip(full, sets) if v < full[0]]
    print(f"{fitness} of {base}: {full[0]:.4f}; {len(sets) - 1} neighbours, {len(better)} better; best five:")
    for v, s in sorted(zip(full[1:], sets[1:]))[:5]:
        print(f"  {v:.4f} {list(s)}")
    for samples in (1, 3):
        rho = spearmanr(fit.measure(sets, fit.micro_batches(samples)), full).statistic
        print(f"Spearman rank correlation of the fitness on {samples} sample(s) with all {n}: {rho:.3f}")
    return 0


def fitness_of(args) -> int:
    """Each named set's fitness under each of ``--fitnesses`` (all samples), and the time of each fitness's
    setup and measurements (one engine per fitness)."""
    from shortened.engine import Engine
    from shortened.search import SetFitness

    sets = {name: tuple(int(b) for b in blocks.split(","))
            for name, blocks in (item.split("=") for item in args.fitness_of.split(";") if item)}
    model, ids = first_calibration(args)
    print(f"{ids.shape[0]} x {args.seq_len} calibration tokens, {torch.get_num_threads()} thread(s)")
    print("| fitness | " + " | ".join(sets) + " | seconds |")
    print("|---|" + "---:|" * (len(sets) + 1))
    for fitness in args.fitnesses.split(","):
        t = time.perf_counter()
        fit = SetFitness(Engine(model, ids, batch_size=1, progress=False), fitness)
        values = fit.measure(list(sets.values()), len(fit.caps))
        print(f"| {fitness} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {time.perf_counter() - t:.1f} |",
              flush=True)
    return 0


def heal_and_evaluate(args, tok, removed: list[int], budget: float) -> dict:
    """``reconstruct`` on the books (bench_heal's settings) for ``budget`` seconds, then evaluate."""
    from shortened.heal import HealingData, heal, load_healing_data
    from shortened.io import pruning_record, save_model
    from shortened.loading import load_model
    from shortened.surgery import remove_blocks

    method, data, settings = RUNS["reconstruct-books"]
    with tempfile.TemporaryDirectory(prefix="bench_search-") as work:
        model, _ = load_model(args.model, dtype="float32", device="cpu")
        n = len(model.model.layers)
        kept = remove_blocks(model, removed)
        source = Path(work) / "pruned"
        save_model(model, tok, source, pruning_record(args.model, n, kept, model_type="llama"))
        common = dict(val_fraction=0.02, warmup_steps=10, progress=False, seed=0, **settings)
        dataset = load_healing_data(data_path(data, args.data_dir, Path(work)), tok, seq_len=common["seq_len"],
                                    val_fraction=common["val_fraction"], seed=common["seed"])
        dataset.val = dataset.val[:32]
        probe = heal(str(source), HealingData(dataset.train, []), method, steps=1, **common)
        steps = max(1, int(budget / probe.run.seconds * 0.9))  # 10% for validation, as bench_heal
        r = heal(str(source), dataset, method, steps=steps, max_time=budget, eval_every=max(1, steps // 4), **common)
        h = r.record["healing"]
        return {**evaluate(r.model, r.tokenizer, args.data_dir, args.ppl_limit, 0), "removed": removed,
                "method": method, "settings": common, "steps_done": h["steps_done"],
                "train_seconds": round(r.run.seconds, 1), "val_before": h["val_loss_before"],
                "val_best": h["best_val_loss"]}


def write_report(args, steps: Steps, sizes: list[int], command: str) -> None:
    d = steps.data
    meta = d["meta"]
    k = args.num_blocks

    def ev(removed):
        return d.get(f"eval {','.join(map(str, removed))}")

    def row(name, removed, note=""):
        e = ev(removed)
        wt = f"{e['wikitext2']:.1f}" if e else "–"
        ptb = f"{e['ptb']:.1f}" if e else "–"
        return f"| {name} | {', '.join(map(str, removed))} | {note} | {wt} | {ptb} |"

    lines = [
        "## Block-set search (issue 15)",
        "",
        f"SmolLM2-135M-Instruct, {k} of 30 blocks removed, calibration from the Gutenberg books "
        f"({args.seq_len} tokens per sample, seed {args.seed}), fp32, {meta['machine']}, "
        f"shared machine (other engineers' jobs ran beside it; each step's torch thread count is in the JSON); torch {meta['versions'].get('torch')}, "
        f"transformers {meta['versions'].get('transformers')}. Perplexity: the paper's protocol on the first "
        f"{args.ppl_limit} chunks of WikiText-2 raw test and PTB validation (as the healing table). Each step's "
        "figures are in `benchmarks/results/search.json`.",
        "",
        "Commands (a re-run measures only the steps not yet in the JSON):",
        "",
        *(f"    {c}" for c in meta.get("commands", [command])),
        "",
    ]
    for n in sizes:
        s, ppl = d.get(f"search {n}"), d.get(f"ppl {n}")
        if not s:
            continue
        sel = d.get(f"selections {n}", {})
        st = s["settings"]
        lines += [
            f"### {n} x {args.seq_len} calibration tokens",
            "",
            f"Search: fitness `{st['fitness']}`, {st['generations']} generations of {st['offspring']} children, "
            f"stages {', '.join(f'{a} samples keep {b}' for a, b in st['stages'])}, seed {st['seed']}; "
            f"{st['sets_measured']} sets measured. Start: the best of the criteria's selections by the same "
            f"fitness: **{s['start']}** ({s['starts'][s['start']]['fitness']:.4f}); found **{s['fitness']:.4f}**.",
            "",
            "| selection | removed blocks | KL to the dense model (calibration) | WikiText-2 | PTB |",
            "|---|---|---|---:|---:|",
        ]
        for name, removed in sel.items() if sel else ():
            kl = s["starts"].get(name, {}).get("fitness")
            lines.append(row(f"`{name}`", removed, f"{kl:.4f}" if kl is not None else ""))
        it = d.get(f"iterative {n}")
        if it:
            lines.append(row("iterative ppl (SLEB-style)", it["removed"], ""))
        lines.append(row("**search**", s["removed"], f"**{s['fitness']:.4f}**"))
        lines.append("")
        after = d.get(f"ppl after {n}")
        timings = [t for t in (ppl, after) if t]
        if timings:
            mean = sum(t["seconds"] for t in timings) / len(timings)
            when = (f"{ppl['seconds']:.0f} s before the search and {after['seconds']:.0f} s after it"
                    if ppl and after else f"{timings[0]['seconds']:.0f} s")
            line = (f"Time (wall): search {s['seconds_total']:.0f} s (of which {s['history'][0]['seconds']:.0f} s "
                    f"the starting criteria and their fitness) against the `ppl` criterion in the same run, "
                    f"{when}: **{s['seconds_total'] / mean:.2f}x** (target: within 5x)")
            if "cpu_seconds_total" in s and all("cpu_seconds" in t for t in timings):
                cpus = [t["cpu_seconds"] for t in timings]
                line += (f". CPU time (all threads, the figure that does not depend on the other jobs): search "
                         f"{s['cpu_seconds_total']:.0f} s against ppl {' and '.join(f'{c:.0f}' for c in cpus)} s: "
                         f"**{s['cpu_seconds_total'] / (sum(cpus) / len(cpus)):.2f}x**")
            if it:
                line += f"; iterative ppl {it['seconds']:.0f} s wall" + (
                    f", {it['cpu_seconds']:.0f} s CPU" if "cpu_seconds" in it else "")
            lines += [line + ".", ""]
        else:
            lines += [f"Time: search {s['seconds_total']:.0f} s (the `ppl` criterion was not timed at this size).", ""]
        lines.append(f"![search fitness, {n} samples](benchmarks/results/search-{n}.png)")
        lines.append("")
    heals = {key: v for key, v in d.items() if key.startswith("heal ")}
    if heals:
        lines += ["### Healing the searched set and the BI set", "",
                  f"`reconstruct` on the Gutenberg books with its defaults (bench_heal's `reconstruct-books`), "
                  f"the same wall-clock budget each ({', '.join(sorted({k.split()[-1] for k in heals}))} s, steps "
                  "planned from a one-step probe, `max_time` as the cap), run one after the other.", "",
                  "| blocks removed | steps | WikiText-2 | PTB | validation (relative error) before, best |",
                  "|---|---:|---:|---:|---|"]
        for key, h in heals.items():
            lines.append(f"| {key.split()[1]} ({', '.join(map(str, h['removed']))}) | {h['steps_done']} | "
                         f"{h['wikitext2']:.1f} | {h['ptb']:.1f} | {h['val_before']:.3f}, {h['val_best']:.3f} |")
        lines.append("")
    reading = args.out.with_name("search-reading.md")  # the hand-written reading of these figures
    if reading.is_file():
        lines += [reading.read_text().strip(), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
