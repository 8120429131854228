"""Outputs that are never lost (issue 16), each case through the command line on a tiny random model:
concurrent writers, a target that appears meanwhile, unwritable outputs checked before any work, the
sequence length checked against the model, inputs that are not text, stale stage temporaries, score file
names and modes, and the messages for bad block lists and corrupt GGUF files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from shortened.cli import main
from tiny_models import N_LAYERS, VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [f"w{i}" for i in range(VOCAB - 1)]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny llama (position limit 128) saved with a word-level tokenizer whose ids fit its vocabulary."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama").save_pretrained(out)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w0").save_pretrained(out)
    return out


@pytest.fixture
def text(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (600,), generator=g).tolist()))
    return path


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of ``shortened ARGV``; the error, if any, must be exactly one line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if code == 2:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "Traceback" not in err, err
        return code, errors[0]
    return code, err


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------ 1: appeared meanwhile
def test_prune_refuses_a_target_that_appeared_meanwhile_and_keeps_the_result(folder, tmp_path, capsys, monkeypatch):
    import shortened.surgery as surgery

    out = tmp_path / "p"
    real = surgery.remove_blocks

    def remove_while_someone_writes_out(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(surgery, "remove_blocks", remove_while_someone_writes_out)
    code, err = cli(capsys, "prune", folder, "--blocks", "2", "--out", out)
    assert code == 2 and "appeared while this command ran" in err
    assert listing(out) == ["theirs.txt"], "the other writer's output was touched"
    kept = Path(err.split("the finished result is in ")[1].split(" (")[0])
    assert kept.parent == tmp_path and kept.name.startswith("p.unsaved-")
    saved = AutoModelForCausalLM.from_pretrained(kept / "p")
    assert saved.config.num_hidden_layers == N_LAYERS - 1
    assert json.loads((kept / "p" / "pruning.json").read_text())["removed_blocks"] == [2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporaries or locks left behind"

    # with --overwrite the finished work replaces what appeared
    import shutil

    shutil.rmtree(out)
    shutil.rmtree(kept)
    code, _ = cli(capsys, "prune", folder, "--blocks", "2", "--out", out, "--overwrite")
    assert code == 0 and (out / "pruning.json").is_file() and not (out / "theirs.txt").exists()


def test_score_refuses_files_that_appeared_meanwhile(folder, tmp_path, capsys, monkeypatch):
    import shortened.criteria as criteria

    out = tmp_path / "s.json"
    real = criteria.score_blocks

    def score_while_someone_writes_the_csv(*args, **kwargs):
        (tmp_path / "s.csv").write_text("theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(criteria, "score_blocks", score_while_someone_writes_the_csv)
    code, err = cli(capsys, "score", folder, "--criterion", "magnitude", "--out", out, "--no-progress")
    assert code == 2 and "s.csv appeared while this command ran" in err
    assert not out.exists() and (tmp_path / "s.csv").read_text() == "theirs"
    kept = Path(err.split("the finished result is in ")[1].split(" (")[0])
    assert sorted(p.name for p in kept.iterdir()) == ["s.csv", "s.json", "s.png"]
    assert json.loads((kept / "s.json").read_text())["criterion"] == "magnitude"


# ------------------------------------------------------------------------------------------ 1: one lock per output
HOLD_LOCK = """
import sys
from shortened.io import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _holder(path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_of_the_same_output_fails_at_start(folder, tmp_path, capsys, monkeypatch):
    import shortened.loading as loading

    out = tmp_path / "p"
    holder = _holder(out)
    try:
        monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("work started despite the lock"))
        code, err = cli(capsys, "prune", folder, "--blocks", "2", "--out", out)
        assert code == 2 and f"is being written by process {holder.pid}" in err
    finally:
        holder.communicate("")
    monkeypatch.undo()
    assert not out.exists()
    code, _ = cli(capsys, "prune", folder, "--blocks", "2", "--out", out)
    assert code == 0 and (out / "pruning.json").is_file()


def test_two_prunes_at_once_one_wins_the_other_says_why(folder, tmp_path):
    exe = Path(sys.executable).with_name("shortened")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    out = tmp_path / "p"
    procs = [subprocess.Popen([str(exe), "prune", str(folder), "--blocks", b, "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for b in ("1", "4")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is being written by" in loser or "already exists" in loser, loser
    winner = procs[[code for code, _ in results].index(0)]
    removed = json.loads((out / "pruning.json").read_text())["removed_blocks"]
    assert removed == [1 if winner is procs[0] else 4]


# ------------------------------------------------------------------------------------------ 2: unwritable outputs
def _unwritable(tmp_path: Path, where: str) -> Path:
    if where == "proc":
        return Path("/proc/shortened-test/out")
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "out"  # below a regular file: nothing can be made there, even by root


@pytest.mark.parametrize("where", ["proc", "below-a-file"])
@pytest.mark.parametrize("command", ["score", "eval", "eval-table", "prune", "heal", "bench", "run"])
def test_unwritable_output_is_refused_before_any_work(command, where, folder, text, tmp_path, capsys, monkeypatch):
    import shortened.bench as bench
    import shortened.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("work started"))
    bad = _unwritable(tmp_path, where)
    argv = {
        "score": ["score", folder, "--criterion", "magnitude", "--out", bad / "s.json"],
        "eval": ["eval", folder, "--ppl", text, "--tasks", "none", "--out", bad / "e.json"],
        "eval-table": ["eval", folder, "--ppl", text, "--tasks", "none", "--table", bad / "e.md"],
        "prune": ["prune", folder, "--blocks", "1", "--out", bad],
        "heal": ["heal", folder, "--method", "full", "--data", text, "--out", bad],
        "bench": ["bench", folder, "--out", bad / "b.json"],
        "run": ["run", folder, "--out", bad],
    }[command]
    code, err = cli(capsys, *argv)
    assert code == 2 and "cannot write" in err, err


# ------------------------------------------------------------------------------------------ 3: sequence length
@pytest.mark.parametrize("command", ["score", "prune", "eval", "heal"])
def test_seq_len_beyond_the_position_limit_is_refused(command, folder, text, tmp_path, capsys):
    argv = {
        "score": ["score", folder, "--criterion", "ppl", "--calib", text, "--seq-len", "500",  # the text has 600
                  "--out", tmp_path / "s.json"],
        "prune": ["prune", folder, "--criterion", "ppl", "--calib", "self", "--seq-len", "129", "--num-blocks", "1",
                  "--out", tmp_path / "p"],
        "eval": ["eval", folder, "--ppl", text, "--tasks", "none", "--seq-len", "100000"],
        "heal": ["heal", folder, "--method", "full", "--data", text, "--seq-len", "1000", "--out", tmp_path / "h"],
    }[command]
    code, err = cli(capsys, *argv)
    assert code == 2 and "longer than the model's position limit of 128 tokens" in err, err
    assert "max_position_embeddings" in err
    assert not [p for p in tmp_path.iterdir() if p.name not in ("calib.txt",)], "something was written"


# ------------------------------------------------------------------------------------------ 4: not text
@pytest.mark.parametrize("command", ["score-calib", "score-calib-jsonl", "heal-data", "eval-ppl"])
def test_random_bytes_are_refused_as_text_by_every_command(command, folder, tmp_path, capsys, monkeypatch):
    import shortened.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    junk = tmp_path / ("junk.jsonl" if command.endswith("jsonl") else "junk.txt")
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
                     .numpy().tobytes())
    argv = {
        "score-calib": ["score", folder, "--criterion", "ppl", "--calib", junk, "--seq-len", "8", "--out", tmp_path / "s.json"],
        "score-calib-jsonl": ["score", folder, "--criterion", "bi", "--calib", junk, "--seq-len", "8",
                              "--out", tmp_path / "s.json"],
        "heal-data": ["heal", folder, "--method", "full", "--data", junk, "--seq-len", "16", "--out", tmp_path / "h"],
        "eval-ppl": ["eval", folder, "--ppl", junk, "--tasks", "none", "--out", tmp_path / "e.json"],
    }[command]
    code, err = cli(capsys, *argv)
    assert code == 2 and f"{junk} is not text: it holds NUL bytes" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [junk.name]


@pytest.mark.parametrize("command", ["prune-blocks", "prune-count", "score-search"])
def test_block_requests_beyond_the_config_are_refused_before_loading(command, folder, tmp_path, capsys, monkeypatch):
    import shortened.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    argv, message = {
        "prune-blocks": (["prune", folder, "--blocks", f"1,{N_LAYERS}", "--out", tmp_path / "p"],
                         f"block index {N_LAYERS} is out of range: the model has {N_LAYERS} blocks"),
        "prune-count": (["prune", folder, "--criterion", "magnitude", "--num-blocks", N_LAYERS - 1, "--out", tmp_path / "p"],
                        f"only {N_LAYERS - 6} of {N_LAYERS} are unprotected"),
        "score-search": (["score", folder, "--criterion", "search", "--calib", "self", "--num-blocks", N_LAYERS,
                          "--out", tmp_path / "s.json"], f"cannot remove {N_LAYERS} of {N_LAYERS} blocks"),
    }[command]
    code, err = cli(capsys, *argv)
    assert code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_control_bytes_without_nul_are_not_text_but_cp1252_books_are(tmp_path):
    from shortened.data import read_text
    from shortened.errors import ShortenedError

    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(b for b in range(1, 256) if b not in (10, 13)) * 8)
    with pytest.raises(ShortenedError, match=r"noise.txt is not text: \d+% of its bytes are control characters"):
        read_text(noise)
    book = tmp_path / "book.txt"
    book.write_bytes("caf\xe9 \u2014 na\xefve\r\n".encode("cp1252") * 50)
    assert read_text(book).startswith("caf\xe9 \u2014 na\xefve\n")


# ------------------------------------------------------------------------------------------ 5: stale stage temporaries
def test_run_removes_stale_stage_temporaries_but_not_live_ones(folder, tmp_path, capsys):
    out = tmp_path / "run"
    stale = out / "stages" / ".scores.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "half-written.safetensors").write_bytes(b"x" * 100)
    holder = _holder(out / "stages" / "healed")  # a live process writing that stage...
    live = out / "stages" / ".healed.tmp-live"  # ...into its temporary
    live.mkdir()
    try:
        code, err = cli(capsys, "run", folder, "--criterion", "magnitude", "--num-blocks", "1", "--protect-first", "0",
                        "--protect-last", "0", "--heal", "none", "--eval", "heldout",
                        "--seq-len", "16", "--eval-seq-len", "8", "--bench", "none", "--out", out)
        assert code == 0, err
        assert not stale.exists(), "the stale temporary of a killed stage was kept"
        assert live.is_dir(), "a temporary held by a live lock was removed"
    finally:
        holder.communicate("")
    assert (out / "stages" / "scores" / "stage.json").is_file() and (out / "README.md").is_file()


# ------------------------------------------------------------------------------------------ 6: score file names, modes
def test_score_out_with_dots_keeps_the_name_and_the_file_mode(folder, tmp_path, capsys):
    out = tmp_path / "a.v1.json"
    code, _ = cli(capsys, "score", folder, "--criterion", "magnitude", "--out", out, "--no-progress")
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.v1.csv", "a.v1.json", "a.v1.png"]
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ------------------------------------------------------------------------------------------ 7: messages
@pytest.mark.parametrize("blocks, message", [
    ("5-2", "the range 5-2 in '5-2' is reversed: write 2-5"),
    ("1,,2", "an empty item between commas"),
    ("1,2,", "an empty item between commas"),
])
def test_block_list_messages(blocks, message, folder, tmp_path, capsys):
    code, err = cli(capsys, "prune", folder, "--blocks", blocks, "--out", tmp_path / "p")
    assert code == 2 and message in err, err
    assert not (tmp_path / "p").exists()


def test_gguf_with_valid_magic_and_corrupt_body_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    body = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes()
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2).to_bytes(8, "little") + (5).to_bytes(8, "little") + body)
    cache = tmp_path / "cache"
    for command in (["info"], ["prune", "--blocks", "1", "--out", str(tmp_path / "p")]):
        code, err = cli(capsys, command[0], bad, *command[1:], "--cache-dir", cache)
        assert code == 2 and f"{bad} is not a readable GGUF file (corrupt or truncated" in err, err
        assert "JSON" not in err
    assert not cache.exists() and not (tmp_path / "p").exists()
