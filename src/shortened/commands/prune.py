"""``shortened prune MODEL ... --out DIR``: remove blocks and save a plain HF model.

Which blocks: given explicitly (``--blocks``), chosen by a criterion scored now (``--criterion``), or
chosen from a saved scores file (``--scores``, no recomputation). How many: ``--num-blocks N`` or
``--ratio R`` (k = floor(R * blocks + 0.5)). ``pruning.json`` in DIR records the criterion, the scores,
the calibration settings and the selection.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..errors import ShortenedError
from ._common import HelpFormatter, add_model_args, add_save_dtype_arg, load_options, parse_int_list, saving_dtypes

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
    which.add_argument("--blocks", help="indices of the blocks to remove, e.g. 20,21,22 or 4-7, as 'shortened info "
                                        "MODEL' numbers them (for a model pruned before: its present blocks; "
                                        "pruning.json records original indices)")
    which.add_argument("--criterion", metavar="CRITERION",
                       help=f"score the blocks now with this criterion: {', '.join(criterion_names())}")
    which.add_argument("--scores", help="choose from a scores JSON file written by 'shortened score'")
    p.add_argument("--out", required=True, help="output folder (a plain Hugging Face model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_save_dtype_arg(p)
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
    from .score import given_scoring_flags

    chosen = args.criterion is not None or args.scores is not None
    if args.blocks is not None:
        extra = [f for f, v in (("--num-blocks", args.num_blocks), ("--ratio", args.ratio),
                                ("--iterative", args.iterative), ("--contiguous", args.contiguous),
                                ("--protect-first", args.protect_first), ("--protect-last", args.protect_last))
                 if v not in (None, False)] + given_scoring_flags(args)
        if extra:
            raise ShortenedError(f"{extra[0]} chooses blocks by score; it cannot be combined with --blocks")
    if chosen and args.num_blocks is None and args.ratio is None:
        raise ShortenedError("say how many blocks to remove: --num-blocks N or --ratio R")
    if args.iterative and args.scores is not None:
        raise ShortenedError("--iterative re-scores after each removal, so it needs --criterion, not --scores")
    if args.ratio is not None and not 0 < args.ratio < 1:
        raise ShortenedError(f"ratio must be strictly between 0 and 1, got {args.ratio}")
    if args.scores is not None:
        unused = [f for f in given_scoring_flags(args) if f != "--batch-size"]
        if unused:
            raise ShortenedError(f"{unused[0]} is not used with --scores (the scores are already computed)")


def run(args: argparse.Namespace) -> int:
    from ..io import claim_outputs

    with claim_outputs([args.out], overwrite=args.overwrite, kind="dir"):  # checked and locked before any work
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..archs import config_block_count, get_arch, num_blocks
    from ..choose import choose
    from ..data import check_source
    from ..io import compose_pruning, pruning_record, read_pruning_record, save_model
    from ..loading import dtype_name, load_for_scoring, local_config
    from ..scores_files import read_scores_file
    from ..selection import check_request
    from ..surgery import check_config, remove_blocks, validate_indices
    from .score import (calibration_from_args, criterion_options, engine_options, fill_calibration_defaults,
                        selection_request, unread_tables)

    _check_combination(args)
    fill_calibration_defaults(args)
    if args.calib is not None:
        check_source(args.calib)  # a missing, empty or binary file is told before the model loads
    blocks = parse_int_list(args.blocks) if args.blocks is not None else None
    saved, saved_calib = read_scores_file(args.scores) if args.scores is not None else (None, None)
    options = criterion_options(args) if args.criterion is not None else None  # mistakes before the load
    config = local_config(args.model, load_options(args))
    declared = config_block_count(config)  # None: known after the load
    if declared is not None and blocks is not None:
        validate_indices(blocks, declared)
    elif declared is not None and args.criterion is not None:
        check_request(declared, args.criterion, **selection_request(args))
    if config is not None:
        check_config(config, blocks)  # a removal the config cannot express is refused before the load
    dtype, source_dtype = saving_dtypes(args)
    loading = load_options(args)
    if args.criterion is None and args.dtype == "auto" and dtype is not None:
        # --blocks / --scores compute nothing: load in the dtype that is saved (half the memory of float32
        # for a bf16 model, and no conversion on the way out)
        loading = dataclasses.replace(loading, dtype=dtype_name(dtype))
    model, tokenizer = load_for_scoring(args.model, loading, offload=args.offload,
                                        unloaded=unread_tables(args.criterion))
    spec = get_arch(model)
    n = num_blocks(model, spec)
    selection: dict[str, Any] | None = None
    if blocks is not None:
        validate_indices(blocks, n)
    else:
        request = selection_request(args)
        ids, calib_info = None, saved_calib
        if saved is None:
            check_request(n, args.criterion, **request)  # before the calibration data, which may be slow
            calib = calibration_from_args(args, model, tokenizer)
            ids, calib_info = (calib.ids, calib.info) if calib else (None, None)
        selection = choose(model, ids, args.criterion, **request, iterative=args.iterative, contiguous=args.contiguous,
                           scores=saved, calibration_info=calib_info, options=options, scores_file=args.scores,
                           **engine_options(args))
        blocks = selection["removed"]
    if args.offload == "cpu":
        model.to("cpu")
    kept = remove_blocks(model, blocks, spec)  # with --offload disk: the (empty) module tree; saved from disk
    record = pruning_record(args.model, n, kept, model_type=model.config.model_type, selection=selection)
    record = compose_pruning(read_pruning_record(args.model, args.cache_dir), record)
    record["source_dtype"] = dtype_name(source_dtype)
    save_model(model, tokenizer, args.out, record, overwrite=args.overwrite, kept=kept, dtype=dtype)
    how = f" by {selection['criterion']} ({selection['method']})" if selection else ""
    removed_now = sorted(set(range(n)) - set(kept))
    original = (f" (of the original {record['original_num_blocks']}: {record['removed_blocks']} removed)"
                if "previous" in record else "")
    print(f"removed blocks {removed_now} of {n}{how}; {len(kept)} remain{original} -> {args.out}")
    return 0
