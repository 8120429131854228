"""Exact or refused: removal on MoE, hybrid, state-space and discovered families, per-block config facts,
the structural check before any work, and the self-check of every saved model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from shortened import get_arch, get_blocks, pruning_record, remove_blocks, save_model, select_blocks
from shortened.archs import LAYER_FACTS, SUFFIX_ONLY
from shortened.errors import ShortenedError
from shortened.layer_facts import rewrite_layer_facts
from shortened.surgery import check_config, check_family, removal_check
from shortened.verify import verify_saved
from tiny_models import FAMILY_CONFIGS, N_LAYERS, family_model, skipped_logits, tiny_inputs, tiny_model

CASES = sorted(FAMILY_CONFIGS)
REMOVALS = [[1, 3], [0, 4]]
# Removals a family's config cannot express: (case, removal) -> words of the refusal.
REFUSED = {("jamba-period", (0, 4)): "expert_layer_period",
           ("ernie4_5_moe-interval", (0, 4)): "moe_layer_interval",
           ("bamba", (2, 5)): "no full_attention block",  # a hybrid's cache needs an attention layer
           ("granitemoehybrid", (2, 5)): "no full_attention block"}


def _exact_cases():
    for case in CASES:
        for removal in REMOVALS:
            if (case, tuple(removal)) not in REFUSED:
                yield case, removal


@pytest.mark.parametrize("case, removal", list(_exact_cases()))
def test_removal_is_exact_reloads_bit_identical_and_caches(case, removal, tmp_path):
    model = family_model(case)
    n = len(get_blocks(model))
    ids = tiny_inputs(length=20)  # longer than the sliding windows
    expected = skipped_logits(model, removal, ids)
    kept = remove_blocks(model, removal)
    assert len(get_blocks(model)) == n - len(removal)
    with torch.no_grad():
        pruned = model(ids, use_cache=False).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)

    out = save_model(model, None, tmp_path / "p", pruning_record("tiny", n, kept, model_type=model.config.model_type))
    record = json.loads((out / "pruning.json").read_text())
    assert record["verification"]["logits_max_abs_diff"] <= 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert len(get_blocks(reloaded)) == len(kept)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, use_cache=False).logits, pruned)
    prompt = tiny_inputs(batch=1, length=12, seed=3)
    gen = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(reloaded.generate(prompt, use_cache=True, **gen),
                           reloaded.generate(prompt, use_cache=False, **gen))


@pytest.mark.parametrize("case, removal", sorted(REFUSED))
def test_inexpressible_removal_is_refused_before_touching_the_model(case, removal, tmp_path):
    model = family_model(case)
    before = list(get_blocks(model))
    config_before = model.config.to_dict()
    with pytest.raises(ShortenedError, match=REFUSED[(case, removal)]):
        remove_blocks(model, list(removal))
    assert list(get_blocks(model)) == before and model.config.to_dict() == config_before
    with pytest.raises(ShortenedError, match=REFUSED[(case, removal)]):
        check_config(model.config, list(removal))  # from the config alone, before any weights load


def test_moe_rules_are_rewritten_into_explicit_forms():
    qwen = family_model("qwen3_moe-step2-mlp-only")  # sparse at 1, 5 (3 is forced dense)
    updates = rewrite_layer_facts(qwen.config, [0, 1, 2, 5], N_LAYERS, get_arch(qwen))
    assert updates["decoder_sparse_step"] == 1 and updates["mlp_only_layers"] == [0, 2]
    deepseek = family_model("deepseek_v3-first-k")  # blocks 0-2 dense
    assert rewrite_layer_facts(deepseek.config, [0, 2, 3, 5], N_LAYERS, get_arch(deepseek))["first_k_dense_replace"] == 2
    llama4 = family_model("llama4-moe-layers")
    updates = rewrite_layer_facts(llama4.config, [0, 2, 3, 5], N_LAYERS, get_arch(llama4))
    assert updates["moe_layers"] == [2, 3] and updates["no_rope_layers"] == [1, 0, 1, 0]
    jamba = family_model("jamba-period")  # attention at 1, 4; experts at 1, 3, 5
    updates = rewrite_layer_facts(jamba.config, [0, 1, 2, 3], N_LAYERS, get_arch(jamba))
    assert [j % updates["attn_layer_period"] == updates["attn_layer_offset"] for j in range(4)] == [0, 1, 0, 0]
    ernie = family_model("ernie4_5_moe-interval")  # MoE at 1, 3, 5
    updates = rewrite_layer_facts(ernie.config, [0, 2, 4, 5], N_LAYERS, get_arch(ernie))
    assert [(j + 1) % updates["moe_layer_interval"] == 0 and updates["moe_layer_start_index"] <= j
            <= updates["moe_layer_end_index"] for j in range(4)] == [False, False, False, True]
    minicpm = family_model("minicpm3-depth")
    updates = rewrite_layer_facts(minicpm.config, [0, 1, 2, 3], N_LAYERS, get_arch(minicpm))
    assert math.isclose(updates["scale_depth"] / math.sqrt(4), 1.4 / math.sqrt(N_LAYERS))


def test_index_dict_keeps_its_key_type():
    model = tiny_model("llama")
    model.config.per_layer_config = None
    spec = get_arch(model)
    from shortened.archs import LayerFact
    from shortened.layer_facts import _index_dict

    fact = LayerFact("per_layer_config", "index_dict")
    assert _index_dict(model.config, fact, {"01": {"a": 1}, "04": {"b": 2}}, [0, 1, 4], N_LAYERS) == {
        "per_layer_config": {"1": {"a": 1}, "2": {"b": 2}}}
    assert _index_dict(model.config, fact, {3: "x"}, [0, 3], N_LAYERS) == {"per_layer_config": {1: "x"}}
    assert spec.blocks == "model.layers"


def test_every_fact_kind_has_a_rewrite():
    from shortened.archs import LAYER_FACT_KINDS
    from shortened.layer_facts import _REWRITERS

    assert set(_REWRITERS) == set(LAYER_FACT_KINDS)
    assert {f.kind for f in LAYER_FACTS} <= set(LAYER_FACT_KINDS)
    assert all(f.partner for f in LAYER_FACTS if f.kind in ("sparse_step", "period"))


def test_index_dependent_block_is_refused_by_the_structural_check():
    config = AutoConfig.for_model("diffllama", vocab_size=97, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with pytest.warns(UserWarning, match="not in the architecture table"):
        spec = get_arch(model)
    with pytest.raises(ShortenedError, match="lambda_init"):
        remove_blocks(model, [1], spec)
    with pytest.raises(ShortenedError, match="only the last blocks"):
        check_family(model, spec)
    kept = remove_blocks(model, [4, 5], spec)  # trailing blocks keep every index: exact
    assert kept == [0, 1, 2, 3]


def test_suffix_only_families_are_data_and_refused():
    assert all(isinstance(why, str) and why for why in SUFFIX_ONLY.values())
    model = tiny_model("llama")
    spec = get_arch(model)
    model.config.model_type = "zaya"  # the table speaks by model_type
    try:
        with pytest.raises(ShortenedError, match="previous block's router"):
            rewrite_layer_facts(model.config, [0, 2, 3, 4, 5], N_LAYERS, spec)
        assert rewrite_layer_facts(model.config, [0, 1, 2, 3], N_LAYERS, spec)["num_hidden_layers"] == 4
    finally:
        model.config.model_type = "llama"


def test_selection_passes_over_sets_the_config_cannot_express():
    model = family_model("jamba-period")
    allowed = removal_check(model)
    assert allowed is not None and allowed([1, 3]) is None and allowed([0, 4]) is not None
    scores = [5.0, 4.0, 3.0, 2.0, 0.0, 1.0]  # lowest: 4, 5 -> inexpressible?
    plan = select_blocks(scores, num_blocks=2, allowed=allowed)
    assert allowed(plan.remove) is None
    assert plan.requested["only_removable"] is True
    if plan.remove != [4, 5]:
        assert plan.requested["passed_over"]
    plan = select_blocks([0.0, 5.0, 5.0, 5.0, 0.0, 5.0], num_blocks=2, allowed=allowed)
    assert plan.remove != [0, 4] and allowed(plan.remove) is None
    assert plan.requested["passed_over"][0]["blocks"] in ([0], [4])
    assert removal_check(tiny_model("llama")) is None  # nothing to constrain: records stay as they were


def test_choose_with_a_criterion_records_only_removable_sets():
    from shortened.choose import choose

    model = family_model("jamba-period")
    selection = choose(model, None, "magnitude", num_blocks=2, protect_first=0, protect_last=0, progress=False)
    assert removal_check(model)(selection["removed"]) is None
    assert selection["plan"]["requested"]["only_removable"] is True


@pytest.mark.parametrize("case, norm", [("phi", "model.final_layernorm"), ("mamba", "backbone.norm_f"),
                                        ("lfm2-conv", "model.embedding_norm")])
def test_discovery_finds_the_final_norm_by_structure(case, norm):
    model = family_model(case)
    with pytest.warns(UserWarning, match="found from its structure"):
        spec = get_arch(model)
    assert spec.generic and spec.head[0] == norm


# -- the self-check of saved models ---------------------------------------------------------------------

@pytest.fixture
def saved_gemma3(tmp_path):
    model = tiny_model("gemma3_text")
    kept = remove_blocks(model, [1, 3])
    out = save_model(model, None, tmp_path / "p", pruning_record("tiny", N_LAYERS, kept, model_type="gemma3_text"))
    return model, out


def test_self_check_passes_and_is_recorded(saved_gemma3):
    model, out = saved_gemma3
    report = verify_saved(out, model)
    assert report["logits_max_abs_diff"] == 0.0
    assert "logits match the full forward" in report["kv_cache"]
    assert "verification" in json.loads((out / "pruning.json").read_text())


def test_self_check_catches_a_corrupted_config(saved_gemma3):
    model, out = saved_gemma3
    config = json.loads((out / "config.json").read_text())
    config["layer_types"] = list(reversed(config["layer_types"]))  # sliding and full layers swapped
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShortenedError, match="logits differ"):
        verify_saved(out, model)


@pytest.mark.parametrize("corruption, words", [("drop", "missing"), ("extra", "unexpected"),
                                               ("reshape", "wrong shape|size mismatch|does not load")])
def test_self_check_catches_a_corrupted_weight_file(saved_gemma3, corruption, words):
    model, out = saved_gemma3
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    if corruption == "drop":
        del tensors[name]
    elif corruption == "extra":
        tensors["model.layers.4.mlp.down_proj.weight"] = tensors[name].clone()
    else:
        tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ShortenedError, match=words):
        verify_saved(out, model)


def test_self_check_without_reload_reads_the_file_headers(saved_gemma3, monkeypatch):
    import shortened.verify as verify

    model, out = saved_gemma3
    monkeypatch.setattr(verify, "_too_large", lambda m: "a second copy does not fit (test)")
    report = verify_saved(out, model)
    assert report["logits"].startswith("not compared")
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ShortenedError, match="q_proj.weight missing"):
        verify_saved(out, model)


def test_a_model_that_would_reload_wrong_is_never_written(tmp_path):
    model = family_model("minicpm3-depth")
    kept = remove_blocks(model, [0, 4])
    model.config.scale_depth = 1.4  # undo the rewrite: the reloaded residual scale would differ
    out = tmp_path / "p"
    with pytest.raises(ShortenedError, match="logits differ"):
        save_model(model, None, out, pruning_record("tiny", N_LAYERS, kept, model_type="minicpm3"))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_refuses_an_inexpressible_removal_before_the_load(tmp_path, capsys):
    from shortened.cli import main

    source = tmp_path / "jamba"
    family_model("jamba-period").save_pretrained(source)
    capsys.readouterr()
    out = tmp_path / "p"
    code = main(["prune", str(source), "--blocks", "0,4", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "expert_layer_period" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code = main(["prune", str(source), "--blocks", "1,3", "--out", str(out)])
    assert code == 0 and json.loads((out / "pruning.json").read_text())["verification"]


def test_a_folder_without_tokenizer_files_loads_without_one(tmp_path):
    from shortened.loading import load_model

    folder = tmp_path / "m"
    tiny_model("llama").save_pretrained(folder)
    model, tokenizer = load_model(str(folder))
    assert tokenizer is None and len(get_blocks(model)) == N_LAYERS


# -- scoring on every family -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_criteria_score_every_family_as_the_slow_reference(case, one_thread):
    from shortened import score_blocks

    model = family_model(case)
    ids = tiny_inputs(batch=2, length=20)
    n = len(get_blocks(model))
    for criterion in ("bi", "magnitude", "angular"):  # hidden states and weights only: every family
        scores = score_blocks(model, ids if criterion != "magnitude" else None, criterion, progress=False)
        assert len(scores.scores) == n and all(math.isfinite(s) for s in scores.scores)
    bi = score_blocks(model, ids, "bi", progress=False).scores
    for i in (0, n // 2):  # Block Influence: 1 - cos(input, output) of the block, from forward hooks
        seen = {}
        block = get_blocks(model)[i]
        h1 = block.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]),
                                             with_kwargs=True)
        h2 = block.register_forward_hook(lambda m, a, o: seen.update(y=o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            model(ids, use_cache=False)
        h1.remove(), h2.remove()
        cos = torch.nn.functional.cosine_similarity(seen["x"].float(), seen["y"].float(), dim=-1)
        assert math.isclose(bi[i], float((1 - cos).mean()), rel_tol=1e-4, abs_tol=1e-6)
    try:
        ppl = score_blocks(model, ids, "ppl", progress=False).scores
    except ShortenedError as exc:  # a discovered head that misses part of the model's own head
        assert "does not reproduce its logits" in str(exc) and case == "minicpm3-depth"
        return
    for i in range(n):
        logits = skipped_logits(model, [i], ids)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        assert math.isclose(ppl[i], math.exp(nll.item()), rel_tol=1e-4)


# -- healing on MoE and hybrid blocks --------------------------------------------------------------------

@pytest.mark.parametrize("case", ["qwen2_moe-step2", "mixtral", "jamba-period", "deepseek_v3-first-k"])
def test_lora_adapts_expert_weights_and_merges_exactly(case):
    from shortened.heal.lora import add_lora, lora_targets, merge_lora

    model = family_model(case)
    modules, parameters = lora_targets(model)
    assert parameters and all("experts" in p for p in parameters)
    assert not {"gate", "router"} & set(modules)
    peft_model = add_lora(model, r=4, dropout=0.0)
    with torch.no_grad():  # non-zero adapters, so merging is tested
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in trained)
    ids = tiny_inputs(length=12)
    with torch.no_grad():
        before = peft_model.eval()(ids).logits
        torch.testing.assert_close(merge_lora(peft_model)(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_readme_lists_the_supported_families_as_the_table_says():
    from pathlib import Path

    from shortened.archs import support_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- support:start")
    body = readme[readme.index("\n", start) + 1:readme.index("<!-- support:end -->")]
    assert body == support_markdown()


@pytest.mark.parametrize("case", ["qwen2_moe-step2", "jamba-period", "mamba"])
@pytest.mark.parametrize("method", ["lora", "full", "distill", "reconstruct", "linear"])
def test_every_healing_method_runs_on_moe_and_hybrid_blocks(case, method, tmp_path, one_thread):
    from test_heal import FAST, pattern_data

    from shortened import heal

    teacher = family_model(case)
    student = family_model(case)
    kept = remove_blocks(student, [1, 3])
    needs = dict(teacher=teacher, kept=kept) if method in ("distill", "reconstruct", "linear") else {}
    try:
        heal(student, pattern_data(), method, steps=2, batch_size=4, grad_accum=1, lr=1e-3, eval_every=1,
             out=tmp_path / "h", **needs, **FAST)
    except ShortenedError as exc:  # the linear bridge needs a last linear layer it can fold into
        assert method == "linear" and "does not support" in str(exc), exc
        return
    record = json.loads((tmp_path / "h" / "pruning.json").read_text())
    assert record["verification"]["logits_max_abs_diff"] <= 1e-4  # the saved model checked itself
    if method == "lora":
        assert record["healing"]["lora_targets"]["modules"]
    assert len(get_blocks(AutoModelForCausalLM.from_pretrained(tmp_path / "h"))) == N_LAYERS - 2


def test_selection_keeps_a_hybrids_last_attention_block():
    model = family_model("bamba")  # attention at 2 and 5
    allowed = removal_check(model)
    assert "no full_attention block" in allowed([2, 5]) and allowed([1, 3]) is None
    plan = select_blocks([5.0, 5.0, 0.0, 4.0, 5.0, 0.0], num_blocks=2, allowed=allowed)
    assert plan.remove == [2, 3] and plan.requested["passed_over"][0]["blocks"] == [5]


def test_a_family_whose_own_kv_cache_is_broken_is_refused_before_scoring():
    from shortened.choose import choose
    from shortened.verify import check_source_cache

    config = AutoConfig.for_model("xlnet", vocab_size=97, d_model=32, n_layer=N_LAYERS, n_head=4, d_inner=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()  # XLNet's cache does not reproduce its forward
    with pytest.raises(ShortenedError, match="own KV cache"):
        check_source_cache(model)
    with pytest.raises(ShortenedError, match="own KV cache"):
        choose(model, None, "magnitude", num_blocks=2, progress=False)
    check_source_cache(tiny_model("llama"))  # a sound family passes
