"""``bi``: ShortGPT's Block Influence, ``1 - cos(block input, block output)`` averaged over tokens.

Input and output are the residual stream before and after the block (before the final norm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..engine import Engine


def score(engine: Engine) -> tuple[list[float], dict[str, Any]]:
    k = len(engine.active)
    sums = torch.zeros(k, dtype=torch.float64)
    count = 0
    for hiddens in engine.dense_hiddens("all"):
        count += hiddens[0].shape[0] * hiddens[0].shape[1]
        for b in range(k):
            cos = F.cosine_similarity(hiddens[b].float(), hiddens[b + 1].float(), dim=-1)
            sums[b] += (1 - cos).double().sum().cpu()
    return (sums / count).tolist(), {}


from . import Criterion  # noqa: E402

CRITERION = Criterion("bi", score, needs_data=True, protect=(0, 0),
                      description="Block Influence: 1 - cos(input, output), mean over tokens (ShortGPT)")
