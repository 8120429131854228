"""The one token NLL and the sliced head loss against torch's cross-entropy on explicit logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shortened.engine import HeadLoss, call_groups, ppl_from_mean_nll, token_nll

VOCAB, HIDDEN = 53, 16  # 53 is prime: no slice size below it divides the vocabulary


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_nll_equals_cross_entropy(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 9, VOCAB, generator=g) * 6).to(dtype)  # [batch, positions, vocab]
    targets = torch.randint(0, VOCAB, (4, 9), generator=g)
    got = token_nll(logits, targets)
    want = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none").view(4, 9)
    assert got.shape == (4, 9) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_token_nll_gradient_equals_cross_entropy():
    """taylor differentiates through it: the gradient is cross-entropy's too."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(20, VOCAB, generator=g, dtype=torch.float64) * 4
    targets = torch.randint(0, VOCAB, (20,), generator=g)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    token_nll(a, targets).sum().backward()
    F.cross_entropy(b, targets, reduction="sum").backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def _head(bias: bool, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    norm, proj = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB, bias=bias)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        proj.weight.mul_(8.0)  # logits of a few units, so the soft-cap below bends them
        if bias:
            proj.bias.normal_()
    return [norm, proj]


def _reference_logits(modules: list[nn.Module], x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = modules[1](modules[0](x))
    return torch.tanh(logits / softcap) * softcap if softcap else logits


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["uncapped", "softcap"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("vocab_chunk", [0, 1, 7, VOCAB, 64])
def test_sliced_hidden_nll_equals_cross_entropy(vocab_chunk, bias, softcap):
    """Through the head, whole or in vocabulary slices (smaller than, equal to, larger than the vocabulary),
    the NLL equals cross-entropy on the head's full logits."""
    modules = _head(bias)
    loss = HeadLoss(modules, softcap, loss_chunk=5, vocab_chunk=vocab_chunk)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(23, HIDDEN, generator=g)
    targets = torch.randint(0, VOCAB, (23,), generator=g)
    with torch.no_grad():
        logits = _reference_logits(modules, x, softcap)
        want = F.cross_entropy(logits.double(), targets, reduction="none")
        got = loss.hidden_nll(x, targets)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.head(x), logits)


@pytest.mark.parametrize("vocab_chunk", [0, 7])
def test_nll_sum_per_stream_equals_cross_entropy(vocab_chunk):
    """``r`` stacked streams of a [b, seq] batch: one summed next-token NLL per stream (the last position
    has no target), token chunks smaller than a stream."""
    modules = _head(bias=False, seed=3)
    loss = HeadLoss(modules, None, loss_chunk=4, vocab_chunk=vocab_chunk)
    g = torch.Generator().manual_seed(4)
    b, seq, r = 2, 6, 3
    ids = torch.randint(0, VOCAB, (b, seq), generator=g)
    hidden = torch.randn(r * b, seq, HIDDEN, generator=g)
    with torch.no_grad():
        got = loss.nll_sum(hidden, ids)
        for k in range(r):
            logits = _reference_logits(modules, hidden[k * b:(k + 1) * b, :-1], None).double()
            want = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
            assert got[k].item() == pytest.approx(want.item(), rel=1e-5)


def test_ppl_from_mean_nll():
    assert ppl_from_mean_nll(math.log(12.5)) == pytest.approx(12.5, rel=1e-12)
    assert ppl_from_mean_nll(1e4) == float("inf")  # past float range, not an OverflowError


@pytest.mark.parametrize("n_items,tokens_each,batch_tokens", [(7, 10, 35), (7, 10, 5), (4, 3, 10**6), (0, 8, 8)])
def test_call_groups_cover_the_items_in_order_within_the_token_budget(n_items, tokens_each, batch_tokens):
    items = list(range(n_items))
    groups = call_groups(items, tokens_each, batch_tokens)
    assert [x for group in groups for x in group] == items
    size = max(1, batch_tokens // tokens_each)  # a call holds at least one stream
    assert all(1 <= len(group) <= size for group in groups)
    assert all(len(group) == size for group in groups[:-1])  # only the last call is short
