"""``angular``: Gromov et al.'s angular distance ``arccos(cos(h_l, h_(l+n))) / pi``.

``h_l`` is the residual stream entering block ``l``; removing blocks ``l .. l+n-1`` is scored by the
distance between ``h_l`` and ``h_(l+n)``. As in the paper the distance is taken at the last token of
each sample (``tokens="last"``) and averaged over samples; ``tokens="all"`` averages over all tokens.
The per-block score is the ``n = 1`` distance; ``span_scores[n - 1][l]`` holds every span, which the
contiguous selection uses to pick the best span of the requested length.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..engine import Engine
from ..errors import ShortenedError


def score(engine: Engine, tokens: str = "last") -> tuple[list[float], dict[str, Any]]:
    if tokens not in ("last", "all"):
        raise ShortenedError(f"angular tokens must be 'last' or 'all', not '{tokens}'")
    k = len(engine.active)
    sums = torch.zeros(k + 1, k + 1, dtype=torch.float64)  # sums[l, l+n]
    count = 0
    for hiddens in engine.dense_hiddens(tokens):
        h = [x.float().reshape(-1, x.shape[-1]) for x in hiddens]
        count += h[0].shape[0]
        for a in range(k):
            for b in range(a + 1, k + 1):
                cos = F.cosine_similarity(h[a], h[b], dim=-1).clamp(-1.0, 1.0)
                sums[a, b] += (torch.arccos(cos) / math.pi).double().sum().cpu()
    dist = sums / count
    spans = [[float(dist[l, l + n]) for l in range(k - n + 1)] for n in range(1, k + 1)]
    return spans[0], {"span_scores": spans}


from . import Criterion  # noqa: E402

CRITERION = Criterion("angular", score, needs_data=True, protect=(0, 0),
                      description="angular distance between a span's input and output (Gromov et al.)")
