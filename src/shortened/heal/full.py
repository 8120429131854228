"""Continued pre-training: every weight trainable, next-token loss on (packed) text."""

from __future__ import annotations

from torch import nn

from .loop import LMObjective


def make_all_trainable(model: nn.Module) -> nn.Module:
    """Mark every parameter trainable (tied embedding and head stay one tensor)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def full_objective() -> LMObjective:
    """The language-modelling loss of continued pre-training."""
    return LMObjective()
