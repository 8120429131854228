"""The next-token loss: one token NLL, and the model's head run in slices so full logits never exist.

:func:`token_nll` is the one definition of a token's negative log-likelihood (the log-sum-exp of its
logits minus the target's logit); the engine, the ``taylor`` criterion and the perplexity evaluation
all use it. :class:`HeadLoss` computes the same quantity from final hidden states through the model's
head (final norm, output projection, logit soft-cap) in chunks of tokens and slices of the vocabulary,
and the KL divergence from the dense model's next-token distributions that the set search uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..archs import ArchSpec, block_config, get_blocks, get_submodule
from ..errors import ShortenedError
from .capture import block_hidden

#: Tokens per head chunk when computing the loss over the vocabulary (keeps [chunk, vocab] logits small).
DEFAULT_LOSS_CHUNK = 1024
#: Vocabulary slice for the loss on a CPU (0: the whole vocabulary at once). Each slice's [tokens, 1024]
#: float32 logits go into one reused buffer and stay in cache between the projection and the log-sum-exp.
#: Measured on SmolLM2's 49k x 576 head, one thread, 635 tokens: median 695 ms against 765 ms for the
#: earlier 2048-word slices with fresh logits per slice (1,270 tokens: 1.10 s against 1.52 s unsliced).
DEFAULT_VOCAB_CHUNK = 1024
#: Below this log-sum-exp (float32 sums near the subnormal range) the unshifted sum is not trusted.
_LSE_FLOOR = -60.0


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target under its logits: ``logits`` [..., vocab], ``targets`` [...]
    (integer ids) -> [...] in the logits' dtype; differentiable. Equals
    ``F.cross_entropy(logits, targets, reduction="none")`` over the last dimension."""
    return torch.logsumexp(logits, -1) - logits.gather(-1, targets[..., None]).squeeze(-1)


def ppl_from_mean_nll(mean_nll: float) -> float:
    """Perplexity from a mean token NLL: ``exp(mean_nll)`` (inf past float range)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return float("inf")


@dataclass
class DenseTargets:
    """The dense model's next-token distributions of one micro-batch, as :meth:`HeadLoss.kl_sum` uses them:
    per token, the expected output embedding and a constant (linear head), or the log-probabilities."""

    mean_embedding: torch.Tensor | None = None  # [tokens, h]
    const: torch.Tensor | None = None           # [tokens], float64
    log_probs: torch.Tensor | None = None       # [tokens, vocab]

    @property
    def num_tokens(self) -> int:
        return (self.log_probs if self.log_probs is not None else self.const).shape[0]  # type: ignore[union-attr]


class HeadLoss:
    """The model's head (``modules``: final norm, optional projection, LM head; then the logit soft-cap)
    and the next-token losses of final hidden states through it.

    ``loss_chunk`` tokens go through the head at a time; with ``vocab_chunk`` (0: the whole vocabulary)
    a linear output projection runs on slices of the vocabulary (see :meth:`hidden_nll`).
    """

    def __init__(self, modules: Sequence[nn.Module], softcap: float | None = None, *,
                 loss_chunk: int = DEFAULT_LOSS_CHUNK, vocab_chunk: int = 0) -> None:
        self.modules = list(modules)
        self.softcap = softcap
        self.loss_chunk = max(1, loss_chunk)
        self.vocab_chunk = max(0, vocab_chunk)

    @classmethod
    def of(cls, model: nn.Module, spec: ArchSpec, *, loss_chunk: int = DEFAULT_LOSS_CHUNK,
           vocab_chunk: int = 0) -> "HeadLoss":
        """The head of ``model`` as its architecture entry names it, soft-cap from its config."""
        modules = [m for m in (get_submodule(model, p) for p in spec.head) if m is not None]
        config = block_config(model.config, spec)
        cap = getattr(config, spec.logit_softcap_field, None) if spec.logit_softcap_field else None
        return cls(modules, float(cap) if cap else None, loss_chunk=loss_chunk, vocab_chunk=vocab_chunk)

    def check_against(self, model: nn.Module, spec: ArchSpec, ids: torch.Tensor, tolerance: float = 1e-4) -> None:
        """Refuse a head that does not reproduce ``model``'s own logits on ``ids`` (e.g. a discovered layout
        that misses a logit scale): the last block's output through :meth:`head` against ``model(ids)``."""
        seen: list[torch.Tensor] = []

        def keep(module, args, output):
            seen.append(block_hidden(output))

        handle = get_blocks(model, spec)[-1].register_forward_hook(keep)
        try:
            with torch.no_grad():
                logits = model(ids, use_cache=False).logits.float()
                ours = self.head(seen[-1]).float()
        finally:
            handle.remove()
        diff = (ours - logits).abs().max().item() if ours.shape == logits.shape else float("inf")
        if not diff <= tolerance * max(1.0, logits.abs().max().item()):
            raise ShortenedError(
                f"the head found for this {model.config.model_type} model ({' -> '.join(spec.head)}) does not "
                f"reproduce its logits (they differ by {diff:.3g}), so criteria that read the loss would score "
                "the wrong function: use bi, angular or magnitude, or add the model to the architecture table")

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, optional projection, LM head and logit soft-cap (as the model's own forward)."""
        for module in self.modules:
            hidden = module(hidden)
        return self._softcap(hidden)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def hidden_nll(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:func:`token_nll` (float32) of the head's logits for final hidden states ``x`` [tokens, h] against
        ``targets`` [tokens].

        With ``vocab_chunk``, the output projection runs on slices of the vocabulary with a running
        log-sum-exp, each slice written into the same buffer and reduced in place, so its [tokens, slice]
        logits are still in cache when the log-sum-exp reads them and no new memory is touched per slice
        (on a CPU this is faster than the plain projection alone); the target's logit is one dot product
        per token.
        """
        proj = self.modules[-1]
        if not self.vocab_chunk or not isinstance(proj, nn.Linear):
            return token_nll(self.head(x).float(), targets)
        x = self.pre_projection(x)
        lse = self.logsumexp(x)
        weight, bias = proj.weight, proj.bias
        target = (x.float() * weight[targets].float()).sum(-1)
        if bias is not None:
            target = target + bias[targets].float()
        return lse - self._softcap(target)

    def pre_projection(self, x: torch.Tensor) -> torch.Tensor:
        """The head's modules before the output projection (the final norm) applied to ``x``."""
        for module in self.modules[:-1]:
            x = module(x)
        return x

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """log-sum-exp over the vocabulary of the (linear) projection's logits for ``x`` (after the final
        norm), in ``vocab_chunk`` slices when set."""
        if not self.vocab_chunk:
            return torch.logsumexp(self._softcap(self.modules[-1](x)).float(), -1)
        lse = self._sliced_logsumexp(x, shift=False)
        # Unshifted sums are exact where they stay in float32's normal range; rows where a logit passed
        # ~88 (inf) or every exp underflowed are recomputed with each slice shifted by its maximum.
        bad = ~torch.isfinite(lse) | (lse < _LSE_FLOOR)
        if bad.any():
            lse[bad] = self._sliced_logsumexp(x[bad], shift=True)
        return lse

    def _sliced_logsumexp(self, x: torch.Tensor, shift: bool) -> torch.Tensor:
        """log-sum-exp over the vocabulary of the head's logits for ``x`` [tokens, h] (after the final norm),
        one ``vocab_chunk`` slice at a time, each written into the same buffer and reduced in place.

        ``shift=False`` sums ``exp`` of the raw logits (two passes over a slice instead of four); ``shift``
        subtracts each slice's row maximum first, as :func:`torch.logsumexp` does.
        """
        proj = self.modules[-1]
        weight, bias, step = proj.weight, proj.bias, self.vocab_chunk
        n = x.shape[0]
        buffer = x.new_empty(n * min(step, weight.shape[0]))
        parts = []
        for v in range(0, weight.shape[0], step):
            w = weight[v:v + step].to(x.dtype)  # a head kept narrower (offload.upcast_linear): this slice upcast
            out = buffer[:n * w.shape[0]].view(n, w.shape[0])
            if bias is None:
                torch.mm(x, w.t(), out=out)
            else:
                torch.addmm(bias[v:v + step].to(x.dtype), x, w.t(), out=out)
            logits = self._softcap_(out.float())
            if not shift:
                parts.append(logits.exp_().sum(-1))
                continue
            top = logits.amax(-1, keepdim=True)
            top = top.masked_fill_(top.isinf(), 0)  # as torch.logsumexp: rows of +-inf stay finite-safe
            parts.append(logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1)))
        if not shift:
            return torch.stack(parts).sum(0).log_()
        return torch.stack(parts).logsumexp(0)

    def _softcap_(self, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`_softcap` in place."""
        return logits.div_(self.softcap).tanh_().mul_(self.softcap) if self.softcap else logits

    def nll_sum(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum of next-token NLL of ``hidden`` [r*b, seq, h] against ``ids`` [b, seq], per stream ([r]).

        The head runs on chunks of tokens so [tokens, vocab] logits are never materialised whole, and the
        last position (no target) is not computed at all.
        """
        b, seq = ids.shape
        r = hidden.shape[0] // b
        x = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = ids[:, 1:].reshape(1, -1).expand(r, -1).reshape(-1)
        per_token = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], self.loss_chunk):
            end = start + self.loss_chunk
            per_token[start:end] = self.hidden_nll(x[start:end], targets[start:end])
        return per_token.view(r, -1).double().sum(1)

    def dense_targets(self, hidden: torch.Tensor) -> DenseTargets:
        """What :meth:`kl_sum` needs of the dense model's next-token distributions, from its final hidden
        states ``hidden`` [b, seq, h] (computed once, then every candidate is compared with it).

        With a linear, uncapped head, ``KL(p || q) = sum p log p - sum p logit_q + lse_q`` and
        ``sum p logit_q = x_q . (p W) + p . bias``: per token, the expected output embedding ``p W`` [h] and
        one constant are all that is kept, not the [tokens x vocabulary] log-probabilities. Otherwise (soft
        cap) the dense log-probabilities themselves are kept.
        """
        x = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        if not self._linear_kl:
            logp = torch.cat([self.head(x[s:s + self.loss_chunk]).float().log_softmax(-1)
                              for s in range(0, x.shape[0], self.loss_chunk)])
            return DenseTargets(log_probs=logp)
        proj = self.modules[-1]
        weight, bias = proj.weight, proj.bias
        step = self.vocab_chunk or weight.shape[0]
        means, consts = [], []
        for s in range(0, x.shape[0], self.loss_chunk):
            xn = self.pre_projection(x[s:s + self.loss_chunk])
            lse = self.logsumexp(xn)
            mean = torch.zeros(xn.shape[0], weight.shape[1], dtype=torch.float32, device=xn.device)
            p_logit = torch.zeros(xn.shape[0], dtype=torch.float64, device=xn.device)
            p_bias = torch.zeros_like(p_logit)
            for v in range(0, weight.shape[0], step):
                w = weight[v:v + step].to(xn.dtype)
                logits = (xn @ w.t() if bias is None else torch.addmm(bias[v:v + step].to(xn.dtype), xn, w.t())).float()
                prob = (logits - lse[:, None]).exp_()
                mean.addmm_(prob, w.float())
                p_logit += (prob * logits).sum(-1).double()
                if bias is not None:
                    p_bias += (prob @ bias[v:v + step].float()).double()
            means.append(mean)
            consts.append(p_logit - lse.double() - p_bias)  # sum p log p - p . bias
        return DenseTargets(mean_embedding=torch.cat(means), const=torch.cat(consts))

    @property
    def _linear_kl(self) -> bool:
        return isinstance(self.modules[-1], nn.Linear) and not self.softcap

    def kl_sum(self, hidden: torch.Tensor, target: DenseTargets) -> torch.Tensor:
        """Sum over tokens of KL(dense || candidate) of the next-token distributions, per stream ([r]):
        ``hidden`` [r*b, seq, h] is ``r`` candidates' final hidden states for the micro-batch of ``target``."""
        x = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        n = target.num_tokens
        sums = torch.zeros(x.shape[0] // n, dtype=torch.float64, device=x.device)
        for i in range(sums.shape[0]):
            for start in range(0, n, self.loss_chunk):
                chunk = x[i * n + start:i * n + min(n, start + self.loss_chunk)]
                sums[i] += self._token_kl(chunk, target, start).sum()
        return sums

    def _token_kl(self, x: torch.Tensor, target: DenseTargets, offset: int) -> torch.Tensor:
        """Per-token KL of the candidate's final hidden states ``x`` against the dense rows from ``offset``."""
        rows = slice(offset, offset + x.shape[0])
        if target.log_probs is not None:
            logp = target.log_probs[rows]
            logq = self.head(x).float().log_softmax(-1)
            return (logp.exp() * (logp - logq)).sum(-1).double()
        xn = self.pre_projection(x)
        dot = (xn.double() * target.mean_embedding[rows].double()).sum(-1)
        return target.const[rows] - dot + self.logsumexp(xn).double()
