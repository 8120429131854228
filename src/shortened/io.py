"""Writing outputs safely: atomic folders and files, the overwrite policy, the run record."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ShortenedError

RECORD_FILE = "pruning.json"


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output (unless ``overwrite``) before any work is done."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise ShortenedError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ShortenedError(f"output {out} exists and is not a folder")
    return out


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only when the block succeeds.

    On any error the temporary folder is removed and ``path`` is left as it was.
    """
    out = check_output_dir(path, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ShortenedError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        _ordinary_permissions(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _ordinary_permissions(folder: Path) -> None:
    """Give every file and folder below ``folder`` the permissions of a plain write (some writers use
    private temporary files, which would otherwise leave the output readable by its owner alone)."""
    umask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with a one-line error for a missing or malformed file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ShortenedError(f"file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ShortenedError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def library_versions() -> dict[str, str]:
    """Versions of shortened and the libraries whose behaviour a result depends on."""
    versions = {"python": platform.python_version()}
    for name in ("shortened", "torch", "transformers", "accelerate", "peft", "safetensors", "lm_eval"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def save_model(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike,
    record: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a plain HF model folder (safetensors weights, config, generation config, tokenizer) and
    ``pruning.json`` atomically: the folder appears complete or not at all.

    A model whose blocks are on disk is written block by block from its checkpoint; ``record`` must then
    hold ``kept_blocks`` (which original block each new one is).
    """
    from .offload import disk_blocks, save_from_disk

    on_disk = disk_blocks(model) is not None
    if on_disk and (record is None or "kept_blocks" not in record):
        raise ShortenedError("a model with its blocks on disk is saved with its pruning record (kept_blocks)")
    with atomic_output_dir(out, overwrite) as tmp:
        if on_disk:
            save_from_disk(model, list(record["kept_blocks"]), tmp)  # type: ignore[index]
        else:
            model.save_pretrained(tmp)  # transformers 5 always writes safetensors
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if record is not None:
            write_json(tmp / RECORD_FILE, record)
    return Path(out)


def pruning_record(
    source: str,
    original_num_blocks: int,
    kept: list[int],
    *,
    model_type: str,
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run record saved as ``pruning.json`` beside a pruned model."""
    removed = sorted(set(range(original_num_blocks)) - set(kept))
    return {
        "format_version": 1,
        "tool": "shortened",
        "created": now_iso(),
        "source": source,
        "model_type": model_type,
        "original_num_blocks": original_num_blocks,
        "num_blocks": len(kept),
        "removed_blocks": removed,
        # position i = original index of new block i
        "kept_blocks": list(kept),
        "selection": selection or {"method": "explicit"},
        "versions": library_versions(),
    }
