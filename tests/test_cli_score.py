"""``shortened score`` and ``shortened prune`` with criteria, end to end on a saved tiny model."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from shortened import get_blocks, load_model
from shortened.commands import info, prune, score
from shortened.criteria import score_blocks
from shortened.data import calibration_ids
from shortened.errors import ShortenedError
from shortened.selection import iterative_select, select_blocks
from tiny_models import N_LAYERS, VOCAB, tiny_model


def run_cli(argv: list[str]) -> int:
    """What shortened.cli.main does, with the score command registered."""
    parser = argparse.ArgumentParser(prog="shortened")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (info, score, prune):
        module.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ShortenedError as exc:
        print(f"shortened {args.command}: error: {exc}")
        return 2


WORDS = [f"w{i}" for i in range(VOCAB - 1)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny llama saved with a word-level tokenizer whose ids fit its vocabulary."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_model("llama")
    model.save_pretrained(out)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out)
    return out


@pytest.fixture
def text(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (400,), generator=g).tolist()))
    return path


def test_score_writes_json_csv_png_equal_to_the_api(folder, text, tmp_path):
    out = tmp_path / "s" / "ppl.json"
    rc = run_cli(["score", str(folder), "--criterion", "ppl", "--calib", str(text), "--n-samples", "3",
                  "--seq-len", "16", "--seed", "7", "--out", str(out), "--no-progress"])
    assert rc == 0
    record = json.loads(out.read_text())
    model, tok = load_model(str(folder))
    ids = calibration_ids(str(text), tok, n_samples=3, seq_len=16, seed=7)
    expected = score_blocks(model, ids, "ppl", progress=False).scores
    assert record["scores"] == expected and record["criterion"] == "ppl" and record["num_blocks"] == N_LAYERS
    assert record["calibration"]["seed"] == 7 and record["calibration"]["seq_len"] == 16
    assert record["settings"]["n_samples"] == 3 and "torch" in record["versions"]
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [float(r["score"]) for r in rows] == expected
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # refuses to overwrite, and writes nothing
    out.with_suffix(".csv").unlink()
    rc = run_cli(["score", str(folder), "--criterion", "ppl", "--calib", str(text), "--out", str(out)])
    assert rc == 2 and not out.with_suffix(".csv").exists()


def test_prune_from_scores_file_without_recomputation(folder, tmp_path):
    scores_file = tmp_path / "mag.json"
    assert run_cli(["score", str(folder), "--criterion", "magnitude", "--norm", "l2", "--out", str(scores_file),
                    "--no-progress"]) == 0
    record = json.loads(scores_file.read_text())
    # Edit the scores: the prune must follow the file, not recompute.
    record["scores"] = [5.0, 1.0, 4.0, 0.5, 3.0, 6.0]
    scores_file.write_text(json.dumps(record))
    out = tmp_path / "p"
    assert run_cli(["prune", str(folder), "--scores", str(scores_file), "--num-blocks", "2",
                    "--protect-first", "0", "--protect-last", "0", "--out", str(out)]) == 0
    pr = json.loads((out / "pruning.json").read_text())
    assert pr["removed_blocks"] == [1, 3]
    sel = pr["selection"]
    assert sel["criterion"] == "magnitude" and sel["scores"]["scores"] == record["scores"]
    assert sel["scores"]["settings"]["norm"] == "l2" and sel["plan"]["protect_first"] == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert len(get_blocks(reloaded)) == N_LAYERS - 2


def test_prune_by_criterion_and_ratio(folder, text, tmp_path):
    out = tmp_path / "p"
    assert run_cli(["prune", str(folder), "--criterion", "bi", "--calib", str(text), "--n-samples", "2",
                    "--seq-len", "16", "--ratio", "0.34", "--out", str(out), "--no-progress"]) == 0
    pr = json.loads((out / "pruning.json").read_text())
    model, tok = load_model(str(folder))
    s = score_blocks(model, calibration_ids(str(text), tok, n_samples=2, seq_len=16), "bi", progress=False)
    assert pr["removed_blocks"] == select_blocks(s, num_blocks=2).remove  # 0.34 * 6 = 2.04 -> 2
    assert pr["selection"]["calibration"]["source"] == str(text)
    assert pr["selection"]["plan"]["requested"]["ratio"] == 0.34


@pytest.mark.parametrize("extra", [[], ["--iterative"]], ids=["one-shot", "iterative"])
def test_prune_by_criterion_with_the_blocks_on_disk(folder, text, tmp_path, extra):
    """Scored and written one block at a time from the safetensors files: the same model as a normal run."""
    args = ["--criterion", "ppl", "--calib", str(text), "--n-samples", "2", "--seq-len", "16", "--num-blocks", "2",
            "--no-progress", *extra]
    assert run_cli(["prune", str(folder), *args, "--out", str(tmp_path / "plain")]) == 0
    assert run_cli(["prune", str(folder), *args, "--offload", "disk", "--out", str(tmp_path / "disk")]) == 0
    plain, disk = (json.loads((tmp_path / k / "pruning.json").read_text()) for k in ("plain", "disk"))
    assert disk["removed_blocks"] == plain["removed_blocks"]
    assert disk["selection"]["scores"]["scores"] == plain["selection"]["scores"]["scores"]
    assert disk["selection"]["scores"]["settings"]["offload"] == "disk"
    a, _ = load_model(str(tmp_path / "plain"))
    b, tok = load_model(str(tmp_path / "disk"))
    assert tok is not None
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_prune_iterative_and_self_calibration(folder, tmp_path):
    out = tmp_path / "p"
    assert run_cli(["prune", str(folder), "--criterion", "ppl", "--calib", "self", "--n-samples", "2",
                    "--seq-len", "12", "--iterative", "--num-blocks", "2", "--out", str(out), "--no-progress"]) == 0
    pr = json.loads((out / "pruning.json").read_text())
    model, _ = load_model(str(folder))
    ids = calibration_ids("self", None, n_samples=2, seq_len=12, model=model)
    plan, _ = iterative_select(model, ids, "ppl", num_blocks=2, progress=False)
    assert pr["removed_blocks"] == plan.remove
    assert [s["removed"] for s in pr["selection"]["iterative_steps"]] == [s["removed"] for s in plan.steps]
    assert pr["selection"]["calibration"]["kind"] == "self"


def test_prune_explicit_blocks_unchanged(folder, tmp_path):
    assert run_cli(["prune", str(folder), "--blocks", "1-2", "--out", str(tmp_path / "p")]) == 0
    pr = json.loads((tmp_path / "p" / "pruning.json").read_text())
    assert pr["removed_blocks"] == [1, 2] and pr["selection"] == {"method": "explicit"}


@pytest.mark.parametrize("argv, message", [
    (["--criterion", "ppl", "--calib", "TEXT", "--ratio", "1.5"], "ratio must be strictly between 0 and 1"),
    (["--criterion", "ppl", "--calib", "TEXT", "--ratio", "0"], "ratio must be strictly between 0 and 1"),
    (["--criterion", "taylor", "--calib", "TEXT", "--num-blocks", "1"], "only 0 of 6 are unprotected"),
    (["--criterion", "ppl", "--calib", "TEXT", "--num-blocks", "4", "--protect-first", "3"], "only 3 of 6"),
    (["--criterion", "ppl", "--calib", "TEXT", "--seq-len", "1000", "--num-blocks", "1"], "shorter than --seq-len 1000"),
    (["--criterion", "ppl", "--num-blocks", "1"], "needs calibration data"),
    (["--criterion", "ppl", "--calib", "TEXT"], "--num-blocks N or --ratio R"),
    (["--blocks", "1", "--ratio", "0.5"], "cannot be combined with --blocks"),
    (["--criterion", "ppl", "--calib", "TEXT", "--num-blocks", "1", "--norm", "l2"], "applies to the magnitude"),
    (["--scores", "MISSING", "--num-blocks", "1"], "file not found"),
    (["--criterion", "bi", "--calib", "TEXT", "--num-blocks", "1", "--iterative", "--contiguous"], "cannot be combined"),
])
def test_prune_bad_input_one_line_nothing_written(folder, text, tmp_path, capsys, argv, message):
    argv = [str(text) if a == "TEXT" else str(tmp_path / "missing.json") if a == "MISSING" else a for a in argv]
    out = tmp_path / "p"
    assert run_cli(["prune", str(folder), *argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().out.strip().splitlines()[-1]
    assert message in err and err.startswith("shortened prune: error:")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".p")]


def test_empty_calibration_file_and_scores_mismatch(folder, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert run_cli(["score", str(folder), "--criterion", "ppl", "--calib", str(tmp_path / "empty.txt"),
                    "--out", str(tmp_path / "s.json")]) == 2
    assert "is empty" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"criterion": "ppl", "scores": [1.0, 2.0, 3.0]}))
    assert run_cli(["prune", str(folder), "--scores", str(bad), "--num-blocks", "1", "--out", str(tmp_path / "p")]) == 2
    assert "scores 3 blocks but the model has 6" in capsys.readouterr().out


def test_unknown_criterion_and_help(capsys):
    assert run_cli(["score", "x", "--criterion", "nope", "--out", "y.json"]) == 2
    assert capsys.readouterr().out.strip() == (
        "shortened score: error: unknown criterion 'nope': choose one of ppl, taylor, magnitude, bi, angular, random, search")
    with pytest.raises(SystemExit):
        run_cli(["score", "--help"])
    assert "examples:" in capsys.readouterr().out


@pytest.mark.slow
def test_score_and_prune_smollm2_from_gutenberg(smollm2_folder, shared_data, tmp_path):
    scores_file = tmp_path / "ppl.json"
    assert run_cli(["score", str(smollm2_folder), "--criterion", "ppl", "--calib", str(shared_data / "gutenberg"),
                    "--n-samples", "2", "--seq-len", "16", "--out", str(scores_file), "--no-progress"]) == 0
    record = json.loads(scores_file.read_text())
    assert len(record["scores"]) == 30 and len(record["calibration"]["files"]) == 4
    # removing block 0 of a real LM hurts far more than removing a middle block
    assert record["scores"][0] > 2 * min(record["scores"])
    out = tmp_path / "p"
    assert run_cli(["prune", str(smollm2_folder), "--scores", str(scores_file), "--ratio", "0.2", "--out", str(out)]) == 0
    pr = json.loads((out / "pruning.json").read_text())
    assert len(pr["removed_blocks"]) == 6 and pr["num_blocks"] == 24
