"""The model card's metadata and method lines, from a pruning record alone."""

from __future__ import annotations

import re

import yaml

from shortened.card import model_card
from shortened.io import pruning_record


def front_matter(card: str) -> dict:
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---", card, re.S).group(1))


def test_an_alias_names_its_hub_model_and_how_its_weights_differ():
    card = model_card(pruning_record("smollm2-135m", 30, list(range(24)), model_type="llama"), license="apache-2.0")
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "Q4_1 GGUF" in card and "dequantized" in card


def test_an_unknown_licence_is_left_out_rather_than_other(tmp_path):
    card = model_card(pruning_record(str(tmp_path / "local"), 6, [0, 1, 2, 3], model_type="llama"))
    meta = front_matter(card)
    assert "license" not in meta and "base_model" not in meta and meta["library_name"] == "transformers"


def test_repo_name_reaches_the_usage_and_healing_says_what_it_used():
    record = pruning_record("org/model", 6, [0, 1, 2, 3], model_type="llama")
    record["healing"] = {"method": "reconstruct", "data": {"source": "books", "kind": "text", "train_examples": 4635,
                                                            "train_examples_used": 6},
                         "settings": {"steps": 3, "lr": 3e-3, "passes": 4.0, "mixed_precision": "bf16", "seed": 0,
                                      "warmup_steps_effective": 3, "lora_r": 8}}
    card = model_card(record, repo_name="me/model-pruned")
    assert 'from_pretrained("me/model-pruned")' in card and front_matter(card)["base_model"] == "org/model"
    healing = next(line for line in card.splitlines() if line.startswith("- **Healing:**"))
    assert "6 of 4635 training examples used" in healing
    for shown in ("steps 3", "passes 4.0", "mixed_precision bf16", "seed 0", "warmup_steps 3"):
        assert shown in healing, shown
    assert "lora_r" not in healing  # not a LoRA run


def test_sampled_healing_text_and_a_search_are_described_not_pathed():
    record = pruning_record("org/model", 6, [0, 1, 2, 5], model_type="llama",
                            selection={"method": "lowest", "criterion": "search", "scores": {"extra": {"search": {
                                "fitness": 0.5893, "start": "angular contiguous",
                                "settings": {"fitness": "kl", "generations": 30, "offspring": 16, "seed": 1234,
                                             "sets_measured": 358}}}}})
    record["healing"] = {"method": "reconstruct", "data": {"source": "/x/stages/heal-data/heal-data.txt",
                                                            "kind": "text", "train_examples": 40}, "settings": {}}
    card = model_card(record, data_labels={"/x/stages/heal-data/heal-data.txt": "text sampled from the source model"})
    assert "stages/heal-data" not in card and "text sampled from the source model" in card
    search = next(line for line in card.splitlines() if line.startswith("- **Block-set search:**"))
    for shown in ("fitness kl", "30 generations of 16 offspring", "seed 1234", "358 sets", "angular contiguous",
                  "final fitness 0.5893"):
        assert shown in search, shown
