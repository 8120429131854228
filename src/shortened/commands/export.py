"""``shortened export DIR --gguf FILE``: a GGUF file for llama.cpp (and Ollama) from a saved model folder.

llama.cpp's own converter makes the file (from a llama.cpp source tree: ``make llamacpp`` installs one,
or ``--llama-cpp DIR`` / ``$SHORTENED_LLAMA_CPP``); then every per-layer fact that pruning changed and the
converter leaves at the architecture's default (which layers use sliding-window attention) is written as
llama.cpp's per-layer array. The output is atomic and an existing FILE is refused without ``--overwrite``.
"""

from __future__ import annotations

import argparse

from ._common import HelpFormatter

EXAMPLES = """examples:
  shortened export runs/demo --gguf runs/demo.gguf
  shortened export runs/p --gguf p-q8.gguf --outtype q8_0 --overwrite
  shortened export runs/p --gguf p.gguf --llama-cpp ~/src/llama.cpp
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..export import OUTTYPES

    p = sub.add_parser("export", help="write a GGUF file for llama.cpp from a saved model folder",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("model", metavar="DIR", help="a saved Hugging Face model folder (e.g. the output of prune)")
    p.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    p.add_argument("--outtype", default="f32", choices=OUTTYPES, help="weight type in the file")
    p.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp source tree with convert_hf_to_gguf.py "
                                                      "(default: $SHORTENED_LLAMA_CPP, else the one 'make llamacpp' "
                                                      "installs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_gguf
    from ..io import claim_outputs

    with claim_outputs([args.gguf], overwrite=args.overwrite, kind="file"):
        info = export_gguf(args.model, args.gguf, outtype=args.outtype, llama_cpp=args.llama_cpp,
                           overwrite=args.overwrite)
    fixed = ", ".join(info["metadata"]) or "none needed"
    print(f"{info['architecture']} -> {info['file']} ({info['outtype']}, sha256 {info['sha256'][:16]}...; "
          f"per-layer metadata written: {fixed})")
    return 0
