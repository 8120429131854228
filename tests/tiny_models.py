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


# Families beyond the table, each with an adversarial per-block pattern: case -> (model_type, overrides).
# Sizes stay tiny (hidden 32, 6 blocks); sliding windows (6) are shorter than the test sequences (20).
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, qk_head_dim=16,
            head_dim=8, num_key_value_heads=4)
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    # MoE: sparse every second block, an explicit dense list on top
    "qwen2_moe-step2": ("qwen2_moe", dict(_COMMON, **_MOE, shared_expert_intermediate_size=16,
                                          decoder_sparse_step=2)),
    "qwen3_moe-step2-mlp-only": ("qwen3_moe", dict(_COMMON, **_MOE, head_dim=8, decoder_sparse_step=2,
                                                   mlp_only_layers=[3])),
    # MoE: the first k blocks dense (DeepSeek's first_k_dense_replace)
    "deepseek_v3-first-k": ("deepseek_v3", dict(_COMMON, n_routed_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=16, first_k_dense_replace=3, n_group=1,
                                                topk_group=1, **_MLA)),
    # MoE: an explicit index list of MoE blocks and a no-RoPE list
    "llama4-moe-layers": ("llama4_text", dict(_COMMON, num_local_experts=4, intermediate_size_mlp=64, head_dim=8,
                                              moe_layers=[1, 3, 5], no_rope_layers=[1, 1, 0, 1, 1, 0])),
    # MoE: every second block from a start to an end (ERNIE-4.5's interval rule)
    "ernie4_5_moe-interval": ("ernie4_5_moe", dict(_COMMON, moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
                                                   moe_num_shared_experts=1, moe_layer_start_index=1,
                                                   moe_layer_end_index=-1, moe_layer_interval=2)),
    "mixtral": ("mixtral", dict(_COMMON, num_local_experts=4, num_experts_per_tok=2)),
    # Hybrid: attention and experts by period/offset rules (Jamba)
    "jamba-period": ("jamba", dict(_COMMON, num_experts=4, num_experts_per_tok=2, attn_layer_period=3,
                                   attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                                   mamba_d_state=4, mamba_dt_rank=4, use_mamba_kernels=False)),
    # Hybrid: linear-attention blocks among full-attention ones, sliding windows
    "qwen3_next-hybrid": ("qwen3_next", dict(_COMMON, **_MOE, head_dim=8, shared_expert_intermediate_size=16,
                                             decoder_sparse_step=2, linear_num_key_heads=2, linear_num_value_heads=2,
                                             linear_key_head_dim=8, linear_value_head_dim=8,
                                             layer_types=["linear_attention", "full_attention"] * 3)),
    "lfm2-conv": ("lfm2", dict(_COMMON, block_dim=32, block_ff_dim=64, conv_L_cache=3,
                               layer_types=["conv", "full_attention", "conv", "conv", "full_attention", "conv"])),
    # Hybrids of state-space and attention blocks (attention at 2 and 5), a hybrid MoE, and a pure SSM
    "bamba": ("bamba", dict(_COMMON, attn_layer_indices=[2, 5], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                            mamba_chunk_size=16)),
    "falcon_h1": ("falcon_h1", dict(_COMMON, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                                    mamba_chunk_size=16)),
    "nemotron_h-moe": ("nemotron_h", dict(_COMMON, head_dim=8, sliding_window=6, ssm_state_size=8, mamba_num_heads=4,
                                          mamba_head_dim=16, n_groups=1, n_routed_experts=4, moe_intermediate_size=16,
                                          moe_shared_expert_intermediate_size=16,
                                          layers_block_type=["linear_attention", "full_attention", "moe",
                                                             "linear_attention", "mlp", "full_attention"])),
    "granitemoehybrid": ("granitemoehybrid", dict(_COMMON, num_local_experts=4, shared_intermediate_size=16,
                                                  layer_types=["linear_attention", "linear_attention",
                                                               "full_attention"] * 2, mamba_n_heads=4,
                                                  mamba_d_state=8, mamba_d_head=16, mamba_chunk_size=16)),
    "lfm2_moe-first-dense": ("lfm2_moe", dict(_COMMON, moe_intermediate_size=16, num_dense_layers=2, num_experts=4,
                                              num_experts_per_tok=2,
                                              layer_types=["conv", "full_attention", "conv", "conv",
                                                           "full_attention", "conv"])),
    # Final norm 'norm_f' in a 'transformer.blocks' list counted by n_layers (MPT), and DBRX's MoE
    "mpt": ("mpt", dict(_IDS, vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=N_LAYERS, max_seq_len=128)),
    # State space: final norm 'norm_f'
    "mamba": ("mamba", dict(_IDS, vocab_size=VOCAB, num_hidden_layers=N_LAYERS, hidden_size=32, state_size=4,
                            expand=2, conv_kernel=4, time_step_rank=4, use_mambapy=True)),
    # Final norm 'final_layernorm'
    "phi": ("phi", dict(_COMMON)),
    # A per-block cycle (RecurrentGemma's block_types)
    "recurrent_gemma-cycle": ("recurrent_gemma", dict(_IDS, vocab_size=VOCAB, num_hidden_layers=N_LAYERS,
                                                      hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                      num_key_value_heads=2, lru_width=32, attention_window_size=6,
                                                      block_types=["recurrent", "attention"])),
    # A no-RoPE interval and sliding windows written as layer_types
    "smollm3-no-rope": ("smollm3", dict(_COMMON, no_rope_layer_interval=2)),
    # Depth-scaled residuals (scale_depth / sqrt(blocks))
    "minicpm3-depth": ("minicpm3", dict(_COMMON, scale_depth=1.4, **_MLA)),
}


def family_model(case: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of ``FAMILY_CONFIGS[case]``, eval mode, fp32, eager attention."""
    model_type, overrides = FAMILY_CONFIGS[case]
    config = AutoConfig.for_model(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def skipped_logits(model: torch.nn.Module, skip: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The reference of a removal: ``model`` run with the ``skip`` blocks replaced by identity (forward hooks
    return each one's input hidden states, keeping any other outputs)."""
    from shortened import get_blocks

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    blocks = get_blocks(model)
    handles = [blocks[i].register_forward_hook(identity, with_kwargs=True) for i in skip]
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
