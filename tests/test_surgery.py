"""remove_blocks on a tiny model of every architecture in the table."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortened import get_arch, get_blocks, remove_blocks, save_model, pruning_record
from shortened.errors import ShortenedError
from tiny_models import N_LAYERS, TINY_CONFIGS, skipped_logits, tiny_inputs, tiny_model

ARCHS = sorted(TINY_CONFIGS)
REMOVE = [1, 3, 4]  # not contiguous, not the first or last, mixes sliding and full layers


def test_table_covers_required_architectures():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt_neox", "gpt2"}
    from shortened import supported_model_types

    assert required <= set(supported_model_types())
    assert required <= set(TINY_CONFIGS)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_logits_equal_identity_reference(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(length=20)  # longer than the sliding windows
    expected = skipped_logits(model, REMOVE, ids)
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
    assert not torch.allclose(dense, expected, atol=1e-3), "removing blocks should change the output"

    kept = remove_blocks(model, REMOVE)
    assert kept == [0, 2, 5]
    with torch.no_grad():
        pruned = model(ids, use_cache=False).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_and_indices_follow_removal(arch):
    model = tiny_model(arch)
    spec = get_arch(model)
    original_types = copy.deepcopy(getattr(model.config, "layer_types", None))
    original_blocks = list(get_blocks(model))
    kept = remove_blocks(model, REMOVE)

    blocks = get_blocks(model)
    assert len(blocks) == N_LAYERS - len(REMOVE)
    assert [b for b in blocks] == [original_blocks[i] for i in kept]  # the same module objects, in order
    assert getattr(model.config, spec.layer_count_field) == len(kept)
    assert model.config.num_hidden_layers == len(kept)
    if original_types is not None:
        assert model.config.layer_types == [original_types[i] for i in kept]
    for new_idx, block in enumerate(blocks):
        indices = {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")}
        assert indices == {new_idx}


@pytest.mark.parametrize("arch", ARCHS)
def test_save_reload_bit_identical_and_cache_consistent(arch, tmp_path):
    model = tiny_model(arch)
    n = len(get_blocks(model))
    kept = remove_blocks(model, REMOVE)
    ids = tiny_inputs(length=20)
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    out = save_model(model, None, tmp_path / "p", pruning_record("tiny", n, kept, model_type=arch))

    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert len(get_blocks(reloaded)) == len(kept)
    with torch.no_grad():
        after = reloaded(ids, use_cache=False).logits
    assert torch.equal(before, after)
    if getattr(model.config, "layer_types", None) is not None:
        assert reloaded.config.layer_types == model.config.layer_types

    record = json.loads((out / "pruning.json").read_text())
    assert record["removed_blocks"] == REMOVE and record["kept_blocks"] == kept

    prompt = tiny_inputs(batch=1, length=12, seed=3)
    gen = dict(max_new_tokens=14, min_new_tokens=14, do_sample=False)
    with torch.no_grad():
        cached = reloaded.generate(prompt, use_cache=True, **gen)
        uncached = reloaded.generate(prompt, use_cache=False, **gen)
    assert cached.shape[1] == prompt.shape[1] + 14
    assert torch.equal(cached, uncached)


def test_removal_of_the_last_and_first_blocks():
    model = tiny_model("llama")
    ids = tiny_inputs()
    expected = skipped_logits(model, [0, N_LAYERS - 1], ids)
    remove_blocks(model, [N_LAYERS - 1, 0])  # order does not matter
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def test_removal_twice_composes():
    model = tiny_model("qwen2")
    ids = tiny_inputs(length=20)
    expected = skipped_logits(model, [1, 2, 4], ids)
    kept = remove_blocks(model, [1])            # originals 0,2,3,4,5 remain
    kept2 = remove_blocks(model, [1, 3])         # new indices 1,3 = originals 2,4
    assert [kept[i] for i in kept2] == [0, 3, 5]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "indices, message",
    [
        ([6], "out of range"),
        ([-1], "out of range"),
        ([2, 2], "duplicate"),
        (list(range(N_LAYERS)), "cannot remove all"),
        ([], "no blocks"),
    ],
)
def test_bad_indices_are_refused_and_model_untouched(indices, message):
    model = tiny_model("llama")
    before = list(get_blocks(model))
    with pytest.raises(ShortenedError, match=message):
        remove_blocks(model, indices)
    assert list(get_blocks(model)) == before
    assert model.config.num_hidden_layers == N_LAYERS


def test_index_dependent_gpt2_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50,
                                       scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ShortenedError, match="absolute index"):
        remove_blocks(model, [1])


def test_unknown_architecture_is_discovered_with_a_warning():
    from transformers import AutoConfig, AutoModelForCausalLM as Auto

    config = AutoConfig.for_model("olmo2", vocab_size=50, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = Auto.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 50, (1, 10))
    with pytest.warns(UserWarning, match="not in the architecture table"):
        spec = get_arch(model)
    assert spec.generic and spec.blocks == "model.layers"
    with pytest.warns(UserWarning):
        expected = skipped_logits(model, [2], ids)
    with pytest.warns(UserWarning):
        remove_blocks(model, [2])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(ShortenedError, match="architecture table"):
        get_arch(model, allow_generic=False)
