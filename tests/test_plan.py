"""``shortened plan``: counts from the config equal the loaded model's, and every estimate is within 25% of
what benchmarks/bench_scale.py measured on real shapes (benchmarks/results/scale.json)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from shortened import save_model
from shortened.archs import get_arch, get_blocks, get_submodule
from shortened.cli import main
from shortened.errors import ShortenedError
from shortened.plan import GIB, Machine, Request, Shape, criterion_flops, plan
from tiny_models import TINY_CONFIGS, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCALE = ROOT / "benchmarks" / "results" / "scale.json"


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3", "gpt2"])
def test_shape_from_the_config_counts_like_the_loaded_model(model_type):
    model = tiny_model(model_type)
    shape = Shape.from_config(AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type]))
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.block_params == sum(p.numel() for b in blocks for p in b.parameters())
    assert shape.num_blocks == len(blocks)
    assert shape.head_params == get_submodule(model, spec.head[-1]).weight.numel()
    assert shape.kept_params(2) == shape.params - 2 * shape.block_params // len(blocks)


def test_criterion_costs_follow_what_each_computes():
    shape = Shape(params=1000, block_params=800, num_blocks=4, head_params=100, hidden=8, intermediate=32, vocab=12, checkpoint_bytes=2)
    assert criterion_flops(shape, "bi", 10) == (2 * 800 * 10, 0)
    assert criterion_flops(shape, "magnitude", 10) == (0, 0)
    # the capture pass (4 blocks), then block i's input through the 3 - i later blocks, and the head each time
    blocks, head = criterion_flops(shape, "ppl", 10)
    assert blocks == pytest.approx(2 * 200 * 10 * (4 + 3 + 2 + 1 + 0)) and head == 4 * 2 * 100 * 10
    from shortened.errors import ShortenedError

    with pytest.raises(ShortenedError, match="generations"):
        criterion_flops(shape, "search", 10)


def test_a_stage_that_does_not_fit_says_which_option_helps():
    shape = Shape(params=8 * 10**9, block_params=7 * 10**9, num_blocks=32, head_params=5 * 10**8, hidden=4096, intermediate=14336,
                  vocab=128256, checkpoint_bytes=2)
    machine = Machine("cpu", gemm_flops=1e11, read_bytes_s=2e9, write_bytes_s=1e9, memory_bytes=24 * GIB)
    plain = {e.stage: e for e in plan(shape, machine, Request(remove=6))}
    assert not plain["score"].fits and "fits with --offload disk" in plain["score"].advice
    offloaded = {e.stage: e for e in plan(shape, machine, Request(remove=6, offload="disk"))}
    assert offloaded["score"].fits and offloaded["prune"].fits
    assert offloaded["score"].memory_bytes < plain["score"].memory_bytes / 4
    assert not plain["eval perplexity"].fits and "fits with --offload disk" in plain["eval perplexity"].advice
    assert offloaded["eval perplexity"].fits and offloaded["eval perplexity"].memory_bytes < 6 * GIB
    assert not plain["bench"].fits and "--offload" not in plain["bench"].advice  # bench holds the whole model
    assert not plain["heal reconstruct"].fits and "fits with --offload disk" in plain["heal reconstruct"].advice
    assert offloaded["heal reconstruct"].fits and offloaded["heal reconstruct"].memory_bytes < 12 * GIB
    distill = {e.stage: e for e in plan(shape, machine, Request(remove=6, offload="disk", heal="distill"))}
    assert not distill["heal distill"].fits and "needs a machine with" in distill["heal distill"].advice


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_estimates_are_within_25_percent_of_the_measured_stages():
    if not SCALE.is_file():
        pytest.skip(f"{SCALE} not measured: run benchmarks/bench_scale.py")
    bench = _bench_scale()
    rows = [r for r in json.loads(SCALE.read_text())["results"] if r.get("rc") == 0]
    assert len({r["shape"] for r in rows}) >= 2 and len(rows) >= 8
    misses = []
    for r in map(bench.replan, rows):  # the current cost model, for the rates measured with each row
        for what, planned, measured in (("memory", r["plan_memory_gib"], r["peak_rss_gib"]),
                                        ("time", r["plan_seconds"], r["wall_s"])):
            if abs(planned / measured - 1) > 0.25:
                misses.append(f"{r['shape']} {r['stage']} {what}: plan {planned:.2f}, measured {measured:.2f}")
    assert not misses, "\n".join(misses)


def test_plan_cli_reads_no_weights_and_refuses_bad_requests(tmp_path, capsys, monkeypatch):
    import transformers

    folder = save_model(tiny_model("llama"), None, tmp_path / "tiny")

    def no_load(*args, **kwargs):
        raise AssertionError("plan loaded the weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    assert main(["plan", str(folder), "--gemm-gflops", "100", "--num-blocks", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["remove"] == 2 and [s["stage"] for s in out["stages"]] == [
        "score", "prune", "heal reconstruct", "eval perplexity", "bench"]
    assert all(s["memory_bytes"] > 0 and s["seconds"] > 0 for s in out["stages"])
    assert main(["plan", str(folder), "--gemm-gflops", "100"]) == 0
    assert "| score |" in capsys.readouterr().out
    for argv, message in ((["--num-blocks", "6"], "--num-blocks must be between 1 and 5"),
                          (["--criterion", "bogus"], "bogus"), (["--criterion", "search"], "generations"),
                          (["--heal-steps", "0"], "--heal-steps must be at least 1")):
        assert main(["plan", str(folder), "--gemm-gflops", "100", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def _llama_config(**fields):
    from transformers import AutoConfig

    shape = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, dtype="bfloat16")
    return AutoConfig.for_model("llama", **{**shape, **fields})


def test_a_stage_that_cannot_fit_is_refused_before_loading(monkeypatch):
    from shortened.plan import NO_CHECK_ENV, check_memory

    config = _llama_config()  # a 70B Llama: 280 GB of float32
    with pytest.raises(ShortenedError, match=r"eval perplexity of this 70\.\dB-parameter model needs about \d+ GiB "
                                             r"and this cpu has 64 GiB: it fits with --offload disk"):
        check_memory("eval perplexity", config, Request(remove=0, eval_chunks=8), "cpu", memory_bytes=64 * GIB)
    check_memory("eval perplexity", config, Request(remove=0, offload="disk", eval_chunks=8), "cpu",
                 memory_bytes=64 * GIB)  # streamed: fits
    with pytest.raises(ShortenedError, match="heal reconstruct .* needs about"):
        check_memory("heal reconstruct", config, Request(remove=0), "cpu", memory_bytes=64 * GIB)
    check_memory("eval perplexity", None, Request(remove=0), "cpu", memory_bytes=1)  # a Hub id: not checked
    monkeypatch.setenv(NO_CHECK_ENV, "1")
    check_memory("eval perplexity", config, Request(remove=0), "cpu", memory_bytes=64 * GIB)


@pytest.mark.parametrize("argv", [["eval", "--tasks", "none", "--ppl", "wikitext2"],
                                  ["heal", "--method", "reconstruct", "--data", "alpaca", "--out", "unused"],
                                  ["bench"]])
def test_commands_refuse_a_model_too_large_before_loading(tmp_path, capsys, argv, monkeypatch):
    """A 400B-shaped config with no weights at all: the commands stop at the check, never at the load."""
    from shortened.cli import main

    monkeypatch.delenv("SHORTENED_NO_MEMORY_CHECK", raising=False)
    folder = tmp_path / "huge"
    _llama_config(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                  ).save_pretrained(folder)
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(1)}, str(folder / "model.safetensors"))  # a folder of weights, by name
    assert main([argv[0], str(folder), *argv[1:], "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert "needs about" in err and "GiB" in err and "Traceback" not in err
