"""The evolutionary block-set search: its fitness against a pruned copy, brute force, seeds, bad input."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from shortened.criteria import score_blocks
from shortened.engine import Engine
from shortened.errors import ShortenedError
from shortened.search import SetFitness, evolutionary_search, parse_stages
from shortened.surgery import remove_blocks
from tiny_models import N_LAYERS, TINY_CONFIGS, tiny_inputs, tiny_model

ARCHS = sorted(TINY_CONFIGS)


def reference_fitness(model: torch.nn.Module, ids: torch.Tensor, removed: list[int], fitness: str) -> float:
    """Delete the blocks from a float64 copy of the model, run it, and compare with torch by hand."""
    dense = copy.deepcopy(model).double()
    pruned = copy.deepcopy(dense)
    remove_blocks(pruned, removed)
    with torch.no_grad():
        logp = dense(ids, use_cache=False).logits[:, :-1].log_softmax(-1)
        logq = pruned(ids, use_cache=False).logits[:, :-1].log_softmax(-1)
    if fitness == "kl":
        return float((logp.exp() * (logp - logq)).sum(-1).mean())
    nll = -logq.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return math.exp(float(nll.mean()))


@pytest.mark.parametrize("arch", ARCHS)
def test_fitness_equals_a_pruned_copy(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(batch=3, length=20)
    sets = [(0,), (2, 3), (1, 4, 5), (0, 2, 4)]
    for fitness in ("kl", "ppl"):
        engine = Engine(model, ids, batch_size=1, progress=False)
        got = SetFitness(engine, fitness).measure(sets, 3)
        for s, value in zip(sets, got):
            expected = reference_fitness(model, ids, list(s), fitness)
            assert value == pytest.approx(expected, rel=1e-4, abs=1e-7), (arch, fitness, s)
