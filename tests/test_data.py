"""Calibration sources: local files, folders, globs, jsonl, Gutenberg text, self-generated, Hub (offline)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from shortened.data import calibration_data, calibration_ids, read_text, sample_windows
from shortened.errors import ShortenedError
from tiny_models import VOCAB, tiny_model

WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built here (no download): 'w17' -> 17 + 1, unknown -> 0."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def words(start: int, count: int) -> str:
    return " ".join(WORDS[(start + i) % 200] for i in range(count))


def token_ids(start: int, count: int) -> list[int]:
    return [(start + i) % 200 + 1 for i in range(count)]


def is_window_of(row: list[int], docs: list[list[int]]) -> bool:
    s = len(row)
    return any(doc[i:i + s] == row for doc in docs for i in range(len(doc) - s + 1))


def test_txt_file_windows_are_slices_and_seeded(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text(words(0, 300))
    ids = calibration_ids(str(tmp_path / "a.txt"), tokenizer, n_samples=6, seq_len=16, seed=1)
    assert ids.shape == (6, 16) and ids.dtype == torch.long
    doc = token_ids(0, 300)
    assert all(is_window_of(r, [doc]) for r in ids.tolist())
    assert torch.equal(ids, calibration_ids(str(tmp_path / "a.txt"), tokenizer, n_samples=6, seq_len=16, seed=1))
    assert not torch.equal(ids, calibration_ids(str(tmp_path / "a.txt"), tokenizer, n_samples=6, seq_len=16, seed=2))


def test_folder_glob_and_jsonl(tmp_path, tokenizer):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text(words(50, 40))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": words(s, 30), "id": s}) for s in (100, 150))
                                      + "\n\n" + json.dumps({"text": words(0, 5)}) + "\n")
    (tmp_path / "ignored.csv").write_text(words(0, 100))
    docs = [token_ids(50, 40), token_ids(100, 30), token_ids(150, 30)]
    cal = calibration_data(str(tmp_path), tokenizer, n_samples=40, seq_len=20, seed=3)
    rows = cal.ids.tolist()
    assert all(is_window_of(r, docs) for r in rows)
    assert {next(i for i, d in enumerate(docs) if is_window_of(r, [d])) for r in rows} == {0, 1, 2}
    assert cal.info["documents"] == 4 and len(cal.info["files"]) == 2 and cal.info["seed"] == 3
    only_txt = calibration_ids(str(tmp_path / "**" / "*.txt"), tokenizer, n_samples=3, seq_len=20)
    assert all(is_window_of(r, docs[:1]) for r in only_txt.tolist())


def test_gutenberg_style_text_is_cleaned(tmp_path, tokenizer):
    body = words(0, 50).replace(" w10 ", " w10\r\n")
    raw = ("The Project Gutenberg eBook of Test\r\nlicence words\r\n"
           "*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\r\n" + body + " caf\xe9\r\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\r\nmore licence\r\n").encode("cp1252")
    (tmp_path / "pg.txt").write_bytes(raw)
    text = read_text(tmp_path / "pg.txt")
    assert text.startswith("w0 w1") and text.endswith("caf\xe9") and "\r" not in text and "licence" not in text


def test_sample_windows_is_the_paper_rule():
    docs = [[1] * 5, list(range(10, 40)), list(range(100, 120))]
    a = sample_windows(docs, 50, 8, seed=0).tolist()
    assert all(is_window_of(r, docs[1:]) for r in a)
    assert {r[0] // 100 for r in a} == {0, 1}  # both long documents are used


@pytest.mark.parametrize("setup, source, message", [
    (lambda p: (p / "s.txt").write_text(words(0, 5)), "s.txt", "shorter than --seq-len 16: its longest document has 5"),
    (lambda p: (p / "e.txt").write_text(""), "e.txt", "is empty"),
    (lambda p: (p / "e.jsonl").write_text("\n"), "e.jsonl", "is empty"),
    (lambda p: (p / "x.jsonl").write_text('{"txt": "a"}\n'), "x.jsonl", "x.jsonl:1: expected a JSON object"),
    (lambda p: (p / "y.jsonl").write_text('{"text": \n'), "y.jsonl", "y.jsonl:1: not valid JSON"),
    (lambda p: (p / "d").mkdir(), "d", "no .txt or .jsonl files"),
    (lambda p: None, "nothing-*.txt", "not a file, folder or glob"),
])
def test_bad_local_sources(tmp_path, tokenizer, setup, source, message):
    setup(tmp_path)
    with pytest.raises(ShortenedError, match=message):
        calibration_ids(str(tmp_path / source), tokenizer, n_samples=2, seq_len=16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_samples=0), "--n-samples must be an integer >= 1"),
    (dict(seq_len=1), "--seq-len must be an integer >= 2"),
])
def test_bad_sizes(tmp_path, tokenizer, kwargs, message):
    with pytest.raises(ShortenedError, match=message):
        calibration_ids("self", tokenizer, **kwargs)


def test_self_generated_is_seeded_and_from_the_model():
    model = tiny_model("llama")
    a = calibration_ids("self", None, n_samples=3, seq_len=12, seed=5, model=model)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert (a[:, 0] == model.config.bos_token_id).all() and (a >= 0).all() and (a < VOCAB).all()
    assert torch.equal(a, calibration_ids("self", None, n_samples=3, seq_len=12, seed=5, model=model))
    assert not torch.equal(a, calibration_ids("self", None, n_samples=3, seq_len=12, seed=6, model=model))
    with pytest.raises(ShortenedError, match="needs the model"):
        calibration_ids("self", None)


def test_hub_sources_offline_give_a_clear_error(monkeypatch, tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    for source in ("wikitext2", "hf:some/dataset-that-is-not-cached:cfg:validation"):
        with pytest.raises(ShortenedError, match="cannot load Hugging Face dataset.*--calib self"):
            calibration_ids(source, tokenizer, n_samples=2, seq_len=8)
    with pytest.raises(ShortenedError, match="expected hf:NAME"):
        calibration_ids("hf:", tokenizer)


def gutenberg_body_by_hand(path) -> str:
    """A Project Gutenberg book as the README says to read it: cp1252, CRLF, the text between the
    ``*** START OF`` and ``*** END OF`` lines (the end marker may be indented), blank lines at its ends dropped."""
    lines = path.read_bytes().decode("cp1252").replace("\r\n", "\n").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if i > start and line.strip().startswith("*** END OF"))
    body = lines[start + 1:end]
    while not body[-1].strip():
        body.pop()
    return "\n".join(body).strip("\n")


def test_gutenberg_books_with_smollm2_tokenizer(shared_data, smollm2_tokenizer):
    """The four real books: each is read as its body alone (header, markers and licence gone), and every
    calibration window is a stretch of one body, without special tokens (the byte-level BPE decodes exactly)."""
    tok = smollm2_tokenizer
    books = sorted((shared_data / "gutenberg").glob("*.txt"))
    assert len(books) == 4
    bodies = [gutenberg_body_by_hand(book) for book in books]
    for book, body in zip(books, bodies):
        text = read_text(book)
        assert text == body, book.name
        raw = book.read_bytes().decode("cp1252")
        for gone in ("This eBook is for the use of anyone anywhere", "*** START OF", "*** END OF",
                     "FULL PROJECT GUTENBERG LICENSE"):  # header, markers, licence
            assert gone in raw and gone not in text, (book.name, gone)
    cal = calibration_data(str(shared_data / "gutenberg"), tok, n_samples=10, seq_len=128, seed=1234)
    assert cal.ids.shape == (10, 128) and cal.info["files"] == [str(b) for b in books]
    windows = [tok.decode(row) for row in cal.ids.tolist()]
    assert all(any(w in body for body in bodies) for w in windows), windows
    # an explicitly named file is read whatever its suffix
    wiki_file = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    wiki = calibration_ids(str(wiki_file), tok, n_samples=2, seq_len=64)
    assert wiki.shape == (2, 64) and all(tok.decode(row) in wiki_file.read_text(encoding="utf-8") for row in wiki.tolist())
