"""Continued pre-training: every weight trainable, next-token loss on (packed) text."""

from __future__ import annotations

from torch import nn

from .loop import LMObjective
from .registry import PAPER_BATCH, HealMethod, Prepared


def make_all_trainable(model: nn.Module) -> nn.Module:
    """Mark every parameter trainable (tied embedding and head stay one tensor)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def full_objective() -> LMObjective:
    """The language-modelling loss of continued pre-training."""
    return LMObjective()


METHOD = HealMethod(
    name="full",
    summary="continued pre-training of every weight (next-token loss on text)",
    prepare=lambda ctx: Prepared(make_all_trainable(ctx.model), full_objective(), "full"),
    defaults={"lr": 2e-5, **PAPER_BATCH},
)
