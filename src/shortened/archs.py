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
    #: Attributes of any submodule of a block that hold that block's index (e.g. the KV-cache slot); other
    #: uses of an index there (RWKV's first block, GPT-NeoX-Japanese's last) show in the structural check.
    layer_index_attrs: tuple[str, ...] = ("layer_idx", "layer_id", "layer_number")
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
    #: Attribute path, from the model's config, of the config that describes the blocks ("" = the config
    #: itself; "text_config" for a multimodal model whose language model is pruned).
    config_path: str = ""
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


@dataclass(frozen=True)
class LayerFact:
    """A config field that says something about each block by its index, and how it follows a removal.

    ``kind`` is one of:

    - ``per_block``: a list with one entry per block; the kept blocks' entries are kept (a value that is not
      a list applies to every block and stays);
    - ``cycle``: a list repeated over the blocks (RecurrentGemma's ``block_types``); written out for the kept;
    - ``runs``: ``[[pattern, repeats], ...]`` expanding to one entry per block (GPT-Neo's ``attention_types``);
      written as one run of the kept blocks' entries;
    - ``count``: a second field holding the block count (xLSTM's ``num_blocks``); set to the kept count;
    - ``index_list``: a list of block indices; the kept ones are renumbered, the removed ones dropped;
    - ``index_dict``: a dict keyed by block index (int or str keys); re-keyed likewise;
    - ``threshold``: an int K splitting the blocks into ``index < K`` and the rest (first-k dense, MoE from
      block K on); K becomes the number of kept blocks below it;
    - ``sparse_step``: ``(i + 1) % field == 0`` marks a sparse block unless ``i`` is in the index list named by
      ``partner`` (Qwen2-MoE's ``decoder_sparse_step`` with ``mlp_only_layers``); rewritten into the explicit
      form: step 1 and every kept dense block listed in ``partner``;
    - ``period``: ``i % field == offset`` marks a block (Jamba's ``attn_layer_period`` with
      ``attn_layer_offset``, named by ``partner``); a period and offset giving the kept pattern are searched
      for, and the removal is refused when none exists;
    - ``interval_range``: ``(i + 1) % step == 0 and field <= i <= partner`` marks a block (ERNIE-4.5-MoE's MoE
      blocks); a step, start and end giving the kept pattern are searched for, else the removal is refused;
    - ``depth_scale``: a residual scale divided by sqrt(block count) (MiniCPM3's ``scale_depth``); scaled by
      sqrt(kept / blocks), so that each block's residual scale is unchanged.
    """

    field: str
    kind: str
    partner: str | None = None
    #: A third field of the rule (``interval_range``'s step).
    step: str | None = None


#: Every per-block config fact pruning knows, for every model type (the field names mean the same across the
#: transformers families that use them; surveyed over transformers 5.25's causal-LM mapping). A removal the
#: rewritten config does not rebuild exactly is refused by the structural check of
#: :func:`shortened.surgery.check_removal`, whatever its field; fields read only at run time are covered by
#: the self-check of every saved model (:mod:`shortened.verify`).
LAYER_FACTS: tuple[LayerFact, ...] = (
    *(LayerFact(name, "per_block") for name in (
        "layer_types", "mlp_layer_types", "layers_block_type", "no_rope_layers", "layer_rope_theta",
        "num_attention_heads_per_layer", "activation_sparsity_pattern", "expert_swiglu_limit_list",
        "share_expert_swiglu_limit_list", "swiglu_limits", "swiglu_limits_shared", "indexer_types", "attn_layers",
        "attention_layers")),
    LayerFact("attention_types", "runs"),
    LayerFact("num_blocks", "count"),
    LayerFact("intermediate_size", "per_block"),  # Gemma 3n's list form; a single value is left alone
    LayerFact("moe_topk", "per_block"),  # HunYuan-MoE's list form
    LayerFact("block_types", "cycle"),
    *(LayerFact(name, "index_list") for name in (
        "mlp_only_layers", "moe_layers", "cross_attention_layers", "attn_layer_indices", "full_attn_idxs",
        "local_layer_ids")),
    LayerFact("per_layer_config", "index_dict"),
    *(LayerFact(name, "threshold") for name in ("first_k_dense_replace", "num_dense_layers")),
    LayerFact("decoder_sparse_step", "sparse_step", partner="mlp_only_layers"),
    LayerFact("attn_layer_period", "period", partner="attn_layer_offset"),
    LayerFact("expert_layer_period", "period", partner="expert_layer_offset"),
    LayerFact("moe_layer_start_index", "interval_range", partner="moe_layer_end_index", step="moe_layer_interval"),
    LayerFact("scale_depth", "depth_scale"),
)

#: Model types whose blocks depend on their neighbours or their absolute index at run time in a way no config
#: rewrite expresses (and the meta-device check cannot see): only trailing blocks may be removed (kept blocks
#: keep their indices). Found by reading transformers 5.25's modeling code.
SUFFIX_ONLY: dict[str, str] = {
    "zaya": "each block's router adds the previous block's router state",
    "beam": "residual scales are computed from the block's index",
    "inkling2_text": "block-attention residuals mix the states of earlier blocks by index",
    "inkling2_loop_text": "block-attention residuals mix the states of earlier blocks by index",
    "glm_moe_dsa": "'shared' indexer blocks reuse the top-k of the block before them",
    "hy_v4": "'shared' indexer blocks reuse the top-k of the block before them",
    "kolibri1_1": "blocks reuse the KV cache and index pools of other blocks by index",
    "qwen4_exp_text": "per-layer embedding tables are sized by each block's ordinal",
    "dory": "blocks form input, recurrent and output sections counted by the config",
    "zamba": "one shared transformer block is reused by every hybrid block",
    "zamba2": "shared blocks are picked by each hybrid block's ordinal",
    "hrm_text": "two stacks of blocks run in recurrent cycles",
    "gemma4_assistant": "every block reuses the KV cache of the target model",
    "gemma4_unified_assistant": "every block reuses the KV cache of the target model",
}

LAYER_FACT_KINDS = ("per_block", "cycle", "runs", "count", "index_list", "index_dict", "threshold", "sparse_step",
                    "period", "interval_range", "depth_scale")


def suffix_only(config: Any) -> str | None:
    """Why the blocks of ``config``'s family (the config that describes the blocks) cannot be renumbered, when
    :data:`SUFFIX_ONLY` says so; None otherwise."""
    model_type = getattr(config, "model_type", None)
    why = SUFFIX_ONLY.get(model_type)
    return f"blocks of {model_type} cannot be renumbered exactly ({why})" if why else None


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
        f"{how_to_add}. Using the layout found from its structure: blocks at '{spec.blocks}' "
        f"({spec.layer_count_field}), head {spec.head}; a removal is checked on the meta device before any "
        "work and every saved model is reloaded and compared with the model in memory",
        stacklevel=2,
    )
    return spec


#: Config fields that can hold the number of blocks, in order of preference: a decoder's own count first (in
#: the BART family ``num_hidden_layers`` is the encoder's), then the usual one (attribute maps such as GPT-2's
#: ``n_layer`` resolve to it), then others (LongCat-Flash's ``num_hidden_layers`` counts sub-layers).
_BLOCK_COUNT_FIELDS = ("num_decoder_layers", "decoder_layers", "num_hidden_layers", "num_layers", "n_layers", "n_layer")


#: Config fields of a logit soft-cap after the head (tanh(logits / cap) * cap), as transformers names them.
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def block_config(config: Any, spec: ArchSpec) -> Any:
    """The config that describes the blocks: ``config`` itself, or its sub-config at ``spec.config_path``."""
    for part in filter(None, spec.config_path.split(".")):
        config = getattr(config, part)
    return config


def discover_arch(model: nn.Module) -> ArchSpec | None:
    """Find an ArchSpec for a model type outside the table from its structure: the block list is the
    ModuleList whose length a block-count field of the (text) config gives; the final norm is the
    normalisation module registered after it beside it (none for post-norm models); the head is the output
    embedding's top-level module. None when the block list is ambiguous."""
    config, config_path = _text_config(model.config)
    found = None
    for count_field in _BLOCK_COUNT_FIELDS:
        count = getattr(config, count_field, None)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            continue
        lists = [name for name, module in model.named_modules()
                 if isinstance(module, nn.ModuleList) and len(module) == count and name.count(".") <= 2]
        if len(lists) == 1:
            found = (count_field, lists[0])
            break
        if len(lists) > 1:
            return None
    if found is None:
        return None
    count_field, blocks = found
    parent_path = blocks.rsplit(".", 1)[0] if "." in blocks else ""
    parent = get_submodule(model, parent_path) if parent_path else model
    norm = _final_norm(parent, blocks.rsplit(".", 1)[-1])
    output = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is output), None) if output is not None else None
    if head_name is None:
        return None
    head_name = head_name.split(".")[0]  # e.g. BERT's cls(.predictions.decoder): the whole head runs
    embed = model.get_input_embeddings()
    embed_name = next((n for n, m in model.named_modules() if m is embed), "")
    prefix = f"{parent_path}." if parent_path else ""
    softcap = next((f for f in _SOFTCAP_FIELDS if getattr(config, f, None)), None)
    return ArchSpec(
        model_types=(model.config.model_type,),
        blocks=blocks,
        head=((f"{prefix}{norm}",) if norm else ()) + (head_name,),
        embed=embed_name,
        layer_count_field=count_field,
        logit_softcap_field=softcap,
        lora_targets=(),
        config_path=config_path,
        generic=True,
    )


def _text_config(config: Any) -> tuple[Any, str]:
    """The config of the language model's blocks and its attribute path ("" for a text-only model)."""
    getter = getattr(config, "get_text_config", None)
    text = getter(decoder=True) if getter else config
    if text is config or text is None:
        return config, ""
    name = next((k for k, v in vars(config).items() if v is text), None)
    return (text, name) if name else (config, "")


def _final_norm(parent: nn.Module, blocks_name: str) -> str | None:
    """The name of the one normalisation child of ``parent`` registered after the block list (a norm
    registered before it normalises the embeddings); None for none (a post-norm model) or several."""
    names = list(parent._modules)
    after = names.index(blocks_name) + 1 if blocks_name in names else 0
    later = [n for n in names[after:] if _is_norm(parent._modules[n])]
    return later[0] if len(later) == 1 else None


def _is_norm(module: nn.Module | None) -> bool:
    """A normalisation layer: torch's, or a leaf whose class says so with at most a weight and a bias of one
    dimension (OLMo's and NanoChat's norms have none)."""
    if module is None:
        return False
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    own = list(module.parameters(recurse=False))
    return ("norm" in type(module).__name__.lower() and not list(module.children())
            and len(own) <= 2 and all(p.dim() == 1 for p in own))


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
    return config_position_limit(block_config(model.config, spec), spec)


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


_KIND_TEXT = {
    "per_block": "one entry per block: the kept blocks' entries are kept",
    "cycle": "a pattern repeated over the blocks: written out for the kept blocks",
    "runs": "runs of a pattern expanding to one entry per block: one run of the kept blocks' entries",
    "count": "a second block count: the number of kept blocks",
    "index_list": "block indices: kept ones renumbered, removed ones dropped",
    "index_dict": "keyed by block index: re-keyed to the kept blocks",
    "threshold": "blocks below it are one kind: becomes the number of kept blocks below it",
    "sparse_step": "every step-th block sparse: rewritten as step 1 plus the explicit dense list in",
    "period": "blocks with index % period == offset: a period and offset giving the kept pattern, else refused",
    "interval_range": "every step-th block between a start and an end: a step, start and end giving the kept "
                      "pattern, else refused",
    "depth_scale": "divided by sqrt(block count) in the residuals: scaled by sqrt(kept / blocks)",
}


def support_markdown() -> str:
    """The README's "Supported families" section, generated from the table (a test keeps the README equal)."""
    lines = ["Per-block config facts rewritten after a removal, for every model type:", "",
             "| config fields | how they follow a removal |", "|---|---|"]
    groups: dict[tuple[str, str | None], list[str]] = {}
    for fact in LAYER_FACTS:
        groups.setdefault((fact.kind, fact.partner if fact.kind == "sparse_step" else None), []).append(
            f"`{fact.field}`" + (f"/`{fact.partner}`" if fact.kind in ("period", "interval_range") else "")
            + (f"/`{fact.step}`" if fact.step else ""))
    for (kind, partner), fields in groups.items():
        text = _KIND_TEXT[kind] + (f" `{partner}`" if partner else "")
        lines.append(f"| {', '.join(fields)} | {text} |")
    lines += ["", "Families whose blocks depend on their neighbours or index at run time: only trailing blocks "
              "can be removed (a criterion-driven selection is refused before any scoring):", "",
              "| model_type | why |", "|---|---|"]
    lines += [f"| `{t}` | {why} |" for t, why in sorted(SUFFIX_ONLY.items())]
    lines += ["", "Settings refused in table entries: " + ", ".join(
        f"`{t}` with `{name}={value!r}`" for spec in ARCHITECTURES for t in spec.model_types[:1]
        for name, value in spec.index_dependent_settings) + "."]
    return "\n".join(lines) + "\n"
