"""``random``: seeded uniform scores, the baseline every pruning paper compares with."""

from __future__ import annotations

from typing import Any

import torch

from ..engine import Engine


def score(engine: Engine, seed: int = 1234) -> tuple[list[float], dict[str, Any]]:
    g = torch.Generator().manual_seed(int(seed))
    values = torch.rand(engine.num_blocks, generator=g, dtype=torch.float64)
    # One draw per original block, so a block keeps its score when others are skipped.
    return [float(values[i]) for i in engine.active], {}


from . import Criterion  # noqa: E402

CRITERION = Criterion("random", score, cost="weights", needs_data=False, protect=(0, 0),
                      description="seeded random scores (baseline)")
