"""``shortened info MODEL``: architecture, block count and parameters per block."""

from __future__ import annotations

import argparse
import json

from ._common import HelpFormatter, add_model_args, load_from_args

EXAMPLES = """examples:
  shortened info smollm2-135m
  shortened info runs/pruned --json
  shortened info meta-llama/Llama-3.2-1B --dtype bfloat16
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's blocks and parameter counts",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..describe import format_info, model_info

    model, _ = load_from_args(args)
    info = model_info(model)
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_info(info))
    return 0
