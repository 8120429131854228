"""Healing benchmark: SmolLM2-135M with 6 of 30 blocks removed, each healing method under the same
wall-clock budget, WikiText-2 / PTB perplexity (paper protocol, seq 128) and zero-shot accuracy.

    python benchmarks/bench_heal.py --budget 300 --methods lora-paper,distill-lora --zs-limit 100

Every method gets ``--budget`` seconds of training (steps are planned from a short timing probe and
capped by ``max_time``), run one after another on the same machine. A chain ``a+b`` shares one budget:
each training phase gets an equal share of what the phases before it left; a training-free phase
(``linear-books``) takes no share, its measured time (fit, loading included) is taken from the budget.
A run with ``passes`` (reconstruct's teacher cache) is planned from a probe that times a first-pass step
and a later-pass step. ``--heal-data`` heals every run on one text instead of each run's own (the text of
the evaluation's domain, ``wikitext2-rest``, leaves out the chunks the perplexity scores). Results go to
``--results`` (JSON, with settings and library versions) and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from shortened.heal import HealingData, heal, load_healing_data
from shortened.io import library_versions, now_iso, pruning_record, save_model
from shortened.loading import load_model
from shortened.surgery import remove_blocks

DATA = Path("/work/shared/data")
REMOVED = [4, 5, 13, 14, 17, 18]  # PPL criterion with the paper's calibration on book text (issue 5)

# name -> (method, data, settings). "lora-paper" is the paper's recipe at this budget.
RUNS: dict[str, tuple[str, str, dict]] = {
    "lora-paper": ("lora", "alpaca", dict(lr=1e-4, batch_size=4, grad_accum=2, seq_len=256)),
    "lora-paper-bf16": ("lora", "alpaca", dict(lr=1e-4, batch_size=4, grad_accum=2, seq_len=256, mixed_precision="bf16")),
    "lora-5e-4": ("lora", "alpaca", dict(lr=5e-4, batch_size=4, grad_accum=2, seq_len=256)),
    "distill-lora-1e-3": ("distill", "alpaca", dict(student="lora", lr=1e-3, batch_size=4, grad_accum=2, seq_len=256)),
    "full-lm": ("full", "books", dict(lr=2e-5, batch_size=4, grad_accum=2, seq_len=128)),
    "distill-lora": ("distill", "alpaca", dict(student="lora", lr=5e-4, batch_size=4, grad_accum=2, seq_len=256)),
    "distill-lora-books": ("distill", "books", dict(student="lora", lr=5e-4, batch_size=4, grad_accum=2, seq_len=128)),
    "distill-full-books": ("distill", "books", dict(student="full", lr=2e-5, batch_size=4, grad_accum=2, seq_len=128)),
    "reconstruct-books": ("reconstruct", "books", dict(lr=3e-3, batch_size=8, grad_accum=1, seq_len=128)),
    "reconstruct-books-total": ("reconstruct", "books", dict(lr=3e-3, batch_size=8, grad_accum=1, seq_len=128,
                                                            reconstruct_loss="total")),
    "reconstruct-books-w3": ("reconstruct", "books", dict(lr=3e-3, batch_size=8, grad_accum=1, seq_len=128,
                                                         bridge_width=3)),
    # the teacher's states cached: four passes over a random quarter of what the steps would need
    "reconstruct-books-p4": ("reconstruct", "books", dict(lr=3e-3, batch_size=8, grad_accum=1, seq_len=128, passes=4.0)),
    "reconstruct-books-p4-first": ("reconstruct", "books", dict(lr=3e-3, batch_size=8, grad_accum=1, seq_len=128,
                                                               passes=4.0, reconstruct_first_token=True)),
    "reconstruct-books-p4-student": ("reconstruct", "books", dict(lr=3e-3, batch_size=8, grad_accum=1, seq_len=128,
                                                                 passes=4.0, bridge_inputs="student")),
    # bf16 autocast (teacher and bridges; weights, optimizer and loss in fp32): ~2.7x faster steps on a CPU with
    # AVX512-BF16
    "reconstruct-books-p4-bf16": ("reconstruct", "books", dict(lr=3e-3, batch_size=8, grad_accum=1, seq_len=128,
                                                              passes=4.0, mixed_precision="bf16")),
    # ... with the attention-sink position in the loss: without it, the longer run breaks that position
    "reconstruct-books-p4-bf16-first": ("reconstruct", "books", dict(lr=3e-3, batch_size=8, grad_accum=1, seq_len=128,
                                                                    passes=4.0, mixed_precision="bf16",
                                                                    reconstruct_first_token=True)),
    "reconstruct-books-p2": ("reconstruct", "books", dict(lr=3e-3, batch_size=8, grad_accum=1, seq_len=128, passes=2.0)),
    "reconstruct-alpaca": ("reconstruct", "alpaca", dict(lr=3e-3, batch_size=8, grad_accum=1, seq_len=256)),
    # training-free: its time counts against the budget of the phases after it
    "linear-books": ("linear", "books", dict(batch_size=8, seq_len=128)),
    "linear-cosine-books": ("linear", "books", dict(batch_size=8, seq_len=128, linear_objective="cosine",
                                                   linear_cosine_steps=200, linear_cosine_lr=1e-4)),
}


def setting_value(text: str):
    """A ``--set`` value: JSON (3, 6e-3, true, "auto"), else the text itself (student, auto)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


HEAL_DATA_NAMES = ("books", "alpaca", "ptb-test", "wikitext2-rest")
HELD_OUT_MARGIN = 512  # tokens skipped past the last scored chunk, so no healing text is near a scored one


def data_path(name: str, data_dir: Path, work: Path, tokenizer=None, ppl_limit: int | None = None) -> str:
    """The healing data of a run: ``alpaca``, ``books``, ``ptb-test`` (PTB's test sentences: the perplexity
    reads the validation split), ``wikitext2-rest`` (WikiText-2 test after the first ``ppl_limit`` chunks
    and a margin: in the domain of the perplexity text, none of its scored tokens), or a path."""
    if name == "alpaca":
        return str(data_dir / "alpaca" / "alpaca_data_2k_subset.json")
    if name == "books":  # the four Gutenberg novels (headers stripped by the reader)
        return str(data_dir / "gutenberg")
    if name == "ptb-test":
        return str(data_dir / "ptb" / "ptb.test.txt")
    if name == "wikitext2-rest":
        from shortened.evaluation.perplexity import load_ppl_text, tokenize_text

        path = work / "wikitext2-rest.txt"
        if not path.exists():
            text = load_ppl_text("wikitext2", data_dir)
            ids = tokenize_text(tokenizer, text)  # the evaluation's own tokenization
            skip = ppl_limit * 128 + HELD_OUT_MARGIN
            # Cut the text where the decoded prefix ends: the scored chunks are the first ppl_limit x 128 tokens.
            path.write_text(text[len(tokenizer.decode(ids[:skip])):], encoding="utf-8")
        return str(path)
    if Path(name).exists():
        return name
    raise ValueError(name)


def evaluate(model, tokenizer, data_dir: Path, ppl_limit: int, zs_limit: int | None,
             extra_ppl: tuple[str, ...] = (), full_ppl: bool = False) -> dict:
    """WikiText-2 and PTB perplexity (and of each text file of ``extra_ppl``, under ``ppl <path>``),
    zero-shot on ``zs_limit`` items per task; with ``full_ppl`` also WikiText-2 and PTB on every chunk
    (``wikitext2_full``, ``ptb_full``)."""
    from shortened.evaluation.perplexity import perplexity_on

    out = {}
    for name in ("wikitext2", "ptb", *extra_ppl):
        r = perplexity_on(model, tokenizer, name, data_dir=data_dir, seq_len=128, batch_size=8, limit=ppl_limit,
                          progress=False)
        out[name if name in ("wikitext2", "ptb") else f"ppl {name}"] = r["value"]
    for name in ("wikitext2", "ptb") if full_ppl else ():
        r = perplexity_on(model, tokenizer, name, data_dir=data_dir, seq_len=128, batch_size=8, limit=None,
                          progress=False)
        out[f"{name}_full"] = r["value"]
        out[f"{name}_full_chunks"] = r.get("n_chunks")
    if zs_limit:
        from shortened.evaluation.zeroshot import PAPER_METRICS, run_tasks

        res = run_tasks(model, tokenizer, list(PAPER_METRICS), data_dir=data_dir, limit=zs_limit, progress=False)
        out["zeroshot"] = {t: r["value"] for t, r in res.items()}
        out["zeroshot_avg"] = sum(out["zeroshot"].values()) / len(out["zeroshot"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=600, help="training seconds per method")
    p.add_argument("--methods", default="lora-paper,full-lm,distill-lora,distill-full-books",
                   help=f"comma-separated, from {', '.join(RUNS)}; a+b runs b on a's output, half the budget each")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--ppl-limit", type=int, default=300, help="first N chunks of 128 tokens")
    p.add_argument("--extra-ppl", action="append", default=[], metavar="TEXT_FILE",
                   help="also the perplexity of this text file (first --ppl-limit chunks); repeatable")
    p.add_argument("--full-ppl", action="store_true",
                   help="also WikiText-2 (test) and PTB (validation) on every chunk, as the paper reports them")
    p.add_argument("--zs-limit", type=int, default=0, help="items per zero-shot task (0: skip zero-shot)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--probe-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=None,
                   help="train this many steps instead of planning them from the budget (to repeat a run exactly)")
    p.add_argument("--cpu-budget", action="store_true",
                   help="--budget is process CPU seconds (steps planned from the probe's CPU time per step, no wall "
                        "cap): the same budget for every row on a machine shared with other jobs")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps (capped at the run's steps)")
    p.add_argument("--val-examples", type=int, default=32, help="validation examples per run")
    p.add_argument("--evals", type=int, default=4, help="validations per run")
    p.add_argument("--set", action="append", default=[], metavar="RUN.KEY=VALUE",
                   help="override a setting, e.g. distill-lora.lr=1e-3 (repeatable)")
    p.add_argument("--save-dir", type=Path, default=None,
                   help="save each healed model under DIR/METHOD (a plain Hugging Face folder) for later evaluation")
    p.add_argument("--heal-data", default=None, metavar="DATA",
                   help="heal every run on this data instead of its own: ptb-test, wikitext2-rest (WikiText-2 test "
                        "after the scored chunks; not with --full-ppl), books, alpaca or a path")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/healing.json"))
    p.add_argument("--skip-baselines", action="store_true", help="do not evaluate the dense and pruned models")
    p.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model")
    p.add_argument("--blocks", default=",".join(map(str, REMOVED)),
                   help="blocks to remove before healing (default: the issue's PPL-criterion choice)")
    args = p.parse_args()
    if args.heal_data and args.heal_data not in HEAL_DATA_NAMES and not Path(args.heal_data).exists():
        p.error(f"--heal-data {args.heal_data!r}: use {', '.join(HEAL_DATA_NAMES)} or an existing path")
    if args.heal_data == "wikitext2-rest" and args.full_ppl:
        p.error("--heal-data wikitext2-rest heals on the WikiText-2 chunks after --ppl-limit: not with --full-ppl")
    torch.set_num_threads(args.threads)
    runs = {k: (m, d, dict(s)) for k, (m, d, s) in RUNS.items()}
    for item in args.set:
        key, value = item.split("=", 1)
        run, field = key.split(".", 1)
        runs[run][2][field] = setting_value(value)

    work = Path(tempfile.mkdtemp(prefix="bench_heal-"))
    removed = [int(b) for b in args.blocks.split(",")]
    results = {"created": now_iso(), "command": " ".join(sys.argv), "budget_s": args.budget, "removed": removed,
               "threads": args.threads, "versions": library_versions(), "models": {}}
    if args.results.exists():
        results["models"] = json.loads(args.results.read_text()).get("models", {})

    dense, tok = load_model("smollm2-135m")
    if not (args.skip_baselines or args.skip_dense):
        t = time.perf_counter()
        results["models"]["dense"] = evaluate(dense, tok, args.data_dir, args.ppl_limit, args.zs_limit,
                                              tuple(args.extra_ppl), args.full_ppl)
        print("dense", results["models"]["dense"], f"({time.perf_counter() - t:.0f} s eval)", flush=True)
    n = len(dense.model.layers)
    kept = remove_blocks(dense, removed)
    pruned_dir = work / "pruned"
    save_model(dense, tok, pruned_dir, pruning_record("smollm2-135m", n, kept, model_type="llama"))
    if not args.skip_baselines:
        results["models"]["pruned"] = evaluate(dense, tok, args.data_dir, args.ppl_limit, args.zs_limit,
                                              tuple(args.extra_ppl), args.full_ppl)
        print("pruned", results["models"]["pruned"], flush=True)
    del dense

    from shortened.heal import get_method

    for name in [m for m in args.methods.split(",") if m]:
        # "a+b": run a, then b on a's output, sharing one budget (module docstring).
        phases = name.split("+")
        source, t, entries, spent = pruned_dir, time.perf_counter(), [], 0.0
        for k, phase in enumerate(phases):
            method, data, settings = runs[phase]
            training_left = sum(get_method(runs[p][0]).trains for p in phases[k:])
            common = dict(val_fraction=0.02, warmup_steps=args.warmup, progress=True, seed=0)
            common.update(settings)
            spec = data_path(args.heal_data or data, args.data_dir, work, tok, args.ppl_limit)
            dataset = load_healing_data(spec, tok, seq_len=common["seq_len"], val_fraction=common["val_fraction"],
                                        seed=common["seed"])
            dataset.val = dataset.val[:args.val_examples]
            out = work / f"{name}-{k}" if k + 1 < len(phases) else (
                args.save_dir / name if args.save_dir else None)
            if not get_method(method).trains:
                start, cpu = time.perf_counter(), time.process_time()
                r = heal(str(source), dataset, method, out=out, **{**common, "progress": False})
                h = r.record["healing"]
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                entries.append({"phase": phase, "method": method, "data": spec, "steps_done": 0,
                                "train_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                                "bridges": h.get("bridges"), "settings": {**common, "progress": None}})
                print(f"{name} [{phase}]: {wall:.1f} s wall, {cpu:.1f} s CPU", h.get("bridges"), flush=True)
                spent += cpu if args.cpu_budget else wall
                source = out
                continue
            budget = (args.budget - spent) / training_left
            # Timing probe: a few steps of the same run (training loop only), not counted in the budget.
            marks: list[float] = []
            clock = time.process_time if args.cpu_budget else time.perf_counter
            passes = common.get("passes")
            if args.steps:  # a fixed step count: no probe, no plan
                pass
            elif passes:
                # Four batches, gone over twice: steps 1-4 run the teacher, steps 5-8 read the teacher cache;
                # each kind timed over its last two steps (the first steps of a run are slow: one step
                # alone read up to 40% more than the run's steps took).
                batch = common["batch_size"] * common.get("grad_accum", 1)
                heal(str(source), HealingData(dataset.train[:4 * batch], []), method, steps=8,
                     on_step=lambda step, log: marks.append(clock()),
                     **{**common, "progress": False, "passes": None})
                first, later = (marks[3] - marks[1]) / 2, (marks[7] - marks[5]) / 2
                # A step of the first pass costs `first`, of a later pass `later`.
                per_step = first / passes + later * (1 - 1 / passes)
                print(f"{name} [{phase}]: first pass {first:.2f} s/step, later passes {later:.2f} s/step", flush=True)
            else:
                probe = heal(str(source), HealingData(dataset.train, []), method, steps=args.probe_steps + 1,
                             on_step=lambda step, log: marks.append(clock()), **{**common, "progress": False})
                if args.cpu_budget:  # CPU time between the first and the last probe step: loading left out
                    per_step = (marks[-1] - marks[0]) / args.probe_steps
                else:
                    per_step = probe.run.seconds / (args.probe_steps + 1)
            if args.steps:
                steps = args.steps
            else:
                steps = max(1, int(budget / per_step * 0.9))  # 10% for validation
                print(f"{name} [{phase}]: {per_step:.2f} s/step -> {steps} steps in {budget:.0f} s", flush=True)
            cpu = time.process_time()
            r = heal(str(source), dataset, method, steps=steps, max_time=None if args.cpu_budget else budget,
                     eval_every=max(1, steps // args.evals), out=out, **common)
            cpu = time.process_time() - cpu
            h = r.record["healing"]
            entries.append({"phase": phase, "method": method, "data": spec, "steps_planned": steps,
                            "steps_done": h["steps_done"], "train_seconds": round(r.run.seconds, 1),
                            "cpu_seconds": round(cpu, 1), "budget_s": round(budget, 1), "best_step": h["best_step"],
                            "val_before": h["val_loss_before"], "val_best": h["best_val_loss"],
                            "teacher_cache": h.get("teacher_cache"), "train_examples_used": h["data"].get(
                                "train_examples_used", h["data"]["train_examples"]),
                            "settings": {**common, "progress": None}})
            spent += cpu if args.cpu_budget else r.run.seconds
            source = out
        train_s = time.perf_counter() - t
        ev = evaluate(r.model, r.tokenizer, args.data_dir, args.ppl_limit, args.zs_limit, tuple(args.extra_ppl),
                      args.full_ppl)
        results["models"][name] = {**ev, **entries[-1], "steps_done": sum(e["steps_done"] for e in entries),
                                   "train_seconds": round(sum(e["train_seconds"] for e in entries), 1),
                                   "cpu_seconds": round(sum(e["cpu_seconds"] for e in entries), 1),
                                   "wall_seconds": round(train_s, 1), "phases": entries}
        print(name, results["models"][name], flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2, default=str))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)

    print("\n| model | steps | WikiText-2 | PTB | zero-shot avg |\n|---|---|---|---|---|")
    for name, m in results["models"].items():
        zs = f"{m['zeroshot_avg'] * 100:.1f}" if "zeroshot_avg" in m else "-"
        print(f"| {name} | {m.get('steps_done', '-')} | {m['wikitext2']:.1f} | {m['ptb']:.1f} | {zs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
