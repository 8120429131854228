"""The info and prune commands, including every bad input the foundation issue lists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortened.cli import main
from shortened.io import save_model
from tiny_models import N_LAYERS, tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    save_model(tiny_model("llama"), None, folder)
    return folder


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_info_reports_blocks_and_parameters(tiny_folder, capsys):
    code, out, _ = run_cli(capsys, "info", str(tiny_folder), "--json")
    assert code == 0
    info = json.loads(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    assert info["num_blocks"] == N_LAYERS
    assert info["block_params"] == [sum(p.numel() for p in b.parameters()) for b in model.model.layers]
    assert info["total_params"] == sum(p.numel() for p in model.parameters())


def test_prune_writes_a_plain_model(tiny_folder, tmp_path, capsys):
    out = tmp_path / "p"
    code, stdout, _ = run_cli(capsys, "prune", str(tiny_folder), "--blocks", "1,3-4", "--out", str(out))
    assert code == 0 and "removed blocks [1, 3, 4]" in stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == N_LAYERS - 3 and len(model.model.layers) == N_LAYERS - 3
    record = json.loads((out / "pruning.json").read_text())
    assert record["source"] == str(tiny_folder)
    assert record["removed_blocks"] == [1, 3, 4] and record["kept_blocks"] == [0, 2, 5]
    assert {"torch", "transformers", "shortened"} <= set(record["versions"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    # --overwrite replaces the folder completely and atomically
    code, _, _ = run_cli(capsys, "prune", str(tiny_folder), "--blocks", "5", "--out", str(out), "--overwrite")
    assert code == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == N_LAYERS - 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("offload", [None, "disk"])
def test_pruning_a_pruned_model_records_original_indices(offload, tiny_folder, tmp_path, capsys):
    """--blocks counts the input's present blocks; pruning.json stays against the original model (its
    source, its block indices), so later healing takes the original as teacher and the chain is kept."""
    first, second = tmp_path / "p1", tmp_path / "p2"
    assert run_cli(capsys, "prune", str(tiny_folder), "--blocks", "1,3", "--out", str(first))[0] == 0
    more = ["--offload", offload] if offload else []
    code, stdout, _ = run_cli(capsys, "prune", str(first), "--blocks", "2", *more, "--out", str(second))
    assert code == 0 and "removed blocks [2] of 4" in stdout and "[1, 3, 4] removed" in stdout, stdout
    record = json.loads((second / "pruning.json").read_text())
    assert record["source"] == str(tiny_folder) and record["original_num_blocks"] == N_LAYERS
    assert record["removed_blocks"] == [1, 3, 4] and record["kept_blocks"] == [0, 2, 5]
    assert record["previous"]["model"] == str(first) and record["previous"]["removed_blocks"] == [1, 3]
    original = AutoModelForCausalLM.from_pretrained(tiny_folder)
    pruned = AutoModelForCausalLM.from_pretrained(second)
    for new, old in enumerate(record["kept_blocks"]):
        for (name, a), (_, b) in zip(pruned.model.layers[new].named_parameters(),
                                     original.model.layers[old].named_parameters()):
            assert torch.equal(a, b), (new, old, name)


def _corrupt_copy(src: Path, dst: Path, how: str) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" * 64)
    return dst


@pytest.mark.parametrize(
    "case, message",
    [
        ("out_of_range", "out of range"),
        ("negative", "out of range"),
        ("duplicate", "duplicate"),
        ("all_blocks", "cannot remove all"),
        ("bad_list", "cannot read block indices"),
        ("missing_path", "does not exist"),
        ("not_a_model", "no config.json"),
        ("truncated", "corrupt or truncated"),
        ("garbage", "corrupt or truncated"),
        ("existing_out", "already exists"),
    ],
)
def test_prune_bad_input_one_line_error_nothing_written(case, message, tiny_folder, tmp_path, capsys):
    model, blocks = str(tiny_folder), "1"
    out = tmp_path / "out"
    if case == "out_of_range":
        blocks = str(N_LAYERS)
    elif case == "negative":
        blocks = "-1"
    elif case == "duplicate":
        blocks = "2,2"
    elif case == "all_blocks":
        blocks = f"0-{N_LAYERS - 1}"
    elif case == "bad_list":
        blocks = "two"
    elif case == "missing_path":
        model = str(tmp_path / "nowhere" / "model")
    elif case == "not_a_model":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case in ("truncated", "garbage"):
        model = str(_corrupt_copy(tiny_folder, tmp_path / "bad", case))
    elif case == "existing_out":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    before = sorted(p.name for p in tmp_path.iterdir())

    code, stdout, stderr = run_cli(capsys, "prune", model, "--blocks", blocks, "--out", str(out))

    assert code == 2
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("shortened prune: error: ") and message in errors[0], stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"
    if case == "existing_out":
        assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("argv, message", [
    (["info", "{model}", "--device", "bogus"], "unknown device 'bogus'"),
    (["info", "{model}", "--device", "cuda:99"], "--device cuda:99"),
    (["prune", "{model}", "--scores", "{model}", "--num-blocks", "1", "--out", "{tmp}/p"], "is a folder, not a JSON file"),
    (["eval", "--compare", "{model}"], "is a folder, not a JSON file"),
    (["score", "{model}", "--criterion", "magnitude", "--batch-size", "0", "--out", "{tmp}/s.json"],
     "--batch-size must be at least 1"),
    (["generate", "{model}", "--prompt", "Hi", "--sample", "--temperature", "0"], "--temperature must be positive"),
    (["generate", "{model}", "--prompt", "Hi", "--sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", "{model}", "--prompt", "Hi", "--temperature", "0.2"], "add --sample"),
    (["generate", "{model}", "--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "{model}", "--prompt", "Hi", "--compare", "{tmp}/nowhere/model"], "does not exist"),
    (["bench", "{model}", "--output-lens", "9000", "--prompt-len", "4", "--out", "{tmp}/b.json"],
     "more than the model's limit"),
    (["prune", "{model}", "--blocks", "3", "--calib", "self", "--out", "{tmp}/p"], "--calib chooses blocks by score"),
    (["prune", "{model}", "--blocks", "3", "--n-samples", "4", "--out", "{tmp}/p"], "--n-samples chooses blocks"),
    (["prune", "{model}", "--blocks", "3", "--generations", "3", "--out", "{tmp}/p"], "--generations chooses blocks"),
    (["prune", "{model}", "--scores", "{tmp}/s.json", "--num-blocks", "1", "--seq-len", "64", "--out", "{tmp}/p"],
     "--seq-len is not used with --scores"),
    (["heal", "{model}", "--method", "lora", "--bridge-width", "3", "--data", "alpaca", "--out", "{tmp}/h"],
     "--bridge-width applies to --method reconstruct"),
    (["heal", "{model}", "--method", "reconstruct", "--lora-r", "4", "--data", "alpaca", "--out", "{tmp}/h"],
     "--lora-r applies to --method lora"),
    (["heal", "{model}", "--method", "full", "--teacher", "{model}", "--data", "alpaca", "--out", "{tmp}/h"],
     "--teacher applies to methods"),
    (["run", "{model}", "--heal", "none", "--heal-steps", "5", "--out", "{tmp}/r"], "--heal none turns it off"),
])
def test_more_mistakes_are_one_line_errors(argv, message, tiny_folder, tmp_path, capsys):
    """Each fails before any model is loaded or any text generated, with one line and status 2."""
    argv = [a.replace("{model}", str(tiny_folder)).replace("{tmp}", str(tmp_path)) for a in argv]
    code, stdout, stderr = run_cli(capsys, *argv)
    assert code == 2 and message in stderr and "Traceback" not in stderr, stderr
    assert stdout == "" and not list(tmp_path.iterdir()), "something was generated or written"


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("shortened")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run([str(exe), "info", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("shortened info: error: model path does not exist")


@pytest.mark.parametrize("command", ["info", "prune"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_unknown_alias_package_message(monkeypatch):
    from shortened import loading
    from shortened.errors import ShortenedError

    monkeypatch.setitem(loading.ALIASES, "nothing-here", ("no_such_package_xyz", "m.gguf", "pip install no-such"))
    with pytest.raises(ShortenedError, match="pip install no-such"):
        loading.load_model("nothing-here")


def test_outputs_have_ordinary_permissions(tiny_folder, tmp_path, capsys):
    import os
    import stat

    out = tmp_path / "p"
    assert main(["prune", str(tiny_folder), "--blocks", "2", "--out", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
