"""Where the blocks of an offloaded model live between the engine's visits: in memory, or on disk.

The scoring engine visits blocks one at a time. In offloaded mode it fetches a block onto the execution
device for its visit and releases it afterwards, so only one block's weights are on the accelerator:

- :class:`MemoryHome`: the blocks stay in memory on a device (the CPU) and are moved;
- :class:`DiskBlocks`: no block weights are held at all. The model is built with its blocks on the meta
  device (:func:`load_blocks_on_disk`); a block's tensors are read from the model's safetensors files
  when it is fetched and dropped again when it is released. Scoring then needs memory for the
  embeddings, the head and one block: a model larger than the machine's memory can be scored.

The two large tables outside the blocks (the input embedding and the output head: 2 x 1 GiB of bf16 for an
8B Llama) are kept in the checkpoint's dtype when it is narrower than the compute dtype, and upcast where
they are used (a looked-up row; one slice of the head's rows at a time): upcasting is exact, so this computes
what a full-precision copy would, in half its memory. Work that does not read the head (BI, angular,
magnitude scores; pruning chosen blocks) leaves it, and pruning the embedding too, unloaded: the save reads
them from the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from collections import defaultdict
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .archs import get_arch, get_blocks
from .errors import ShortenedError


class BlockHome(Protocol):
    """Puts a block on the execution device for a visit and takes it away afterwards."""

    def fetch(self, block: nn.Module, index: int, device: torch.device) -> None: ...

    def release(self, block: nn.Module, index: int) -> None: ...


class MemoryHome:
    """Blocks kept in memory on ``device`` and moved to the execution device for their visit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def fetch(self, block: nn.Module, index: int, device: torch.device) -> None:
        block.to(device)

    def release(self, block: nn.Module, index: int) -> None:
        block.to(self.device)


class DiskBlocks:
    """Block weights read from safetensors files at each visit (``blocks_prefix.{index}.*``).

    ``names`` maps each of the model's tensor names to ``(file, name in that file)``: checkpoints may use
    older names that transformers renames on load (e.g. GPT-NeoX's ``embed_out``).
    """

    def __init__(self, names: dict[str, tuple[Path, str]], blocks_prefix: str, dtype: torch.dtype) -> None:
        self.names = names
        self.prefix = blocks_prefix
        self.dtype = dtype

    def _read(self, wanted: dict[str, str], device: torch.device, keep: Container[str] = ()) -> dict[str, torch.Tensor]:
        """``wanted``: local name -> model tensor name; returns local name -> tensor on ``device``, floating
        tensors in :attr:`dtype` except those named in ``keep`` (local names), which stay as stored."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
        for local, name in wanted.items():
            path, key = self.names[name]
            by_file[path].append((local, key))
        where = "cpu" if device.type == "cpu" else str(device)
        out: dict[str, torch.Tensor] = {}
        for path, items in by_file.items():
            with safe_open(str(path), "pt", device=where) as f:
                for local, key in items:
                    t = f.get_tensor(key)
                    out[local] = t.to(self.dtype) if t.is_floating_point() and local not in keep else t
        return out

    def fetch(self, block: nn.Module, index: int, device: torch.device) -> None:
        from accelerate.utils import set_module_tensor_to_device

        prefix = f"{self.prefix}.{index}."
        wanted = {name: prefix + name for name, _ in block.named_parameters()}
        wanted.update({name: prefix + name for name, _ in block.named_buffers() if prefix + name in self.names})
        for name, value in self._read(wanted, device).items():
            set_module_tensor_to_device(block, name, device, value=value)
        for name, buf in block.named_buffers():  # buffers not in the checkpoint (computed at init) move along
            if name not in wanted and buf.device != device:
                set_module_tensor_to_device(block, name, device)

    def release(self, block: nn.Module, index: int) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(block.named_parameters()):
            set_module_tensor_to_device(block, name, "meta")
        for name, buf in list(block.named_buffers()):
            if buf.device.type != "cpu":
                set_module_tensor_to_device(block, name, "cpu")

    def load_rest(self, model: nn.Module, device: torch.device, *, head: bool = True, embedding: bool = True) -> None:
        """Read every tensor outside the blocks (embeddings, final norm, head) onto ``device``; without ``head``
        or ``embedding`` that table stays on the meta device (a tied head comes with the embedding)."""
        from accelerate.utils import set_module_tensor_to_device

        block_prefix = self.prefix + "."
        tables = _tables(model)
        unloaded = set()
        if not embedding:
            unloaded |= tables["embedding"]
        if not head and not (tables["head"] & tables["embedding"] and embedding):
            unloaded |= tables["head"]
        wanted = {name: name for name, _ in _named_tensors(model) if not name.startswith(block_prefix)
                  and name in self.names and name not in unloaded}
        stored = self._stored_narrower(tables["embedding"] | tables["head"])
        for name, value in self._read(wanted, device, keep=stored).items():
            set_module_tensor_to_device(model, name, device, value=value, dtype=value.dtype)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # a tied head is not in the checkpoint: it is the embedding
        for name, p in model.named_parameters(remove_duplicate=False):
            if not name.startswith(block_prefix) and p.is_meta and name not in unloaded:
                raise ShortenedError(f"the checkpoint has no tensor for '{name}': cannot keep this model's "
                                     "blocks on disk (use --offload cpu)")
        for name, buf in model.named_buffers():
            if not name.startswith(block_prefix) and buf.device != device:
                set_module_tensor_to_device(model, name, device)
        _upcast_tables(model, self.dtype)

    def _stored_narrower(self, names: set[str]) -> set[str]:
        """Those of ``names`` the checkpoint stores in a narrower floating dtype than :attr:`dtype`."""
        from safetensors import safe_open

        narrower = set()
        for name in names & set(self.names):
            path, key = self.names[name]
            with safe_open(str(path), "pt") as f:
                stored = f.get_slice(key).get_dtype()
            width = _SAFETENSORS_WIDTH.get(stored)
            if width is not None and width < self.dtype.itemsize:
                narrower.add(name)
        return narrower

    def read_tensor(self, name: str, device: torch.device) -> torch.Tensor:
        """One tensor outside the blocks, as stored (a table left unloaded, read when it is saved)."""
        return self._read({name: name}, device, keep={name})[name]


#: safetensors dtype names of floating types -> bytes per element.
_SAFETENSORS_WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def _table_modules(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The input embedding and the output projection: the two tables whose size grows with the vocabulary."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return embedding, head


def _tables(model: nn.Module) -> dict[str, set[str]]:
    """The parameter names (every alias of a tied tensor) of the input embedding ("embedding") and of the
    output projection ("head")."""
    found: dict[str, set[str]] = {"embedding": set(), "head": set()}
    for role, module in zip(found, _table_modules(model)):
        if module is None:
            continue
        tensors = {id(p) for p in module.parameters()}
        found[role] = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in tensors}
    return found


def _upcast_tables(model: nn.Module, dtype: torch.dtype) -> None:
    """Let a plain embedding or linear head whose weight is narrower than ``dtype`` compute in ``dtype``: the
    looked-up rows are upcast, the head multiplies one upcast slice of its rows at a time (both exact)."""
    embedding, head = _table_modules(model)
    if type(embedding) is nn.Embedding and _narrower(embedding.weight, dtype):
        embedding.register_forward_hook(lambda module, args, out: out.to(dtype))
    if type(head) is nn.Linear and _narrower(head.weight, dtype):
        # read at each call: the weight may be replaced (a tie, a reload) after this
        head.forward = lambda x: upcast_linear(x, head.weight, head.bias)  # type: ignore[method-assign]


def _narrower(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return not t.is_meta and t.is_floating_point() and t.dtype.itemsize < dtype.itemsize


#: Rows of a narrower weight upcast at once by :func:`upcast_linear` (4 MiB of float32 for a 1024-wide model).
UPCAST_ROWS = 1024


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed in ``x``'s dtype when ``weight`` is stored narrower: each slice of
    :data:`UPCAST_ROWS` output rows upcast for its product, so no full-precision copy of ``weight`` exists."""
    if weight.dtype == x.dtype:
        return torch.nn.functional.linear(x, weight, bias)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for v in range(0, weight.shape[0], UPCAST_ROWS):
        b = None if bias is None else bias[v:v + UPCAST_ROWS].to(x.dtype)
        out[..., v:v + UPCAST_ROWS] = torch.nn.functional.linear(x, weight[v:v + UPCAST_ROWS].to(x.dtype), b)
    return out


# Models whose blocks are read from disk -> their DiskBlocks (weak: the entry goes with the model).
_DISK: "weakref.WeakKeyDictionary[nn.Module, DiskBlocks]" = weakref.WeakKeyDictionary()


def disk_blocks(model: nn.Module) -> DiskBlocks | None:
    """The :class:`DiskBlocks` of a model loaded by :func:`load_blocks_on_disk`, else None."""
    return _DISK.get(model)


@contextlib.contextmanager
def streamed(model: nn.Module, micro_batch: int, on_block: Callable[[], None] | None = None) -> Iterator[None]:
    """For the duration, a forward of ``model`` (its blocks on disk) reads each block once: fetched onto the
    device of the model's other weights when it is called, run on ``micro_batch`` sequences at a time (so a
    forward over many sequences holds one micro-batch's activations), released after; ``on_block`` is
    called after each."""
    from .engine.capture import call_in_slices

    store = disk_blocks(model)
    if store is None:
        raise ShortenedError("streamed() is for a model loaded with its blocks on disk")
    blocks = get_blocks(model, get_arch(model))
    device = loaded_device(model)

    def visit(index: int, block: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            store.fetch(block, index, device)
            try:
                return call_in_slices(forward, args, kwargs, micro_batch)
            finally:
                store.release(block, index)
                if on_block is not None:
                    on_block()
        return run

    own = [block.__dict__.get("forward") for block in blocks]  # a forward set on the instance (a hook's)
    for i, block in enumerate(blocks):
        block.forward = visit(i, block, block.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward  # the class's forward again
            else:
                block.forward = forward  # type: ignore[method-assign]


def loaded_device(model: nn.Module) -> torch.device:
    """Where the weights of a model with its blocks on disk are (those loaded), and so where its blocks run."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: its blocks' store's for one with blocks on disk (whose tables may be
    held narrower), else its first floating parameter's."""
    store = disk_blocks(model)
    if store is not None:
        return store.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def check_in_memory(model: nn.Module, what: str) -> None:
    """Refuse, with one line, work that runs the whole model on one whose blocks are on disk (only
    scoring, pruning, saving and perplexity read those block by block)."""
    if disk_blocks(model) is not None:
        raise ShortenedError(f"{what} runs the whole model, and this one was loaded with its blocks on disk "
                             "(blocks_on_disk=True, --offload disk), for scoring, pruning and perplexity only: "
                             "load it without to do this")


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers()


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted({folder / f for f in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ShortenedError(f"no safetensors weights in {folder}: blocks can only be read from safetensors files")
    return files


def _renamings(model: nn.Module) -> list[tuple[str, str]]:
    """transformers' own renamings of legacy checkpoint names for this model (regex, replacement)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model)
    except Exception:  # older or newer transformers without this API: names are taken as they are
        return []
    pairs = []
    for t in transforms:
        if isinstance(t, WeightRenaming):
            pairs += list(zip(t.source_patterns, t.target_patterns))
    return pairs


def index_checkpoint(model: nn.Module, folder: Path) -> dict[str, tuple[Path, str]]:
    """Model tensor name -> (file, checkpoint name), checked against the model's shapes."""
    from safetensors import safe_open

    renames = _renamings(model)
    names: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, list[int]] = {}
    for path in checkpoint_files(folder):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                name = key
                for pattern, repl in renames:
                    name = re.sub(pattern, repl, name)
                names[name] = (path, key)
                shapes[name] = list(f.get_slice(key).get_shape())
    for name, t in _named_tensors(model):
        if name in shapes and shapes[name] != list(t.shape):
            raise ShortenedError(f"checkpoint tensor for '{name}' has shape {shapes[name]}, the model expects "
                                 f"{list(t.shape)}: cannot read its blocks from disk")
    return names


def load_blocks_on_disk(folder: Path, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                        trust_remote_code: bool = False, head: bool = True, embedding: bool = True) -> nn.Module:
    """Build the model of ``folder`` with its blocks on the meta device and everything else loaded on
    ``device``; the engine reads each block from the safetensors files when it visits it. ``head=False``
    (nothing reads the loss) and ``embedding=False`` (nothing is computed) leave those tables unloaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with init_empty_weights():  # parameters on meta, buffers (rotary tables, ...) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    spec = get_arch(model)
    names = index_checkpoint(model, folder)
    missing = [n for n, _ in get_blocks(model, spec).named_parameters(prefix=spec.blocks) if n not in names]
    if missing:
        raise ShortenedError(f"the checkpoint in {folder} has no tensor '{missing[0]}' (its names differ from the "
                             "model's): cannot read its blocks from disk; use --offload cpu")
    store = DiskBlocks(names, spec.blocks, dtype)
    store.load_rest(model, torch.device(device), head=head, embedding=embedding)
    _DISK[model] = store
    return model


class _ShardWriter:
    """Writes tensors into safetensors shards of at most ``shard_bytes`` (one file: ``model.safetensors``)
    plus the index transformers reads for a sharded checkpoint."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return
        n = len(self.files)
        weight_map = {}
        for k, (path, names) in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


#: The largest shard the disk-offloaded save holds before writing it.
SHARD_BYTES = 2**30


def save_from_disk(model: nn.Module, kept: list[int], folder: Path, *, shard_bytes: int = SHARD_BYTES,
                   dtype: torch.dtype | None = None) -> None:
    """Write the weights and config of ``model`` (pruned, its blocks on disk) into ``folder``, one block at a
    time: new block ``i`` is read from the checkpoint's block ``kept[i]``; floating tensors in ``dtype`` when
    given (else as loaded). Memory: one block and one shard (the writer holds a shard until it is written)."""
    store = disk_blocks(model)
    if store is None:
        raise ShortenedError("save_from_disk needs a model loaded with its blocks on disk")
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    if len(kept) != len(blocks):
        raise ShortenedError(f"{len(kept)} kept block indices for a model of {len(blocks)} blocks")
    if dtype is not None:
        model.config.dtype = dtype
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    writer = _ShardWriter(folder, shard_bytes)
    persistent = set(model.state_dict(keep_vars=True))
    seen: set[int] = set()
    prefix = spec.blocks + "."
    cpu = torch.device("cpu")
    dtype = dtype or store.dtype  # tables kept narrower in memory are saved as the config says
    for name, t in _named_tensors(model):
        if name.startswith(prefix) or name not in persistent or id(t) in seen:
            continue  # blocks come next; non-persistent buffers are not saved; a tied head is saved once
        seen.add(id(t))
        writer.add(name, _as(store.read_tensor(name, cpu) if t.is_meta else t, dtype))
    for new, (block, old) in enumerate(zip(blocks, kept)):
        store.fetch(block, old, cpu)
        try:
            for name, t in block.state_dict().items():
                writer.add(f"{prefix}{new}.{name}", _as(t, dtype))
        finally:
            store.release(block, old)
    writer.close()


def _as(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


__all__ = ["BlockHome", "DiskBlocks", "MemoryHome", "disk_blocks", "index_checkpoint", "load_blocks_on_disk",
           "compute_dtype", "loaded_device", "save_from_disk", "streamed", "upcast_linear", "SHARD_BYTES", "UPCAST_ROWS"]
