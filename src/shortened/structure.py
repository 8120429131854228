"""Structural equivalence of two configs, checked on the meta device (no weights, no work).

A removal is publishable only if the rewritten config rebuilds every kept block as the original config
builds it at its old index: the same module classes, parameter and buffer shapes, buffer values and plain
settings (``is_sliding``, ``sliding_window``, ``lambda_init``, ...), and the same rest of the model. This
catches, without knowing the field, any config rule that picks a block's kind or size by its index
(MoE-ness, per-layer sizes, index-derived constants) that the table's rewrite did not express.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .archs import ArchSpec, get_submodule

# Module attributes that are not part of what a block computes.
_IGNORED_ATTRS = frozenset({"training"})


def meta_model(config: Any, model_class: type | None = None) -> nn.Module:
    """The module tree ``config`` builds, parameters on the meta device (buffers computed for real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False), _quiet():
        if model_class is not None and hasattr(model_class, "_from_config"):
            return model_class._from_config(config)
        if model_class is not None:
            return model_class(config)
        return AutoModelForCausalLM.from_config(config)


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def module_signature(module: nn.Module, ignored: Sequence[str] = (), blocks: int | None = None
                     ) -> list[tuple[str, str, Any]]:
    """What ``module`` computes as far as its structure tells: for each submodule, its class, its plain
    settings, and the shapes (and real values) of its parameters and buffers. ``ignored`` attributes (the
    block's index, a KV-cache slot) are left out, and so are lists with one entry per block (``blocks``
    long: a copy of a per-block config list, whose own entry shows in the block's other settings)."""
    skip = _IGNORED_ATTRS | set(ignored)
    rows: list[tuple[str, str, Any]] = []
    for name, sub in module.named_modules():
        rows.append((name, "class", type(sub).__name__))
        for key, value in sorted(vars(sub).items()):
            if not key.startswith("_") and key not in skip and _plain(value):
                if isinstance(value, (list, tuple)) and len(value) == blocks:
                    continue
                rows.append((name, f"setting {key}", value))
        for key, p in sub.named_parameters(recurse=False):
            rows.append((name, f"parameter {key}", tuple(p.shape)))
        for key, b in sub.named_buffers(recurse=False):
            rows.append((name, f"buffer {key}", (tuple(b.shape), _value(b))))
    return rows


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


def _value(t: torch.Tensor) -> Any:
    if t.device.type == "meta" or t.numel() > 1_000_000:
        return None
    return tuple(t.detach().float().flatten().tolist())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def first_difference(old: list[tuple[str, str, Any]], new: list[tuple[str, str, Any]]) -> str | None:
    """A one-line description of the first way ``new`` differs from ``old``, or None when they match."""
    old_map = {(m, k): v for m, k, v in old}
    new_map = {(m, k): v for m, k, v in new}
    for key, value in old_map.items():
        if key not in new_map:
            return f"{_where(key[0])} would have no {key[1]} (now {_show(value)})"
        if not _same(value, new_map[key]):
            return f"{_where(key[0])} {key[1]} would be {_show(new_map[key])} instead of {_show(value)}"
    for key, value in new_map.items():
        if key not in old_map:
            return f"{_where(key[0])} would get a new {key[1]} ({_show(value)})"
    return None


def _where(name: str) -> str:
    return f"module '{name}'" if name else "the block itself"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def compare_structure(config: Any, new_config: Any, kept: Sequence[int], spec: ArchSpec, *,
                      model_class: type | None = None) -> str | None:
    """None when ``new_config`` builds block ``j`` as ``config`` builds block ``kept[j]``, for every ``j``,
    and the same rest of the model; else the first difference, in one line."""
    old_model = meta_model(config, model_class)
    new_model = meta_model(new_config, model_class)
    old_blocks = get_submodule(old_model, spec.blocks)
    new_blocks = get_submodule(new_model, spec.blocks)
    if old_blocks is None or new_blocks is None:
        return f"the config does not build a block list at '{spec.blocks}'"
    if len(new_blocks) != len(kept):
        return f"the rewritten config builds {len(new_blocks)} blocks, not the {len(kept)} kept"
    ignored = spec.layer_index_attrs
    for j, i in enumerate(kept):
        diff = first_difference(module_signature(old_blocks[i], ignored, len(old_blocks)),
                                module_signature(new_blocks[j], ignored, len(new_blocks)))
        if diff is not None:
            return f"block {i} (new index {j}): {diff}"
    diff = first_difference(_rest(old_model, spec), _rest(new_model, spec))
    if diff is not None:
        return f"outside the blocks, {diff} (a weight sized by the number of blocks)"
    return None


def _rest(model: nn.Module, spec: ArchSpec) -> list[tuple[str, str, Any]]:
    """Shapes of the saved tensors outside the block list (non-persistent buffers, such as rotary tables for
    a layer type no kept block has, are recomputed at load and not compared)."""
    prefix = spec.blocks + "."
    return [(name, "tensor", tuple(t.shape)) for name, t in model.state_dict(keep_vars=True).items()
            if not name.startswith(prefix)]
