"""``shortened prune MODEL ... --out DIR``: remove blocks and save a plain HF model.

Which blocks: given explicitly (``--blocks``), chosen by a criterion scored now (``--criterion``), or
chosen from a saved scores file (``--scores``, no recomputation). How many: ``--num-blocks N`` or
``--ratio R`` (k = floor(R * blocks + 0.5)). ``pruning.json`` in DIR records the criterion, the scores,
the calibration settings and the selection.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ShortenedError
from ._common import HelpFormatter, add_model_args, load_from_args, parse_int_list

EXAMPLES = """examples:
  shortened prune smollm2-135m --blocks 20,21,22 --out runs/p
  shortened prune ./my-llama --blocks 4-7 --out runs/p --overwrite
  shortened prune smollm2-135m --criterion ppl --calib data/books/ --ratio 0.2 --out runs/ppl20
  shortened prune smollm2-135m --criterion taylor --calib self --num-blocks 6 --out runs/taylor6
  shortened prune smollm2-135m --scores runs/ppl.json --num-blocks 6 --out runs/ppl6
  shortened prune smollm2-135m --criterion ppl --calib self --iterative --num-blocks 6 --out runs/sleb6
  shortened prune smollm2-135m --criterion angular --calib self --contiguous --num-blocks 6 --out runs/ang6
  shortened prune smollm2-135m --criterion search --calib data/books/ --num-blocks 6 --generations 60 --out runs/s6
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..criteria import criterion_names
    from .score import add_scoring_args

    p = sub.add_parser("prune", help="remove blocks (given, or chosen by a criterion) and save the pruned model",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    add_model_args(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--blocks", help="original indices of the blocks to remove, e.g. 20,21,22 or 4-7")
    which.add_argument("--criterion", metavar="CRITERION",
                       help=f"score the blocks now with this criterion: {', '.join(criterion_names())}")
    which.add_argument("--scores", help="choose from a scores JSON file written by 'shortened score'")
    p.add_argument("--out", required=True, help="output folder (a plain Hugging Face model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sel = p.add_argument_group("selection (with --criterion or --scores)")
    count = sel.add_mutually_exclusive_group()
    count.add_argument("--num-blocks", type=int, default=None, help="number of blocks to remove")
    count.add_argument("--ratio", type=float, default=None,
                       help="fraction of the blocks to remove, 0 < R < 1, rounded half up")
    sel.add_argument("--protect-first", type=int, default=None,
                     help="never remove the first K blocks (default: 4 for taylor and magnitude, else 0)")
    sel.add_argument("--protect-last", type=int, default=None,
                     help="never remove the last M blocks (default: 2 for taylor and magnitude, else 0)")
    sel.add_argument("--iterative", action="store_true",
                     help="remove one block at a time and re-score the rest (SLEB-style; with --criterion)")
    sel.add_argument("--contiguous", action="store_true",
                     help="remove one run of adjacent blocks (angular: its span distance; others: summed scores)")
    add_scoring_args(p, required_criterion=False)
    p.set_defaults(func=run)


def _check_combination(args: argparse.Namespace) -> None:
    chosen = args.criterion is not None or args.scores is not None
    if args.blocks is not None:
        extra = [f for f, v in (("--num-blocks", args.num_blocks), ("--ratio", args.ratio),
                                ("--iterative", args.iterative), ("--contiguous", args.contiguous),
                                ("--protect-first", args.protect_first), ("--protect-last", args.protect_last))
                 if v not in (None, False)]
        if extra:
            raise ShortenedError(f"{extra[0]} chooses blocks by score; it cannot be combined with --blocks")
    if chosen and args.num_blocks is None and args.ratio is None:
        raise ShortenedError("say how many blocks to remove: --num-blocks N or --ratio R")
    if args.iterative and args.scores is not None:
        raise ShortenedError("--iterative re-scores after each removal, so it needs --criterion, not --scores")
    if args.iterative and args.contiguous:
        raise ShortenedError("--iterative and --contiguous cannot be combined")
    if args.ratio is not None and not 0 < args.ratio < 1:
        raise ShortenedError(f"ratio must be strictly between 0 and 1, got {args.ratio}")
    if args.scores is not None and args.calib is not None:
        raise ShortenedError("--calib is not used with --scores (the scores are already computed)")


def run(args: argparse.Namespace) -> int:
    from ..io import claim_outputs

    with claim_outputs([args.out], overwrite=args.overwrite, kind="dir"):  # checked and locked before any work
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..archs import get_arch, num_blocks
    from ..io import pruning_record, read_json, save_model
    from ..surgery import remove_blocks, validate_indices

    _check_combination(args)
    blocks = parse_int_list(args.blocks) if args.blocks is not None else None
    saved = read_json(args.scores) if args.scores is not None else None
    if args.criterion is not None:
        from .score import criterion_options

        criterion_options(args)
    if args.criterion is not None or args.offload:
        from .score import load_for_scoring

        model, tokenizer = load_for_scoring(args)
    else:
        model, tokenizer = load_from_args(args)
    spec = get_arch(model)
    n = num_blocks(model, spec)
    selection: dict[str, Any] | None = None
    if blocks is not None:
        validate_indices(blocks, n)
    else:
        selection = _choose(args, model, tokenizer, saved, n)
        blocks = selection["removed"]
    if args.offload == "cpu":
        model.to("cpu")
    kept = remove_blocks(model, blocks, spec)  # with --offload disk: the (empty) module tree; saved from disk
    record = pruning_record(args.model, n, kept, model_type=model.config.model_type, selection=selection)
    save_model(model, tokenizer, args.out, record, overwrite=args.overwrite)
    how = f" by {selection['criterion']} ({selection['method']})" if selection else ""
    print(f"removed blocks {record['removed_blocks']} of {n}{how}; {len(kept)} remain -> {args.out}")
    return 0


def _choose(args: argparse.Namespace, model: Any, tokenizer: Any, saved: Any, n: int) -> dict[str, Any]:
    """Score (or read scores), select, and return the ``selection`` record for pruning.json."""
    from ..engine import BlockScores
    from ..selection import check_request, iterative_select, select_blocks
    from .score import calibration_from_args, compute_scores, criterion_options

    sel_kw = dict(num_blocks=args.num_blocks, ratio=args.ratio,
                  protect_first=args.protect_first, protect_last=args.protect_last)
    calib: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = []
    criterion = args.criterion if saved is None else str(saved.get("criterion", "custom")) if isinstance(saved, dict) else "custom"
    check_request(n, criterion, **sel_kw)  # before any (slow) scoring
    if saved is not None:
        if not isinstance(saved, dict):
            raise ShortenedError(f"{args.scores} is not a scores file written by 'shortened score'")
        scores = BlockScores.from_dict(saved)
        if scores.num_blocks != n:
            raise ShortenedError(f"{args.scores} scores {scores.num_blocks} blocks but the model has {n}")
        if any(s is None for s in scores.scores):
            raise ShortenedError(f"{args.scores} lacks the score of some blocks")
        calib = saved.get("calibration")
        plan = select_blocks(scores, contiguous=args.contiguous, **sel_kw)
    elif args.iterative:
        from ..criteria import get_criterion

        ids, calib = (calibration_from_args(args, model, tokenizer) if get_criterion(args.criterion).needs_data
                      else (None, None))
        plan, history = iterative_select(
            model, ids, args.criterion, batch_size=args.batch_size, offload=bool(args.offload),
            device=args.device if args.offload else None, progress=not args.no_progress,
            **sel_kw, **criterion_options(args))
        scores = history[0]
        steps = plan.steps
    else:
        scores, calib = compute_scores(args, model, tokenizer)
        plan = select_blocks(scores, contiguous=args.contiguous, **sel_kw)
    plan_dict = plan.to_dict()
    plan_dict.pop("steps", None)
    return {
        "method": plan.method,
        "criterion": scores.criterion,
        "removed": plan.remove,
        "plan": plan_dict,
        "scores": scores.to_dict(),
        "calibration": calib,
        "scores_file": args.scores,
        "iterative_steps": steps,
    }
