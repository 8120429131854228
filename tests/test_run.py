"""`shortened run` end to end on a tiny model: every stage, the model card, resuming, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from shortened.cli import main
from shortened.io import save_model
from eval_data import tiny_llama_for_tokenizer, write_data_dir
from tiny_models import N_LAYERS

@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_tokenizer, tmp_path_factory) -> Path:
    """A tiny random llama with SmolLM2's tokenizer (the real model is not needed)."""
    folder = tmp_path_factory.mktemp("run") / "tiny"
    save_model(tiny_llama_for_tokenizer(), smollm2_tokenizer, folder)
    return folder


def _args(model: Path, out: Path, data: Path) -> list[str]:
    return ["run", str(model), "--recipe", "paper", "--ratio", "0.34", "--n-samples", "2", "--seq-len", "16",
            "--heal", "distill", "--heal-steps", "2", "--heal-batch-size", "2", "--heal-grad-accum", "1",
            "--heal-seq-len", "32", "--data-dir", str(data), "--eval", "wikitext2,ptb,piqa,arc_easy",
            "--eval-limit", "3", "--eval-seq-len", "16", "--bench", "1", "--bench-output-lens", "4", "--bench-repeats", "1",
            "--out", str(out)]


@pytest.mark.slow  # every stage, twice: tens of seconds even on a tiny model
def test_run_end_to_end_then_resume(tiny_with_tokenizer, tmp_path, capsys):
    data = write_data_dir(tmp_path / "data")
    out = tmp_path / "out"
    assert main(_args(tiny_with_tokenizer, out, data)) == 0
    first = capsys.readouterr().out

    stages = out / "stages"
    for stage in ("calibration", "scores", "pruned", "healed", "heal-data", "eval-dense", "eval-pruned",
                  "eval-healed", "bench"):
        assert (stages / stage / "stage.json").is_file(), stage
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    for name in ("README.md", "pruning.json", "config.json", "model.safetensors", "scores.png", "bench.png",
                 "loss.png", "results/bench.json"):
        assert (out / name).is_file(), name

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == N_LAYERS - 2  # round(0.34 * 6) = 2
    record = json.loads((out / "pruning.json").read_text())
    assert len(record["removed_blocks"]) == 2 and record["healing"]["method"] == "distill"
    assert record["selection"]["criterion"] == "ppl"

    card = (out / "README.md").read_text()
    for role in ("dense", "pruned", "healed"):
        r = json.loads((stages / f"eval-{role}" / "results.json").read_text())
        row = next(line for line in card.splitlines() if line.startswith("| ") and
                   f"{r['perplexity']['wikitext2']['value']:.2f}" in line)
        assert f"{r['perplexity']['ptb']['value']:.2f}" in row
        assert f"{100 * r['zeroshot']['piqa']['value']:.2f}" in row
        assert f"{100 * r['average']:.2f}" in row
    bench = json.loads((out / "results" / "bench.json").read_text())
    point = bench["models"]["model"]["points"][0]
    assert f"{point['throughput_tok_s']:.1f}" in card
    assert f"{bench['flop_speedup_bound']:.3f}x" in card
    assert "Shortened LLaMA" in card and "```bibtex" in card
    assert re.search(r"Removed blocks \(original indices\):\*\* " + ", ".join(map(str, record["removed_blocks"])), card)

    assert main(_args(tiny_with_tokenizer, out, data)) == 0
    second = capsys.readouterr().out
    assert "skipped" in second and "running" not in second
    assert second.count("skipped") >= 9
    assert "skipped" not in first
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("case, message", [
    ("ratio0", "ratio must be strictly between 0 and 1"),
    ("ratio1", "ratio must be strictly between 0 and 1"),
    ("inside", "inside the source model folder"),
    ("unwritable", "cannot write"),
])
def test_run_bad_input(case, message, tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    ratio = {"ratio0": "0", "ratio1": "1"}.get(case, "0.3")
    if case == "inside":
        out = tiny_with_tokenizer / "pruned"
    if case == "unwritable":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"  # a folder below a file cannot be made, even by root
    before = sorted(p.name for p in tiny_with_tokenizer.iterdir())
    code = main(["run", str(tiny_with_tokenizer), "--ratio", ratio, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert sorted(p.name for p in tiny_with_tokenizer.iterdir()) == before
    if case.startswith("ratio"):
        assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--eval", "bogus"], "unknown perplexity set 'bogus'"),
    (["--eval", "wikitext2,hellaswg"], "unknown perplexity set 'hellaswg'"),
    (["--eval-limit", "0"], "--eval-limit must be a positive number"),
    (["--heal", "reconstruct", "--heal-data", "{tmp}/missing"], "data path not found"),
    (["--heal", "reconstruct", "--heal-data", "{tmp}/binary.txt"], "is not text"),
    (["--heal", "reconstruct", "--heal-steps", "0"], "--heal-steps must be at least 1"),
    (["--heal", "reconstruct", "--heal-lr", "-1"], "--heal-lr must be positive"),
    (["--calib", "{tmp}/missing"], "calibration source"),
    (["--calib", "{tmp}/binary.txt"], "is not text"),
    (["--calib", "{tmp}/empty.txt"], "is empty"),
    (["--bench", "0"], "batch size must be at least 1"),
    (["--bench-output-lens", "0"], "output length must be at least 1"),
    (["--n-samples", "0"], "--n-samples must be at least 1"),
    (["--device", "bogus"], "unknown device 'bogus'"),
])
def test_run_refuses_late_stage_mistakes_before_any_work(extra, message, tiny_with_tokenizer, tmp_path, capsys):
    """Options only a later stage reads (evaluation, healing, benchmark) fail before the first stage: a typo
    must not surface after hours of scoring and healing, and no output folder is left behind."""
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "empty.txt").write_text("\n")
    out = tmp_path / "out"
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code = main(["run", str(tiny_with_tokenizer), "--criterion", "bi", "--num-blocks", "1", "--heal", "none",
                 *extra, "--out", str(out)])  # a --heal in extra comes later, and wins
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err, captured.err
    assert "Traceback" not in captured.err and "running" not in captured.out
    assert not out.exists()


def test_a_failed_run_keeps_finished_stages_only(tiny_with_tokenizer, tmp_path, capsys, monkeypatch):
    """A run that fails after a stage finished keeps it (the same command resumes), and says so; one that
    fails before any stage finished leaves no folder."""
    from shortened import pipeline

    def broken(self, final):
        raise pipeline.ShortenedError("the benchmark broke")

    monkeypatch.setattr(pipeline.Pipeline, "benchmark", broken)
    out = tmp_path / "out"
    argv = ["run", str(tiny_with_tokenizer), "--criterion", "bi", "--num-blocks", "1", "--heal", "none",
            "--calib", "self", "--n-samples", "2", "--seq-len", "16", "--eval", "none", "--out", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "the benchmark broke" in captured.err and "the same command resumes" in captured.out
    assert (out / "stages" / "pruned" / "stage.json").is_file()

    def broken_early(self):
        raise pipeline.ShortenedError("the scoring broke")

    monkeypatch.setattr(pipeline.Pipeline, "pruned", broken_early)
    fresh = tmp_path / "fresh"
    assert main([*argv[:-1], str(fresh)]) == 2
    assert "the scoring broke" in capsys.readouterr().err and not fresh.exists()


def test_push_to_hub_uploads_the_folder_without_stages(tmp_path, monkeypatch, capsys):
    """The upload itself is the Hub's; what is ours: which folder, which repo, what is left out, and a
    one-line error (naming the finished folder) when the upload fails."""
    import huggingface_hub

    from shortened.commands.run import _push
    from shortened.errors import ShortenedError

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, exist_ok: calls.append(("create", repo, exist_ok)))
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"], kw["ignore_patterns"])))
    _push(tmp_path, "me/model")
    assert calls == [("create", "me/model", True), ("upload", "me/model", str(tmp_path), ["stages/*", ".*"])]
    assert "https://huggingface.co/me/model" in capsys.readouterr().out

    def offline(**kw):
        raise OSError("Network is unreachable\nmore detail")

    monkeypatch.setattr(huggingface_hub, "upload_folder", offline)
    with pytest.raises(ShortenedError, match=f"the run finished in {tmp_path}, but the upload to me/model failed: "
                                             "Network is unreachable$"):
        _push(tmp_path, "me/model")


@pytest.mark.slow  # every stage: tens of seconds even on a tiny model
def test_run_linear_chain_end_to_end(tiny_with_tokenizer, tmp_path):
    """The best recipe's Block Influence with block 0 kept, then the chain linear,reconstruct on text sampled
    from the model (no data folder), and a card that lists both methods and the fitted bridges; --eval
    none skips every evaluation stage."""
    out = tmp_path / "out"
    assert main(["run", str(tiny_with_tokenizer), "--ratio", "0.34", "--n-samples", "2", "--seq-len", "16",
                 "--heal", "linear,reconstruct", "--protect-first", "1", "--heal-steps", "2", "--heal-batch-size", "2", "--heal-seq-len", "16", "--eval", "none",
                 "--bench", "none", "--out", str(out)]) == 0
    assert not [p for p in (out / "stages").iterdir() if p.name.startswith("eval-")]  # --eval none: none run
    record = json.loads((out / "pruning.json").read_text())
    assert record["selection"]["criterion"] == "bi" and 0 not in record["removed_blocks"]
    h = record["healing"]
    assert h["method"] == "linear,reconstruct" and [s["method"] for s in h["stages"]] == ["linear", "reconstruct"]
    assert h["stages"][0]["bridges"] and h["steps_done"] == 2
    assert record["run"]["config"]["recipe"] == "best"
    card = (out / "README.md").read_text()
    assert "`linear,reconstruct`" in card and "1. `linear`: " in card and "2. `reconstruct`: steps 2" in card
    first = h["stages"][0]["bridges"][0]
    assert f"after block {first['end']}: {first['error_removed']:.3f} -> {first['error_bridged']:.3f}" in card


def test_a_changed_dtype_reruns_every_stage_that_loads_the_source(tiny_with_tokenizer, tmp_path, capsys):
    """dtype changes the weights every stage computes with: no stage of the float32 run may be reused."""
    out = tmp_path / "out"
    argv = ["run", str(tiny_with_tokenizer), "--criterion", "bi", "--calib", "self", "--n-samples", "2",
            "--seq-len", "16", "--num-blocks", "1", "--heal", "none", "--eval", "none", "--bench", "none",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "running" not in again and again.count("skipped") >= 3
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    changed = capsys.readouterr().out
    assert "skipped" not in changed, changed
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # saved as the source is
    assert main([*argv, "--dtype", "bfloat16", "--save-dtype", "bfloat16"]) == 0
    rerun = capsys.readouterr().out  # only the saved model depends on --save-dtype
    assert "[scores] finished earlier" in rerun and "[pruned] running" in rerun, rerun
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_rerun_with_fewer_outputs_leaves_nothing_of_the_earlier_model(tiny_with_tokenizer, tmp_path, capsys):
    """The folder is what gets published: a loss plot or results of the earlier, healed model must go."""
    out = tmp_path / "out"
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog."] * 60))
    base = ["run", str(tiny_with_tokenizer), "--criterion", "bi", "--calib", "self", "--n-samples", "2",
            "--seq-len", "16", "--num-blocks", "1", "--bench", "none", "--no-progress", "--out", str(out)]
    argv = [*base, "--eval", str(text), "--eval-limit", "2", "--eval-seq-len", "16"]
    assert main([*argv, "--heal", "full", "--heal-data", str(text), "--heal-steps", "2", "--heal-seq-len", "16",
                 "--heal-batch-size", "2", "--heal-grad-accum", "1"]) == 0
    assert (out / "loss.png").is_file() and len(list((out / "results").glob("eval-*.json"))) == 3
    assert main([*argv, "--heal", "none"]) == 0
    assert not (out / "loss.png").exists()
    assert sorted(p.name for p in (out / "results").iterdir()) == ["eval-original.json", "eval-pruned-one-shot.json"]
    assert main([*base, "--eval", "none", "--heal", "none"]) == 0
    assert not (out / "results").exists()
    recorded = json.loads((out / "pruning.json").read_text())["run"]["config"]["command_line"]
    assert recorded.startswith("shortened run ") and recorded.endswith("--eval none --heal none")
    kept = {p.name for p in out.iterdir()}
    assert {"README.md", "pruning.json", "config.json", "model.safetensors", "scores.png", "stages"} <= kept
    capsys.readouterr()
