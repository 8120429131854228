"""Per-block config facts after a removal: every field of the architecture table's ``LAYER_FACTS`` rewritten
for the kept blocks (pure functions on a config; :mod:`shortened.surgery` applies and checks them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .archs import LAYER_FACTS, ArchSpec, LayerFact, block_config, suffix_only
from .errors import ShortenedError


def rewrite_layer_facts(config: Any, kept: Sequence[int], num_blocks: int, spec: ArchSpec) -> dict[str, Any]:
    """The new values of ``config``'s per-block fields for a model that keeps the blocks ``kept`` (original
    indices, increasing) of ``num_blocks``; the block count included. Pure: ``config`` is not changed.

    Raises ShortenedError naming the field and the blocks when a field cannot express the kept pattern.
    """
    kept = list(kept)
    config = block_config(config, spec)
    why = suffix_only(config)
    if why is not None and kept != list(range(len(kept))):
        raise ShortenedError(f"{why}: only the last blocks can be removed, and removing "
                             f"{sorted(set(range(num_blocks)) - set(kept))} renumbers some")
    updates: dict[str, Any] = {}
    for fact in layer_facts(spec):
        if is_derived(config, fact.field):
            continue  # a read-only property computed from other fields, which are rewritten instead
        value = getattr(config, fact.field, None)
        if value is None or isinstance(value, bool):
            continue
        new = _REWRITERS[fact.kind](config, fact, value, kept, num_blocks)
        if new is not None:
            updates.update(new)
    updates[spec.layer_count_field] = len(kept)
    return updates


def layer_facts(spec: ArchSpec) -> list[LayerFact]:
    """The per-block facts that apply to ``spec``'s family: the table's own lists, then every known field."""
    own = [LayerFact(name, "per_block") for name in spec.per_layer_config_lists]
    known = {f.field for f in own}
    return own + [f for f in LAYER_FACTS if f.field not in known]


def is_derived(config: Any, name: str) -> bool:
    """Whether ``name`` is a read-only property of the config (computed from other fields, which are the
    ones to rewrite)."""
    name = getattr(type(config), "attribute_map", {}).get(name, name)
    attr = getattr(type(config), name, None)
    return isinstance(attr, property) and attr.fset is None


def _per_block(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    if not isinstance(value, (list, tuple)):
        return None
    if len(value) != n:
        raise ShortenedError(f"config.{fact.field} has {len(value)} entries but the model has {n} blocks: "
                             "cannot tell which entry belongs to which block")
    return {fact.field: type(value)(value[i] for i in kept)}


def _cycle(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    if not isinstance(value, (list, tuple)) or not value:
        return None
    return {fact.field: type(value)(value[i % len(value)] for i in kept)}


def _runs(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(r, (list, tuple)) and len(r) == 2 for r in value):
        return None
    expanded = [entry for pattern, repeats in value for _ in range(repeats) for entry in pattern]
    if len(expanded) != n:
        raise ShortenedError(f"config.{fact.field} expands to {len(expanded)} entries but the model has {n} blocks")
    return {fact.field: [[[expanded[i] for i in kept], 1]]}


def _count(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    return {fact.field: len(kept)} if value == n else None


def _depth_scale(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    if not isinstance(value, (int, float)):
        return None
    return {fact.field: float(value) * math.sqrt(len(kept) / n)}


def _index_list(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) for i in value):
        return None
    marked = set(value)
    return {fact.field: type(value)(j for j, i in enumerate(kept) if i in marked)}


def _index_dict(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    keys = {}
    for key in value:
        try:
            keys[int(key)] = key
        except (TypeError, ValueError):
            raise ShortenedError(f"config.{fact.field} has the key {key!r}, not a block index") from None
    return {fact.field: {type(keys[i])(j): value[keys[i]] for j, i in enumerate(kept) if i in keys}}


def _threshold(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    if not isinstance(value, int):
        return None
    return {fact.field: sum(1 for i in kept if i < value)}


def _sparse_step(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    if not isinstance(value, int) or value < 1:
        return None
    dense = set(getattr(config, fact.partner, None) or ())
    pattern = [i in dense or (i + 1) % value != 0 for i in kept]  # True = a dense block
    if value == 1 and not dense:
        return None
    if not hasattr(config, fact.partner):
        step = _find_step(pattern)
        if step is None:
            raise ShortenedError(
                f"config.{fact.field}={value} cannot mark the kept sparse blocks "
                f"{[i for i, d in zip(kept, pattern) if not d]} (original indices) and the config has no "
                f"{fact.partner} list: remove other blocks")
        return {fact.field: step}
    return {fact.field: 1, fact.partner: [j for j, d in enumerate(pattern) if d]}


def _find_step(dense: list[bool]) -> int | None:
    for step in range(1, len(dense) + 2):
        if [(j + 1) % step != 0 for j in range(len(dense))] == dense:
            return step
    return None


def _period(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    if not isinstance(value, int) or value < 1:
        return None
    offset = getattr(config, fact.partner, 0) or 0
    marked = [i % value == offset for i in kept]
    k = len(kept)
    first = marked.index(True) if True in marked else None
    # With a first marked block the offset is fixed by it; with none, a period past the last block marks none.
    candidates = [(value, offset)] + ([(p, first % p) for p in range(1, k + 2)] if first is not None else [(k + 1, k)])
    for p, o in candidates:
        if o < p and [j % p == o for j in range(k)] == marked:
            return {fact.field: p, fact.partner: o}
    raise ShortenedError(
        f"config.{fact.field}/{fact.partner} ({value}/{offset}) cannot mark the kept blocks "
        f"{[i for i, m in zip(kept, marked) if m]} (original indices) among the {k} kept: no period and offset "
        "give that pattern; remove other blocks")


def _interval_range(config: Any, fact: LayerFact, value: Any, kept: list[int], n: int) -> dict[str, Any] | None:
    end, step = getattr(config, fact.partner, None), getattr(config, fact.step, None)
    if not all(isinstance(v, int) for v in (value, end, step)) or step < 1:
        return None
    end = n - 1 if end == -1 else end
    marked = [(i + 1) % step == 0 and value <= i <= end for i in kept]
    k = len(kept)
    ones = [j for j, m in enumerate(marked) if m]
    if not ones:  # an empty range marks nothing
        return {fact.field: k, fact.partner: k - 1, fact.step: 1}
    start, stop = ones[0], ones[-1]  # the first and last marked blocks bound the range; then only the step
    for s in range(1, k + 2):
        if [(j + 1) % s == 0 and start <= j <= stop for j in range(k)] == marked:
            return {fact.field: start, fact.partner: stop, fact.step: s}
    raise ShortenedError(
        f"config.{fact.field}/{fact.partner}/{fact.step} ({value}/{end}/{step}) cannot mark the kept blocks "
        f"{[i for i, m in zip(kept, marked) if m]} (original indices) among the {k} kept: no step, start and end "
        "give that pattern; remove other blocks")


_REWRITERS = {"per_block": _per_block, "cycle": _cycle, "runs": _runs, "count": _count,
              "index_list": _index_list, "index_dict": _index_dict, "threshold": _threshold,
              "sparse_step": _sparse_step, "period": _period, "interval_range": _interval_range,
              "depth_scale": _depth_scale}


def apply_config_updates(config: Any, updates: dict[str, Any]) -> None:
    """Set every field of ``updates`` on ``config`` (validation is the caller's: it reads them together)."""
    for name, value in updates.items():
        setattr(config, name, value)
