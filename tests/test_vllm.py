"""The saved model served by vLLM (its own environment: ``make vllm``) gives transformers' greedy tokens.

Skipped with the reason where no environment with vLLM is found. Tokens are compared up to the first step
where transformers' two best logits are closer than 1e-3 (a near-tie either engine may break either way).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
NEW_TOKENS = 24


def greedy_until_near_tie(model, ids: list[int]) -> list[int]:
    """transformers' greedy tokens after ``ids``, cut before the first step whose top-2 margin is below 1e-3."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    for i, logits in enumerate(out.logits):
        top = torch.topk(logits[0].float(), 2).values
        if top[0] - top[1] < 1e-3:
            return tokens[:i]
    return tokens


def test_pruned_smollm2_in_vllm_gives_transformers_tokens(vllm_python, smollm2_folder, tmp_path):
    from shortened import load_model, remove_blocks, save_model
    from shortened.engines.vllm_engine import vllm_generate

    model, tokenizer = load_model(str(smollm2_folder))
    remove_blocks(model, [20, 21, 22, 23, 24, 25])
    folder = save_model(model, tokenizer, tmp_path / "pruned")
    texts = ["The capital of France is", "def fibonacci(n):", "Give three tips for staying healthy. " * 12]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    served = vllm_generate(folder, prompts, NEW_TOKENS, python=vllm_python)["tokens"]
    for ids, theirs in zip(prompts, served):
        ours = greedy_until_near_tie(model, ids)
        assert len(ours) >= 8 and theirs[:len(ours)] == ours
