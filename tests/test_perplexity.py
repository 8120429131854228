"""Perplexity: the paper's protocol against an independent straightforward loop, and the text loaders."""

from __future__ import annotations

import pytest
import torch

from eval_data import PTB_LINES, WIKI_LINES, reference_perplexity, tiny_llama_for_tokenizer
from shortened.errors import ShortenedError
import shortened.evaluation.perplexity as ppl_mod
from shortened.evaluation.perplexity import load_ppl_text, perplexity, perplexity_on, tokenize_text
from shortened.evaluation.sources import ptb_rows, wikitext_rows
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


TEXT = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hills, where the grass was thin but dry. In the village the "
    "baker kept his ovens burning, because people would need bread whatever the weather did. "
) * 8


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama_for_tokenizer(seed=3)


@pytest.fixture(scope="module")
def data_dir(eval_data_dir):
    return eval_data_dir


@pytest.mark.parametrize("batch_size", [1, 8])
def test_matches_reference_loop(tiny, tokenizer, batch_size):
    ids = tokenize_text(tokenizer, TEXT)
    assert ids.numel() >= 11 * 32  # several batches, the last one partial
    got = perplexity(tiny, ids, seq_len=32, batch_size=batch_size, progress=False)
    want = reference_perplexity(tiny, ids, 32)
    assert got == pytest.approx(want, rel=1e-5)


def test_batch_size_does_not_change_result(tiny, tokenizer):
    ids = tokenize_text(tokenizer, TEXT)
    values = [perplexity(tiny, ids, seq_len=24, batch_size=b, progress=False) for b in (1, 3, 8, 64)]
    assert max(values) == pytest.approx(min(values), rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_bos_on_every_chunk(tiny, tokenizer, batch_size):
    ids = tokenize_text(tokenizer, TEXT)
    got = perplexity(tiny, ids, seq_len=32, batch_size=batch_size, bos_token_id=1, progress=False)
    want = reference_perplexity(tiny, ids, 32, bos_id=1)
    assert got == pytest.approx(want, rel=1e-5)
    # BOS changes what is scored (the first token of each chunk is now predicted)
    assert got != pytest.approx(perplexity(tiny, ids, seq_len=32, progress=False), rel=1e-6)


def test_limit_and_remainder(tiny, tokenizer):
    ids = tokenize_text(tokenizer, TEXT)
    first3 = perplexity(tiny, ids, seq_len=32, limit=3, progress=False)
    assert first3 == pytest.approx(reference_perplexity(tiny, ids[:96], 32), rel=1e-5)
    # a remainder shorter than one chunk is dropped
    n = (ids.numel() // 32) * 32
    assert perplexity(tiny, ids[:n], seq_len=32, progress=False) == pytest.approx(
        perplexity(tiny, ids[:n + 31], seq_len=32, progress=False), rel=1e-7)


def test_other_architecture_without_tokenizer():
    # any causal LM works (GPT-2 here), on token ids alone
    model = tiny_model("gpt2")
    ids = torch.randint(3, 97, (200,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids, seq_len=16, batch_size=5, progress=False) == pytest.approx(
        reference_perplexity(model, ids, 16), rel=1e-5)


def test_bad_inputs(tiny):
    ids = torch.arange(3, 50)
    with pytest.raises(ShortenedError, match="fewer than one chunk"):
        perplexity(tiny, ids, seq_len=128, progress=False)
    with pytest.raises(ShortenedError, match="1-D"):
        perplexity(tiny, ids.view(1, -1), seq_len=8, progress=False)
    with pytest.raises(ShortenedError, match="seq_len"):
        perplexity(tiny, ids, seq_len=1, progress=False)
    with pytest.raises(ShortenedError, match="limit"):
        perplexity(tiny, ids, seq_len=8, limit=0, progress=False)
    with pytest.raises(ShortenedError, match="batch size"):
        perplexity(tiny, ids, seq_len=8, batch_size=0, progress=False)


# --------------------------------------------------------------------------------------------- texts


def test_wikitext_rows_follow_the_hf_rule():
    raw = "\n".join(WIKI_LINES) + "\n"
    rows = wikitext_rows(raw)
    assert len(rows) == len(WIKI_LINES)
    for line, row in zip(WIKI_LINES, rows):
        assert row == ("" if not line.strip() else line + "\n")
    # a Unicode line separator inside a line must not split it
    assert wikitext_rows(" a\u2028b \n") == [" a\u2028b \n"]


def test_ptb_rows_are_stripped_sentences():
    assert ptb_rows("\n".join(PTB_LINES) + "\n") == [s.strip() for s in PTB_LINES]


def test_load_ppl_text_local_layout(data_dir, tmp_path):
    wiki = load_ppl_text("wikitext2", data_dir)
    assert wiki == "\n\n".join("" if not l.strip() else l + "\n" for l in WIKI_LINES)
    assert load_ppl_text("ptb", data_dir) == "\n\n".join(s.strip() for s in PTB_LINES)
    own = tmp_path / "notes.txt"
    own.write_text("some text of my own\n", encoding="utf-8")
    assert load_ppl_text(str(own), None) == "some text of my own\n"


def test_load_ppl_text_errors(tmp_path, monkeypatch):
    with pytest.raises(ShortenedError, match=r"wikitext-2-raw/wiki.test.raw"):
        load_ppl_text("wikitext2", tmp_path)
    with pytest.raises(ShortenedError, match="unknown perplexity set 'nope'"):
        load_ppl_text("nope", None)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ShortenedError, match="not UTF-8"):
        load_ppl_text(str(bad), None)

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ShortenedError, match=r"ptb.*Hub.*ptb/ptb.valid.txt"):
        load_ppl_text("ptb", None)


def test_perplexity_on_record(tiny, tokenizer, data_dir):
    out = perplexity_on(tiny, tokenizer, "wikitext2", data_dir=data_dir, seq_len=16, batch_size=4)
    ids = tokenize_text(tokenizer, load_ppl_text("wikitext2", data_dir))
    assert out["n_chunks"] == ids.numel() // 16
    assert out["n_tokens"] == out["n_chunks"] * 15
    assert out["value"] == pytest.approx(reference_perplexity(tiny, ids, 16), rel=1e-5)
    assert out["settings"]["seq_len"] == 16 and out["settings"]["bos"] is False
    with_bos = perplexity_on(tiny, tokenizer, "ptb", data_dir=data_dir, seq_len=16, bos=True, limit=2)
    assert with_bos["n_chunks"] == 2 and with_bos["n_tokens"] == 32
    assert with_bos["settings"]["bos_token_id"] == tokenizer.bos_token_id


def test_input_device_is_the_input_embeddings():
    """Under a device map the inputs go where the input embedding is, not where the model's first or last
    weights are (the meta device stands for a second device)."""
    model = tiny_model("llama")
    model.get_input_embeddings().to("meta")
    assert ppl_mod.input_device(model) == torch.device("meta")
    assert model.lm_head.weight.device == torch.device("cpu")  # the rest stayed
    model = tiny_model("llama")
    model.register_parameter("first", torch.nn.Parameter(torch.zeros(1, device="meta")))
    assert next(model.parameters()).device == torch.device("meta")
    assert ppl_mod.input_device(model) == torch.device("cpu")


def test_shared_data_texts(shared_data):
    rows = wikitext_rows((shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8"))
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert len(ptb_rows((shared_data / "ptb" / "ptb.valid.txt").read_text())) == 3370
    text = load_ppl_text("wikitext2", shared_data)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n")


@pytest.mark.slow
def test_smollm2_matches_reference(smollm2_folder, shared_data):
    from shortened import load_model

    model, tok = load_model(str(smollm2_folder))
    ids = tokenize_text(tok, load_ppl_text("wikitext2", shared_data))
    got1 = perplexity(model, ids, seq_len=64, batch_size=1, limit=3, progress=False)
    got3 = perplexity(model, ids, seq_len=64, batch_size=3, limit=3, progress=False)
    want = reference_perplexity(model, ids, 64, limit=3)
    assert got1 == pytest.approx(want, rel=1e-5) and got3 == pytest.approx(want, rel=1e-5)
    assert 5 < want < 200  # a trained model, not noise (random would be ~ vocab size)
