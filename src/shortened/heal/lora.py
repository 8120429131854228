"""LoRA through peft, on the attention and MLP projections named in the architecture table."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..archs import get_arch
from ..errors import ShortenedError
from .loop import LMObjective
from .registry import PAPER_BATCH, HealContext, HealMethod, Prepared

#: The paper's LoRA settings (Kim et al. 2024, following alpaca-lora).
PAPER_LORA = dict(r=8, alpha=16, dropout=0.05)


def lora_target_modules(model: nn.Module) -> list[str]:
    """The linear projections of a block that LoRA adapts (``ArchSpec.lora_targets``)."""
    targets = list(get_arch(model).lora_targets)
    if not targets:
        raise ShortenedError(
            f"no LoRA targets are known for model_type '{model.config.model_type}': use --method full or "
            "--student full, or add lora_targets to its ArchSpec in shortened/archs.py"
        )
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [t for t in targets if t in present]
    if not found:
        raise ShortenedError(f"none of the LoRA targets {targets} exist in this {model.config.model_type} model")
    return found


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05, seed: int = 0) -> Any:
    """Wrap ``model`` in a peft LoRA model (only the adapters trainable); initialisation is seeded."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ShortenedError(f"--lora-r must be at least 1, got {r}")
    if not 0 <= dropout < 1:
        raise ShortenedError(f"--lora-dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_modules(model),
                        bias="none", task_type="CAUSAL_LM")
    # get_peft_model draws lora_A from the global RNG: seed it so runs (and processes) agree.
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the adapters into the base weights and return the plain transformers model."""
    return peft_model.merge_and_unload()



def _prepare(ctx: HealContext) -> Prepared:
    s = ctx.settings
    return Prepared(add_lora(ctx.model, s.lora_r, s.lora_alpha, s.lora_dropout, s.seed), LMObjective(), "lora",
                    finalize=merge_lora, adapter=True)


METHOD = HealMethod(
    name="lora",
    summary="the paper's recipe: LoRA (r 8, alpha 16) on the attention and MLP projections, merged at the end",
    prepare=_prepare,
    defaults={"lr": 1e-4, **PAPER_BATCH},
)
