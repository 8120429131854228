"""``shortened plan``: counts from the config equal the loaded model's, and every estimate is within 25% of
what benchmarks/bench_scale.py measured on real shapes (benchmarks/results/scale.json)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from shortened import save_model
from shortened.archs import get_arch, get_blocks, get_submodule
from shortened.cli import main
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
    assert not offloaded["eval perplexity"].fits and "fits with --dtype bfloat16" in offloaded["eval perplexity"].advice
    assert not offloaded["heal reconstruct"].fits and "needs a machine with" in offloaded["heal reconstruct"].advice


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
