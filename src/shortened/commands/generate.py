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
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --sample; default 0.7)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --sample; default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ShortenedError
    from ..generation import generate_text
    from ..loading import resolve_local_folder

    if args.max_new_tokens < 1:
        raise ShortenedError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.sample and (args.temperature is not None or args.top_p is not None):
        raise ShortenedError("--temperature and --top-p set sampling: add --sample (the default is greedy decoding)")
    temperature = 0.7 if args.temperature is None else args.temperature
    top_p = 0.9 if args.top_p is None else args.top_p
    if not temperature > 0:
        raise ShortenedError(f"--temperature must be positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise ShortenedError(f"--top-p must be in (0, 1], got {top_p}")
    specs = [args.model] + ([args.compare] if args.compare else [])
    for spec in specs:  # a mistyped second model fails before the first one generates
        resolve_local_folder(spec, args.cache_dir)
    for spec in specs:
        args.model = spec
        model, tokenizer = load_from_args(args)
        if len(specs) > 1:
            print(f"=== {spec} ===", flush=True)
        generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                      do_sample=args.sample, temperature=temperature, top_p=top_p, seed=args.seed,
                      stream=True)
        print(flush=True)
        del model
    return 0
