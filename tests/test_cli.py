"""The info and prune commands, including every bad input the foundation issue lists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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
