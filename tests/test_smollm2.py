"""End to end on the real SmolLM2-135M-Instruct weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened import load_model, remove_blocks, save_model, pruning_record
from shortened.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    return load_model(str(smollm2_folder), dtype="float32", device="cpu")


def test_alias_info_reports_30_blocks(smollm2_folder, capsys):
    cache_dir = smollm2_folder.parent.parent  # the fixture's cache: <cache>/gguf/<name>
    assert main(["info", "smollm2-135m", "--cache-dir", str(cache_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_blocks"] == 30 and info["model_type"] == "llama"
    assert info["total_params"] == 134_515_008  # tied embeddings counted once


def test_prune_three_blocks_save_reload_same_generation(smollm2, tmp_path):
    model, tokenizer = smollm2
    assert tokenizer is not None
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    kept = remove_blocks(model, [20, 21, 22])
    gen = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with torch.no_grad():
        before = model.generate(prompt, **gen)
    out = save_model(model, tokenizer, tmp_path / "p", pruning_record("smollm2-135m", 30, kept, model_type="llama"))

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 27 and len(reloaded.model.layers) == 27
    with torch.no_grad():
        after = reloaded.generate(prompt, **gen)
        uncached = reloaded.generate(prompt, use_cache=False, **gen)
    assert before.shape[1] == prompt.shape[1] + 20
    assert torch.equal(before, after)
    assert torch.equal(after, uncached)
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded_tok("The capital of France is").input_ids == prompt[0].tolist()


def test_generate_streams_the_same_text_as_generate(smollm2_folder, capsys):
    from shortened.generation import build_prompt_ids

    model, tokenizer = load_model(str(smollm2_folder))
    ids = build_prompt_ids(tokenizer, "What is the capital of France?")
    assert ids[0, 0].item() == tokenizer.convert_tokens_to_ids("<|im_start|>")  # chat template applied
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert main(["generate", str(smollm2_folder), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert expected.strip() and expected.strip() in out
    assert "Paris" in out
