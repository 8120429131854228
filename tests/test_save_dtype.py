"""The saved model keeps the source checkpoint's dtype (issue 31): a bf16 checkpoint pruned or healed while
computing in float32 on a CPU is saved in bf16, bit for bit where nothing was trained, unless --save-dtype
says otherwise; the record and the card say which dtype was saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from shortened import save_model
from shortened.card import model_card
from shortened.cli import main
from shortened.errors import ShortenedError
from shortened.loading import checkpoint_dtype
from tiny_models import N_LAYERS, tiny_model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture
def bf16_source(tmp_path: Path) -> Path:
    model = tiny_model("llama").to(torch.bfloat16)
    return save_model(model, None, tmp_path / "src")


def _check_kept_blocks_bitwise(source: Path, pruned: Path, removed: list[int], dtype: torch.dtype) -> None:
    src, out = _tensors(source), _tensors(pruned)
    kept = [i for i in range(N_LAYERS) if i not in removed]
    assert {t.dtype for t in out.values() if t.is_floating_point()} == {dtype}
    for new, old in enumerate(kept):
        names = [k for k in src if k.startswith(f"model.layers.{old}.")]
        assert names
        for k in names:
            assert torch.equal(out[k.replace(f"layers.{old}.", f"layers.{new}.")], src[k].to(dtype)), k
    assert torch.equal(out["model.embed_tokens.weight"], src["model.embed_tokens.weight"].to(dtype))


def test_checkpoint_dtype_is_read_from_the_config(bf16_source, tmp_path):
    assert checkpoint_dtype(bf16_source) == torch.bfloat16
    assert checkpoint_dtype(save_model(tiny_model("llama"), None, tmp_path / "f32")) == torch.float32
    with pytest.raises(ShortenedError, match="does not exist"):
        checkpoint_dtype(tmp_path / "missing")


@pytest.mark.parametrize("offload", [None, "disk"])
def test_a_bf16_checkpoint_pruned_in_float32_is_saved_in_bf16_bit_for_bit(bf16_source, tmp_path, offload):
    out = tmp_path / "pruned"
    extra = ["--offload", offload] if offload else []
    assert main(["prune", str(bf16_source), "--blocks", "1,3", "--dtype", "float32", *extra, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _check_kept_blocks_bitwise(bf16_source, out, [1, 3], torch.bfloat16)
    record = json.loads((out / "pruning.json").read_text())
    assert (record["weights_dtype"], record["source_dtype"]) == ("bfloat16", "bfloat16")
    assert "- **Weights:** bfloat16 (the source checkpoint's)" in model_card(record)
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # the config's dtype
    assert reloaded.dtype == torch.bfloat16 and len(reloaded.model.layers) == N_LAYERS - 2


def test_save_dtype_float32_keeps_what_was_computed(bf16_source, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", str(bf16_source), "--blocks", "0", "--save-dtype", "float32", "--out", str(out)]) == 0
    _check_kept_blocks_bitwise(bf16_source, out, [0], torch.float32)
    record = json.loads((out / "pruning.json").read_text())
    assert "- **Weights:** float32 (the source checkpoint's: bfloat16)" in model_card(record)


def test_a_float32_source_stays_float32(tmp_path):
    source = save_model(tiny_model("llama"), None, tmp_path / "src")
    out = tmp_path / "pruned"
    assert main(["prune", str(source), "--blocks", "2", "--out", str(out)]) == 0
    _check_kept_blocks_bitwise(source, out, [2], torch.float32)


def test_save_model_in_bf16_keeps_the_model_computing_in_float32(tmp_path):
    """The saved weights are bf16; the model in memory stays float32 with exactly those values (so the reload
    check runs in float32), and RoPE frequencies, which from_pretrained computes in float32, are untouched."""
    from shortened.io import cast_weights

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    save_model(model, None, tmp_path / "m", dtype=torch.bfloat16)  # verified against a reload: equal logits
    saved = _tensors(tmp_path / "m")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k].to(torch.bfloat16).float()), k
        assert torch.equal(saved[k].float(), v) or k == "lm_head.weight", k  # the tied head is saved once
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)
    cast_weights(model, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_healing_a_bf16_model_saves_bf16(tmp_path, smollm2_tokenizer):
    from eval_data import tiny_llama_for_tokenizer

    source = save_model(tiny_llama_for_tokenizer().to(torch.bfloat16), smollm2_tokenizer, tmp_path / "src")
    pruned, healed = tmp_path / "pruned", tmp_path / "healed"
    assert main(["prune", str(source), "--blocks", "2", "--out", str(pruned)]) == 0
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    assert main(["heal", str(pruned), "--method", "full", "--data", str(text), "--seq-len", "16", "--steps", "1",
                 "--batch-size", "2", "--grad-accum", "1", "--device", "cpu", "--out", str(healed)]) == 0
    assert json.loads((healed / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in _tensors(healed).values() if t.is_floating_point()} == {torch.bfloat16}
    record = json.loads((healed / "pruning.json").read_text())
    assert (record["weights_dtype"], record["source_dtype"]) == ("bfloat16", "bfloat16")
    assert main(["heal", str(pruned), "--method", "full", "--data", str(text), "--seq-len", "16", "--steps", "1",
                 "--batch-size", "2", "--grad-accum", "1", "--device", "cpu", "--save-dtype", "float32",
                 "--out", str(tmp_path / "h32")]) == 0
    assert {t.dtype for t in _tensors(tmp_path / "h32").values() if t.is_floating_point()} == {torch.float32}
