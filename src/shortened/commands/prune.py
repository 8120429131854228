"""``shortened prune MODEL --blocks ... --out DIR``: remove blocks and save a plain HF model."""

from __future__ import annotations

import argparse

from ._common import HelpFormatter, add_model_args, load_from_args, parse_int_list

EXAMPLES = """examples:
  shortened prune smollm2-135m --blocks 20,21,22 --out runs/p
  shortened prune ./my-llama --blocks 4-7 --out runs/p --overwrite
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove blocks and save the pruned model",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--blocks", required=True, help="original indices of the blocks to remove, e.g. 20,21,22 or 4-7")
    p.add_argument("--out", required=True, help="output folder (a plain Hugging Face model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..archs import get_arch, num_blocks
    from ..io import check_output_dir, pruning_record, save_model
    from ..surgery import remove_blocks, validate_indices

    blocks = parse_int_list(args.blocks)
    check_output_dir(args.out, args.overwrite)  # fail before the (slow) load
    model, tokenizer = load_from_args(args)
    spec = get_arch(model)
    n = num_blocks(model, spec)
    validate_indices(blocks, n)
    kept = remove_blocks(model, blocks, spec)
    record = pruning_record(args.model, n, kept, model_type=model.config.model_type)
    save_model(model, tokenizer, args.out, record, overwrite=args.overwrite)
    print(f"removed blocks {record['removed_blocks']} of {n}; {len(kept)} remain -> {args.out}")
    return 0
