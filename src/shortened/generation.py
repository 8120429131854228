"""Text generation for trying a (pruned) model: chat template when the tokenizer has one, streamed output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ShortenedError


def build_prompt_ids(tokenizer: Any, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids of ``prompt``, wrapped in the tokenizer's chat template when it has one and ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    chat: bool = True,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    stream: bool = False,
) -> str:
    """Generate a continuation of ``prompt`` and return the new text (printed as it comes if ``stream``)."""
    if tokenizer is None:
        raise ShortenedError("this model has no tokenizer, so it cannot generate text from a prompt")
    if max_new_tokens < 1:
        raise ShortenedError("--max-new-tokens must be at least 1")
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = build_prompt_ids(tokenizer, prompt, chat).to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             streamer=streamer, pad_token_id=pad, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
