"""How close a pruned (or healed) model stays to its source: KL(source || model) of the next-token
distributions on the chunks of a perplexity set, with both models' perplexities on the same chunks.

Perplexity asks how well a model predicts the text; the KL asks how much it changed what the source
model predicts. The two can disagree: after healing, a model can be closer to its source on every text
and still have the higher perplexity (BENCHMARKS.md, block-set search, session 13). The block-set search
optimises the KL on calibration text, so this is the measure of whether its choice held up.

Chunks are cut as for perplexity (the paper's protocol, :mod:`shortened.evaluation.perplexity`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from ..engine.loss import ppl_from_mean_nll
from ..errors import ShortenedError
from .perplexity import chunk_batches, input_device, scored_slices, set_chunks, set_settings

__all__ = ["kl_sums", "fidelity_on"]


@torch.no_grad()
def kl_sums(model: nn.Module, reference: nn.Module, chunks: torch.Tensor, *, bos_token_id: int | None = None,
            batch_size: int = 8, progress: bool = True, desc: str = "fidelity") -> dict[str, float]:
    """Over ``chunks`` (n, seq_len): the summed per-token KL(reference || model) of the next-token
    distributions, each model's summed NLL of the next token (float64), and the number of scored tokens.

    The two models need the same vocabulary (a pruned model and its source have it).
    """
    sums = {"kl": 0.0, "nll": 0.0, "reference_nll": 0.0, "tokens": 0}
    for batch in chunk_batches(chunks, bos_token_id=bos_token_id, batch_size=batch_size, progress=progress,
                               desc=desc):
        logits = model(input_ids=batch.to(input_device(model)), use_cache=False).logits
        ref_logits = reference(input_ids=batch.to(input_device(reference)), use_cache=False).logits
        if logits.shape[-1] != ref_logits.shape[-1]:
            raise ShortenedError(f"the model's vocabulary ({logits.shape[-1]}) differs from the reference's "
                                 f"({ref_logits.shape[-1]}): the KL needs the same one")
        for row in range(batch.shape[0]):
            for lo, hi in scored_slices(batch.shape[1]):
                target = batch[row, lo + 1:hi + 1, None]
                log_q = logits[row, lo:hi].to("cpu", torch.float64).log_softmax(-1)
                log_p = ref_logits[row, lo:hi].to("cpu", torch.float64).log_softmax(-1)
                sums["kl"] += (log_p.exp() * (log_p - log_q)).sum().item()
                sums["nll"] -= log_q.gather(-1, target).sum().item()
                sums["reference_nll"] -= log_p.gather(-1, target).sum().item()
                sums["tokens"] += target.numel()
    return sums


def fidelity_on(
    model: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    bos: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean token KL(reference || model) on a named perplexity set or text file, with both perplexities.

    Returns ``{"kl", "ppl", "reference_ppl", "n_chunks", "n_tokens", "seconds", "settings"}``.
    """
    ids, chunks, bos_id = set_chunks(tokenizer, name, data_dir=data_dir, seq_len=seq_len, bos=bos, limit=limit)
    start = time.perf_counter()
    s = kl_sums(model, reference, chunks, bos_token_id=bos_id, batch_size=batch_size, progress=progress,
                desc=f"fidelity {os.path.basename(name) or name}")
    n = s["tokens"]
    return {
        "kl": s["kl"] / n,
        "ppl": ppl_from_mean_nll(s["nll"] / n),
        "reference_ppl": ppl_from_mean_nll(s["reference_nll"] / n),
        "n_chunks": int(chunks.shape[0]),
        "n_tokens": n,
        "seconds": round(time.perf_counter() - start, 2),
        "settings": set_settings(name, data_dir, ids, bos_id, seq_len=seq_len, batch_size=batch_size, bos=bos,
                                 limit=limit),
    }
