"""Block removal: take blocks out of a model in place and keep everything that indexes them consistent."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

from torch import nn

from .archs import ArchSpec, get_arch, get_blocks
from .errors import ShortenedError


def is_kept_list(kept: Sequence[int]) -> bool:
    """Whether ``kept`` can say which original block each remaining one is: non-negative integers, strictly
    increasing (what :func:`remove_blocks` returns)."""
    return (all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in kept)
            and all(a < b for a, b in zip(kept, kept[1:])))


def validate_indices(indices: Iterable[int], n_blocks: int) -> list[int]:
    """Check a list of block indices against a model with ``n_blocks`` blocks; return them sorted.

    Raises ShortenedError for an empty list, an index out of range, duplicates, or removing every block.
    """
    if hasattr(indices, "tolist") and not isinstance(indices, (list, tuple)):  # a numpy array or torch tensor
        indices = indices.tolist()
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise TypeError(f"block indices must be a list of integers, got {type(indices).__name__}")
    idx = list(indices)
    if not idx:
        raise ShortenedError("no blocks to remove were given")
    kinds = [i for i in idx if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if kinds:
        raise TypeError(f"block indices must be integers, got {kinds[0]!r} ({type(kinds[0]).__name__})")
    idx = [int(i) for i in idx]  # numpy integers included
    bad = [i for i in idx if not 0 <= i < n_blocks]
    if bad:
        raise ShortenedError(f"block index {bad[0]} is out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")
    dupes = sorted({i for i in idx if idx.count(i) > 1})
    if dupes:
        raise ShortenedError(f"duplicate block indices: {', '.join(map(str, dupes))}")
    if len(idx) >= n_blocks:
        raise ShortenedError(f"cannot remove all {n_blocks} blocks: at least one must remain")
    return sorted(idx)


def remove_blocks(model: nn.Module, indices: Sequence[int], spec: ArchSpec | None = None) -> list[int]:
    """Remove the blocks at ``indices`` (original numbering) from ``model`` in place.

    Afterwards the model computes the original function with those blocks skipped: the block list,
    the config's layer count, every per-layer config list (e.g. ``layer_types``) and every layer-index
    attribute of the kept blocks' modules (the KV-cache slot) are renumbered. Returns the kept blocks'
    original indices, position ``i`` holding the original index of new block ``i``.
    """
    spec = spec or get_arch(model)
    blocks = get_blocks(model, spec)
    n = len(blocks)
    removed = set(validate_indices(indices, n))
    kept = [i for i in range(n) if i not in removed]

    config = model.config
    lists = {}
    for name in spec.per_layer_config_lists:
        values = getattr(config, name, None)
        if values is None:
            continue
        if len(values) != n:
            raise ShortenedError(f"config.{name} has {len(values)} entries but the model has {n} blocks")
        lists[name] = [values[i] for i in kept]

    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    set_submodule(model, spec.blocks, new_blocks)
    for new_idx, block in enumerate(new_blocks):
        _renumber(block, new_idx, spec.layer_index_attrs)

    setattr(config, spec.layer_count_field, len(kept))
    for name, values in lists.items():
        setattr(config, name, values)
    return kept


def _renumber(block: nn.Module, new_idx: int, attrs: tuple[str, ...]) -> None:
    for module in block.modules():
        for attr in attrs:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, new_idx)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``model`` (e.g. the blocks' ``model.layers``)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)
