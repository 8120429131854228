"""Block removal: take blocks out of a model in place and keep everything that indexes them consistent."""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace
from typing import Any

from torch import nn

from .archs import ArchSpec, block_config, get_arch, get_blocks, suffix_only
from .layer_facts import apply_config_updates, is_derived, layer_facts, rewrite_layer_facts
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

    Afterwards the model computes the original function with those blocks skipped: the block list, the
    config's layer count, every per-block config fact of the table (``layer_types``, MoE index lists and
    rules, ...) and every layer-index attribute of the kept blocks' modules (the KV-cache slot) are
    renumbered. A removal the rewritten config would not rebuild exactly (checked on the meta device, no
    weights) is refused before the model is touched. Returns the kept blocks' original indices, position
    ``i`` holding the original index of new block ``i``.
    """
    spec = spec or get_arch(model)
    blocks = get_blocks(model, spec)
    n = len(blocks)
    removed = validate_indices(indices, n)
    kept = [i for i in range(n) if i not in set(removed)]
    updates = check_removal(model.config, removed, spec, model_class=type(model), num_blocks=n)

    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    set_submodule(model, spec.blocks, new_blocks)
    for new_idx, block in enumerate(new_blocks):
        _renumber(block, new_idx, spec.layer_index_attrs)
    apply_config_updates(block_config(model.config, spec), updates)
    return kept


#: Block kinds (values of the per-block type lists) whose last one a hybrid model's cache cannot lose: its
#: masks are sized from an attention layer (transformers raises when only linear-attention layers remain).
_ATTENTION_KINDS = ("full_attention", "sliding_attention", "attention", "chunked_attention")
_TYPE_LISTS = ("layer_types", "layers_block_type")


def _lost_kinds(old: Any, new: Any) -> str | None:
    """The attention kind the rewritten config no longer has a block of, in a model that mixes it with
    other kinds (a pure attention model cannot lose all its blocks)."""
    for name in _TYPE_LISTS:
        before, after = getattr(old, name, None), getattr(new, name, None)
        if not isinstance(before, (list, tuple)) or not isinstance(after, (list, tuple)):
            continue
        had = [k for k in _ATTENTION_KINDS if k in before]
        if had and set(before) - set(_ATTENTION_KINDS) and not any(k in after for k in _ATTENTION_KINDS):
            return "/".join(had)
    return None


def removable(config: Any, removed: Sequence[int], spec: ArchSpec, num_blocks: int) -> str | None:
    """None when the config can express the model without ``removed`` (the fast check used while
    selecting), else the one-line reason."""
    try:
        _rewritten(config, [i for i in range(num_blocks) if i not in set(removed)], num_blocks, spec)
    except _RuleRefusal as exc:
        return str(exc)
    return None


def removal_check(model: nn.Module, spec: ArchSpec | None = None) -> Callable[[list[int]], str | None] | None:
    """The fast predicate selection uses to choose only removable sets (None for a set the config can
    express without, else why not), or None when the model's config can express every removal."""
    spec = spec or get_arch(model)
    n = len(get_blocks(model, spec))
    config = model.config
    sub = block_config(config, spec)
    can_refuse = [f for f in layer_facts(spec) if f.kind in _MAY_REFUSE and getattr(sub, f.field, None) is not None
                  and not is_derived(sub, f.field)]
    if not can_refuse and not _lost_kinds(sub, SimpleNamespace(**{name: [] for name in _TYPE_LISTS})):
        return None
    return lambda removed: removable(config, removed, spec, n)


#: Rewrites that cannot express every kept pattern (a period, or a step without an explicit list).
_MAY_REFUSE = ("period", "sparse_step", "interval_range")


def check_family(model: nn.Module, spec: ArchSpec | None = None) -> None:
    """Refuse, before any scoring, a model whose kept blocks would change when renumbered (e.g. a constant
    computed from the block's index): removing the last block but one, which renumbers only the last, is
    checked on the meta device. Removals that only some sets fail are left to the selection."""
    spec = spec or get_arch(model)
    n = len(get_blocks(model, spec))
    if n < 2:
        raise ShortenedError(f"the model has {n} block: nothing can be removed")
    sub = block_config(model.config, spec)
    why = suffix_only(sub)
    if why is not None:
        raise ShortenedError(f"{why}; only the last blocks can be removed: name them with --blocks")
    try:
        _rebuild(model.config, [i for i in range(n) if i != n - 2], n, spec, type(model))
    except _RuleRefusal:
        return  # a rule that this one set cannot express; selection passes over such sets
    except ShortenedError as exc:
        raise ShortenedError(f"blocks of this {sub.model_type} model cannot be renumbered exactly ({exc}); only "
                             "the last blocks can be removed: name them with --blocks") from None


def check_config(config: Any, removed: Sequence[int] | None = None) -> None:
    """Before any weights load: refuse the removal of ``removed`` from the model ``config`` builds (None:
    refuse a family whose blocks cannot be renumbered at all), from the config alone on the meta device. A
    config that does not build here (remote code, ...) is left to the load to judge."""
    import warnings

    from .structure import meta_model

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = meta_model(config)
            spec = get_arch(skeleton)
    except ShortenedError:
        raise
    except Exception:  # the load that follows reports what is wrong with the model itself
        return
    if removed is None:
        check_family(skeleton, spec)
    else:
        check_removal(config, removed, spec, model_class=type(skeleton), num_blocks=len(get_blocks(skeleton, spec)))


def check_removal(config: Any, removed: Sequence[int], spec: ArchSpec, *, model_class: type | None = None,
                  num_blocks: int | None = None) -> dict[str, Any]:
    """The config updates that express the model without the blocks ``removed``, after checking on the
    meta device (no weights) that the rewritten config rebuilds every kept block exactly as it is built
    now (its modules, parameter shapes, buffers and settings) and the rest of the model unchanged.

    Raises ShortenedError with a one-line reason otherwise: the removal cannot be published exactly.
    """
    n = num_blocks if num_blocks is not None else getattr(block_config(config, spec), spec.layer_count_field)
    removed = validate_indices(removed, n)
    try:
        return _rebuild(config, [i for i in range(n) if i not in set(removed)], n, spec, model_class)
    except ShortenedError as exc:
        raise ShortenedError(f"removing blocks {removed} cannot be saved exactly: {exc}") from None


class _RuleRefusal(ShortenedError):
    """The config cannot express this set of kept blocks (a per-block rule, the config class's validation, a
    hybrid's last attention block), though another set may be fine."""


def _rewritten(config: Any, kept: list[int], n: int, spec: ArchSpec) -> tuple[dict[str, Any], Any]:
    """The config updates for keeping ``kept`` of ``n`` blocks and a copy of ``config`` with them applied, once
    the config class's own validation accepts it and a hybrid keeps an attention block; raises
    :class:`_RuleRefusal` otherwise. No model is built (the fast part, used while selecting)."""
    try:
        updates = rewrite_layer_facts(config, kept, n, spec)
    except ShortenedError as exc:
        raise _RuleRefusal(str(exc)) from None
    new_config = copy.deepcopy(config)  # derived type lists (Bamba's) follow the rewritten fields
    try:
        apply_config_updates(block_config(new_config, spec), updates)
        if hasattr(new_config, "validate"):
            new_config.validate()
    except Exception as exc:  # the config class's own validation (strict dataclass validators, setters)
        raise _RuleRefusal("transformers refuses the rewritten config: " + " ".join(str(exc).split())[-300:])
    lost = _lost_kinds(block_config(config, spec), block_config(new_config, spec))
    if lost:
        raise _RuleRefusal(f"it would leave no {lost} block, which this hybrid model's cache needs")
    return updates, new_config


def _rebuild(config: Any, kept: list[int], n: int, spec: ArchSpec, model_class: type | None) -> dict[str, Any]:
    """:func:`_rewritten`'s updates, once the rewritten config builds every kept block (and the rest) as now
    on the meta device; ShortenedError with the difference otherwise."""
    from .structure import compare_structure

    updates, new_config = _rewritten(config, kept, n, spec)
    problem = compare_structure(config, new_config, kept, spec, model_class=model_class)
    if problem is not None:
        raise ShortenedError(problem)
    return updates


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
