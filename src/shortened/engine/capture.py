"""Capturing how a model calls its blocks, and calling a block again the same way.

A forward pre-hook on every block sees its input hidden states and the rest of its call (attention mask,
position embeddings: they can differ per block, e.g. sliding-window layers in Gemma 2/3). A
:class:`BlockCall` keeps that rest; :func:`call_block` runs the block again on other hidden states (a
stack of several candidate streams at once) with the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ShortenedError
from ..offload import BlockHome


@dataclass
class BlockCall:
    """How a block was called: positional args after the hidden states, kwargs, where the hidden goes."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_key: str | None  # None: the hidden states are the first positional argument


@dataclass
class Capture:
    """One micro-batch of calibration samples after the capture pass."""

    ids: torch.Tensor                       # [b, seq]
    inputs: list[torch.Tensor | None]       # input of each block in the dense model (None past the stop)
    calls: list[BlockCall]                  # per block

    @property
    def batch(self) -> int:
        return self.ids.shape[0]


class _StopForward(Exception):
    """Raised by the capture hook at the last block: nothing after it is needed."""


_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def split_block_call(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, BlockCall]:
    """A block's hidden-states input and the rest of its call, as seen by a forward pre-hook."""
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs), None)
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return kwargs["hidden_states"], BlockCall((), rest, "hidden_states")


def without_cache(call: BlockCall) -> BlockCall:
    """The call with no KV-cache object (re-runs would update it: wrong results) and ``use_cache`` off."""
    call.kwargs = {k: (None if k in _CACHE_ARGS else v) for k, v in call.kwargs.items()}
    if "use_cache" in call.kwargs:
        call.kwargs["use_cache"] = False
    return call


def check_calib_ids(calib_ids: Any, vocab_size: int | None = None) -> torch.Tensor:
    """Validate ``calib_ids`` as a LongTensor[n_samples, seq_len] with seq_len >= 2."""
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2:
        raise ShortenedError("calibration ids must be a LongTensor of shape [n_samples, seq_len]")
    if calib_ids.dtype not in (torch.int64, torch.int32):
        raise ShortenedError(f"calibration ids must be integer token ids, got {calib_ids.dtype}")
    n, seq = calib_ids.shape
    if n < 1 or seq < 2:
        raise ShortenedError(f"need at least 1 calibration sample of at least 2 tokens, got shape {tuple(calib_ids.shape)}")
    if vocab_size is not None and (calib_ids.min() < 0 or calib_ids.max() >= vocab_size):
        raise ShortenedError(f"calibration ids must lie in 0..{vocab_size - 1} (the model's vocabulary)")
    return calib_ids.long()


def capture_blocks(model: nn.Module, blocks: Sequence[nn.Module], ids: torch.Tensor, device: torch.device,
                   home: BlockHome | None = None) -> Capture:
    """Run ``ids`` through ``model`` with ``use_cache=False`` and record every block's input and call.

    The forward stops at the last block's input (the rest is not needed). With ``home`` (offloaded
    mode), each block is fetched onto ``device`` for its call and released after it.
    """
    n_blocks = len(blocks)
    inputs: list[torch.Tensor | None] = [None] * n_blocks
    calls: list[BlockCall | None] = [None] * n_blocks
    handles = []

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, call = split_block_call(args, kwargs)
            inputs[i], calls[i] = hidden.detach(), call
            if i == n_blocks - 1:
                raise _StopForward
            if home is not None:
                home.fetch(module, i, device)

        return hook

    def make_post(i: int):
        def post(module: nn.Module, args: tuple, output: Any) -> None:
            home.release(module, i)  # type: ignore[union-attr]

        return post

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        if home is not None:
            handles.append(block.register_forward_hook(make_post(i)))
    try:
        with torch.no_grad():
            model(input_ids=ids.to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls):
        raise ShortenedError("the model's forward did not call every block; cannot score its blocks")
    for c in calls:
        without_cache(c)  # type: ignore[arg-type]
    return Capture(ids=ids.to(device), inputs=inputs, calls=calls)  # type: ignore[arg-type]


def _expand(obj: Any, n: int, r: int) -> Any:
    """Tile a captured argument built for a batch of ``n`` to ``r`` stacked copies of that batch.

    Tensors whose first dimension is the batch are tiled (stream-major, matching ``torch.cat``); others
    (broadcast masks, position embeddings of batch 1, scalars) are left alone.
    """
    if r == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == n and n > 1:
            return obj.repeat(r, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(_expand(o, n, r) for o in obj)
    if isinstance(obj, list):
        return [_expand(o, n, r) for o in obj]
    if isinstance(obj, dict):
        return {k: _expand(v, n, r) for k, v in obj.items()}
    return obj


def call_block(block: nn.Module, call: BlockCall, hidden: torch.Tensor, n: int) -> torch.Tensor:
    """Run ``block`` on ``hidden`` (``r * n`` sequences) with its captured arguments for ``n``."""
    r = hidden.shape[0] // n
    args, kwargs = _expand(call.args, n, r), _expand(call.kwargs, n, r)
    if call.hidden_key is None:
        out = block(hidden, *args, **kwargs)
    else:
        out = block(*args, **{**kwargs, call.hidden_key: hidden})
    return block_hidden(out)


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden states a block returns: the output itself, or the first entry of a tuple or list (GPT-1's
    blocks return lists) or of a ModelOutput."""
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, dict):
        return next(iter(output.values()))
    return output


def _take(obj: Any, n: int, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of a captured argument built for a batch of ``n`` (the inverse of :func:`_expand`: tensors
    whose first dimension is the batch are sliced, broadcast ones left alone)."""
    if isinstance(obj, torch.Tensor):
        return obj[lo:hi] if obj.dim() >= 2 and obj.shape[0] == n and n > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_take(o, n, lo, hi) for o in obj)
    if isinstance(obj, list):
        return [_take(o, n, lo, hi) for o in obj]
    if isinstance(obj, dict):
        return {k: _take(v, n, lo, hi) for k, v in obj.items()}
    return obj


def call_in_slices(forward: Any, args: tuple, kwargs: dict[str, Any], size: int) -> Any:
    """``forward(*args, **kwargs)`` of a block, run on ``size`` sequences of the batch at a time and the hidden
    states put back together (each sequence is computed on its own: the same function in less memory)."""
    hidden, call = split_block_call(args, kwargs)
    n = hidden.shape[0]
    if n <= size:
        return forward(*args, **kwargs)
    outs = []
    for lo in range(0, n, size):
        part = hidden[lo:lo + size]
        rest, kw = _take(call.args, n, lo, lo + size), _take(call.kwargs, n, lo, lo + size)
        outs.append(forward(part, *rest, **kw) if call.hidden_key is None else forward(*rest, **{**kw, "hidden_states": part}))
    joined = torch.cat([block_hidden(o) for o in outs], 0)
    if isinstance(outs[0], torch.Tensor):
        return joined
    if isinstance(outs[0], (tuple, list)) and all(x is None for o in outs for x in o[1:]):
        return type(outs[0])([joined, *outs[0][1:]])
    raise ShortenedError(f"a block returned {type(outs[0]).__name__} with more than its hidden states: cannot run "
                         "it in slices")
