"""``shortened eval --backend vllm``: the same chunks and tasks scored by vLLM (its own environment, ``make
vllm``) give transformers' perplexity and accuracy.

The comparison is skipped with the reason where vLLM's environment (or the shared data) is absent; the
refusals run everywhere.
"""

from __future__ import annotations

import json

import pytest

from shortened import cli
from shortened.errors import ShortenedError

LIMIT = 10  # chunks per perplexity set and items per task
TASKS = ("arc_easy", "piqa")


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv("SHORTENED_DATA", raising=False)


def _eval(*argv: str) -> int:
    return cli.main(["eval", *argv, "--no-progress"])


@pytest.mark.parametrize("argv, message", [
    (["someone/some-model"], "--backend vllm serves a saved model folder; someone/some-model is not one"),
    (["no/such/folder/here"], "model path does not exist"),
    (["someone/some-model", "--reference", "smollm2-135m"], "--backend vllm cannot honour --reference"),
    (["someone/some-model", "--device", "cpu"], "--backend vllm cannot honour --device"),
    (["someone/some-model", "--dtype", "int8"], "--backend vllm computes in float32, bfloat16, float16"),
])
def test_requests_vllm_cannot_serve_are_refused_in_one_line(argv, message, capsys):
    assert _eval(*argv, "--backend", "vllm", "--ppl", "wikitext2", "--tasks", "none") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_without_vllms_environment_it_says_make_vllm(tmp_path, monkeypatch, capsys, smollm2_tokenizer):
    from eval_data import tiny_llama_for_tokenizer

    folder = tmp_path / "tiny"
    tiny_llama_for_tokenizer(seed=2).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    for name in ("SHORTENED_VLLM_PYTHON", "SHORTENED_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # where `make vllm` puts it: nothing there
    assert _eval(str(folder), "--backend", "vllm", "--ppl", "wikitext2", "--tasks", "none") == 2
    assert "run 'make vllm'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def vllm_with_harness(vllm_python):
    """vLLM's environment, with shortened's lm-eval in it (``make vllm`` installs it): else skipped."""
    from shortened.evaluation.vllm_backend import _check_harness_version

    try:
        _check_harness_version(vllm_python)
    except ShortenedError as exc:
        pytest.skip(str(exc))
    return vllm_python


@pytest.mark.slow
def test_vllm_gives_transformers_perplexity_and_accuracy(vllm_with_harness, smollm2_folder, shared_data,
                                                         tmp_path, capsys):
    """SmolLM2 (a saved folder) evaluated by both backends on the same 10 WikiText-2 chunks and the same 10 items
    of two tasks, in float32 in both."""
    from shortened import load_model
    from shortened.evaluation import evaluate

    folder = smollm2_folder
    model, tokenizer = load_model(str(folder))
    out = tmp_path / "vllm.json"
    assert _eval(str(folder), "--backend", "vllm", "--data-dir", str(shared_data), "--ppl", "wikitext2",
                 "--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    served = json.loads(out.read_text())
    ours = evaluate(model, tokenizer, ppl=["wikitext2"], tasks=list(TASKS), data_dir=shared_data, limit=LIMIT,
                    progress=False)

    assert (served["backend"], ours["backend"]) == ("vllm", "hf")
    assert served["engine"]["name"] == "vllm" and served["engine"]["version"] and served["engine"]["dtype"] == "float32"
    # the same record, key for key, but for what only vLLM's has and what the CLI adds
    assert set(served) - {"engine", "source"} == set(ours)
    assert served["settings"] == ours["settings"]
    assert served["model"] == ours["model"]  # read from the folder's config without its weights

    theirs, mine = served["perplexity"]["wikitext2"], ours["perplexity"]["wikitext2"]
    assert theirs["settings"] == mine["settings"]
    assert (theirs["n_chunks"], theirs["n_tokens"]) == (mine["n_chunks"], mine["n_tokens"]) == (10, 10 * 127)
    rel = abs(theirs["value"] - mine["value"]) / mine["value"]
    print(f"perplexity: transformers {mine['value']:.6f}, vLLM {theirs['value']:.6f}, relative difference {rel:.2e}")
    assert rel < 1e-3

    for task in TASKS:
        a, b = served["zeroshot"][task], ours["zeroshot"][task]
        assert (a["n_items"], a["n_total"], a["source"]) == (b["n_items"], b["n_total"], b["source"])
        assert a["n_items"] == LIMIT
        assert {k: a["metrics"][k] for k in ("acc", "acc_norm")} == {k: b["metrics"][k] for k in ("acc", "acc_norm")}
    assert served["average"] == ours["average"]
    assert "WikiText-2" in printed and "ARC-e" in printed
