"""Perplexity with the paper's protocol.

The text of a set (WikiText-2 raw test rows or PTB validation sentences, joined with ``"\\n\\n"``) is
tokenized once without special tokens and cut into non-overlapping ``seq_len``-token chunks; the
remainder is dropped. Each chunk is scored on its own (no context from the previous chunk), and
``PPL = exp(mean token NLL over all chunks)``. ``seq_len=128`` is the paper's setting; 2048 is the
other convention in the literature. With ``bos_token_id`` a BOS token is put before every chunk (Gemma
needs it): the chunk's first token is then scored too, from the BOS, and the BOS itself is not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..engine.loss import ppl_from_mean_nll, token_nll
from ..errors import ShortenedError
from .sources import PPL_SETS, ROW_SEPARATOR, ppl_rows, read_text_file

__all__ = ["load_ppl_text", "perplexity", "perplexity_on", "tokenize_text"]

# Positions whose float64 token NLL is taken at once (256 x 49152 vocab x 8 bytes = 100 MB).
POSITIONS_PER_SLICE = 256


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embedding (also under a device map)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and getattr(embed, "weight", None) is not None:
        return embed.weight.device
    return next(model.parameters()).device


def chunk_tokens(token_ids: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """``(n_chunks, seq_len)`` non-overlapping chunks of a 1-D tensor; the remainder is dropped."""
    if token_ids.dim() != 1:
        raise ShortenedError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if seq_len < 2:
        raise ShortenedError(f"seq_len must be at least 2, got {seq_len}")
    if limit is not None and limit < 1:
        raise ShortenedError(f"limit must be a positive number of chunks, got {limit}")
    n_chunks = token_ids.numel() // seq_len
    if limit is not None:
        n_chunks = min(n_chunks, limit)
    if n_chunks == 0:
        raise ShortenedError(f"the text has {token_ids.numel()} tokens: fewer than one chunk of {seq_len}")
    return token_ids[: n_chunks * seq_len].view(n_chunks, seq_len)


def chunk_batches(chunks: torch.Tensor, *, bos_token_id: int | None = None, batch_size: int = 8,
                  progress: bool = True, desc: str = "perplexity") -> Iterator[torch.Tensor]:
    """``chunks`` (n, seq_len), ``batch_size`` at a time, a BOS put before each chunk when ``bos_token_id``
    is given, with a progress bar over the chunks."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ShortenedError(f"batch size must be positive, got {batch_size}")
    bar = tqdm(total=chunks.shape[0], desc=desc, unit="chunk", disable=not progress, leave=False)
    try:  # the bar is closed also when the caller stops early or raises (e.g. a vocabulary mismatch)
        for start in range(0, chunks.shape[0], batch_size):
            batch = chunks[start:start + batch_size]
            if bos_token_id is not None:
                batch = torch.cat([torch.full((batch.shape[0], 1), bos_token_id, dtype=batch.dtype), batch], dim=1)
            yield batch
            bar.update(batch.shape[0])
    finally:
        bar.close()


def scored_slices(length: int) -> Iterator[tuple[int, int]]:
    """``(lo, hi)``: the predicting positions of a ``length``-token row, ``POSITIONS_PER_SLICE`` at a time.

    Position t predicts token t+1; every chunk is full length, so no padding is involved and the batch
    size cannot change which tokens are scored. Scores run in float64 (an fp32 log-sum-exp over a large
    vocabulary drifts by ~1e-5 relative), one slice at a time so that the float64 copy stays small.
    """
    for lo in range(0, length - 1, POSITIONS_PER_SLICE):
        yield lo, min(lo + POSITIONS_PER_SLICE, length - 1)


@torch.no_grad()
def sum_nll(model: nn.Module, chunks: torch.Tensor, *, bos_token_id: int | None = None,
            batch_size: int = 8, progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of scored tokens over ``chunks`` (n, seq_len).

    A model whose blocks are on disk (``--offload disk``) is run block by block over many chunks at once
    (:func:`streamed_sum_nll`); the numbers are the same."""
    from ..offload import disk_blocks

    if disk_blocks(model) is not None:
        return streamed_sum_nll(model, chunks, bos_token_id=bos_token_id, batch_size=batch_size,
                                progress=progress, desc=desc)
    device = input_device(model)
    total, count = 0.0, 0
    for batch in chunk_batches(chunks, bos_token_id=bos_token_id, batch_size=batch_size, progress=progress,
                               desc=desc):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll, n = batch_nll(batch, lambda row, lo, hi: logits[row, lo:hi])
        total, count = total + nll, count + n
    return total, count


def batch_nll(batch: torch.Tensor, logits: Callable[[int, int, int], torch.Tensor]) -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of scored tokens of ``batch`` (rows of token ids), with
    ``logits(row, lo, hi)`` the logits of predicting positions ``lo:hi`` of a row (:func:`scored_slices`)."""
    total, count = 0.0, 0
    for row in range(batch.shape[0]):
        for lo, hi in scored_slices(batch.shape[1]):
            target = batch[row, lo + 1:hi + 1]
            total += token_nll(logits(row, lo, hi).double(), target).sum().item()
            count += target.numel()
    return total, count


#: Hidden states a streamed pass holds (its chunks' input, output and the joined output of a block): the chunks
#: of one pass are as many as fit; each pass reads every block once (an 8B Llama: 170 chunks of 128 tokens).
PASS_BYTES = 2**30


class _LastBlock(Exception):
    """Raised by a hook on the last block with its output: the head is run here, in slices."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


@torch.no_grad()
def streamed_sum_nll(model: nn.Module, chunks: torch.Tensor, *, bos_token_id: int | None = None,
                     batch_size: int = 8, progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """:func:`sum_nll` of a model whose blocks are on disk: the model's own forward over as many chunks as
    :data:`PASS_BYTES` of hidden states allow, each block read once per pass and run ``batch_size`` chunks
    at a time; the head (whose logits for all those chunks would not fit) on one chunk's slice at a time."""
    from tqdm.auto import tqdm

    from ..archs import get_arch, get_blocks
    from ..engine.capture import block_hidden
    from ..engine.loss import HeadLoss
    from ..offload import streamed

    if batch_size < 1:
        raise ShortenedError(f"batch size must be positive, got {batch_size}")
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    head = HeadLoss.of(model, spec)
    device = input_device(model)
    if bos_token_id is not None:
        chunks = torch.cat([torch.full((chunks.shape[0], 1), bos_token_id, dtype=chunks.dtype), chunks], dim=1)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    per_pass = max(batch_size, PASS_BYTES // (3 * chunks.shape[1] * hidden_size * 4))
    passes = chunks.split(per_pass)
    total, count = 0.0, 0

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise _LastBlock(block_hidden(output))

    with tqdm(total=len(blocks) * len(passes), desc=desc, unit="block", disable=not progress, leave=False) as bar:
        for batch in passes:
            batch = batch.to(device)
            handle = blocks[-1].register_forward_hook(stop)
            try:
                with streamed(model, batch_size, on_block=bar.update):
                    model(input_ids=batch, use_cache=False)
                raise ShortenedError("the model's forward did not reach its last block")
            except _LastBlock as done:
                final = done.hidden
            finally:
                handle.remove()
            nll, n = batch_nll(batch, lambda row, lo, hi: head.head(final[row, lo:hi]))
            total, count = total + nll, count + n
    return total, count


def perplexity(
    model: nn.Module,
    token_ids: torch.LongTensor,
    *,
    seq_len: int = 128,
    batch_size: int = 8,
    bos_token_id: int | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on a 1-D token tensor: non-overlapping ``seq_len`` chunks (remainder
    dropped, first ``limit`` chunks only), optional BOS before each chunk, ``exp(mean token NLL)``."""
    chunks = chunk_tokens(token_ids, seq_len, limit)
    total, count = sum_nll(model, chunks, bos_token_id=bos_token_id, batch_size=batch_size, progress=progress)
    return ppl_from_mean_nll(total / count)


def load_ppl_text(name: str, data_dir: str | os.PathLike | None) -> str:
    """The text of a perplexity set: ``wikitext2`` (WikiText-2 raw v1 test rows joined with "\\n\\n"),
    ``ptb`` (``ptb_text_only`` validation sentences, joined the same way) or a local UTF-8 text file.

    Named sets are read from ``data_dir`` (the layout of ``../shared/data``) or, when it is None, from
    the Hugging Face Hub; a path is read as it is.
    """
    if name in PPL_SETS:
        return ROW_SEPARATOR.join(ppl_rows(name, data_dir))
    if os.path.isfile(os.path.expanduser(name)):
        return read_text_file(name)
    raise ShortenedError(f"unknown perplexity set '{name}': use {', '.join(PPL_SETS)} or the path of a text file")


def tokenize_text(tokenizer: Any, text: str) -> torch.LongTensor:
    """Token ids of ``text`` without special tokens, as one 1-D tensor."""
    if tokenizer is None:
        raise ShortenedError("perplexity needs a tokenizer, and this model has none")
    # verbose=False: the whole test set is far longer than the model's context, which is expected here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def set_chunks(tokenizer: Any, name: str, *, data_dir: str | os.PathLike | None, seq_len: int, bos: bool,
               limit: int | None) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """A named set's or text file's token ids, its ``seq_len`` chunks and the BOS id to put before each
    (None without ``bos``)."""
    bos_id = None
    if bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise ShortenedError("--bos was asked for but the tokenizer has no BOS token")
    ids = tokenize_text(tokenizer, load_ppl_text(name, data_dir))
    return ids, chunk_tokens(ids, seq_len, limit), bos_id


def set_settings(name: str, data_dir: str | os.PathLike | None, ids: torch.Tensor, bos_id: int | None, *,
                 seq_len: int, batch_size: int, bos: bool, limit: int | None) -> dict[str, Any]:
    """What reproduces a measurement on a set (from :func:`set_chunks`): where its text came from and how it
    was cut and batched."""
    return {
        "set": name,
        "source": "local" if data_dir is not None or name not in PPL_SETS else "hub",
        "data_dir": str(data_dir) if data_dir is not None and name in PPL_SETS else None,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "bos": bos,
        "bos_token_id": bos_id,
        "limit": limit,
        "text_tokens": int(ids.numel()),
    }


def perplexity_on(
    model: nn.Module,
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
    """Perplexity on a named set or text file, with what is needed to reproduce it.

    Returns ``{"value", "n_chunks", "n_tokens", "seconds", "settings": {...}}``; ``n_tokens`` counts the
    scored tokens.
    """
    ids, chunks, bos_id = set_chunks(tokenizer, name, data_dir=data_dir, seq_len=seq_len, bos=bos, limit=limit)
    start = time.perf_counter()
    total, count = sum_nll(model, chunks, bos_token_id=bos_id, batch_size=batch_size, progress=progress,
                           desc=f"ppl {os.path.basename(name) or name}")
    return {
        "value": ppl_from_mean_nll(total / count),
        "n_chunks": int(chunks.shape[0]),
        "n_tokens": count,
        "seconds": round(time.perf_counter() - start, 2),
        "settings": set_settings(name, data_dir, ids, bos_id, seq_len=seq_len, batch_size=batch_size, bos=bos,
                                 limit=limit),
    }
