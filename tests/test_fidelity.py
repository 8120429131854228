"""KL to the source model (``shortened.evaluation.fidelity``, ``shortened eval --reference``): equal to a
straightforward float64 loop, zero for the model itself, measured on the same chunks as perplexity."""

from __future__ import annotations

import copy
import math
import json

import pytest
import torch

from eval_data import tiny_llama_for_tokenizer
from shortened import cli
from shortened.errors import ShortenedError
from shortened.evaluation import evaluate
from shortened.evaluation.fidelity import fidelity_on, kl_sums
from shortened.evaluation.perplexity import chunk_tokens, perplexity_on, tokenize_text
from shortened.surgery import remove_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("The lamps along the quay were lit one by one, and the boats came in with their sails half furled. "
        "An old man counted the crates as they were carried up the steps, and wrote each number twice. ") * 8


@pytest.fixture(scope="module")
def dense():
    return tiny_llama_for_tokenizer(seed=5).eval()


@pytest.fixture(scope="module")
def pruned(dense):
    model = copy.deepcopy(dense)
    remove_blocks(model, [1])
    return model.eval()


def reference_kl(model, reference, chunks, bos_id=None):
    """One chunk at a time, whole-vocabulary float64 softmaxes, no slicing."""
    kl = nll = ref_nll = 0.0
    n = 0
    with torch.no_grad():
        for chunk in chunks:
            x = chunk[None] if bos_id is None else torch.cat([torch.tensor([[bos_id]]), chunk[None]], 1)
            lq = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
            lp = torch.log_softmax(reference(x).logits[0, :-1].double(), -1)
            kl += float((lp.exp() * (lp - lq)).sum())
            t = x[0, 1:]
            nll -= float(lq[torch.arange(len(t)), t].sum())
            ref_nll -= float(lp[torch.arange(len(t)), t].sum())
            n += len(t)
    return kl / n, nll / n, ref_nll / n


@pytest.mark.parametrize("batch_size,bos", [(1, None), (3, None), (8, 1)])
def test_kl_sums_match_reference_loop(dense, pruned, smollm2_tokenizer, batch_size, bos):
    chunks = chunk_tokens(tokenize_text(smollm2_tokenizer, TEXT), 24)
    assert chunks.shape[0] >= 5
    s = kl_sums(pruned, dense, chunks, bos_token_id=bos, batch_size=batch_size, progress=False)
    kl, nll, ref_nll = reference_kl(pruned, dense, chunks, bos)
    assert s["tokens"] == chunks.shape[0] * (24 if bos is not None else 23)
    assert s["kl"] / s["tokens"] == pytest.approx(kl, rel=1e-9)
    assert s["nll"] / s["tokens"] == pytest.approx(nll, rel=1e-9)
    assert s["reference_nll"] / s["tokens"] == pytest.approx(ref_nll, rel=1e-9)
    assert kl > 1e-5  # removing a block moved the model


def test_model_against_itself_and_perplexity_agree(dense, pruned, smollm2_tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    same = fidelity_on(dense, dense, smollm2_tokenizer, str(path), seq_len=24, progress=False)
    assert same["kl"] == pytest.approx(0, abs=1e-12) and same["ppl"] == same["reference_ppl"]
    r = fidelity_on(pruned, dense, smollm2_tokenizer, str(path), seq_len=24, limit=3, progress=False)
    ppl = perplexity_on(pruned, smollm2_tokenizer, str(path), seq_len=24, limit=3, progress=False)
    dense_ppl = perplexity_on(dense, smollm2_tokenizer, str(path), seq_len=24, limit=3, progress=False)
    assert r["n_chunks"] == ppl["n_chunks"] == 3 and r["n_tokens"] == ppl["n_tokens"]
    assert r["ppl"] == pytest.approx(ppl["value"], rel=1e-12)
    assert r["reference_ppl"] == pytest.approx(dense_ppl["value"], rel=1e-12)
    assert r["settings"] == ppl["settings"]  # an entry with the KL reproduces like a plain perplexity entry


def test_vocabulary_mismatch_is_an_error(dense, smollm2_tokenizer):
    other = copy.deepcopy(dense)
    other.resize_token_embeddings(dense.config.vocab_size + 8)
    chunks = chunk_tokens(tokenize_text(smollm2_tokenizer, TEXT), 24, limit=1)
    with pytest.raises(ShortenedError, match="vocabulary"):
        kl_sums(other, dense, chunks, progress=False)


def test_evaluate_with_reference(dense, pruned, smollm2_tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    plain = evaluate(pruned, smollm2_tokenizer, ppl=[str(path)], tasks=[], seq_len=24, progress=False)
    res = evaluate(pruned, smollm2_tokenizer, ppl=[str(path)], tasks=[], seq_len=24, progress=False, reference=dense)
    entry = res["perplexity"][str(path)]
    assert entry["value"] == pytest.approx(plain["perplexity"][str(path)]["value"], rel=1e-12)
    kl, _, ref_nll = reference_kl(pruned, dense, chunk_tokens(tokenize_text(smollm2_tokenizer, TEXT), 24))
    assert entry["kl_to_reference"] == pytest.approx(kl, rel=1e-9)
    assert entry["reference_value"] == pytest.approx(math.exp(ref_nll), rel=1e-9)
    assert res["settings"]["reference"]["num_blocks"] == dense.config.num_hidden_layers
    assert "kl_to_reference" not in plain["perplexity"][str(path)]


def test_cli_reference(dense, pruned, smollm2_tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SHORTENED_DATA", raising=False)
    folders = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        smollm2_tokenizer.save_pretrained(folders[name])
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "r.json"
    argv = ["eval", str(folders["pruned"]), "--ppl", str(text), "--tasks", "none", "--seq-len", "24",
            "--no-progress", "--out", str(out)]
    assert cli.main([*argv, "--reference", str(folders["dense"])]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    kl, _, _ = reference_kl(pruned, dense, chunk_tokens(tokenize_text(smollm2_tokenizer, TEXT), 24))
    assert res["perplexity"][str(text)]["kl_to_reference"] == pytest.approx(kl, rel=1e-6)
    assert res["reference"] == str(folders["dense"])
    assert "t.txt KL↓" in printed and f"{kl:.4f}" in printed
    # the KL is measured on perplexity sets: asking for none of them is a one-line error, nothing written
    out.unlink()
    assert cli.main(["eval", str(folders["pruned"]), "--ppl", "none", "--tasks", "boolq", "--no-progress",
                     "--out", str(out), "--reference", str(folders["dense"])]) != 0
    assert "--reference" in capsys.readouterr().err and not out.exists()
