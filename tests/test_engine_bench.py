"""``shortened bench --engine vllm|llamacpp``: generation timed where the model is served, with the same
schedule, prompts and FLOP bound as in transformers.

The timing tests need the engines (``make llamacpp`` / ``make vllm``) and are skipped with the reason where
they are absent; the refusals run everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shortened import remove_blocks, save_model
from shortened.bench import flops_per_token, folder_info, run_benchmark
from shortened.cli import main
from shortened.errors import ShortenedError


@pytest.fixture(scope="module")
def dense_and_pruned(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer (the engines need one; head size 64, as vLLM's CPU attention needs), saved whole and with 2 of its 4
    blocks removed, and the pruned/dense FLOP ratio at a context length, computed from the loaded models."""
    root = tmp_path_factory.mktemp("engine-bench")
    config = AutoConfig.for_model("llama", vocab_size=len(smollm2_tokenizer), hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=256, bos_token_id=smollm2_tokenizer.bos_token_id,
                                  eos_token_id=smollm2_tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    dense = save_model(model, smollm2_tokenizer, root / "dense")
    dense_model = AutoModelForCausalLM.from_config(config)
    remove_blocks(model, [1, 2])
    pruned = save_model(model, smollm2_tokenizer, root / "pruned")
    return dense, pruned, lambda ctx: flops_per_token(model, ctx) / flops_per_token(dense_model, ctx)


def test_folder_info_reads_no_weights_and_counts_like_the_loaded_model(dense_and_pruned):
    dense, pruned, ratio = dense_and_pruned
    info = {name: folder_info(str(f), 36) for name, f in (("dense", dense), ("pruned", pruned))}
    assert (info["dense"]["num_blocks"], info["pruned"]["num_blocks"]) == (4, 2)
    assert info["pruned"]["flops_per_token"] / info["dense"]["flops_per_token"] == pytest.approx(ratio(36), rel=1e-12)


def test_bad_engine_requests_are_refused_before_any_work(dense_and_pruned, tmp_path, capsys):
    dense, pruned, _ = dense_and_pruned
    out = str(tmp_path / "b.json")
    for extra, message in ((["--engine", "llamacpp", "--engine-dtype", "q4_k"], "--engine-dtype for llamacpp"),
                           (["--engine", "vllm", "--engine-dtype", "bf16"], "--engine-dtype for vllm"),
                           (["--engine-dtype", "bf16"], "--engine-dtype is for --engine vllm or llamacpp")):
        assert main(["bench", str(pruned), "--baseline", str(dense), "--out", out, *extra]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ShortenedError, match="serves a saved model folder"):
        run_benchmark("someone/some-model", engine="llamacpp", batch_sizes=[1], output_lens=[2])
    assert not Path(out).exists()


def _require(find, what: str) -> None:
    """Skip, saying why, where the engine ``find`` looks for is not installed."""
    try:
        find()
    except ShortenedError as exc:
        pytest.skip(f"{what}: {exc}")


def _check(result: dict, ratio: float, engine: str, memory_kind: str) -> None:
    assert result["settings"]["engine"] == engine
    assert [result["models"][r]["num_blocks"] for r in ("model", "baseline")] == [2, 4]
    ratio = ratio(result["models"]["model"]["flops_context_len"])
    assert result["flop_ratio"] == pytest.approx(ratio, rel=1e-12)
    for role in ("model", "baseline"):
        info = result["models"][role]
        assert info["engine"] == engine and info["engine_version"]
        points = info["points"]
        assert [(p["batch_size"], p["output_len"]) for p in points] == [(1, 4), (2, 4)]
        for p in points:
            assert len(p["latency_s"]["runs"]) == 2 and p["latency_s"]["median"] > 0
            assert p["throughput_tok_s"] == pytest.approx(p["batch_size"] * 4 / p["latency_s"]["median"])
            assert p["memory_kind"] == memory_kind and p["peak_memory_mb"] > 10
    for row in result["ratios"]:
        assert row["fraction_of_flop_bound"] == pytest.approx(row["throughput_ratio"] * ratio)


@pytest.mark.slow
def test_llamacpp_engine_times_both_models_interleaved(dense_and_pruned, tmp_path):
    from shortened.engines.llamacpp import find_server

    _require(find_server, "llama.cpp's server not built")
    dense, pruned, ratio = dense_and_pruned
    out = tmp_path / "llamacpp.json"
    assert main(["bench", str(pruned), "--baseline", str(dense), "--engine", "llamacpp", "--engine-dtype", "f32",
                 "--batch-sizes", "1,2", "--output-lens", "4", "--prompt-len", "8", "--repeats", "2",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["engine_dtype"] == "f32"
    _check(result, ratio, "llamacpp", "server_peak_rss")


@pytest.mark.slow
def test_vllm_engine_times_both_models_interleaved(dense_and_pruned, tmp_path):
    from shortened.engines.vllm_engine import find_vllm_python

    _require(find_vllm_python, "vLLM not installed")
    dense, pruned, ratio = dense_and_pruned
    result = run_benchmark(str(pruned), str(dense), engine="vllm", engine_dtype="float32", batch_sizes=[1, 2],
                           output_lens=[4], prompt_len=8, repeats=2)
    _check(result, ratio, "vllm", "worker_peak_rss")
