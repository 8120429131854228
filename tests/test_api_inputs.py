"""The Python API with the inputs a user plausibly passes: numpy and torch numbers work as plain ones,
mistakes are one clear error before any work, and nothing the caller owns is left changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import shortened as S
from shortened.choose import choose
from shortened.errors import ShortenedError
from shortened.scores import BlockScores
from shortened.selection import blocks_to_remove
from test_heal import char_tokenizer
from tiny_models import N_LAYERS, VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def ids(seq_len: int = 16, n: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ removal


@pytest.mark.parametrize("indices", [[np.int64(1), np.int64(3)], np.array([1, 3]), torch.tensor([3, 1])])
def test_numpy_and_torch_indices_remove_like_ints(indices):
    model = tiny_model("llama")
    assert S.remove_blocks(model, indices) == [0, 2, 4, 5]
    assert model.config.num_hidden_layers == N_LAYERS - 2


@pytest.mark.parametrize("indices", [["1"], [1.0], "12", 3])
def test_indices_that_are_not_integers_are_a_type_error(indices):
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="block indices must be"):
        S.remove_blocks(model, indices)
    assert len(S.get_blocks(model)) == N_LAYERS


def test_a_module_that_is_not_a_hugging_face_model_is_a_type_error():
    with pytest.raises(TypeError, match="expected a Hugging Face causal LM"):
        S.remove_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), [0])


# ------------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize("ratio, total, expected", [(0.29, 50, 15), (0.58, 25, 15), (0.7, 45, 32), (0.82, 75, 62),
                                                    (0.2, 30, 6), (0.25, 6, 2), (0.2, 32, 6)])
def test_ratio_rounds_the_written_decimal_half_up(ratio, total, expected):
    # 0.29 * 50 is 14.499999... in binary floating point; the documented rule applies to 0.29 as written.
    assert blocks_to_remove(total, ratio=ratio) == expected


def test_scores_as_numpy_or_torch_select_like_a_list():
    expected = S.select_blocks([0.3, 0.1, 0.2, 0.5], num_blocks=2).remove
    assert expected == [1, 2]
    assert S.select_blocks(np.array([0.3, 0.1, 0.2, 0.5]), num_blocks=np.int64(2)).remove == expected
    assert S.select_blocks(torch.tensor([0.3, 0.1, 0.2, 0.5]), num_blocks=2).remove == expected
    assert S.select_blocks([np.float32(0.3), 0.1, 0.2, 0.5], num_blocks=2).remove == expected


def test_scores_as_a_mapping_or_text_are_refused():
    with pytest.raises(TypeError, match="list of numbers"):
        S.select_blocks({0: 0.9, 1: 0.1, 2: 0.5}, num_blocks=1)
    with pytest.raises(ShortenedError, match="not a scores file"):
        BlockScores.from_dict({"criterion": "bi", "scores": {"0": 0.1, "1": 0.2}})
    with pytest.raises(ShortenedError, match="not a scores file"):
        BlockScores.from_dict({"criterion": "bi", "scores": [0.1, 0.2], "settings": [1]})
    with pytest.raises(ShortenedError, match="ratio must be a number"):
        S.select_blocks([0.1, 0.2, 0.3], ratio="0.2")


def test_removed_blocks_do_not_count_towards_what_may_be_removed():
    scores = [0.1, None, 0.2, 0.3, None, 0.5]
    assert S.select_blocks(scores, num_blocks=3).remove == [0, 2, 3]
    with pytest.raises(ShortenedError, match="4 of the 6 are present"):
        S.select_blocks(scores, num_blocks=4)


def test_choose_refuses_scores_of_another_criterion():
    model = tiny_model("llama")
    bi = S.score_blocks(model, ids(), "bi", progress=False)
    assert choose(model, None, None, scores=bi, num_blocks=1)["criterion"] == "bi"
    with pytest.raises(ShortenedError, match="the given scores are bi's, not ppl's"):
        choose(model, ids(), "ppl", scores=bi, num_blocks=1)


# ------------------------------------------------------------------------------------------ scoring


def test_calibration_beyond_the_position_limit_is_refused_before_scoring():
    model = tiny_model("gpt2")  # n_positions 128: longer ids would index past the position embedding
    with pytest.raises(ShortenedError, match="calibration length 200 is longer than the model's position limit"):
        S.score_blocks(model, ids(200), "bi", progress=False)


def test_a_model_in_train_mode_is_scored_without_dropout_and_left_in_train_mode():
    model = tiny_model("gpt2")
    model.config.resid_pdrop = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    with torch.no_grad():  # dropout is live in train mode: two forwards differ
        assert not torch.equal(model(ids()).logits, model(ids()).logits)
    expected = S.score_blocks(model.eval(), ids(), "bi", progress=False).scores
    model.train()
    assert S.score_blocks(model, ids(), "bi", progress=False).scores == expected
    assert model.training


@pytest.mark.parametrize("options, message", [
    (dict(batch_size=0), "batch_size must be an integer of at least 1"),
    (dict(workers=0), "workers must be an integer of at least 1"),
    (dict(vocab_chunk=-1), "vocab_chunk must be an integer of at least 0"),
    (dict(device="tpu"), "unknown device 'tpu'"),
])
def test_bad_engine_settings_are_refused(options, message):
    with pytest.raises(ShortenedError, match=message):
        S.score_blocks(tiny_model("llama"), ids(), "bi", progress=False, **options)


def test_calibration_needs_an_integer_seed_and_a_tokenizer_object(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    tok = char_tokenizer()
    with pytest.raises(ShortenedError, match="--seed must be an integer, got None"):
        S.calibration_ids(str(text), tok, n_samples=2, seq_len=16, seed=None)
    with pytest.raises(TypeError, match="tokenizer object"):
        S.calibration_ids(str(text), "gpt2", n_samples=2, seq_len=16)


# ------------------------------------------------------------------------------------------ records and saving


@pytest.mark.parametrize("kept", [[0, 1, 7], [0, 0, 1], [], [2, 1]])
def test_pruning_record_refuses_kept_lists_that_cannot_be(kept):
    with pytest.raises(ShortenedError, match="are not increasing original indices of a 6-block model"):
        S.pruning_record("x", 6, kept, model_type="llama")


def test_save_model_refuses_a_record_that_contradicts_the_model(tmp_path):
    model = tiny_model("llama")
    S.remove_blocks(model, [1])
    with pytest.raises(ShortenedError, match="the record keeps 4 blocks but the model has 5"):
        S.save_model(model, None, tmp_path / "p", S.pruning_record("x", 6, [0, 1, 4, 5], model_type="llama"))
    with pytest.raises(TypeError, match="the record must be a dict"):
        S.save_model(model, None, tmp_path / "p", [1, 2])
    with pytest.raises(TypeError, match="needs a tokenizer"):
        S.save_model(model, "tok", tmp_path / "p")
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------------------------------------ blocks on disk


def test_whole_model_work_on_blocks_on_disk_is_refused(tmp_path):
    tok = char_tokenizer()
    S.save_model(tiny_model("llama"), tok, tmp_path / "m")
    model, tokenizer = S.load_model(str(tmp_path / "m"), blocks_on_disk=True)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    for what, call in [
        ("--calib self", lambda: S.calibration_ids("self", tokenizer, model=model, n_samples=2, seq_len=16)),
        # perplexity streams the blocks (tests/test_offload.py); the zero-shot tasks hold the whole model
        ("zero-shot tasks", lambda: S.evaluate(model, tokenizer, ppl=[], tasks=["boolq"], progress=False)),
        ("healing", lambda: S.heal(model, str(text), "full", tokenizer=tokenizer, steps=1, seq_len=16,
                                   progress=False)),
    ]:
        with pytest.raises(ShortenedError, match=f"{what}.* loaded with its blocks on disk"):
            call()


# ------------------------------------------------------------------------------------------ evaluation


def test_evaluate_takes_one_name_as_a_set_and_refuses_a_foreign_tokenizer(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    model, tok = tiny_model("llama"), char_tokenizer()
    result = S.evaluate(model, tok, ppl=str(text), tasks=[], seq_len=16, progress=False)
    assert list(result["perplexity"]) == [str(text)]
    big = tiny_model("llama")
    big.resize_token_embeddings(len(tok) - 5)
    with pytest.raises(ShortenedError, match=f"the tokenizer has {len(tok)} tokens but the model embeds only"):
        S.evaluate(big, tok, ppl=str(text), tasks=[], seq_len=16, progress=False)
    with pytest.raises(ShortenedError, match="limit must be a positive integer, got 2.5"):
        S.evaluate(model, tok, ppl=str(text), tasks=[], limit=2.5)


def test_scores_record_the_dtype_and_device_they_were_computed_in():
    settings = S.score_blocks(tiny_model("llama"), ids(), "bi", progress=False).settings
    assert settings["dtype"] == "float32" and settings["device"] == "cpu"
    bf16 = S.score_blocks(tiny_model("llama").to(torch.bfloat16), ids(), "bi", progress=False).settings
    assert bf16["dtype"] == "bfloat16"
