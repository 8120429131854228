"""One set of loading options (issue 13): --dtype, --device, --revision, --trust-remote-code (and the GGUF
--cache-dir) reach load_model from every command that loads a model, from run's stages, bench's worker
processes and heal (student and teacher); the flags shared by several commands have one name and default."""

from __future__ import annotations

from pathlib import Path

import pytest

import shortened.loading as loading
from shortened.cli import build_parser, main
from shortened.errors import ShortenedError
from shortened.io import save_model
from tiny_models import tiny_model

OPTIONS = ["--dtype", "float32", "--device", "cpu", "--revision", "r1", "--trust-remote-code",
           "--cache-dir", "CACHE"]
EXPECTED = {"dtype": "float32", "device": "cpu", "revision": "r1", "trust_remote_code": True}


class Stop(ShortenedError):
    """Raised by the recording load_model once it has seen what it needs (the CLI exits with 2)."""


@pytest.fixture
def recorder(monkeypatch):
    """load_model replaced by a recorder; the first ``real`` calls load for real (options the tiny local
    model does not need, such as the revision, are ignored by load_model for a local folder)."""
    calls: list[tuple[str, dict]] = []
    real_load = loading.load_model
    state = {"real": 0}

    def record(spec, **kwargs):
        calls.append((str(spec), kwargs))
        if len(calls) <= state["real"]:
            return real_load(spec, **kwargs)
        raise Stop("stop")

    monkeypatch.setattr(loading, "load_model", record)
    return calls, state


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("opts") / "model"
    save_model(tiny_model("llama"), None, out)
    return out


def _argv(command: str, folder: Path, tmp: Path) -> list[str]:
    text = tmp / "t.txt"
    text.write_text("some words " * 50)
    return {
        "info": ["info", folder],
        "score": ["score", folder, "--criterion", "magnitude", "--out", tmp / "s.json"],
        "prune": ["prune", folder, "--blocks", "1", "--out", tmp / "p"],
        "eval": ["eval", folder, "--ppl", text, "--tasks", "none"],
        "generate": ["generate", folder, "--prompt", "hi"],
        "heal": ["heal", folder, "--method", "full", "--data", text, "--out", tmp / "h"],
        "run": ["run", folder, "--out", tmp / "run"],
    }[command]


@pytest.mark.parametrize("command", ["info", "score", "prune", "eval", "generate", "heal", "run"])
def test_every_command_loads_with_its_options(command, folder, tmp_path, recorder, capsys):
    calls, _ = recorder
    options = [str(tmp_path / "cache") if o == "CACHE" else o for o in OPTIONS]
    code = main([str(a) for a in _argv(command, folder, tmp_path)] + options)
    assert code == 2 and "error: stop" in capsys.readouterr().err
    (spec, kwargs), = calls
    assert spec == str(folder)
    assert {k: kwargs[k] for k in EXPECTED} == EXPECTED, kwargs
    assert kwargs["cache_dir"] == str(tmp_path / "cache")


def test_heal_loads_the_teacher_with_the_same_options(folder, tmp_path, recorder):
    """What ``shortened heal`` passes on (``load=load_options(args)``) loads the student, then the teacher."""
    from shortened.heal import HealingData, heal
    from shortened.heal.data import pack_tokens
    from shortened.loading import LoadOptions

    calls, state = recorder
    state["real"] = 1  # the student loads for real, then the teacher's load is recorded
    teacher = tmp_path / "teacher"
    save_model(tiny_model("llama"), None, teacher)
    # ready token ids: the tiny folder has no tokenizer
    data = HealingData(pack_tokens([list(range(3, 90))] * 4, 16), pack_tokens([list(range(3, 40))], 16))
    with pytest.raises(Stop):
        heal(str(folder), data, "distill", teacher=str(teacher), out=tmp_path / "h",
             load=LoadOptions(dtype="float32", device="cpu", revision="r1", trust_remote_code=True), progress=False)
    assert [spec for spec, _ in calls] == [str(folder), str(teacher)]
    for _, kwargs in calls:
        assert {k: kwargs[k] for k in EXPECTED} == EXPECTED, kwargs


def test_run_keeps_its_options_in_the_pipeline_config(folder, tmp_path, monkeypatch, capsys):
    from shortened import pipeline

    seen = {}

    class Probe(pipeline.Pipeline):
        def run(self):
            seen["load"] = self.c.load
            seen["progress"] = self.c.progress
            raise Stop("stop")

    monkeypatch.setattr(pipeline, "Pipeline", Probe)
    code = main(["run", str(folder), "--out", str(tmp_path / "r"), "--revision", "r1", "--dtype", "float32",
                 "--trust-remote-code", "--no-progress"])
    assert code == 2
    assert seen["load"] == {"dtype": "float32", "device": None, "device_map": None, "cache_dir": None,
                            "revision": "r1", "trust_remote_code": True}
    assert seen["progress"] is False


def test_run_stages_pass_the_options_to_heal_and_bench(folder, tmp_path, monkeypatch, capsys):
    """What run's healing and benchmark stages hand on: heal() gets the options (and loads the student and
    teacher with them, test above), run_benchmark gets them as its worker processes' load_kwargs."""
    import importlib

    import shortened.bench as bench
    import shortened.evaluation as evaluation
    from shortened.loading import LoadOptions

    heal_package = importlib.import_module("shortened.heal")  # the attribute shortened.heal is the function

    seen = {}

    def fake_heal(model, data, method, *, load, **kwargs):
        seen["heal"] = load
        raise Stop("stop")

    def fake_benchmark(model, baseline, *, load_kwargs, **kwargs):
        seen["bench"] = load_kwargs
        raise Stop("stop")

    monkeypatch.setattr(heal_package, "heal", fake_heal)
    monkeypatch.setattr(bench, "run_benchmark", fake_benchmark)
    # the tiny folder has no tokenizer to evaluate with; the evaluations are not what is checked here
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: {"perplexity": {}, "zeroshot": {}})
    text = tmp_path / "t.txt"
    text.write_text("some words " * 50)
    common = ["--criterion", "magnitude", "--num-blocks", "1", "--protect-first", "0", "--protect-last", "0",
              "--dtype", "float32", "--device", "cpu", "--revision", "r1", "--trust-remote-code", "--no-progress"]
    assert main(["run", str(folder), *common, "--heal", "full", "--heal-data", str(text), "--out", str(tmp_path / "h")]) == 2
    assert main(["run", str(folder), *common, "--heal", "none", "--eval", str(text), "--bench", "1",
                 "--out", str(tmp_path / "b")]) == 2
    assert "error: stop" in capsys.readouterr().err
    assert isinstance(seen["heal"], LoadOptions)
    assert {k: getattr(seen["heal"], k) for k in EXPECTED} == EXPECTED
    assert {k: seen["bench"][k] for k in EXPECTED} == EXPECTED


def test_bench_workers_load_with_the_options(folder, tmp_path, monkeypatch, capsys):
    import shortened.bench as bench

    seen = {}

    def fake_benchmark(model, baseline, *, load_kwargs, **kwargs):
        seen.update(load_kwargs)
        raise Stop("stop")

    monkeypatch.setattr(bench, "run_benchmark", fake_benchmark)
    code = main(["bench", str(folder), "--out", str(tmp_path / "b.json"), "--revision", "r1", "--dtype", "float32",
                 "--device", "cpu", "--trust-remote-code"])
    assert code == 2
    assert {k: seen[k] for k in EXPECTED} == EXPECTED
    # what each worker process does with them: it builds the in-process runner from the same dict
    calls = []

    def record(spec, **kwargs):
        calls.append(kwargs)
        raise Stop("stop")

    monkeypatch.setattr(loading, "load_model", record)
    with pytest.raises(Stop):
        bench._LocalRunner(str(folder), dict(seen), None, {}, 8)
    assert {k: calls[0][k] for k in EXPECTED} == EXPECTED


@pytest.mark.parametrize("flag, default", [("--data-dir", None), ("--no-progress", False)])
def test_shared_flags_have_one_name_and_default(flag, default, monkeypatch):
    monkeypatch.delenv("SHORTENED_DATA", raising=False)
    parser = build_parser()
    commands = {"--data-dir": ["eval", "run"], "--no-progress": ["score", "prune", "eval", "heal", "run"]}[flag]
    dest = flag.lstrip("-").replace("-", "_")
    required = {"score": ["--criterion", "ppl", "--out", "x"], "prune": ["--blocks", "1", "--out", "x"],
                "heal": ["--data", "d", "--out", "x"], "run": ["--out", "x"], "eval": []}
    for command in commands:
        args = parser.parse_args([command, "m", *required[command]])
        assert getattr(args, dest) == default, command
    monkeypatch.setenv("SHORTENED_DATA", "/data")
    if flag == "--data-dir":
        assert {build_parser().parse_args([c, "m", *required[c]]).data_dir for c in commands} == {"/data"}
