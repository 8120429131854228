"""Tiny random models, one per architecture in the table, built from a config (no download)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 97
N_LAYERS = 6

_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_COMMON = dict(_IDS, vocab_size=VOCAB, num_hidden_layers=N_LAYERS, hidden_size=32, intermediate_size=64,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

# model_type -> config overrides. Sliding windows are shorter than the test sequences so that a wrong
# layer_types entry after removal changes the logits.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=8),
    "gemma": dict(_COMMON, head_dim=8),
    "qwen2": dict(_COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=3),
    "qwen3": dict(_COMMON, head_dim=8, use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "gemma2": dict(_COMMON, head_dim=8, sliding_window=6, final_logit_softcapping=5.0,
                   layer_types=["sliding_attention", "full_attention"] * 3),
    "gemma3_text": dict(_COMMON, head_dim=8, sliding_window=6,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2),
    "phi3": dict(_COMMON),
    "opt": dict(_IDS, vocab_size=VOCAB, num_hidden_layers=N_LAYERS, hidden_size=32, ffn_dim=64,
                num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32),
    "gpt_neox": dict(_IDS, vocab_size=VOCAB, num_hidden_layers=N_LAYERS, hidden_size=32, intermediate_size=64,
                     num_attention_heads=4, max_position_embeddings=128),
    "gpt2": dict(_IDS, vocab_size=VOCAB, n_layer=N_LAYERS, n_embd=32, n_head=4, n_positions=128),
}


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny ``model_type`` causal LM in eval mode, fp32, eager attention."""
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def tiny_inputs(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
