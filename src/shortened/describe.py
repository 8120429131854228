"""Describe a model's block structure (what ``shortened info`` prints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .archs import get_arch, get_blocks


@dataclass
class ModelInfo:
    model_type: str
    architecture: str
    num_blocks: int
    block_params: list[int]
    total_params: int
    non_block_params: int
    dtype: str
    layer_types: list[str] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_info(model: nn.Module) -> ModelInfo:
    """Block count and parameter counts (tied weights counted once)."""
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    block_params = [_count(b) for b in blocks]
    total = _count(model)  # parameters() yields a tied tensor once
    layer_types = getattr(model.config, "layer_types", None)
    return ModelInfo(
        model_type=model.config.model_type,
        architecture=type(model).__name__,
        num_blocks=len(blocks),
        block_params=block_params,
        total_params=total,
        non_block_params=total - sum(block_params),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        layer_types=list(layer_types) if layer_types is not None else None,
    )


def format_info(info: ModelInfo) -> str:
    lines = [
        f"architecture   {info.architecture} (model_type {info.model_type})",
        f"blocks         {info.num_blocks}",
        f"parameters     {info.total_params:,} total, {sum(info.block_params):,} in blocks, "
        f"{info.non_block_params:,} outside (embeddings, final norm, head)",
        f"dtype          {info.dtype}",
        "",
        f"{'block':>5}  {'parameters':>12}  {'share':>6}" + ("  type" if info.layer_types else ""),
    ]
    for i, n in enumerate(info.block_params):
        row = f"{i:>5}  {n:>12,}  {100 * n / info.total_params:>5.2f}%"
        if info.layer_types:
            row += f"  {info.layer_types[i]}"
        lines.append(row)
    return "\n".join(lines)
