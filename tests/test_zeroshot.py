"""Zero-shot tasks through lm-evaluation-harness, offline: the harness's run agrees with scoring by hand."""

from __future__ import annotations

import pytest

from eval_data import hand_items, score_by_hand, tiny_llama_for_tokenizer
from shortened.errors import ShortenedError
from shortened.evaluation import harness
from shortened.evaluation.sources import TASKS, task_records
from shortened.evaluation.zeroshot import PAPER_METRICS, build_task, make_lm, run_task, run_tasks

pytestmark = pytest.mark.usefixtures("one_thread")


EXPECTED_COUNTS = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                   "arc_challenge": 1172, "openbookqa": 500}

# The paper's metric for each task, in its table's column order (Kim et al. 2024, as the README states),
# written out here rather than read from the code under test.
PAPER = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
         "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama_for_tokenizer(seed=1)


@pytest.fixture(scope="module")
def data_dir(eval_data_dir):
    return eval_data_dir


@pytest.fixture(scope="module")
def tiny_lm(tiny, tokenizer):
    return make_lm(tiny, tokenizer, batch_size=4)


def _check_against_hand(model, tokenizer, lm, task, folder, n):
    got = run_task(lm, task, data_dir=folder, limit=n, log_samples=True)
    items = hand_items(task, folder, n)
    want = score_by_hand(model, tokenizer, items)
    samples = sorted(got["samples"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(n))
    for i, (sample, item) in enumerate(zip(samples, items)):
        # same prompts and continuations as written by hand from the raw files
        assert [tuple(a) for a in sample["arguments"]] == item["pairs"], f"item {i}"
        lls = [r[0] for r in sample["filtered_resps"]]
        assert lls == pytest.approx(want["lls"][i], rel=1e-4, abs=1e-4)
        assert max(range(len(lls)), key=lls.__getitem__) == want["preds"][i]
    assert got["n_items"] == n
    assert got["metrics"]["acc"] == pytest.approx(want["acc"])
    if "acc_norm" in got["metrics"]:
        assert got["metrics"]["acc_norm"] == pytest.approx(want["acc_norm"])
    assert got["metric"] == PAPER[task]
    assert got["value"] == got["metrics"][PAPER[task]]
    return got


@pytest.mark.parametrize("task", list(PAPER))
def test_harness_matches_hand_scoring_small_files(tiny, tokenizer, tiny_lm, data_dir, task):
    got = _check_against_hand(tiny, tokenizer, tiny_lm, task, data_dir, 3)
    assert got["n_total"] == 3 and got["source"] == "local"


@pytest.mark.parametrize("task", list(PAPER))
def test_harness_matches_hand_scoring_real_files(tiny, tokenizer, tiny_lm, shared_data, task):
    _check_against_hand(tiny, tokenizer, tiny_lm, task, shared_data, 5)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["arc_easy", "winogrande"])
def test_smollm2_matches_hand_scoring(smollm2_folder, shared_data, task):
    from shortened import load_model

    model, tok = load_model(str(smollm2_folder))
    _check_against_hand(model, tok, make_lm(model, tok, batch_size=8), task, shared_data, 3)


def test_item_counts_of_shared_data(shared_data):
    for task, count in EXPECTED_COUNTS.items():
        records = task_records(task, shared_data)
        assert len(records) == count, task
    # the harness's own docs view of a local task: gold indices in range for every item
    arc = build_task("arc_challenge", shared_data)
    docs = arc.eval_docs
    assert len(docs) == 1172
    for doc in docs:
        assert 0 <= arc.doc_to_target(doc) < len(arc.doc_to_choice(doc))


def test_records_use_hub_schema(data_dir):
    boolq = task_records("boolq", data_dir)
    assert [r["label"] for r in boolq] == [0, 1, 1]
    hs = task_records("hellaswag", data_dir)[0]
    assert hs["activity_label"] == "Making tea" and hs["label"] == "2" and len(hs["endings"]) == 4
    arc = task_records("arc_challenge", data_dir)[0]
    assert arc["choices"]["label"] == ["1", "2", "3", "4"] and arc["answerKey"] == "2"
    obqa = task_records("openbookqa", data_dir)[0]
    assert obqa["question_stem"].startswith("A magnet")


def test_task_uses_harness_definition(data_dir):
    # prompts, choices, targets and metrics come from the harness's YAML, not from us
    task = build_task("piqa", data_dir)
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == "Question: How do I keep bread fresh longer?\nAnswer:"
    assert task.doc_to_choice(doc)[0] == "Store it in a sealed bag in a cool place."
    assert set(task._metric_fn_list) == {"acc", "acc_norm"}
    assert task.config.dataset_path == "baber/piqa"  # the harness's own config, dataset swapped


def test_missing_file_is_named(tiny, tokenizer, data_dir, tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text((data_dir / "piqa" / "valid.jsonl").read_text())
    with pytest.raises(ShortenedError, match=r"task 'piqa' needs .*piqa/valid-labels.lst"):
        run_tasks(tiny, tokenizer, ["piqa"], data_dir=tmp_path, progress=False)
    with pytest.raises(ShortenedError, match=r"task 'boolq' needs .*boolq/val.jsonl"):
        build_task("boolq", tmp_path)


def test_unknown_task_and_bad_limit(tiny, tokenizer, tiny_lm, data_dir):
    with pytest.raises(ShortenedError, match="unknown task"):
        run_tasks(tiny, tokenizer, ["mmlu"], data_dir=data_dir, progress=False)
    with pytest.raises(ShortenedError, match="limit"):
        run_task(tiny_lm, "boolq", data_dir=data_dir, limit=0)


def test_malformed_file_is_one_line_error(tmp_path):
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text("just one line\n")
    with pytest.raises(ShortenedError, match="multiple of 6"):
        task_records("hellaswag", tmp_path)
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "val.jsonl").write_text("{not json\n")
    with pytest.raises(ShortenedError, match="cannot read"):
        task_records("boolq", tmp_path)


def test_hub_unreachable_names_local_files(monkeypatch):
    class Offline:
        def load(self, names):
            raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(harness, "task_manager", lambda: Offline())
    with pytest.raises(ShortenedError, match=r"task 'boolq'.*Hub.*--data-dir.*boolq/val.jsonl"):
        build_task("boolq", None)


def test_the_seven_tasks_with_the_papers_metrics_and_a_local_layout():
    assert list(PAPER_METRICS.items()) == list(PAPER.items())  # the columns' order too
    assert set(TASKS) == set(PAPER)


def test_no_progress_hides_the_harness_bars_too(tiny, tokenizer, data_dir, capfd):
    """progress=False: neither our bars nor the harness's (request building, loglikelihood) are drawn,
    and the harness's module is left as it was."""
    import lm_eval.api.task as harness_task

    original = harness_task.tqdm
    results = run_tasks(tiny, tokenizer, ["piqa", "boolq"], data_dir=data_dir, limit=2, progress=False)
    assert set(results) == {"piqa", "boolq"} and harness_task.tqdm is original
    assert "it/s" not in capfd.readouterr().err
    run_tasks(tiny, tokenizer, ["piqa"], data_dir=data_dir, limit=2, progress=True)
    assert "it/s" in capfd.readouterr().err  # the check above can see a bar


def test_bos_is_put_before_prompts_even_where_the_tokenizer_adds_none(tiny, tokenizer):
    """--bos: HFLM encodes with add_special_tokens=True, which SmolLM2's tokenizer ignores; a copy set to add
    BOS is used (as lm-eval's vLLM backend loads its own), and the caller's tokenizer is left as it was."""
    plain = make_lm(tiny, tokenizer).tok_encode("Hello world")
    with_bos = make_lm(tiny, tokenizer, add_bos_token=True).tok_encode("Hello world")
    assert with_bos == [tokenizer.bos_token_id, *plain]
    assert tokenizer.encode("Hello world", add_special_tokens=True) == plain
