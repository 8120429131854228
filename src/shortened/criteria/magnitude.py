"""``magnitude``: size of a block's weights, sum of |w| (``norm="l1"``) or the L2 norm (``norm="l2"``).

All the block's parameters count (weight matrices, biases, norm weights); embeddings and head do not.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine import Engine
from ..errors import ShortenedError


def score(engine: Engine, norm: str = "l1") -> tuple[list[float], dict[str, Any]]:
    if norm not in ("l1", "l2"):
        raise ShortenedError(f"magnitude norm must be l1 or l2, not '{norm}'")
    values = []
    with torch.no_grad():
        for i in engine.active:
            total = torch.zeros((), dtype=torch.float64)
            with engine.on_device(i) as block:  # offloaded (or on disk): one block at a time
                for p in block.parameters():
                    w = p.detach().double()
                    total += (w.abs().sum() if norm == "l1" else w.pow(2).sum()).cpu()
            values.append(float(total if norm == "l1" else total.sqrt()))
    return values, {}


from . import Criterion  # noqa: E402

CRITERION = Criterion("magnitude", score, cost="weights", needs_data=False, protect=(4, 2),
                      description="sum of |w| (or L2 norm) of the block's parameters")
