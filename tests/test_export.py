"""GGUF export (llama.cpp's converter, then the per-layer metadata) and parity with transformers in llama.cpp.

The tests that convert or serve need llama.cpp (``make llamacpp``, or ``$SHORTENED_LLAMA_CPP``): they are
skipped with the reason where it is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shortened.errors import ShortenedError
from shortened.export import export_gguf, find_llama_cpp, layer_metadata


def _llama_cpp() -> Path:
    try:
        tree = find_llama_cpp()
    except ShortenedError as exc:
        pytest.skip(f"llama.cpp not installed: {exc}")
    return tree


def _server() -> None:
    from shortened.engines.llamacpp import find_server

    try:
        find_server()
    except ShortenedError as exc:
        pytest.skip(f"llama.cpp's server not built: {exc}")


def test_layer_metadata_is_the_per_layer_sliding_pattern():
    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    assert layer_metadata({"layer_types": kinds}) == {"attention.sliding_window_pattern": [True, False, True]}
    assert layer_metadata({"text_config": {"layer_types": kinds}}) == {
        "attention.sliding_window_pattern": [True, False, True]}
    assert layer_metadata({"layer_types": ["full_attention"] * 3}) == {}
    assert layer_metadata({"model_type": "llama"}) == {}


def test_bad_requests_are_refused_before_any_conversion(tmp_path, monkeypatch, capsys):
    from shortened.cli import main

    monkeypatch.setenv("SHORTENED_LLAMA_CPP", str(tmp_path / "nowhere"))
    with pytest.raises(ShortenedError, match="not a Hugging Face model folder"):
        export_gguf(tmp_path, tmp_path / "m.gguf")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ShortenedError, match="no safetensors weights"):
        export_gguf(folder, tmp_path / "m.gguf")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ShortenedError, match="make llamacpp"):
        export_gguf(folder, tmp_path / "m.gguf")
    with pytest.raises(ShortenedError, match="--outtype"):
        export_gguf(folder, tmp_path / "m.gguf", outtype="q4_k")
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"x")
    assert main(["export", str(folder), "--gguf", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_bytes() == b"x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _tiny_gemma3(folder: Path, tokenizer) -> AutoModelForCausalLM:
    """A tiny random Gemma 3 with a 4-token sliding window, SmolLM2's tokenizer and vocabulary."""
    config = AutoConfig.for_model(
        "gemma3_text", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        max_position_embeddings=256,
        layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the default init: peaked outputs, where wrong layers show
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if "embed" in name else 0.1)
    return model


def _max_prob_difference(model, server, prompts: list[list[int]], least: int = 3) -> float:
    """:func:`probability_difference`, after checking that at least ``least`` prefixes were compared."""
    from shortened.engines.llamacpp import probability_difference

    worst, measured = probability_difference(model, server, prompts)
    assert measured >= least, measured
    return worst


@pytest.mark.slow
def test_pruned_gemma3_keeps_its_sliding_layers_in_llama_cpp(tmp_path, smollm2_tokenizer, monkeypatch):
    """Blocks 1 and 2 removed move the global layer from index 5 to 3; without the per-layer pattern llama.cpp
    runs its default for Gemma 3 (every sixth layer global: layer 5, now sliding) and layer 3 as sliding, with
    the sliding layers' RoPE base: past the 4-token window the outputs part."""
    import shortened.export as export
    from shortened import remove_blocks, save_model
    from shortened.engines.llamacpp import LlamaServer

    _llama_cpp()
    _server()
    model = _tiny_gemma3(tmp_path, smollm2_tokenizer)
    remove_blocks(model, [1, 2])
    assert model.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 2
    folder = save_model(model, smollm2_tokenizer, tmp_path / "pruned")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (8, 24)]

    fixed = export_gguf(folder, tmp_path / "fixed.gguf")
    assert fixed["metadata"] == {"gemma3.attention.sliding_window_pattern": [True] * 3 + [False] + [True] * 2}
    with LlamaServer(tmp_path / "fixed.gguf") as server:
        good = _max_prob_difference(model, server, prompts)
    monkeypatch.setattr(export, "layer_metadata", lambda config: {})  # what the converter alone writes
    plain = export_gguf(folder, tmp_path / "plain.gguf")
    assert plain["metadata"] == {}
    with LlamaServer(tmp_path / "plain.gguf") as server:
        bad = _max_prob_difference(model, server, prompts)
    assert good < 2e-3, good
    assert bad > 10 * good and bad > 5e-3, (good, bad)


@pytest.mark.slow
def test_pruned_smollm2_exports_and_matches_transformers(smollm2_folder, tmp_path):
    from shortened import load_model, remove_blocks, save_model
    from shortened.cli import main
    from shortened.engines.llamacpp import LlamaServer

    _llama_cpp()
    _server()
    model, tokenizer = load_model(str(smollm2_folder))
    remove_blocks(model, [20, 21, 22, 23, 24, 25])
    folder = save_model(model, tokenizer, tmp_path / "pruned")
    out = tmp_path / "pruned.gguf"
    assert main(["export", str(folder), "--gguf", str(out)]) == 0
    prompts = [tokenizer(t)["input_ids"] for t in ("The capital of France is", "def fibonacci(n):",
                                                   "Give three tips for staying healthy.")]
    with LlamaServer(out) as server:
        assert _max_prob_difference(model, server, prompts) < 2e-3


def test_run_gguf_is_refused_before_any_stage(tmp_path, monkeypatch, smollm2_tokenizer, capsys):
    """``run --gguf`` without llama.cpp, or a GGUF option without ``--gguf``, fails in a second, not after the
    run's stages, and leaves no output folder."""
    from eval_data import tiny_llama_for_tokenizer
    from shortened import save_model
    from shortened.cli import main

    folder = save_model(tiny_llama_for_tokenizer(), smollm2_tokenizer, tmp_path / "tiny")
    monkeypatch.setenv("SHORTENED_LLAMA_CPP", str(tmp_path / "nowhere"))
    base = ["run", str(folder), "--criterion", "bi", "--num-blocks", "1", "--heal", "none", "--out",
            str(tmp_path / "out")]
    for extra, message in ((["--gguf"], "make llamacpp"), (["--gguf-outtype", "f16"], "which --gguf turns on")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_run_gguf_writes_the_file_the_card_names(tmp_path, smollm2_tokenizer, capsys):
    """The exported file sits beside the model with the pruned block count, the card names it and its SHA-256,
    llama.cpp serves it like transformers, and a re-run without --gguf takes it away again."""
    import gguf

    from eval_data import tiny_llama_for_tokenizer
    from shortened import load_model, save_model
    from shortened.cli import main
    from shortened.engines.llamacpp import LlamaServer
    from shortened.export import sha256

    _llama_cpp()
    _server()
    folder = save_model(tiny_llama_for_tokenizer(), smollm2_tokenizer, tmp_path / "tiny")
    out = tmp_path / "out"
    base = ["run", str(folder), "--criterion", "bi", "--calib", "self", "--n-samples", "2", "--seq-len", "16",
            "--num-blocks", "2", "--heal", "none", "--eval", "none", "--bench", "none", "--no-progress",
            "--out", str(out)]
    assert main([*base, "--gguf", "--gguf-outtype", "f16"]) == 0
    file = out / "model-f16.gguf"
    reader = gguf.GGUFReader(str(file))
    assert reader.fields["llama.block_count"].contents() == json.loads((out / "config.json").read_text())[
        "num_hidden_layers"] == 4
    card = (out / "README.md").read_text()
    assert f"`model-f16.gguf` (f16 weights; SHA-256 `{sha256(file)}`)" in card
    assert "llama-server -m model-f16.gguf" in card
    model, _ = load_model(str(out))
    prompts = [smollm2_tokenizer(t)["input_ids"] for t in ("The capital of France is", "def fibonacci(n):")]
    with LlamaServer(file) as server:
        assert _max_prob_difference(model, server, prompts) < 5e-3  # f16 weights
    assert main(base) == 0
    assert not list(out.glob("*.gguf")) and "shortened export" in (out / "README.md").read_text()
    capsys.readouterr()
