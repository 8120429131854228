"""``shortened score MODEL --criterion C --calib SRC --out scores.json``: score every block.

Writes the scores as JSON (criterion, scores, settings, calibration, library versions), the same as
CSV next to it (named after OUT: ``bi.json`` -> ``bi.csv``), and a bar chart (``bi.png``; a search also
plots its fitness, ``bi-search.png``). Lower score = less important.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ShortenedError
from ._common import HelpFormatter, add_model_args, add_progress_arg, load_options

EXAMPLES = """examples:
  shortened score smollm2-135m --criterion ppl --calib data/books/ --out runs/ppl.json
  shortened score smollm2-135m --criterion taylor --calib self --n-samples 10 --seq-len 128 --out runs/taylor.json
  shortened score ./my-llama --criterion angular --calib 'texts/*.jsonl' --out runs/angular.json
  shortened score meta-llama/Llama-3.1-70B --criterion ppl --calib wikitext2 --offload --out runs/70b.json
  shortened score meta-llama/Llama-3.1-405B --criterion ppl --calib wikitext2 --offload disk --out runs/405b.json
  shortened score smollm2-135m --criterion magnitude --norm l2 --out runs/mag.json
  shortened score smollm2-135m --criterion search --num-blocks 6 --calib data/books/ --out runs/search.json
"""

CALIB_HELP = ("calibration text: a .txt/.jsonl file, a folder or a glob; 'self' (text sampled from the model, "
              "seeded); or, when online, wikitext2, bookcorpus, c4, hf:NAME[:CONFIG][:SPLIT]")


#: The paper's calibration: 10 windows of 128 tokens (and our seed).
CALIBRATION_DEFAULTS = {"n_samples": 10, "seq_len": 128, "seed": 1234}
#: The scoring options besides the search's (SEARCH_FLAGS): all default to None, so "given" is "not None".
SCORING_FLAGS = ("--calib", "--n-samples", "--seq-len", "--seed", "--norm", "--angular-tokens", "--batch-size")


def given_scoring_flags(args: argparse.Namespace) -> list[str]:
    """The scoring options given on the command line (before :func:`fill_calibration_defaults`)."""
    return [flag for flag in (*SCORING_FLAGS, *SEARCH_FLAGS) if getattr(args, flag[2:].replace("-", "_")) is not None]


def fill_calibration_defaults(args: argparse.Namespace) -> None:
    """Replace the calibration options left unset by their defaults."""
    for dest, value in CALIBRATION_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def add_scoring_args(parser: argparse.ArgumentParser, *, required_criterion: bool = True) -> None:
    """Criterion, calibration and engine options, shared with ``shortened prune``."""
    from ..criteria import criterion_names

    if required_criterion:
        parser.add_argument("--criterion", required=True, metavar="CRITERION",
                            help=f"importance criterion: {', '.join(criterion_names())}")
    cal = parser.add_argument_group("calibration data")
    cal.add_argument("--calib", default=None, help=CALIB_HELP)
    # None until filled in (fill_calibration_defaults), so that a command can tell a given value from the default
    cal.add_argument("--n-samples", type=int, default=None,
                     help=f"number of calibration windows (default {CALIBRATION_DEFAULTS['n_samples']})")
    cal.add_argument("--seq-len", type=int, default=None,
                     help=f"tokens per calibration window (default {CALIBRATION_DEFAULTS['seq_len']})")
    cal.add_argument("--seed", type=int, default=None,
                     help="seed of the window sampling (and of --calib self, random; "
                          f"default {CALIBRATION_DEFAULTS['seed']})")
    opt = parser.add_argument_group("criterion options")
    opt.add_argument("--norm", choices=("l1", "l2"), default=None, help="magnitude: sum of |w| (l1) or the L2 norm")
    opt.add_argument("--angular-tokens", choices=("last", "all"), default=None,
                     help="angular: distance at the last token of each sample (the paper) or over all tokens")
    add_search_args(parser)
    eng = parser.add_argument_group("engine")
    eng.add_argument("--batch-size", type=int, default=None, help="calibration samples per micro-batch (default: all)")
    eng.add_argument("--offload", nargs="?", const="cpu", choices=("cpu", "disk"), default=None,
                     help="bring one block at a time to the accelerator (--device): 'cpu' (the default when "
                          "given without a value) keeps the blocks in memory, 'disk' keeps them in the model's "
                          "safetensors files and reads each when visited (models larger than memory)")
    add_progress_arg(eng)


#: The search's options on the command line: flag -> option of the search criterion.
SEARCH_FLAGS = {"--fitness": "fitness", "--generations": "generations", "--offspring": "offspring",
                "--search-stages": "stages", "--search-start": "start", "--search-max-run": "max_run"}


def add_search_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``--criterion search`` (shared by score, prune and run)."""
    g = parser.add_argument_group("search (with --criterion search: an evolutionary search for the set)")
    g.add_argument("--fitness", choices=("kl", "linear-kl", "ppl"),  # shortened.search.FITNESSES, without importing torch
                   default=None,
                   help="what the search minimises: mean KL(dense || pruned) of the next-token distributions "
                        "on the calibration tokens (kl, the default); the same KL with each removed run bridged by "
                        "a closed-form linear map, as the training-free 'linear' healing would (linear-kl: ranks "
                        "sets by what a cheap repair leaves); or the calibration perplexity (ppl)")
    g.add_argument("--generations", type=int, default=None, help="generations of the search (default 30)")
    g.add_argument("--offspring", type=int, default=None, help="children per generation (default 16)")
    g.add_argument("--search-stages", default=None, metavar="N:KEEP,...",
                   help="token budgets: each stage measures the children on the first N calibration samples "
                        "and keeps the KEEP best; the last stage is 'all' (default 1:4,3:1,all:1)")
    g.add_argument("--search-start", default=None, metavar="CRITERIA",
                   help="criteria whose selections are the candidates for the start (the best by the fitness "
                        "is taken; default bi,angular,magnitude: the ones that cost no more than a dense pass; add ppl,taylor "
                        "for theirs, at about one ppl criterion's time each or more)")
    g.add_argument("--search-max-run", type=int, default=None, metavar="K",
                   help="search only sets whose runs of adjacent removed blocks are at most K long (e.g. to "
                        "spread the removals; reconstruct's auto bridge width already gives long runs more blocks)")


def search_options(args: argparse.Namespace) -> dict[str, Any]:
    """The search options given on the command line (refused with any other criterion)."""
    given = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key in SEARCH_FLAGS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    if args.criterion != "search":
        flag = next((f for f, k in SEARCH_FLAGS.items() if k in given), None)
        if flag:
            raise ShortenedError(f"{flag} applies to --criterion search, not {args.criterion}")
        return {}
    return given


def criterion_options(args: argparse.Namespace) -> dict[str, Any]:
    """The criterion-specific options given on the command line, checked against the criterion (the
    selection request of the search is added by :func:`shortened.choose.scoring_options`)."""
    from ..choose import check_choice
    from ..criteria import get_criterion

    check_choice(args.criterion, iterative=getattr(args, "iterative", False),
                 contiguous=getattr(args, "contiguous", False))
    if args.batch_size is not None and args.batch_size < 1:
        raise ShortenedError(f"--batch-size must be at least 1, got {args.batch_size}")
    options: dict[str, Any] = {}
    given = {"norm": ("magnitude", args.norm), "tokens": ("angular", args.angular_tokens)}
    for key, (owner, value) in given.items():
        if value is None:
            continue
        if args.criterion != owner:
            flag = "--norm" if key == "norm" else "--angular-tokens"
            raise ShortenedError(f"{flag} applies to the {owner} criterion, not {args.criterion}")
        options[key] = value
    if get_criterion(args.criterion).takes_seed:  # random, search
        options["seed"] = args.seed
    options.update(search_options(args))
    return options


def calibration_from_args(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    """The :class:`~shortened.data.Calibration` of --calib, --n-samples, --seq-len and --seed (None when the
    criterion needs no data)."""
    from ..choose import calibration_for

    return calibration_for(args.criterion, args.calib, tokenizer, model, n_samples=args.n_samples,
                           seq_len=args.seq_len, seed=args.seed)


def unread_tables(criterion: str | None) -> tuple[str, ...]:
    """The tables a model with its blocks on disk may leave unloaded for ``criterion`` (None: the blocks are
    given, nothing is computed)."""
    from ..criteria import get_criterion

    if criterion is None:
        return ("head", "embedding")
    return () if get_criterion(criterion).uses_head else ("head",)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """--batch-size, --offload (with --device, where the blocks run) and --no-progress, for the scoring."""
    return dict(batch_size=args.batch_size, offload=bool(args.offload),
                device=args.device if args.offload else None, progress=not args.no_progress)


def selection_request(args: argparse.Namespace) -> dict[str, Any]:
    """--num-blocks / --ratio and the protection."""
    return dict(num_blocks=args.num_blocks, ratio=args.ratio, protect_first=args.protect_first,
                protect_last=args.protect_last)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score every block's importance (lower = remove first)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    add_model_args(p)
    add_scoring_args(p)
    sel = p.add_argument_group("selection request (with --criterion search, which chooses the set)")
    count = sel.add_mutually_exclusive_group()
    count.add_argument("--num-blocks", type=int, default=None, help="number of blocks to remove")
    count.add_argument("--ratio", type=float, default=None, help="fraction of the blocks to remove, rounded half up")
    sel.add_argument("--protect-first", type=int, default=None, help="never remove the first K blocks (default 0)")
    sel.add_argument("--protect-last", type=int, default=None, help="never remove the last M blocks (default 0)")
    p.add_argument("--out", required=True, help="scores JSON file; the CSV and the PNG chart go next to it")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import claim_outputs
    from ..scores_files import output_paths

    paths = output_paths(args.out, search=args.criterion == "search")
    with claim_outputs(list(paths.values()), overwrite=args.overwrite):  # before any work
        return _run(args, paths)


def _run(args: argparse.Namespace, paths: dict[str, Path]) -> int:
    from ..archs import config_block_count, get_arch
    from ..choose import scoring_options
    from ..data import check_source
    from ..criteria import score_blocks
    from ..io import library_versions, now_iso
    from ..loading import load_for_scoring, local_config
    from ..scores_files import scores_record, write_scores_files
    from ..selection import check_request

    fill_calibration_defaults(args)
    if args.calib is not None:
        check_source(args.calib)  # a missing, empty or binary file is told before the model loads
    options = criterion_options(args)  # option mistakes before the load too
    request = selection_request(args)
    given = [k for k, v in request.items() if v is not None]
    if args.criterion != "search" and given:
        raise ShortenedError(f"--{given[0].replace('_', '-')} is a selection request; 'shortened score' takes it "
                             "only with --criterion search (use 'shortened prune' to select)")
    options = scoring_options(args.criterion, options, **request)
    declared = config_block_count(local_config(args.model, load_options(args)))  # None: known after the load
    if args.criterion == "search" and declared is not None:
        check_request(declared, args.criterion, **request)
    model, tokenizer = load_for_scoring(args.model, load_options(args), offload=args.offload,
                                        unloaded=unread_tables(args.criterion))
    calib = calibration_from_args(args, model, tokenizer)
    scores = score_blocks(model, calib.ids if calib else None, args.criterion, **engine_options(args), **options)
    record = scores_record(args.model, model, scores, calib.info if calib else None)
    record.update(created=now_iso(), versions=library_versions())
    write_scores_files(record, paths, overwrite=args.overwrite)
    if args.criterion == "search":  # its scores are the chosen set (0) and the rest (1): name the set
        found = record["extra"]["search"]
        summary = f"removes {found['removed']} (fitness {found['fitness']:.4g})"
    else:
        summary = f"lowest: {sorted(range(len(scores.scores)), key=lambda i: scores.scores[i])[:5]}"
    print(f"{scores.criterion} scores of {len(scores.scores)} blocks ({get_arch(model).model_types[0]}) -> "
          f"{paths['json']}, {paths['csv'].name}, {paths['png'].name}; {summary}")
    return 0
