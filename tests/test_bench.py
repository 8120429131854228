"""The generation benchmark: every field written, ratios consistent with the raw figures."""

from __future__ import annotations

import json
import mmap
import time

import pytest

from shortened import remove_blocks, save_model
from shortened.bench import PeakRSS, bench_model, flops_per_token
from shortened.cli import main
from tiny_models import N_LAYERS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs cost more than they save


@pytest.fixture(scope="module")
def dense_and_pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    save_model(tiny_model("llama"), None, root / "dense")
    model = tiny_model("llama")
    remove_blocks(model, [1, 2, 3])
    save_model(model, None, root / "pruned")
    return root / "dense", root / "pruned"


def test_flops_per_token_by_hand():
    model = tiny_model("llama")
    cfg = model.config
    h, i, heads, kv, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_block = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i   # q, k+v, o, gate/up/down
    head = cfg.vocab_size * h
    ctx = 40
    expected = 2 * (N_LAYERS * per_block + head) + 4 * heads * d * ctx * N_LAYERS
    assert flops_per_token(model, ctx) == expected


@pytest.mark.parametrize("kernel", [True, False], ids=["high-water-mark", "sampling-thread"])
def test_peak_rss_sees_an_allocation_freed_before_exit(kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(PeakRSS, "_reset_high_water_mark", lambda self: False)
    tracker = PeakRSS()
    before = tracker.peak
    with tracker as rss:
        # 64 MiB of fresh anonymous pages, touched: malloc could serve a tensor from memory an earlier test
        # freed but kept resident, which would not raise the RSS at all.
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * len(block))
        if not kernel:
            time.sleep(0.05)  # the sampler must get a look at it
        block.close()
    assert rss.peak - before > 32 * 2**20


def test_bench_model_points_are_consistent():
    model = tiny_model("llama")
    points = bench_model(model, batch_sizes=[1, 2], output_lens=[3, 5], prompt_len=4, warmup=1, repeats=2)
    assert [(p.batch_size, p.output_len) for p in points] == [(1, 3), (1, 5), (2, 3), (2, 5)]
    for p in points:
        assert len(p.latency_s.runs) == 2 and p.latency_s.min <= p.latency_s.median <= p.latency_s.max
        assert p.throughput_tok_s == pytest.approx(p.batch_size * p.output_len / p.latency_s.median)
        decode = p.latency_s.median - p.prefill_s.median
        if decode >= 0.1 * p.latency_s.median:
            assert p.decode_s == pytest.approx(decode)
            assert p.decode_tok_s == pytest.approx(p.batch_size * (p.output_len - 1) / decode)
        else:  # lost in the timing noise: reported as not measured, never as a huge speed
            assert p.decode_s is None and p.decode_tok_s is None
        assert p.peak_memory_mb > 0 and p.memory_kind == "process_peak_rss"


def test_decode_time_is_none_when_it_cannot_be_measured():
    from shortened.bench import _decode

    assert _decode(1.0, 0.4, 5) == pytest.approx(0.6)
    assert _decode(0.132, 0.211, 2) is None  # prefill timed slower than the whole run
    assert _decode(1.0, 0.95, 5) is None     # a difference inside the noise
    assert _decode(1.0, 0.2, 1) is None      # one token: nothing after the prefill


def test_bench_cli_writes_every_field(dense_and_pruned, tmp_path, capsys):
    dense, pruned = dense_and_pruned
    out = tmp_path / "bench.json"
    code = main(["bench", str(pruned), "--baseline", str(dense), "--batch-sizes", "1,2", "--output-lens", "4",
                 "--prompt-len", "4", "--repeats", "2", "--threads", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    model, base = result["models"]["model"], result["models"]["baseline"]
    assert model["num_blocks"] == N_LAYERS - 3 and base["num_blocks"] == N_LAYERS
    assert model["cpu_threads"] == base["cpu_threads"] == result["settings"]["threads"] == 1
    assert result["flop_ratio"] == pytest.approx(model["flops_per_token"] / base["flops_per_token"])
    assert result["flop_speedup_bound"] == pytest.approx(1 / result["flop_ratio"])
    assert {"command", "created", "versions", "settings"} <= set(result)
    by_point = {(p["batch_size"], p["output_len"]): p for p in base["points"]}
    assert len(result["ratios"]) == 2
    for row, p in zip(result["ratios"], model["points"]):
        b = by_point[(p["batch_size"], p["output_len"])]
        assert row["throughput_ratio"] == pytest.approx(p["throughput_tok_s"] / b["throughput_tok_s"])
        assert row["latency_ratio"] == pytest.approx(p["latency_s"]["median"] / b["latency_s"]["median"])
        assert row["memory_ratio"] == pytest.approx(p["peak_memory_mb"] / b["peak_memory_mb"])
        assert row["fraction_of_flop_bound"] == pytest.approx(row["throughput_ratio"] * result["flop_ratio"])
        assert row["throughput_ratio_per_repeat"] == pytest.approx(
            [bl / pl for bl, pl in zip(b["latency_s"]["runs"], p["latency_s"]["runs"])])
    assert "speed-up bound" in capsys.readouterr().out


def test_bench_bad_input(dense_and_pruned, tmp_path, capsys):
    dense, _ = dense_and_pruned
    assert main(["bench", str(dense), "--batch-sizes", "0", "--out", str(tmp_path / "b.json")]) == 2
    assert main(["bench", str(dense), "--threads", "0", "--out", str(tmp_path / "b.json")]) == 2
    assert main(["bench", str(tmp_path / "missing"), "--out", str(tmp_path / "b.json")]) == 2
    (tmp_path / "b.json").write_text("{}")
    assert main(["bench", str(dense), "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "at least 1" in err and "does not exist" in err and "already exists" in err
    assert (tmp_path / "b.json").read_text() == "{}"


class _FakeRunner:
    """Records the calls the schedule makes; each timed run takes a fixed, known time."""

    def __init__(self, name: str, log: list, seconds: float):
        self.name, self.log, self.seconds = name, log, seconds

    def start_point(self, bs, out_len, warmup):
        self.log.append((self.name, "start", bs, out_len))

    def time(self, new_tokens):
        self.log.append((self.name, "time", new_tokens))
        return self.seconds * new_tokens

    def end_point(self):
        self.log.append((self.name, "end"))
        return 100.0, "process_peak_rss"


def test_measure_interleaves_the_models_abba():
    from shortened.bench import _measure

    log: list = []
    runners = {"model": _FakeRunner("A", log, 1.0), "baseline": _FakeRunner("B", log, 2.0)}
    points = _measure(runners, batch_sizes=[2], output_lens=[5], prompt_len=4, warmup=1, repeats=4)
    timed = [name for name, what, *_ in log if what == "time"]
    assert timed == ["A", "A", "B", "B", "B", "B", "A", "A", "A", "A", "B", "B", "B", "B", "A", "A"]
    assert log[:2] == [("A", "start", 2, 5), ("B", "start", 2, 5)] and log[-2:] == [("A", "end"), ("B", "end")]
    a, b = points["model"][0], points["baseline"][0]
    assert a.latency_s.runs == [5.0] * 4 and b.prefill_s.runs == [2.0] * 4
    assert b.throughput_tok_s / a.throughput_tok_s == pytest.approx(0.5)


@pytest.mark.parametrize("interleave", [False, True], ids=["sequential", "interleaved"])
def test_run_benchmark_in_process_loads_and_times_in_order(dense_and_pruned, monkeypatch, interleave):
    """Sequential: one model is loaded, timed and let go before the other is loaded (both need not fit in
    memory); interleaved: both are loaded, then their runs alternate. The ratios are those of the raw points."""
    import shortened.bench as bench

    dense, pruned = dense_and_pruned
    log = []

    class Logged(bench._LocalRunner):
        def __init__(self, spec, *args):
            self.role = "model" if spec == str(pruned) else "baseline"
            log.append(("load", self.role))
            super().__init__(spec, *args)

        def time(self, new_tokens):
            log.append(("time", self.role))
            return super().time(new_tokens)

        def close(self):
            log.append(("close", self.role))

    monkeypatch.setattr(bench, "_LocalRunner", Logged)
    result = bench.run_benchmark(str(pruned), str(dense), isolate=False, interleave=interleave, batch_sizes=[1],
                                 output_lens=[3], prompt_len=4, repeats=2)
    loads = [entry for entry in log if entry[0] != "time"]
    timed = [role for what, role in log if what == "time"]
    if interleave:
        assert loads == [("load", "model"), ("load", "baseline"), ("close", "model"), ("close", "baseline")]
        assert timed == ["model"] * 2 + ["baseline"] * 4 + ["model"] * 2  # prefill + total, ABBA
    else:
        assert log == [("load", "model"), *[("time", "model")] * 4, ("close", "model"),
                       ("load", "baseline"), *[("time", "baseline")] * 4, ("close", "baseline")]
    assert result["settings"]["interleave"] is interleave
    assert result["models"]["model"]["num_blocks"] == N_LAYERS - 3
    (point,), (base,) = result["models"]["model"]["points"], result["models"]["baseline"]["points"]
    assert result["ratios"][0]["throughput_ratio"] == pytest.approx(point["throughput_tok_s"] / base["throughput_tok_s"])


def test_run_benchmark_child_errors_reach_the_caller(tmp_path):
    from shortened.bench import run_benchmark
    from shortened.errors import ShortenedError

    with pytest.raises(ShortenedError, match="does not exist"):
        run_benchmark(str(tmp_path / "missing"), batch_sizes=[1], output_lens=[2], repeats=1)
