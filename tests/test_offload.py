"""Blocks on disk: a model loaded with ``blocks_on_disk=True`` holds no block weights; the engine reads each
block from the safetensors files when it visits it, one at a time, and the scores equal a normal load's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from shortened import get_blocks, load_model
from shortened.criteria import score_blocks
from shortened.errors import ShortenedError
from shortened.offload import DiskBlocks, disk_blocks
from shortened.selection import iterative_select
from tiny_models import N_LAYERS, TINY_CONFIGS, tiny_inputs, tiny_model

ARCHS = sorted(TINY_CONFIGS)


def saved(tmp_path, arch: str):
    folder = tmp_path / arch
    tiny_model(arch).save_pretrained(folder)
    return folder


def both(folder):
    """The same folder loaded normally and with its blocks on disk."""
    normal, _ = load_model(folder, dtype="float32", device="cpu")
    on_disk, _ = load_model(folder, dtype="float32", device="cpu", blocks_on_disk=True)
    return normal, on_disk


def block_params(model):
    return list(get_blocks(model).parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_ppl_from_disk_equals_a_normal_load(tmp_path, arch):
    normal, on_disk = both(saved(tmp_path, arch))
    assert all(p.is_meta for p in block_params(on_disk))  # no block weight is held
    assert not any(p.is_meta for n, p in on_disk.named_parameters() if not any(p is q for q in block_params(on_disk)))
    ids = tiny_inputs(batch=2, length=20)
    want = score_blocks(normal, ids, "ppl", progress=False)
    got = score_blocks(on_disk, ids, "ppl", progress=False)
    assert got.scores == want.scores
    assert got.settings["offload"] == "disk" and want.settings["offload"] is False
    assert all(p.is_meta for p in block_params(on_disk))  # every block released after its visit


@pytest.mark.parametrize("criterion", ["taylor", "bi", "angular", "magnitude"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_neox"])
def test_every_weight_criterion_from_disk(tmp_path, arch, criterion):
    normal, on_disk = both(saved(tmp_path, arch))
    ids = tiny_inputs(batch=2, length=20)
    assert score_blocks(on_disk, ids, criterion, progress=False).scores == \
        score_blocks(normal, ids, criterion, progress=False).scores


def test_one_block_in_memory_at_a_time(tmp_path, monkeypatch):
    _, on_disk = both(saved(tmp_path, "qwen2"))
    live: set[int] = set()
    most = 0
    fetch, release = DiskBlocks.fetch, DiskBlocks.release

    def counting_fetch(self, block, index, device):
        nonlocal most
        fetch(self, block, index, device)
        live.add(index)
        most = max(most, len(live))

    def counting_release(self, block, index):
        release(self, block, index)
        live.discard(index)

    monkeypatch.setattr(DiskBlocks, "fetch", counting_fetch)
    monkeypatch.setattr(DiskBlocks, "release", counting_release)
    score_blocks(on_disk, tiny_inputs(batch=2, length=20), "ppl", workers=2, progress=False)
    assert most == 1 and not live


def test_iterative_removal_from_disk(tmp_path):
    normal, on_disk = both(saved(tmp_path, "mistral"))
    ids = tiny_inputs(batch=2, length=20)
    a, _ = iterative_select(normal, ids, "ppl", num_blocks=2, progress=False)
    b, _ = iterative_select(on_disk, ids, "ppl", num_blocks=2, progress=False)
    assert a.remove == b.remove


def test_sharded_checkpoint(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    normal, on_disk = both(folder)
    ids = tiny_inputs(batch=2, length=20)
    assert score_blocks(on_disk, ids, "ppl", progress=False).scores == \
        score_blocks(normal, ids, "ppl", progress=False).scores


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_checkpoint_without_a_block_tensor_is_refused(tmp_path):
    folder = saved(tmp_path, "llama")
    _rewrite(folder, lambda t: t.update({"renamed.q": t.pop("model.layers.3.self_attn.q_proj.weight")}))
    with pytest.raises(ShortenedError, match="model.layers.3.self_attn.q_proj.weight.*--offload cpu"):
        load_model(folder, dtype="float32", device="cpu", blocks_on_disk=True)


def test_a_checkpoint_with_a_wrong_shape_is_refused(tmp_path):
    folder = saved(tmp_path, "llama")
    key = "model.layers.2.mlp.up_proj.weight"
    _rewrite(folder, lambda t: t.update({key: t[key][:-1].clone()}))
    with pytest.raises(ShortenedError, match="shape"):
        load_model(folder, dtype="float32", device="cpu", blocks_on_disk=True)


def test_blocks_are_read_in_the_requested_dtype(tmp_path):
    folder = saved(tmp_path, "llama")
    on_disk, _ = load_model(folder, dtype="bfloat16", device="cpu", blocks_on_disk=True)
    store = disk_blocks(on_disk)
    block = get_blocks(on_disk)[N_LAYERS - 1]
    store.fetch(block, N_LAYERS - 1, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in block.parameters())
    store.release(block, N_LAYERS - 1)
    assert all(p.is_meta for p in block.parameters())


def _weights(folder):
    model, _ = load_model(folder, dtype="float32", device="cpu")
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_neox", "opt"])
def test_prune_from_disk_writes_the_same_model(tmp_path, arch):
    """Pruned from disk, block by block, the saved model equals the normal prune, tensor for tensor."""
    from shortened.cli import main

    folder = saved(tmp_path, arch)
    assert main(["prune", str(folder), "--blocks", "1,4", "--out", str(tmp_path / "plain")]) == 0
    assert main(["prune", str(folder), "--blocks", "1,4", "--offload", "disk", "--out", str(tmp_path / "disk")]) == 0
    plain_model, plain = _weights(tmp_path / "plain")
    disk_model, disk = _weights(tmp_path / "disk")
    assert plain.keys() == disk.keys()
    assert all(torch.equal(plain[k], disk[k]) for k in plain)
    configs = [{k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"} for m in (disk_model, plain_model)]
    assert configs[0] == configs[1]
    ids = tiny_inputs(batch=2, length=20)
    with torch.no_grad():
        assert torch.equal(disk_model(ids).logits, plain_model(ids).logits)


def test_prune_from_disk_in_shards(tmp_path):
    from shortened.io import pruning_record, save_model
    from shortened.surgery import remove_blocks

    folder = saved(tmp_path, "qwen3")
    on_disk, _ = load_model(folder, dtype="float32", device="cpu", blocks_on_disk=True)
    kept = remove_blocks(on_disk, [0, 5])
    record = pruning_record(str(folder), N_LAYERS, kept, model_type="qwen3")
    import shortened.offload as offload

    real = offload.save_from_disk
    out = tmp_path / "out"
    try:  # tiny shards, so the index path is exercised
        offload.save_from_disk = lambda m, k, f, **kw: real(m, k, f, shard_bytes=20_000, **kw)
        save_model(on_disk, None, out, record)
    finally:
        offload.save_from_disk = real
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    reference = tiny_model("qwen3")
    remove_blocks(reference, [0, 5])
    model, weights = _weights(out)
    ref = reference.state_dict()
    assert all(torch.equal(weights[k], ref[k]) for k in ref)


def test_scoring_from_disk_on_the_command_line(tmp_path):
    """``--offload disk`` writes the scores of a normal run, with the mode recorded."""
    import json

    from shortened.cli import main

    folder = saved(tmp_path, "llama")
    normal, _ = load_model(folder, dtype="float32", device="cpu")
    want = score_blocks(normal, None, "magnitude", progress=False).scores
    out = tmp_path / "m.json"
    assert main(["score", str(folder), "--criterion", "magnitude", "--offload", "disk", "--no-progress",
                 "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["scores"] == want and got["settings"]["offload"] == "disk"


def test_self_calibration_needs_the_blocks_in_memory(tmp_path, capsys):
    from shortened.cli import main

    folder = saved(tmp_path, "llama")
    rc = main(["score", str(folder), "--criterion", "ppl", "--calib", "self", "--offload", "disk",
               "--out", str(tmp_path / "s.json")])
    assert rc == 2
    assert "--calib self" in capsys.readouterr().err and not (tmp_path / "s.json").exists()


def _bf16_untied(tmp_path):
    """A tiny Llama saved in bfloat16 with an untied head: both tables stored narrower than float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_models import TINY_CONFIGS

    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "tie_word_embeddings": False})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    folder = tmp_path / "bf16"
    model.save_pretrained(folder)
    return folder


def test_narrow_tables_stay_narrow_and_compute_as_float32(tmp_path, monkeypatch):
    """The embedding and head of a bf16 checkpoint are held in bf16 (half the memory) and upcast where used:
    the loss-reading scores equal those of a float32 load of the same checkpoint."""
    import shortened.offload as offload

    folder = _bf16_untied(tmp_path)
    normal, on_disk = both(folder)
    assert on_disk.get_input_embeddings().weight.dtype == torch.bfloat16
    assert on_disk.get_output_embeddings().weight.dtype == torch.bfloat16
    assert on_disk.model.norm.weight.dtype == torch.float32  # small tensors take the compute dtype
    monkeypatch.setattr(offload, "UPCAST_ROWS", 7)  # several slices of the head's rows, a ragged last one
    ids = tiny_inputs(batch=2, length=20)
    for criterion in ("ppl", "bi"):
        want = score_blocks(normal, ids, criterion, progress=False).scores
        got = score_blocks(on_disk, ids, criterion, progress=False).scores
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 5, normal.config.hidden_size)
    with torch.no_grad():  # the head module itself (as the model's own forward calls it)
        torch.testing.assert_close(on_disk.get_output_embeddings()(x), normal.get_output_embeddings()(x),
                                   rtol=1e-5, atol=1e-5)


def test_tables_nothing_reads_stay_in_the_files(tmp_path):
    """BI does not read the head, pruning chosen blocks computes nothing: those tables are never loaded, and
    the pruned model saved from disk still holds them, bit for bit."""
    from shortened.cli import main

    folder = _bf16_untied(tmp_path)
    normal, _ = load_model(folder, dtype="float32", device="cpu")
    no_head, _ = load_model(folder, dtype="float32", device="cpu", blocks_on_disk=True, unloaded=("head",))
    assert no_head.get_output_embeddings().weight.is_meta and not no_head.get_input_embeddings().weight.is_meta
    ids = tiny_inputs(batch=2, length=20)
    assert score_blocks(no_head, ids, "bi", progress=False).scores == score_blocks(normal, ids, "bi", progress=False).scores
    out = tmp_path / "pruned"
    assert main(["prune", str(folder), "--blocks", "1,3", "--offload", "disk", "--out", str(out)]) == 0
    source = load_file(str(folder / "model.safetensors"))
    weights = load_file(str(out / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert weights[name].dtype == torch.bfloat16 and torch.equal(weights[name], source[name])
    with pytest.raises(ShortenedError, match="unknown table"):
        load_model(folder, device="cpu", blocks_on_disk=True, unloaded=("norm",))
    with pytest.raises(ShortenedError, match="blocks on disk"):
        load_model(folder, device="cpu", unloaded=("head",))


@pytest.mark.parametrize("bos", [False, True])
def test_perplexity_with_blocks_on_disk(tmp_path, monkeypatch, smollm2_tokenizer, bos):
    """Perplexity streams a bf16 model's blocks from disk, several passes of several chunks, each block read
    once per pass, and equals a float32 load's."""
    import shortened.evaluation.perplexity as ppl_mod
    from eval_data import tiny_llama_for_tokenizer
    from shortened.evaluation import evaluate

    folder = tmp_path / "m"
    model = tiny_llama_for_tokenizer(seed=4)
    model.config.tie_word_embeddings = False
    model.to(torch.bfloat16).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text("The keeper climbed the stairs each evening to light the lamp above the bay. " * 40)
    normal, tok = load_model(folder, dtype="float32", device="cpu")
    on_disk, _ = load_model(folder, dtype="float32", device="cpu", blocks_on_disk=True)
    # 5 chunks a pass (3 copies of their float32 hidden states), 2 chunks per block call: 3 passes, the last partial
    monkeypatch.setattr(ppl_mod, "PASS_BYTES", 3 * (24 + bos) * normal.config.hidden_size * 4 * 5)
    reads = []
    real_fetch = disk_blocks(on_disk).fetch
    monkeypatch.setattr(disk_blocks(on_disk), "fetch", lambda b, i, d: (reads.append(i), real_fetch(b, i, d)))
    kw = dict(ppl=[str(text)], tasks=[], seq_len=24, batch_size=2, bos=bos, limit=12, progress=False)
    want = evaluate(normal, tok, **kw)["perplexity"][str(text)]
    got = evaluate(on_disk, tok, **kw)
    entry = got["perplexity"][str(text)]
    assert entry["n_tokens"] == want["n_tokens"] and entry["n_chunks"] == 12
    assert entry["value"] == pytest.approx(want["value"], rel=1e-6)
    assert reads == list(range(N_LAYERS)) * 3  # every block once per pass
    assert got["model"]["offload"] == "disk" and got["model"]["dtype"] == "float32"
    assert all(p.is_meta for p in block_params(on_disk))
    with pytest.raises(ShortenedError, match="zero-shot"):
        evaluate(on_disk, tok, ppl=[], tasks=["boolq"], progress=False)


def test_eval_offload_on_the_command_line(tmp_path, capsys, smollm2_tokenizer):
    import json

    from eval_data import tiny_llama_for_tokenizer
    from shortened.cli import main

    folder = tmp_path / "m"
    tiny_llama_for_tokenizer(seed=5).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text("Ships that passed in the night saw the beam turn slowly across the water. " * 30)
    outs = []
    for extra in ([], ["--offload", "disk"]):
        out = tmp_path / f"r{len(extra)}.json"
        assert main(["eval", str(folder), "--ppl", str(text), "--tasks", "none", "--seq-len", "16", "--limit", "6",
                     "--no-progress", "--out", str(out), *extra]) == 0
        outs.append(json.loads(out.read_text())["perplexity"][str(text)]["value"])
    assert outs[1] == pytest.approx(outs[0], rel=1e-6)
    capsys.readouterr()
    assert main(["eval", str(folder), "--ppl", str(text), "--offload", "disk", "--no-progress"]) != 0
    assert "--tasks none" in capsys.readouterr().err
