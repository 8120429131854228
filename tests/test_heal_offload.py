"""Healing with the blocks on disk (``heal --offload disk``): reconstruct trains the bridges one after another,
only theirs in memory, and gives the model that training them in memory gives."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from shortened.errors import ShortenedError
from shortened.heal import heal
from test_heal import pattern_data
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(steps=3, batch_size=4, grad_accum=1, lr=1e-3, warmup_steps=1, eval_every=1, max_grad_norm=0,
                bridge_width=2, progress=False)


def _pruned(tmp_path, removed: str, dtype: torch.dtype = torch.float32):
    from shortened.cli import main

    source = tmp_path / "source"
    tiny_model("llama").to(dtype).save_pretrained(source)
    pruned = tmp_path / f"pruned-{removed}"
    assert main(["prune", str(source), "--blocks", removed, "--out", str(pruned)]) == 0
    return pruned


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("removed", ["2", "1,4"])
def test_bridges_from_disk_equal_bridges_in_memory(tmp_path, removed):
    """One bridge, then two trained one after another: the same weights as training them in memory (without
    gradient clipping, which the joint run applies to both bridges together), the other blocks untouched."""
    pruned = _pruned(tmp_path, removed)
    memory = heal(pruned, pattern_data(), "reconstruct", out=tmp_path / "memory", **SETTINGS)
    disk = heal(pruned, pattern_data(), "reconstruct", out=tmp_path / "disk", offload="disk", **SETTINGS)
    want, got, before = _weights(tmp_path / "memory"), _weights(tmp_path / "disk"), _weights(pruned)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    bridges = disk.record["healing"]["trained_bridges"]
    kept = json.loads((pruned / "pruning.json").read_text())["kept_blocks"]
    trained = {kept.index(t) for b in bridges for t in b["trained"]}
    for name in before:  # blocks no bridge holds are the pruned model's, bit for bit
        if not any(name.startswith(f"model.layers.{i}.") for i in trained):
            assert torch.equal(got[name], before[name]), name
    assert len(bridges) == (1 if removed == "2" else 2) and disk.record["healing"]["offload"] == "disk"
    cache = disk.record["healing"]["teacher_cache"]  # one teacher forward per example serves every bridge
    assert cache["batches_from_teacher"] == 3 + -(-len(pattern_data().val) // 4)  # training, then validation once
    assert cache["batches_from_cache"] > 0
    val = [e["val_loss"] for e in disk.run.val_log]
    torch.testing.assert_close(val, [e["val_loss"] for e in memory.run.val_log], rtol=1e-4, atol=1e-6)
    assert val[-1] < val[0]
    assert not (tmp_path / "disk.checkpoints").exists()  # the bridges' files went with the checkpoints


def test_bf16_checkpoint_on_disk_saves_bf16(tmp_path):
    pruned = _pruned(tmp_path, "3", torch.bfloat16)
    heal(pruned, pattern_data(), "reconstruct", out=tmp_path / "healed", offload="disk", save_dtype=torch.bfloat16,
         **SETTINGS)
    got, before = _weights(tmp_path / "healed"), _weights(pruned)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert torch.equal(got["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert any(not torch.equal(got[n], before[n]) for n in got if n.startswith("model.layers.2."))


def test_what_offload_disk_refuses(tmp_path):
    pruned = _pruned(tmp_path, "2")
    with pytest.raises(ShortenedError, match="reconstruct .*lora trains the whole model"):
        heal(pruned, pattern_data(), "lora", out=tmp_path / "x", offload="disk", steps=1)
    with pytest.raises(ShortenedError, match="give --out"):
        heal(pruned, pattern_data(), "reconstruct", offload="disk", steps=1)
    with pytest.raises(ShortenedError, match="bridge-inputs teacher"):
        heal(pruned, pattern_data(), "reconstruct", out=tmp_path / "y", offload="disk", bridge_inputs="student",
             **SETTINGS)
