"""Survey: does block removal give an exact model for every causal-LM type transformers knows?

For each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model (6 blocks) is built from a
config (no download), blocks are removed through the public API (``get_arch``, ``remove_blocks``,
``save_model``), the folder is reloaded with plain ``AutoModelForCausalLM.from_pretrained`` and compared
with the unpruned model run with the same blocks skipped (forward hooks that hand a block's input on as
its output). Each (type, removal set) is one of:

  exact         the reloaded model's logits match the reference within 1e-4, greedy generation with and
                without the KV cache agree, and loading reported no missing/unexpected/mismatched weights
  refused       a ShortenedError was raised (fine only when no output folder was left behind)
  wrong         it loads but the logits differ, the cache changes the generation, or weights were reported
  load-fails    the folder was written, then from_pretrained raised
  crash         any other exception (or a timeout / a dead subprocess)
  out-of-scope  the unpruned model could not be built, run on input_ids alone, saved and reloaded exactly,
                or generate (the type's own limits, before any pruning)

A type's class is the worst over the removal sets. Every type runs in its own subprocess with a timeout.

    .venv/bin/python benchmarks/survey_archs.py --out /tmp/survey/result.json
    .venv/bin/python benchmarks/survey_archs.py --types llama,gpt2,qwen3_moe --out /tmp/survey/some.json

Per-type config overrides live in ``TYPE_OVERRIDES`` below; extend it when a type builds too big or not at all.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import copy
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

N_BLOCKS = 6
REMOVAL_SETS: tuple[tuple[int, ...], ...] = ((1, 3), (0, 4))
VOCAB = 128
BATCH, SEQ_LEN = 2, 20
NEW_TOKENS = 12
TOLERANCE = 1e-4
TIMEOUT_S = 120
# Over this many parameters the overrides missed a size field; the type is still surveyed, but flagged.
PARAM_WARN = 5_000_000

# Fields that count a model's blocks, by the names configs use (aliases resolve through attribute_map).
# Decoder fields first: in encoder-decoder configs num_hidden_layers may alias the encoder's count.
LAYER_FIELDS = ("decoder_layers", "num_decoder_layers", "num_hidden_layers", "n_layer", "n_layers", "num_layers",
                "num_blocks")

# Small sizes applied to the text (decoder) config; a key is passed only when the type's config has that
# field, so synonyms can all be listed. Sliding windows are shorter than the test sequence, MoE layers
# alternate with dense ones and the first block is dense, so a wrongly re-indexed per-layer setting shows.
GENERIC: dict[str, Any] = {
    # block count
    **{f: N_BLOCKS for f in LAYER_FIELDS},
    # width, heads
    "hidden_size": 32, "n_embd": 32, "d_model": 32, "embed_dim": 32, "embedding_size": 32,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "kv_n_heads": 2, "multi_query_group_num": 2,
    "num_query_groups": 2,
    "head_dim": 8, "kv_channels": 8, "d_head": 8, "d_kv": 8, "attention_head_dim": 8, "attention_head_size": 8,
    # feed-forward
    "intermediate_size": 64, "ffn_dim": 64, "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "n_inner": 64,
    "d_ff": 64, "ffn_hidden_size": 64, "intermediate_size_mlp": 64, "dense_intermediate_size": 64,
    "first_dense_intermediate_size": 64, "prefix_dense_intermediate_size": 64, "mlp_only_intermediate_size": 64,
    "d_inner": 64,
    # vocabulary and positions (ids 0/1/2 are pad/bos/eos; random test ids start at 3)
    "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_seq_len": 128,
    "max_target_positions": 128, "max_source_positions": 128,
    "encoder_layers": 2, "num_encoder_layers": 2, "rotary_dim": 4,
    # per-layer embeddings (Gemma 3n / 4) default to a 262k vocabulary
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
    # mixture of experts: 4 experts, top-2, every second block sparse, first block dense
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_top_k": 2, "top_k_experts": 2,
    "moe_k": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1,
    "first_k_dense_replace": 1, "decoder_sparse_step": 2, "interleave_moe_layer_step": 2,
    "expert_layer_period": 2, "expert_layer_offset": 1, "moe_layer_interval": 2,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 8,
    # sliding windows shorter than the sequence, alternating with full attention
    "sliding_window": 6, "sliding_window_size": 6, "sliding_window_pattern": 2, "_sliding_window_pattern": 2,
    "max_window_layers": 3, "attention_window_size": 6, "local_attention_window": 6,
    # state-space / linear-attention mixers
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "conv_kernel": 4, "mamba_d_conv": 4,
    "expand": 2, "mamba_expand": 2, "time_step_rank": 4, "mamba_dt_rank": 4, "mamba_n_heads": 4,
    "mamba_num_heads": 4, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_headdim": 16, "mamba_n_groups": 1,
    "mamba_ngroups": 1, "n_groups": 1, "mamba_chunk_size": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
    "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4, "linear_num_heads": 2, "linear_head_dim": 8,
    "conv_L_cache": 3, "lru_width": 32,
    # multi-token-prediction heads are extra blocks outside the list; none keeps the model small
    "num_nextn_predict_layers": 0, "num_mtp_layers": 0,
}

# Non-text sub-configs (vision, audio...) only need to be small: they never run on input_ids.
SUB_GENERIC: dict[str, Any] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_layers": 2, "depth": 2, "num_attention_heads": 4,
    "num_heads": 4, "intermediate_size": 64, "out_hidden_size": 32, "embed_dim": 32,
}

# Sub-config keys naming a tower outside the decoder (SUB_GENERIC applies to them).
TOWER_WORDS = ("vision", "audio", "vq", "image", "speech", "encoder", "patcher")

# Per-type additions or corrections, applied to the text config after GENERIC (a value of None removes a
# generic key). Add an entry when a type builds too big, fails to build, or hides a pattern worth testing.
# "__sub__" maps a sub-config's key to fields set on it, "__top__" sets fields of a composite config's top level.
_HYBRID = ["linear_attention", "linear_attention", "full_attention"] * 2  # attention at 2 and 5: both sets keep one
TYPE_OVERRIDES: dict[str, dict[str, Any]] = {
    # hybrids with attention blocks where both removal sets keep one (the default patterns may have none)
    **{t: {"layer_types": _HYBRID} for t in ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe",
                                             "qwen3_5_moe_text", "kimi_linear")},
    "granitemoehybrid": {"layers_block_type": ["mamba", "mamba", "attention"] * 2},
    "bamba": {"attn_layer_indices": [2, 5]},
    # transformers' Dbrx attention reads rope_theta (absent from DbrxAttentionConfig) and clamps by clip_qkv
    "dbrx": {"__sub__": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}}},
    # config validators tie these sizes together
    "mamba2": {"head_dim": 16},  # num_heads * head_dim == expand * hidden_size
    "falcon_h1": {"mamba_d_ssm": 64},  # mamba_n_heads * mamba_d_head == mamba_d_ssm
    "kolibri1_1": {"hidden_size": 64, "head_dim": 16, "index_num_heads": 1},  # NVFP4 rounding needs head_dim % 16 == 0
    "zaya": {"num_experts_per_tok": 1},
    "dots3_note": {"num_key_value_heads": 4},
    # default per-layer tables index layers beyond 6, or are sized for the default depth
    "dots3_note_text": {"per_layer_config": {}},
    "gemma4_text": {"per_layer_config": {}},
    "gemma4_unified_text": {"per_layer_config": {}},
    "gpt_neo": {"attention_types": [[["global", "local"], 3]], "window_size": 6},
    "zamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "zamba2": {"layers_block_type": ["mamba", "hybrid", "mamba", "mamba", "hybrid", "mamba"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "conv", "full_attention", "conv"],
                 "num_dense_layers": 1},
    "nemotron_h": {"layers_block_type": ["mamba", "full_attention", "moe", "mamba", "mlp", "full_attention"]},
    "gemma3n_text": {"num_kv_shared_layers": 2},
    "qwen4_exp_text": {"indexer_budget": 8, "indexer_compress_ratio": 2, "indexer_n_heads": 2,
                       "indexer_kv_heads": 1, "indexer_head_dim": 8},
    "qwen4_exp": {"indexer_budget": 8, "indexer_compress_ratio": 2, "indexer_n_heads": 2, "indexer_kv_heads": 1,
                  "indexer_head_dim": 8},
    "reformer": {"is_decoder": True, "attn_layers": ["local", "lsh"] * 3, "axial_pos_shape": [8, 16],
                 "axial_pos_embds_dim": [16, 16], "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4},
}

# Encoder families whose *ForCausalLM / LM-head class is causal only with is_decoder=True.
ENCODER_AS_DECODER = ("bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
                      "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
                      "xlm-roberta", "xlm-roberta-xl", "xmod")
for _t in ENCODER_AS_DECODER:
    TYPE_OVERRIDES.setdefault(_t, {})["is_decoder"] = True


def rules(defaults: dict[str, Any]) -> dict[str, Any]:
    """Overrides that follow from which fields a config has (applied before TYPE_OVERRIDES)."""
    out: dict[str, Any] = {}
    if "kv_lora_rank" in defaults:  # multi-head latent attention has one key/value head per query head
        out["num_key_value_heads"] = GENERIC["num_attention_heads"]
    return out


def text_sub_key(defaults: dict[str, Any]) -> str | None:
    """The key of the sub-config that holds the decoder, for composite configs (None: the top level)."""
    for key in ("text_config", "decoder", "llm_config", "language_config"):
        if isinstance(defaults.get(key), dict):
            return key
    return None


def pick(overrides: dict[str, Any], defaults: dict[str, Any], attribute_map: dict[str, str]) -> dict[str, Any]:
    """The overrides whose keys the config knows (directly or through its attribute map)."""
    known = set(defaults) | set(attribute_map)
    return {k: v for k, v in overrides.items() if k in known and v is not None}


def make_config(model_type: str) -> Any:
    """A tiny config of ``model_type``: GENERIC (filtered to the fields the config has) and then
    TYPE_OVERRIDES (as given) on the text config, SUB_GENERIC on the towers that do not run on input_ids."""
    from transformers import AutoConfig, CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    default = config_cls()
    defaults = default.to_dict()
    text_defaults = defaults[text_sub_key(defaults)] if text_sub_key(defaults) else defaults
    extra = {**rules(text_defaults), **TYPE_OVERRIDES.get(model_type, {})}
    top_extra, sub_extra = extra.pop("__top__", {}), extra.pop("__sub__", {})
    generic = {k: v for k, v in GENERIC.items() if k not in extra or extra[k] is not None}
    extra = {k: v for k, v in extra.items() if v is not None}
    text_key = text_sub_key(defaults)
    kwargs: dict[str, Any] = {}
    for key, value in defaults.items():
        if key == text_key or not isinstance(value, dict) or not ("model_type" in value or key.endswith("_config")):
            continue
        sub_map = dict(getattr(getattr(default, key, None), "attribute_map", {}) or {})
        # towers that never run on input_ids only need to be small; parts of the decoder itself
        # (dbrx attn_config / ffn_config, mpt attn_config) take the text sizes
        tower = any(word in key for word in TOWER_WORDS)
        kwargs[key] = {**value, **pick(SUB_GENERIC if tower else generic, value, sub_map)}
    if text_key is None:
        kwargs.update({**pick(generic, defaults, dict(config_cls.attribute_map)), **extra})
    else:
        sub_defaults = defaults[text_key]
        sub_map = dict(getattr(getattr(default, text_key), "attribute_map", {}) or {})
        # only the changed fields plus the type, so values derived from the block count are recomputed
        kwargs[text_key] = {"model_type": sub_defaults.get("model_type"), **pick(generic, sub_defaults, sub_map),
                            **extra}
        # composite configs also keep token ids and the vocabulary at the top
        ids = {k: GENERIC[k] for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")}
        kwargs.update(pick(ids, defaults, {}))
    kwargs.update(top_extra)
    for key, value in sub_extra.items():
        kwargs[key] = {**kwargs.get(key, {}), **value}
    return AutoConfig.for_model(model_type, **kwargs)


def text_config(config: Any) -> Any:
    """The decoder's config of a possibly composite config (not get_text_config(): for encoder-decoder
    configs such as Bart it returns a copy with remapped counts)."""
    for key in ("text_config", "decoder", "llm_config", "language_config"):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return sub
    return config


def layer_count(config: Any) -> tuple[str | None, int | None]:
    """The block-count field of the decoder config and its value."""
    cfg = text_config(config)
    for field in LAYER_FIELDS:
        value = getattr(cfg, field, None)
        if isinstance(value, int) and value > 0:
            return field, value
    return None, None


def build(config: Any) -> Any:
    """The random model (seed 0, fp32, eval), with eager attention where the type accepts it."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager",
                                                 dtype=torch.float32)
    except (ValueError, TypeError) as exc:
        if "attn" not in str(exc).lower() and "attention" not in str(exc).lower():
            raise
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    return model.float().eval()


def find_blocks(model: Any, n: int) -> str | None:
    """The survey's own idea of the block list: the ModuleList of ``n`` entries holding the most
    parameters (independent of shortened's table, so a wrong table entry shows as a wrong model)."""
    from torch import nn

    best: tuple[int, int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            size = sum(p.numel() for p in module.parameters())
            key = (size, -name.count("."), name)
            if best is None or key > best:
                best = key
    return best[2] if best else None


@contextlib.contextmanager
def skipping(blocks: Any, removed: tuple[int, ...]):
    """Make the ``removed`` blocks pass their input hidden states on unchanged (other outputs kept)."""
    import torch

    def hook(module, args, kwargs, output):
        hidden = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
        if hidden is None:
            hidden = next(v for v in kwargs.values() if torch.is_tensor(v) and v.is_floating_point())
        if torch.is_tensor(output):
            return hidden
        if isinstance(output, (tuple, list)):  # GPT-1's blocks return lists
            return type(output)([hidden, *output[1:]])
        if isinstance(output, dict):  # a ModelOutput: replace its first field
            first = next(iter(output.keys()))
            output[first] = hidden
            return output
        raise TypeError(f"cannot skip a block returning {type(output).__name__}")

    handles = [blocks[i].register_forward_hook(hook, with_kwargs=True) for i in removed]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def greedy(model: Any, ids: Any, use_cache: bool) -> list[list[int]]:
    """Greedy continuation of exactly NEW_TOKENS tokens."""
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache, pad_token_id=0,
                             num_beams=1)
    return out[:, ids.shape[1]:].tolist()


def max_diff(a: Any, b: Any) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max())


class LogCapture(logging.Handler):
    """Collect transformers' warnings (the load report names missing/unexpected/mismatched weights)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def captured_logs():
    logger = logging.getLogger("transformers")
    handler = LogCapture()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def reload(folder: Path) -> tuple[Any, dict[str, list[str]], list[str]]:
    """``from_pretrained(folder)`` as a user would, with its loading report and log messages."""
    from transformers import AutoModelForCausalLM

    with captured_logs() as messages, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                           output_loading_info=True)
    report = {k: sorted(map(str, v)) for k, v in (info or {}).items() if v and k != "error_msgs"}
    return model.eval(), report, messages


def last_line(exc: BaseException) -> str:
    """The last line of a traceback: the exception type and message, cut short."""
    line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return line[:400]


def leftovers(out: Path) -> list[str]:
    """Whatever a refused save left beside or at ``out`` (the folder, temporaries, unsaved copies)."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if out.name in p.name and not p.name.endswith(".lock"))


def baseline(model: Any, ids: Any, work: Path) -> dict[str, Any]:
    """Whether the unpruned model itself saves, reloads exactly and generates the same with and without
    the cache; a type failing here says nothing about block removal."""
    folder = work / "unpruned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    try:
        loaded, report, _ = reload(folder)
        diff = max_diff(logits(loaded, ids), logits(model, ids))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # A model that cannot generate with its own cache says nothing about pruning: the cache check is
    # then skipped for the pruned folders, the logits are still compared.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache_same: bool | str = greedy(model, ids, True) == greedy(model, ids, False)
    except Exception as exc:  # noqa: BLE001
        cache_same = f"generate fails: {last_line(exc)}"
    return {"reload_diff": diff, "load_report": report, "cache_consistent": cache_same}


def survey_removal(model: Any, model_type: str, removed: tuple[int, ...], ids: Any, work: Path,
                   check_cache: bool) -> dict[str, Any]:
    """Prune a copy of ``model`` with the public API, save, reload and classify."""
    from shortened import get_arch, get_blocks, pruning_record, remove_blocks, save_model
    from shortened.errors import ShortenedError

    model = copy.deepcopy(model)
    out = work / f"pruned-{'-'.join(map(str, removed))}"
    detail: dict[str, Any] = {"removed": list(removed)}
    stage = "get_arch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            spec = get_arch(model)
            detail["blocks_path"] = spec.blocks
            detail["generic_spec"] = bool(getattr(spec, "generic", False))
            blocks = get_blocks(model, spec)
            field, n = layer_count(model.config)
            ours = find_blocks(model, n) if n else None
            detail["survey_blocks_path"] = ours
            # The reference skips the blocks the survey found, not the ones shortened found.
            ref_blocks = model.get_submodule(ours) if ours else blocks
            with skipping(ref_blocks, removed):
                reference = logits(model, ids)
            stage = "remove_blocks"
            original = len(blocks)
            kept = remove_blocks(model, list(removed), spec)
            detail["kept"] = list(kept)
            detail["diff_in_memory"] = max_diff(logits(model, ids), reference)
            stage = "save_model"
            save_model(model, None, out, pruning_record("survey", original, kept, model_type=model_type))
        except ShortenedError as exc:
            left = leftovers(out)
            detail.update(cls="refused", stage=stage, message=str(exc)[:600], leftovers=left)
            if left:
                detail["message"] = f"refused but left {left} behind: {detail['message']}"
            shutil.rmtree(out, ignore_errors=True)
            return detail
        except Exception as exc:  # noqa: BLE001 - every other failure is a finding
            detail.update(cls="crash", stage=stage, message=last_line(exc))
            shutil.rmtree(out, ignore_errors=True)
            return detail
        finally:
            detail["warnings"] = sorted({str(w.message)[:300] for w in caught})
    try:
        try:
            loaded, report, messages = reload(out)
        except ShortenedError as exc:
            detail.update(cls="refused", stage="reload", message=str(exc)[:600])
            return detail
        except Exception as exc:  # noqa: BLE001
            detail.update(cls="load-fails", stage="reload", message=last_line(exc))
            return detail
        detail["load_report"] = report
        detail["load_log"] = [m[:300] for m in messages if any(w in m.lower() for w in
                                                                ("missing", "unexpected", "mismatch", "newly"))]
        stage = "compare"
        try:
            diff = max_diff(logits(loaded, ids), reference)
            detail["max_diff"] = diff
            problems = []
            if report:
                problems.append(f"load reported {report}")
            if not diff <= TOLERANCE:
                problems.append(f"logits differ by {diff:.3g}")
            if check_cache:
                stage = "generate"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with_cache, without = greedy(loaded, ids, True), greedy(loaded, ids, False)
                detail["cache_consistent"] = with_cache == without
                if with_cache != without:
                    problems.append("greedy generation differs with use_cache=True")
        except Exception as exc:  # noqa: BLE001
            detail.update(cls="crash", stage=stage, message=last_line(exc))
            return detail
        detail["cls"] = "wrong" if problems else "exact"
        detail["message"] = "; ".join(problems)[:600]
        return detail
    finally:
        shutil.rmtree(out, ignore_errors=True)


SEVERITY = ("exact", "refused", "out-of-scope", "load-fails", "crash", "wrong")


def survey_type(model_type: str, work: Path) -> dict[str, Any]:
    """Build, check the unpruned model, then survey each removal set (runs inside the subprocess)."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    result: dict[str, Any] = {"type": model_type}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = make_config(model_type)
            model = build(config)
        result["config_class"] = type(config).__name__
        result["model_class"] = type(model).__name__
        result["params"] = sum(p.numel() for p in model.parameters())
        field, n = layer_count(config)
        result["layer_field"] = field
        if n != N_BLOCKS:
            raise RuntimeError(f"the config says {n} blocks (field {field}), not {N_BLOCKS}")
        vocab = getattr(text_config(config), "vocab_size", None) or VOCAB
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, min(vocab, VOCAB), (BATCH, SEQ_LEN), generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits(model, ids)
    except Exception as exc:  # noqa: BLE001
        result.update(cls="out-of-scope", message=f"cannot build or run on input_ids: {last_line(exc)}",
                      seconds=round(time.perf_counter() - start, 2))
        return result
    try:
        result["baseline"] = base = baseline(model, ids, work)
    except Exception as exc:  # noqa: BLE001
        result.update(cls="out-of-scope", message=f"the unpruned model fails save/reload: "
                                                  f"{last_line(exc)}", seconds=round(time.perf_counter() - start, 2))
        return result
    if base["load_report"] or not base["reload_diff"] <= TOLERANCE:
        result.update(cls="out-of-scope", message=f"the unpruned model does not reload exactly (diff "
                                                  f"{base['reload_diff']:.3g}, report {base['load_report']})",
                      seconds=round(time.perf_counter() - start, 2))
        return result
    result["criteria"] = survey_criteria(model, ids)
    details = []
    for removed in REMOVAL_SETS:
        t0 = time.perf_counter()
        d = survey_removal(model, model_type, removed, ids, work, check_cache=base["cache_consistent"] is True)
        d["seconds"] = round(time.perf_counter() - t0, 2)
        details.append(d)
    worst = max(details, key=lambda d: SEVERITY.index(d["cls"]))
    result.update(cls=worst["cls"], message=worst.get("message", ""), removals=details,
                  max_diff=max((d["max_diff"] for d in details if "max_diff" in d), default=None))
    if base["cache_consistent"] is not True:
        why = base["cache_consistent"] or "it generates differently with the cache"
        result["note"] = f"cache not checked: the unpruned model fails it too ({why})"
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def survey_criteria(model: Any, ids: Any) -> dict[str, str]:
    """Each criterion on the unpruned model: "ok" (ppl: equal to the loss of the model run with the block
    skipped, to 1e-4 relative, for every block), "refused: ..." (a ShortenedError), or "WRONG"/"crash: ..."."""
    import math

    import torch

    from shortened import get_blocks, score_blocks
    from shortened.errors import ShortenedError

    out: dict[str, str] = {}
    try:
        blocks = get_blocks(model)
    except ShortenedError as exc:  # no block list found: nothing to score
        return {c: f"refused: {exc}" for c in ("bi", "magnitude", "ppl")}
    for criterion in ("bi", "magnitude", "ppl"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = score_blocks(model, ids if criterion != "magnitude" else None, criterion,
                                      progress=False).scores
            if not all(math.isfinite(v) for v in scores):
                out[criterion] = "WRONG: a score is not finite"
                continue
            out[criterion] = "ok"
            if criterion == "ppl":
                for i in range(len(blocks)):
                    with skipping(blocks, (i,)):
                        lg = logits(model, ids)
                    nll = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))
                    if not math.isclose(scores[i], math.exp(nll.item()), rel_tol=1e-4):
                        out[criterion] = f"WRONG: block {i}: {scores[i]:.6g} against {math.exp(nll.item()):.6g}"
                        break
        except ShortenedError as exc:
            out[criterion] = f"refused: {exc}"
        except Exception as exc:  # noqa: BLE001
            out[criterion] = f"crash: {last_line(exc)}"
    return out


def run_one(model_type: str, work: Path, timeout: float) -> dict[str, Any]:
    """Survey ``model_type`` in a fresh interpreter, so a hang or a segfault costs only this type."""
    folder = Path(tempfile.mkdtemp(prefix=f"{model_type}-", dir=work))
    result_file = folder / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", model_type, "--work", str(folder),
           "--result", str(result_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group, nothing else
            proc.communicate()
            return {"type": model_type, "cls": "crash", "message": f"timed out after {timeout:.0f} s",
                    "seconds": round(time.perf_counter() - start, 2)}
        if result_file.exists():
            return json.loads(result_file.read_text())
        tail = [line for line in err.strip().splitlines() if line.strip()][-1:] or [""]
        why = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"type": model_type, "cls": "crash", "message": f"subprocess died ({why}): {tail[0][:300]}",
                "seconds": round(time.perf_counter() - start, 2)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def summary(results: dict[str, dict[str, Any]], header: dict[str, Any]) -> str:
    """The Markdown summary: counts per class, then every non-exact type with its reason."""
    counts = {c: sum(r["cls"] == c for r in results.values()) for c in SEVERITY}
    lines = [f"# Block-removal survey ({len(results)} model types)", "",
             f"transformers {header['transformers']}, torch {header['torch']}; removal sets "
             f"{[list(r) for r in REMOVAL_SETS]} of {N_BLOCKS}; `{header['command']}`", "",
             "| class | types |", "|---|---|"]
    lines += [f"| {c} | {n} |" for c, n in counts.items()]
    return "\n".join(lines + ["", *non_exact_table(results)])


def non_exact_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: every type that is not exact, worst first, with its reason."""
    lines = ["| type | class | max diff | reason |", "|---|---|---|---|"]
    for name, r in sorted(results.items(), key=lambda kv: (SEVERITY.index(kv[1]["cls"]), kv[0])):
        if r["cls"] == "exact":
            continue
        diff = r.get("max_diff")
        diff_s = f"{diff:.2g}" if isinstance(diff, float) else ""
        reason = (r.get("message") or "")[:300] + (f" ({r['note'][:150]})" if r.get("note") else "")
        reason = reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {r['cls']} | {diff_s} | {reason} |")
    return lines


#: Why a type was refused, from the words of its message: (category, pattern), first match wins.
REFUSAL_KINDS: tuple[tuple[str, str], ...] = (
    ("no unique block list (discovery)", "no unique list of blocks"),
    ("the family's own KV cache differs from its forward (the model in memory too)", "so does the model in memory"),
    ("the saved model cannot generate with its KV cache", "cannot generate with its KV cache"),
    ("the KV cache differs after pruning", "decodes differently with its KV cache"),
    ("blocks depend on their neighbours or index at run time (table: trailing blocks only)", "renumbered exactly"),
    ("a per-block rule cannot mark the kept blocks", "cannot mark the kept blocks"),
    ("the last attention block of a hybrid", "would leave no"),
    ("transformers' own validation refuses the rewritten config", "transformers refuses the rewritten config"),
    ("a weight outside the blocks is sized by the block count", "outside the blocks"),
    ("a kept block would be built differently (index-dependent settings or modules)", "cannot be saved exactly"),
)


def section(results: dict[str, dict[str, Any]], header: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: counts, refusals by kind, and every type that is not exact."""
    counts = header["counts"]
    kinds: dict[str, list[str]] = {}
    for name, r in results.items():
        if r["cls"] == "refused":
            kind = next((k for k, pat in REFUSAL_KINDS if pat in (r.get("message") or "")), "other")
            kinds.setdefault(kind, []).append(name)
    lines = ["## Exact or refused across transformers' causal-LM mapping (issue 29)", "",
             f"Every model type of transformers {header['transformers']}'s causal-LM mapping, as a tiny random model "
             f"({header['blocks']} blocks, MoE every second block, sliding windows shorter than the test sequence), "
             f"blocks {' and '.join(str(r) for r in header['removal_sets'])} removed with the public API, saved "
             "(with the self-check), reloaded with plain `AutoModelForCausalLM.from_pretrained` and compared with "
             f"the source run with those blocks skipped (logits within {header['tolerance']}, greedy generation "
             "with and without the KV cache). A type counts under its worse removal set. "
             f"{header['seconds']:.0f} s on this 2-core machine.", "",
             "| outcome | types |", "|---|---:|"]
    lines += [f"| {c} | {n} |" for c, n in counts.items()]
    lines += ["", "Refusals by kind (each a one-line ShortenedError; nothing is left at the output):", "",
              "| kind | types |", "|---|---|"]
    lines += [f"| {k} ({len(v)}) | {', '.join(sorted(v))} |" for k, v in sorted(kinds.items(), key=lambda kv: -len(kv[1]))]
    crit: dict[str, dict[str, int]] = {}
    odd: list[str] = []
    for name, r in results.items():
        for c, v in (r.get("criteria") or {}).items():
            key = v.split(":")[0]
            crit.setdefault(c, {}).setdefault(key, 0)
            crit[c][key] += 1
            if key not in ("ok", "refused"):
                odd.append(f"{name} {c}: {v}")
    lines += ["", "Scoring on every type that builds (the unpruned model; `ppl` compared block by block with the "
              "loss of the model run with that block skipped, 1e-4 relative):", "",
              "| criterion | " + " | ".join(sorted({k for v in crit.values() for k in v})) + " |",
              "|---|" + "---:|" * len({k for v in crit.values() for k in v})]
    keys = sorted({k for v in crit.values() for k in v})
    lines += [f"| {c} | " + " | ".join(str(v.get(k, 0)) for k in keys) + " |" for c, v in crit.items()]
    if odd:
        lines += ["", "Not ok: " + "; ".join(o.replace("|", "\\|")[:200] for o in odd)]
    lines += ["", "Every type that is not exact, with its message:", "", *non_exact_table(results),
              "", "Command:", "", "```", header["command"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON file for the per-type results")
    p.add_argument("--section", type=Path, help="write the BENCHMARKS.md section (Markdown) here")
    p.add_argument("--types", help="comma-separated model types (default: the whole causal-LM mapping)")
    p.add_argument("--jobs", type=int, default=1, help="types surveyed at once (one subprocess each)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per type")
    p.add_argument("--work", type=Path, help="folder for temporary model folders (default: a new temp dir)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: survey one type in this process
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        args.work.mkdir(parents=True, exist_ok=True)
        result = survey_type(args.one, args.work)
        text = json.dumps(result, default=str)
        if args.result:
            args.result.write_text(text)
        else:
            print(text)
        return 0

    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types.split(",") if args.types else list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    unknown = [t for t in types if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        print(f"error: not causal-LM model types: {', '.join(unknown)}", file=sys.stderr)
        return 2
    header = {"transformers": transformers.__version__, "torch": torch.__version__,
              "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO)
                                                           if sys.executable.startswith(str(REPO)) else sys.executable,
                                                           os.path.relpath(__file__, REPO), *sys.argv[1:]]),
              "removal_sets": [list(r) for r in REMOVAL_SETS], "blocks": N_BLOCKS, "tolerance": TOLERANCE,
              "batch": BATCH, "seq_len": SEQ_LEN, "new_tokens": NEW_TOKENS}
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="survey-")) if own_work else args.work
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    try:
        with futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = {pool.submit(run_one, t, work, args.timeout): t for t in types}
            for i, job in enumerate(futures.as_completed(jobs), 1):
                r = job.result()
                results[jobs[job]] = r
                print(f"[{i}/{len(types)}] {r['type']}: {r['cls']} ({r.get('seconds', 0):.0f} s) "
                      f"{(r.get('message') or '')[:120]}", file=sys.stderr, flush=True)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    header["seconds"] = round(time.perf_counter() - start, 1)
    ordered = {t: results[t] for t in types if t in results}
    header["counts"] = {c: sum(r["cls"] == c for r in ordered.values()) for c in SEVERITY}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**header, "types": ordered}, indent=1, default=str) + "\n")
    print(summary(ordered, header))
    if args.section:
        args.section.write_text(section(ordered, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
