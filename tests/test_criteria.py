"""Each criterion against a direct, independent computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shortened import get_blocks, load_model
from shortened.criteria import criterion_names, default_protection, get_criterion, score_blocks
from shortened.errors import ShortenedError
from tiny_models import N_LAYERS, TINY_CONFIGS, tiny_inputs, tiny_model

ARCHS = sorted(TINY_CONFIGS)


def reference_taylor(model: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    """Plain loss.backward() on the mean causal-LM loss, then sum |w * grad| over each block."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    out = [float(sum((p.detach().double() * p.grad.double()).abs().sum() for p in b.parameters() if p.grad is not None))
           for b in get_blocks(model)]
    model.zero_grad(set_to_none=True)
    return out


def hidden_states(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream before each block and after the last (before the final norm), by forward hooks."""
    blocks = get_blocks(model)
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach()),
                                           with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach())))
    try:
        with torch.no_grad():
            out = model(ids, use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return seen, out.hidden_states


def assert_rel(got, expected, tol=1e-4):
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert abs(a - b) <= tol * abs(b) + 1e-12, f"block {i}: {a} != {b}"


@pytest.mark.parametrize("arch", ARCHS)
def test_taylor_equals_plain_backward(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(batch=3, length=20)
    expected = reference_taylor(model, ids)
    got = score_blocks(model, ids, "taylor", progress=False)
    assert_rel(got.scores, expected)
    loss = model(ids, labels=ids).loss.item()
    assert abs(got.extra["loss"] - loss) < 1e-5 * loss


def test_taylor_with_micro_batches_sums_gradients_before_abs():
    model = tiny_model("llama")
    ids = tiny_inputs(batch=4, length=16, seed=5)
    assert_rel(score_blocks(model, ids, "taylor", batch_size=1, loss_chunk=5, progress=False).scores,
               reference_taylor(model, ids))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt", "gpt2"])
def test_bi_and_angular_equal_output_hidden_states(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(batch=3, length=20)
    hooked, hs = hidden_states(model, ids)
    n = N_LAYERS
    # output_hidden_states holds the block inputs; its last entry may be normed, so the hook gives h_L.
    for i in range(n):
        torch.testing.assert_close(hooked[i], hs[i], rtol=0, atol=0)
    h = hooked
    bi_ref = [float((1 - F.cosine_similarity(h[i], h[i + 1], dim=-1)).mean()) for i in range(n)]
    assert_rel(score_blocks(model, ids, "bi", progress=False).scores, bi_ref, 1e-4)

    def ang(a, b):
        cos = F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
        return float((torch.arccos(cos) / math.pi).mean())

    last = score_blocks(model, ids, "angular", progress=False)
    allt = score_blocks(model, ids, "angular", tokens="all", progress=False)
    for span in range(1, n + 1):
        assert_rel(last.span_scores[span - 1], [ang(h[l][:, -1], h[l + span][:, -1]) for l in range(n - span + 1)])
        assert_rel(allt.span_scores[span - 1], [ang(h[l], h[l + span]) for l in range(n - span + 1)])
    assert last.scores == last.span_scores[0]


def test_magnitude_and_random():
    model = tiny_model("qwen3")
    blocks = get_blocks(model)
    l1 = score_blocks(model, None, "magnitude").scores
    l2 = score_blocks(model, None, "magnitude", norm="l2").scores
    assert_rel(l1, [sum(float(p.detach().double().abs().sum()) for p in b.parameters()) for b in blocks], 1e-9)
    assert_rel(l2, [math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in b.parameters())) for b in blocks], 1e-9)
    r1 = score_blocks(model, None, "random", seed=7).scores
    assert r1 == score_blocks(model, None, "random", seed=7).scores
    assert r1 != score_blocks(model, None, "random", seed=8).scores
    assert r1 == torch.rand(N_LAYERS, generator=torch.Generator().manual_seed(7), dtype=torch.float64).tolist()


def test_registry_and_defaults():
    assert criterion_names() == ["ppl", "taylor", "magnitude", "bi", "angular", "random", "search"]
    assert default_protection("taylor") == (4, 2) and default_protection("magnitude") == (4, 2)
    assert default_protection("ppl") == (0, 0) and default_protection("search") == (0, 0)
    assert get_criterion("magnitude").options() == {"norm": "l1"}


def test_unknown_criterion_lists_valid_ones():
    with pytest.raises(ShortenedError, match="unknown criterion 'foo'.*ppl, taylor, magnitude, bi, angular, random"):
        score_blocks(tiny_model("llama"), tiny_inputs(), "foo")


@pytest.mark.parametrize("criterion, options, message", [
    ("magnitude", {"norm": "l3"}, "l1 or l2"),
    ("magnitude", {"nrom": "l2"}, "no option 'nrom'.*norm"),
    ("angular", {"tokens": "first"}, "'last' or 'all'"),
    ("ppl", {}, "needs calibration data"),
])
def test_bad_options(criterion, options, message):
    ids = tiny_inputs() if criterion == "angular" else None
    with pytest.raises(ShortenedError, match=message):
        score_blocks(tiny_model("llama"), ids, criterion, **options)


@pytest.mark.slow
def test_taylor_and_bi_on_smollm2(smollm2_folder):
    model, _ = load_model(str(smollm2_folder))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    assert_rel(score_blocks(model, ids, "taylor", progress=False).scores, reference_taylor(model, ids))
    h, _ = hidden_states(model, ids)
    bi_ref = [float((1 - F.cosine_similarity(h[i], h[i + 1], dim=-1)).mean()) for i in range(len(h) - 1)]
    assert_rel(score_blocks(model, ids, "bi", progress=False).scores, bi_ref, 1e-4)
