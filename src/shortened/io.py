"""Writing outputs safely: one exclusive lock per output path, atomic files and folders, the overwrite
policy, the run record.

Every output is claimed before any work (:func:`claim_outputs`: refused when it exists without
``--overwrite``, when it is of the wrong kind or its folder cannot be written, and locked so that a second
writer of the same path fails at once), written to a temporary sibling ``.NAME.tmp-*`` and renamed into
place at the end (:func:`atomic_outputs`). If the target appeared meanwhile (another program wrote it),
nothing is replaced: the finished result is moved to a visible ``NAME.unsaved-*`` folder and the error
says where. Temporaries left by a killed process are removed by the next writer of the same path.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import glob
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ShortenedError

if TYPE_CHECKING:
    import torch

RECORD_FILE = "pruning.json"
TMP_INFIX = ".tmp-"
UNSAVED_INFIX = ".unsaved-"

# Locks this process holds, by absolute path: flock locks belong to an open file, so a nested writer
# of a path the process already claimed (a command, then save_model) would otherwise lock itself out.
_HELD: dict[str, int] = {}


def lock_file(path: str | os.PathLike) -> Path:
    """The sibling file whose flock guards writes to ``path``."""
    out = Path(path)
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, *, wait: bool = False) -> Iterator[bool]:
    """Hold the exclusive lock of output ``path`` for the block (re-entrant within a process).

    Another process holding it: ShortenedError at once (``wait``: block until it is released). On first
    acquisition, temporaries ``.NAME.tmp-*`` beside ``path`` are removed: every writer of ``path`` creates
    them under this lock, so any found now belong to a process that died. Yields whether this call took
    the lock (False when the process already held it).
    """
    out = Path(os.path.abspath(path))
    key = str(out)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield False
        finally:
            _HELD[key] -= 1
        return
    created = _make_parents(out.parent)
    lock = lock_file(out)
    fd = -1
    try:
        fd = _acquire(lock, out, wait)
        _HELD[key] = 1
        remove_temporaries(out)
        yield True
    finally:
        _HELD.pop(key, None)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still holding it: see _acquire
            os.close(fd)
        for folder in reversed(created):  # folders made only for an output that was not written
            with contextlib.suppress(OSError):
                folder.rmdir()


def _acquire(lock: Path, out: Path, wait: bool) -> int:
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise ShortenedError(f"cannot write {out}: {exc.strerror or exc} ({lock.parent})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise ShortenedError(f"{out} is being written by {who} (lock {lock}); wait for it to finish "
                                 "or choose another output") from None
        # The previous holder unlinks the file before releasing it; a lock taken on an unlinked file
        # guards nothing, so take the one on the file that is there now.
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created (outermost first)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    for f in reversed(missing):
        try:
            f.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            for c in reversed(created):
                with contextlib.suppress(OSError):
                    c.rmdir()
            raise ShortenedError(f"cannot create folder {f}: {exc.strerror or exc}") from None
        created.append(f)
    return created


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries ``.NAME.tmp-*`` of output ``path``; the caller holds its lock."""
    out = Path(path)
    removed = []
    for tmp in out.parent.glob(f".{glob.escape(out.name)}{TMP_INFIX}*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        removed.append(tmp)
    return removed


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove every ``.NAME.tmp-*`` in ``folder`` whose output ``NAME`` no live process is writing."""
    removed: list[Path] = []
    names = {p.name[1:p.name.index(TMP_INFIX)] for p in Path(folder).glob(f".*{TMP_INFIX}*")}
    for name in sorted(names):
        try:
            with output_lock(Path(folder) / name) as first:
                if first:
                    removed.append(Path(folder) / name)
        except ShortenedError:  # being written right now: its temporary is live
            continue
    return removed


def check_output(path: str | os.PathLike, overwrite: bool, *, kind: str = "dir") -> Path:
    """Refuse, before any work, an output that exists (unless ``overwrite``), exists as the other
    ``kind`` (``"dir"`` or ``"file"``), or lies where nothing can be written."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise ShortenedError(f"output {out} already exists; pass --overwrite to replace it")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise ShortenedError(f"output {out} exists and is not a folder")
    if kind == "file" and out.is_dir():
        raise ShortenedError(f"output {out} is a folder; give a file name")
    check_writable(out)
    return out


def check_writable(path: str | os.PathLike) -> None:
    """Refuse ``path`` when its folder cannot be created or written (probed with a temporary folder,
    since permission bits say nothing for root or on read-only and virtual file systems)."""
    out = Path(os.path.abspath(path))
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ShortenedError(f"cannot write {path}: {existing} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".shortened-probe-", dir=existing))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOENT:
            reason = "not a writable file system"
        raise ShortenedError(f"cannot write {path}: {existing} is not writable ({reason})") from None


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output folder (unless ``overwrite``) before any work is done."""
    return check_output(path, overwrite, kind="dir")


@contextlib.contextmanager
def claim_outputs(paths: Sequence[str | os.PathLike | None], *, overwrite: bool,
                  kind: str = "file") -> Iterator[list[Path]]:
    """Check every output of a command (None entries skipped) and hold their locks for the block:
    called first thing, so that no work is done for an output that could not be written."""
    outs = [check_output(p, overwrite, kind=kind) for p in paths if p is not None]
    with contextlib.ExitStack() as stack:
        for out in outs:
            stack.enter_context(output_lock(out))
        for out in outs:  # created between the check and the lock
            check_output(out, overwrite, kind=kind)
        yield outs


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike], *, overwrite: bool = False,
                   kind: str = "file") -> Iterator[list[Path]]:
    """Yield one temporary sibling per path (an empty folder for ``kind="dir"``, a file name for
    ``"file"``); when the block succeeds all of them are renamed into place, else removed.

    A target that appeared meanwhile is not replaced without ``overwrite``: the results are moved to a
    ``NAME.unsaved-*`` folder that the error names, and no target is touched.
    """
    # A target claimed earlier (a command claims its outputs first) that exists now appeared meanwhile:
    # it is refused at the end, so that the work of the block is kept.
    claimed = all(os.path.abspath(p) in _HELD for p in paths)
    with claim_outputs(paths, overwrite=overwrite or claimed, kind=kind) as outs:
        tmps: list[Path] = []
        try:
            for out in outs:
                if kind == "dir":
                    tmps.append(Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_INFIX}", dir=out.parent)))
                else:
                    fd, name = tempfile.mkstemp(prefix=f".{out.name}{TMP_INFIX}", suffix=out.suffix, dir=out.parent)
                    os.close(fd)
                    tmps.append(Path(name))
            yield tmps
            for tmp in tmps:
                _ordinary_permissions(tmp)
            appeared = [out for out in outs if os.path.lexists(out)] if not overwrite else []
            if appeared:
                kept = _keep(tmps, outs)
                raise ShortenedError(
                    f"output {appeared[0]} appeared while this command ran, so it was not replaced; the finished "
                    f"result is in {kept} (move it into place, or run again with --overwrite)")
            for tmp, out in zip(tmps, outs):
                _replace(tmp, out)
        finally:
            for tmp in tmps:
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False, kind: str = "file") -> Iterator[Path]:
    """:func:`atomic_outputs` for one path."""
    with atomic_outputs([path], overwrite=overwrite, kind=kind) as (tmp,):
        yield tmp


def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only when the block succeeds.

    On any error the temporary folder is removed and ``path`` is left as it was.
    """
    return atomic_output(path, overwrite=overwrite, kind="dir")


def write_file(path: str | os.PathLike, writer: Callable[[Path], Any], *, overwrite: bool = True) -> Path:
    """``writer(tmp)`` writes the content to a temporary file that then replaces ``path`` atomically."""
    with atomic_output(path, overwrite=overwrite, kind="file") as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write UTF-8 text atomically."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    return write_text(path, json_text(obj), overwrite=overwrite)


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON of every file shortened writes (paths and tensors serialised)."""
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def _replace(tmp: Path, out: Path) -> None:
    if out.is_dir() and not out.is_symlink():  # a folder cannot be renamed over another: move it aside
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _keep(tmps: list[Path], outs: list[Path]) -> Path:
    """Move finished temporaries, under their final names, into a visible ``NAME.unsaved-*`` folder."""
    kept = Path(tempfile.mkdtemp(prefix=f"{outs[0].name}{UNSAVED_INFIX}", dir=outs[0].parent))
    os.chmod(kept, 0o777 & ~_umask())
    for tmp, out in zip(tmps, outs):
        os.replace(tmp, kept / out.name)
    return kept


def _ordinary_permissions(folder: Path) -> None:
    """Give every file and folder below ``folder`` the permissions of a plain write (some writers use
    private temporary files, which would otherwise leave the output readable by its owner alone)."""
    umask = _umask()
    for path in [folder, *(folder.rglob("*") if folder.is_dir() else ())]:
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
    except IsADirectoryError:
        raise ShortenedError(f"{path} is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise ShortenedError(f"{path} is not a JSON file (not UTF-8 text)") from None
    except OSError as exc:
        raise ShortenedError(f"cannot read {path}: {exc.strerror or exc}") from None
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
    kept: list[int] | None = None,
    verify: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save a plain HF model folder (safetensors weights, config, generation config, tokenizer) and
    ``pruning.json`` atomically: the folder appears complete or not at all.

    A model whose blocks are on disk is written block by block from its checkpoint: ``kept`` (else the
    record's ``kept_blocks``) says which of the checkpoint's blocks each new one is.

    With ``verify`` (the default) the written folder is reloaded with plain transformers and compared with
    ``model`` before it is moved into place (:func:`shortened.verify.verify_saved`): a difference is a
    ShortenedError and nothing is left at ``out``. What was checked is recorded as ``verification``.

    ``dtype`` is the dtype of the saved weights (e.g. the source checkpoint's, :func:`shortened.loading.save_dtype`);
    None saves them as they are. A model computing in another dtype keeps it, its weights rounded in place to
    the values saved, so that what is verified (in the model's own dtype) is what was saved. The record notes
    the saved dtype as ``weights_dtype``.
    """
    from .offload import disk_blocks, save_from_disk

    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_model needs a Hugging Face model, got {type(model).__name__}")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"save_model needs a tokenizer (or None), got {type(tokenizer).__name__}")
    if record is not None and not isinstance(record, dict):
        raise TypeError(f"the record must be a dict such as pruning_record() returns, got {type(record).__name__}")
    on_disk = disk_blocks(model) is not None
    recorded = (record or {}).get("kept_blocks")
    kept = kept if kept is not None else recorded
    if not on_disk and isinstance(recorded, list):
        from .archs import num_blocks

        present = num_blocks(model)
        if len(recorded) != present:
            raise ShortenedError(f"the record keeps {len(recorded)} blocks but the model has {present}: build it "
                                 "from the indices remove_blocks returned for this model")
    if on_disk and kept is None:
        raise ShortenedError("a model with its blocks on disk is saved with its pruning record (kept_blocks)")
    computed = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    with atomic_output_dir(out, overwrite) as tmp:
        if on_disk:
            save_from_disk(model, list(kept), tmp, dtype=dtype)  # type: ignore[arg-type]
        elif dtype is not None and dtype != computed:
            cast_weights(model, dtype)
            try:
                model.save_pretrained(tmp)  # transformers 5 always writes safetensors
            finally:  # back, exactly: every value is now one the saved dtype holds
                cast_weights(model, computed)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if verify:
            from .verify import verify_saved

            report = verify_saved(tmp, model, trust_remote_code=bool(getattr(model.config, "auto_map", None)))
            if record is not None:
                record = dict(record, verification=report)
        if record is not None:
            from .loading import dtype_name

            record = dict(record, weights_dtype=dtype_name(dtype or computed))
            write_json(tmp / RECORD_FILE, record)
    return Path(out)


def cast_weights(model: Any, dtype: torch.dtype) -> None:
    """Parameters and persistent floating buffers to ``dtype``, in place. Non-persistent buffers (RoPE
    frequencies) stay as they are: ``from_pretrained`` computes them in float32 whatever the dtype, and the
    saved model is verified against a reload."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # the same Parameter: tied weights stay tied
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != dtype and name not in module._non_persistent_buffers_set:
                module._buffers[name] = b.to(dtype)


def pruning_record(
    source: str,
    original_num_blocks: int,
    kept: list[int],
    *,
    model_type: str,
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run record saved as ``pruning.json`` beside a pruned model; ``kept`` lists, in order, the
    original index of each remaining block (what :func:`~shortened.surgery.remove_blocks` returns)."""
    import operator

    from .surgery import is_kept_list

    try:
        kept = [operator.index(i) for i in kept]
        original_num_blocks = operator.index(original_num_blocks)
    except TypeError:
        raise TypeError("pruning_record needs integer block indices and an integer block count") from None
    if not kept or not is_kept_list(kept) or kept[-1] >= original_num_blocks:
        raise ShortenedError(f"kept blocks {kept} are not increasing original indices of a "
                             f"{original_num_blocks}-block model with at least one block left")
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


def compose_pruning(previous: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` of pruning a model that was pruned before (``previous``, its ``pruning.json``), rewritten
    against the original model: source, block count and kept/removed blocks in original indices, so the
    teacher of later healing is the original and the chain is not lost. ``selection`` stays as chosen on
    the input model; ``previous`` keeps how the input model was made. Without a previous record (or one
    without ``kept_blocks``) ``record`` is returned as it is."""
    if not previous or not isinstance(previous.get("kept_blocks"), list):
        return record
    before = previous["kept_blocks"]
    kept = [before[i] for i in record["kept_blocks"]]
    n = int(previous["original_num_blocks"])
    composed = dict(record, source=previous["source"], original_num_blocks=n, num_blocks=len(kept),
                    removed_blocks=sorted(set(range(n)) - set(kept)), kept_blocks=kept)
    composed["previous"] = {"model": record["source"],
                            "removed_now": sorted(set(range(len(before))) - set(record["kept_blocks"])),
                            **{k: previous[k] for k in ("removed_blocks", "selection", "healing", "previous")
                               if k in previous}}
    return composed


def read_pruning_record(spec: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The ``pruning.json`` of the local model ``spec``, or None (a Hub id, or a model never pruned)."""
    from .loading import resolve_local_folder

    folder = resolve_local_folder(spec, cache_dir)
    if folder is None or not (Path(folder) / RECORD_FILE).is_file():
        return None
    return read_json(Path(folder) / RECORD_FILE)
