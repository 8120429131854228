"""``shortened generate MODEL --prompt ...``: try a model, optionally next to another one."""

from __future__ import annotations

import argparse

from ._common import HelpFormatter, add_model_args, load_from_args

EXAMPLES = """examples:
  shortened generate runs/p --prompt "Give three tips for staying healthy."
  shortened generate runs/p --compare smollm2-135m --prompt "What is the capital of France?"
  shortened generate runs/p --prompt "Once upon a time" --no-chat --sample --seed 1
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (streamed)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--compare", default=None, metavar="MODEL", help="also generate with this model (e.g. the original)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..generation import generate_text

    specs = [args.model] + ([args.compare] if args.compare else [])
    for spec in specs:
        args.model = spec
        model, tokenizer = load_from_args(args)
        if len(specs) > 1:
            print(f"=== {spec} ===", flush=True)
        generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                      do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      stream=True)
        print(flush=True)
        del model
    return 0
