"""``shortened eval``: results file, table, --compare, and one-line errors with nothing half-written."""

from __future__ import annotations

import json

import pytest

from eval_data import reference_perplexity, tiny_llama_for_tokenizer
from shortened import cli
from shortened.evaluation import evaluate
from shortened.evaluation.perplexity import load_ppl_text, tokenize_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def eval_registered(monkeypatch):
    # Until the command is listed in cli.COMMANDS, register it for these tests.
    if "eval" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "eval"))
    monkeypatch.delenv("SHORTENED_DATA", raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama_for_tokenizer(seed=2).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(eval_data_dir):
    return eval_data_dir


def _eval(*argv: str) -> int:
    return cli.main(["eval", *argv, "--no-progress"])


def test_eval_writes_results_and_table(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _eval(str(model_dir), "--data-dir", str(data_dir), "--tasks", "arc_easy,boolq", "--seq-len", "16",
                 "--limit", "2", "--out", str(out), "--name", "tiny") == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["kind"] == "shortened-evaluation" and res["name"] == "tiny"
    assert set(res["perplexity"]) == {"wikitext2", "ptb"} and set(res["zeroshot"]) == {"arc_easy", "boolq"}
    assert res["zeroshot"]["arc_easy"]["n_items"] == 2 and res["perplexity"]["ptb"]["n_chunks"] <= 2
    assert res["average"] == pytest.approx((res["zeroshot"]["arc_easy"]["value"] + res["zeroshot"]["boolq"]["value"]) / 2)
    assert res["settings"]["limit"] == 2 and res["settings"]["seq_len"] == 16
    assert {"torch", "transformers", "lm_eval"} <= set(res["versions"])
    # the CLI's perplexity is that of a straightforward loop over the first two chunks
    from shortened import load_model

    model, tok = load_model(str(model_dir))
    ids = tokenize_text(tok, load_ppl_text("wikitext2", data_dir))
    assert res["perplexity"]["wikitext2"]["value"] == pytest.approx(reference_perplexity(model, ids, 16, limit=2),
                                                                    rel=1e-5)
    # the printed table: the paper's column order (BoolQ before ARC-e, whatever --tasks said), the JSON's numbers
    wiki, ptb = res["perplexity"]["wikitext2"]["value"], res["perplexity"]["ptb"]["value"]
    boolq, arc = res["zeroshot"]["boolq"]["value"], res["zeroshot"]["arc_easy"]["value"]
    table, notes = printed.split("\n\n", 1)
    assert table.splitlines() == [
        "| Model | WikiText-2 PPL↓ | PTB PPL↓ | BoolQ (acc) | ARC-e (acc) | Average↑ |",
        "|---|---:|---:|---:|---:|---:|",
        f"| tiny | {wiki:.2f} | {ptb:.2f} | {100 * boolq:.2f} | {100 * arc:.2f} | {50 * (boolq + arc):.2f} |",
    ]
    assert "Partial evaluation: --limit 2" in notes and "fewer than the seven tasks for: *tiny*" in notes


def test_refuses_to_overwrite_and_writes_nothing_on_error(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("keep me")
    assert _eval(str(model_dir), "--data-dir", str(data_dir), "--out", str(out)) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me"
    # a missing task file: one line naming it, and no results file
    empty = tmp_path / "empty-data"
    empty.mkdir()
    fresh = tmp_path / "fresh.json"
    assert _eval(str(model_dir), "--data-dir", str(empty), "--ppl", "none", "--tasks", "piqa",
                 "--out", str(fresh)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "piqa/valid.jsonl" in err
    assert not fresh.exists() and list(tmp_path.glob(".fresh.json*")) == []


@pytest.mark.parametrize("argv, message", [
    (["--ppl", "none", "--tasks", "none"], "nothing to evaluate"),
    (["--tasks", "mmlu", "--ppl", "none"], "unknown task"),
    (["--ppl", "nosuchset"], "unknown perplexity set"),
    (["--limit", "0"], "--limit"),
    (["--data-dir", "/nonexistent/data"], "data folder not found"),
])
def test_bad_options_are_one_line_errors(model_dir, data_dir, capsys, argv, message):
    if "--data-dir" not in argv:
        argv = [*argv, "--data-dir", str(data_dir)]
    assert _eval(str(model_dir), *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("shortened eval: error:")


def test_compare_side_by_side(model_dir, data_dir, tmp_path, capsys):
    from shortened import load_model, remove_blocks

    model, tok = load_model(str(model_dir))
    a = evaluate(model, tok, ppl=["wikitext2"], tasks=["piqa"], data_dir=data_dir, seq_len=16, limit=2,
                 name="dense", progress=False)
    remove_blocks(model, [3, 4, 5])  # a different model for the second row
    b = evaluate(model, tok, ppl=["wikitext2"], tasks=["piqa"], data_dir=data_dir, seq_len=16, limit=2,
                 name="pruned", progress=False)
    from shortened.io import write_json

    write_json(tmp_path / "a.json", a)
    write_json(tmp_path / "b.json", b)
    table_file = tmp_path / "t.md"
    assert cli.main(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                     "--table", str(table_file)]) == 0
    printed = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in printed.splitlines()
            if line.startswith("| ")]
    assert rows == [["Model", "WikiText-2 PPL↓", "PIQA (acc)", "Average↑"]] + [
        [name, f"{r['perplexity']['wikitext2']['value']:.2f}", f"{100 * r['zeroshot']['piqa']['value']:.2f}",
         f"{100 * r['average']:.2f}"] for name, r in (("dense", a), ("pruned", b))]
    assert rows[1][1] != rows[2][1]  # two different models: the rows cannot be swapped unnoticed
    assert table_file.read_text() == printed
    assert "Partial evaluation: --limit 2" in printed


def test_compare_rejects_other_files(tmp_path, capsys):
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"hello": 1}))
    assert cli.main(["eval", "--compare", str(other)]) == 2
    assert "not a results file" in capsys.readouterr().err
    assert cli.main(["eval", "--compare", str(tmp_path / "missing.json")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--help"])
    assert exc.value.code == 0
    assert "shortened eval --compare" in capsys.readouterr().out


def test_compare_flags_rows_evaluated_with_other_settings():
    from shortened.evaluation.tables import markdown_table

    def result(seq_len, limit, dtype):
        return {"name": "m", "settings": {"seq_len": seq_len, "limit": limit, "bos": False},
                "model": {"dtype": dtype}, "perplexity": {"wikitext2": {"value": 40.0}}}

    same = markdown_table([result(128, 5, "float32"), result(128, 5, "float32")], names=["a", "b"])
    assert "Settings differ" not in same and "Partial evaluation: --limit 5" in same
    mixed = markdown_table([result(128, None, "float32"), result(64, 5, "bfloat16")], names=["a", "b"])
    assert "seq_len: 128 (*a*), 64 (*b*)" in mixed and "dtype: float32 (*a*), bfloat16 (*b*)" in mixed
    assert "full (*a*), --limit 5 (*b*)" in mixed
