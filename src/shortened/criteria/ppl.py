"""``ppl``: perplexity with that single block removed (Shortened LLaMA's PPL criterion).

Mean next-token NLL over every calibration token (within each sample), exponentiated. Higher
perplexity without the block means the block matters more, so the score is the perplexity itself.
"""

from __future__ import annotations

from typing import Any

from ..engine import Engine, ppl_from_mean_nll


def score(engine: Engine) -> tuple[list[float], dict[str, Any]]:
    nll = engine.removal_nll()
    return [ppl_from_mean_nll(nll[i]) for i in engine.active], {"mean_nll": [nll[i] for i in engine.active]}


from . import Criterion  # noqa: E402  (the registry imports this module)

CRITERION = Criterion("ppl", score, cost="each_removal", needs_data=True, uses_head=True, protect=(0, 0),
                      description="perplexity of the calibration set with the block removed")
