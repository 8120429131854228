"""The architecture table: every fact about where a model keeps its blocks lives here.

Algorithms never look at a model's name. They ask :func:`get_arch` for an :class:`ArchSpec` and use
its fields: where the list of blocks is, which config field counts them, which per-layer config lists
and module attributes must follow a removal, what runs after the last block, and which linear layers
LoRA should target.

Adding an architecture is one entry in ``ARCHITECTURES`` (plus a tiny config in
``tests/tiny_models.py`` so the invariant tests cover it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ShortenedError


@dataclass(frozen=True)
class ArchSpec:
    """How one family of causal LMs is laid out.

    Paths are dotted attribute paths from the ``*ForCausalLM`` object.
    """

    #: ``config.model_type`` values this entry covers.
    model_types: tuple[str, ...]
    #: The ``nn.ModuleList`` of transformer blocks.
    blocks: str
    #: Modules applied, in order, to the last block's output to get the logits (missing ones skipped).
    head: tuple[str, ...]
    #: The token embedding.
    embed: str
    #: Config field holding the number of blocks (attribute maps such as GPT-2's ``n_layer`` resolve).
    layer_count_field: str = "num_hidden_layers"
    #: Config lists with one entry per block; they are re-indexed to the kept blocks.
    per_layer_config_lists: tuple[str, ...] = ()
    #: Attributes of any submodule of a block that hold that block's index (e.g. the KV-cache slot).
    layer_index_attrs: tuple[str, ...] = ("layer_idx",)
    #: Config field of the longest sequence the position embeddings cover (attribute maps such as GPT-2's
    #: ``n_positions`` resolve); sequence lengths are checked against it before any work.
    position_limit_field: str = "max_position_embeddings"
    #: Config field of a logit soft-cap applied after the head (Gemma 2/3), if any.
    logit_softcap_field: str | None = None
    #: Names of the linear projections inside a block (attention and MLP), for LoRA.
    lora_targets: tuple[str, ...] = ()
    #: Config settings under which a block's computation depends on its absolute index, so removing
    #: blocks cannot keep the function of the kept ones: ``(field, value)`` pairs that are refused.
    index_dependent_settings: tuple[tuple[str, Any], ...] = ()
    #: Dotted path, inside a block, of the linear layer whose output is the block's last residual term
    #: (block output = everything else + this layer's output), where ``heal --method linear`` folds its
    #: bridge; None where no such layer exists (then ``mlp_out_why`` says why).
    mlp_out: str | None = None
    mlp_out_why: str | None = None
    #: True when the entry was discovered at run time rather than read from the table.
    generic: bool = field(default=False, compare=False)


_LLAMA_LIKE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        model_types=("llama", "mistral", "gemma"),
        blocks="model.layers",
        head=("model.norm", "lm_head"),
        embed="model.embed_tokens",
        lora_targets=_LLAMA_LIKE_TARGETS,
        mlp_out="mlp.down_proj",
    ),
    ArchSpec(
        model_types=("qwen2", "qwen3"),
        blocks="model.layers",
        head=("model.norm", "lm_head"),
        embed="model.embed_tokens",
        per_layer_config_lists=("layer_types",),
        lora_targets=_LLAMA_LIKE_TARGETS,
        mlp_out="mlp.down_proj",
    ),
    ArchSpec(
        model_types=("gemma2", "gemma3_text"),
        blocks="model.layers",
        head=("model.norm", "lm_head"),
        embed="model.embed_tokens",
        per_layer_config_lists=("layer_types",),
        logit_softcap_field="final_logit_softcapping",
        lora_targets=_LLAMA_LIKE_TARGETS,
        mlp_out_why="the MLP output is normalised (post_feedforward_layernorm) before it joins the residual, "
                    "so no linear map on it can be folded into a weight",
    ),
    ArchSpec(
        model_types=("phi3",),
        blocks="model.layers",
        head=("model.norm", "lm_head"),
        embed="model.embed_tokens",
        lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        mlp_out="mlp.down_proj",
    ),
    ArchSpec(
        model_types=("opt",),
        blocks="model.decoder.layers",
        head=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
        embed="model.decoder.embed_tokens",
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        mlp_out="fc2",
    ),
    ArchSpec(
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        head=("gpt_neox.final_layer_norm", "lm_head"),
        embed="gpt_neox.embed_in",
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        mlp_out="mlp.dense_4h_to_h",
    ),
    ArchSpec(
        model_types=("gpt2",),
        blocks="transformer.h",
        head=("transformer.ln_f", "lm_head"),
        embed="transformer.wte",
        layer_count_field="n_layer",
        position_limit_field="n_positions",
        lora_targets=("c_attn", "c_proj", "c_fc"),
        mlp_out="mlp.c_proj",
        # GPT-2 can scale attention by 1/(layer_idx+1); a renumbered block would change its function.
        index_dependent_settings=(("scale_attn_by_inverse_layer_idx", True),),
    ),
)

_BY_TYPE: dict[str, ArchSpec] = {t: spec for spec in ARCHITECTURES for t in spec.model_types}

# Config lists that commonly carry one entry per block, looked for when discovering an unknown model.
_KNOWN_PER_LAYER_LISTS = ("layer_types", "no_rope_layers", "mlp_only_layers", "sliding_window_layers")


def supported_model_types() -> list[str]:
    """The ``model_type`` values with an entry in the table."""
    return sorted(_BY_TYPE)


def get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted ``path``, or None when any step is missing or None."""
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def get_arch(model: nn.Module, *, allow_generic: bool = True) -> ArchSpec:
    """The table entry for ``model``; for an unknown type, a discovered entry (with a warning).

    Raises ShortenedError when the type is unknown and either ``allow_generic`` is False or no
    unambiguous block list can be found.
    """
    if getattr(model, "config", None) is None:
        raise TypeError(f"expected a Hugging Face causal LM (a model with a .config), got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    spec = _BY_TYPE.get(model_type)
    if spec is not None:
        _check_index_independent(model, spec)
        return spec
    how_to_add = (
        f"model_type '{model_type}' is not in the architecture table (shortened/archs.py, "
        f"supported: {', '.join(supported_model_types())}); add an ArchSpec entry to ARCHITECTURES"
    )
    if not allow_generic:
        raise ShortenedError(how_to_add)
    spec = discover_arch(model)
    if spec is None:
        raise ShortenedError(how_to_add + " (automatic discovery found no unique list of blocks)")
    warnings.warn(
        f"{how_to_add}. Using automatic discovery: blocks at '{spec.blocks}', head {spec.head}, "
        f"per-layer config lists {spec.per_layer_config_lists}. Check the pruned model.",
        stacklevel=2,
    )
    return spec


def discover_arch(model: nn.Module) -> ArchSpec | None:
    """Guess an ArchSpec for an unknown model: the one ModuleList with one entry per block."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(n_layers, int):
        return None
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name.count(".") <= 2
    ]
    if len(candidates) != 1:
        return None
    blocks = candidates[0]
    parent = blocks.rsplit(".", 1)[0] if "." in blocks else ""
    prefix = f"{parent}." if parent else ""
    norm = next(
        (f"{prefix}{n}" for n in ("norm", "final_layer_norm", "ln_f", "final_norm")
         if get_submodule(model, f"{prefix}{n}") is not None),
        None,
    )
    output = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is output), None)
    if norm is None or head_name is None:
        return None
    embed = model.get_input_embeddings()
    embed_name = next((n for n, m in model.named_modules() if m is embed), "")
    lists = tuple(
        name for name in _KNOWN_PER_LAYER_LISTS
        if isinstance(getattr(model.config, name, None), (list, tuple))
        and len(getattr(model.config, name)) == n_layers
    )
    return ArchSpec(
        model_types=(model.config.model_type,),
        blocks=blocks,
        head=(norm, head_name),
        embed=embed_name,
        per_layer_config_lists=lists,
        lora_targets=(),
        generic=True,
    )


def _check_index_independent(model: nn.Module, spec: ArchSpec) -> None:
    for name, refused in spec.index_dependent_settings:
        if getattr(model.config, name, None) == refused:
            raise ShortenedError(
                f"this {model.config.model_type} model sets {name}={refused!r}: each block's "
                "computation depends on its absolute index, so blocks cannot be removed exactly"
            )


def get_blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The ModuleList of transformer blocks of ``model``."""
    spec = spec or get_arch(model)
    blocks = get_submodule(model, spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise ShortenedError(f"expected a ModuleList of blocks at '{spec.blocks}', found {type(blocks).__name__}")
    return blocks


def num_blocks(model: nn.Module, spec: ArchSpec | None = None) -> int:
    """Number of transformer blocks."""
    return len(get_blocks(model, spec))



def position_limit(model: nn.Module, spec: ArchSpec | None = None) -> int | None:
    """The longest sequence ``model``'s position embeddings cover, or None when its config does not say."""
    spec = spec or get_arch(model)
    return config_position_limit(model.config, spec)


def config_position_limit(config: Any, spec: ArchSpec | None = None) -> int | None:
    """:func:`position_limit` from a config alone (no weights loaded); unknown types use the usual field."""
    spec = spec or _BY_TYPE.get(getattr(config, "model_type", None))
    limit = getattr(config, spec.position_limit_field if spec else "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def config_block_count(config: Any) -> int | None:
    """The number of blocks a config declares (read before any weights load), or None for a model type
    outside the table or a config that does not say."""
    spec = _BY_TYPE.get(getattr(config, "model_type", None))
    count = getattr(config, spec.layer_count_field, None) if spec else None
    return count if isinstance(count, int) and count > 0 else None


def check_seq_len(model: nn.Module, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse a sequence length beyond the model's position limit (it would fail or crawl deep in the work)."""
    spec = get_arch(model)
    limit = position_limit(model, spec)
    if limit is not None and seq_len > limit:
        raise ShortenedError(f"{flag} {seq_len} is longer than the model's position limit of {limit} tokens "
                             f"(config {spec.position_limit_field}); use at most {limit}")
