"""Healing: data (Alpaca template, prompt masking, packing, bad files), the shared loop (token-mean
gradients, resume), LoRA/full/distill on tiny models, merged output, the CLI, and SmolLM2 end to end."""

from __future__ import annotations

import argparse
import json
import string

import pytest
import torch
import torch.nn.functional as F

from shortened.errors import ShortenedError
from shortened.heal import HealingData, heal
from shortened.heal.data import (
    IGNORE_INDEX, alpaca_prompt, collate, load_healing_data, pack_tokens, read_alpaca_file, split_examples,
    strip_gutenberg, tokenize_alpaca,
)
from shortened.heal.distill import DistillObjective, check_same_vocab, kl_sum
from shortened.heal.loop import LMObjective
from tiny_models import TINY_CONFIGS, VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = dict(progress=False, warmup_steps=2)




def char_tokenizer():
    """A character-level fast tokenizer (no download) whose vocabulary fits the tiny models."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " \n#:.,?!'-"
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def pattern_data(seq_len: int = 16) -> HealingData:
    """Learnable token sequences (a deterministic successor for every token, random starts), split
    at random into train and validation."""
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(40):
        t, doc = int(torch.randint(3, 43, (1,), generator=g)), []
        for _ in range(32):
            doc.append(t)
            t = (t * 7 + 3) % 40 + 3
        docs.append(doc)
    train, val = split_examples(pack_tokens(docs, seq_len), 0.1, seed=0)
    return HealingData(train, val)


# ------------------------------------------------------------------------------------------ data


def test_alpaca_template_is_alpaca_lora():
    # Written out independently from tloen/alpaca-lora templates/alpaca.json.
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\nSum."
                  "\n\n### Input:\n2 3\n\n### Response:\n")
    without = ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert alpaca_prompt("Sum.", "2 3") == with_input
    assert alpaca_prompt("Say hi.") == without


def test_prompt_masking_handmade_example():
    tok = char_tokenizer()
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "It is 5."}
    ex = tokenize_alpaca(record, tok, cutoff=256)
    prompt = alpaca_prompt("Add 2 and 3.")
    # One token per character, then EOS; only the response and EOS are targets.
    assert len(ex["input_ids"]) == len(prompt) + len("It is 5.") + 1
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"][:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex["labels"][len(prompt):] == ex["input_ids"][len(prompt):]
    assert tok.decode(ex["labels"][len(prompt):-1]) .replace(" ", "") == "Itis5."
    # train_on_inputs keeps every token; a cut-off truncates without EOS.
    assert tokenize_alpaca(record, tok, cutoff=256, train_on_inputs=True)["labels"] == ex["input_ids"]
    cut = tokenize_alpaca(record, tok, cutoff=len(prompt) + 3)
    assert len(cut["input_ids"]) == len(prompt) + 3 and cut["input_ids"][-1] != tok.eos_token_id


def test_alpaca_cut_off_leaves_the_tokenizer_as_it_was():
    """The healed model's saved tokenizer.json must not cut its users' inputs at the healing cut-off."""
    tok = char_tokenizer()
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "It is 5, and that is all there is to it."}
    cutoff = len(alpaca_prompt("Add 2 and 3.")) + 4
    ex = tokenize_alpaca(record, tok, cutoff=cutoff)
    assert tok.backend_tokenizer.truncation is None
    # The same ids as the tokenizer's own truncation (which is what leaves the setting behind).
    reference = char_tokenizer()(alpaca_prompt("Add 2 and 3.") + record["output"], truncation=True,
                                 max_length=cutoff)["input_ids"]
    assert ex["input_ids"] == reference


def test_loss_counts_response_tokens_only():
    tok = char_tokenizer()
    ex = tokenize_alpaca({"instruction": "Name a colour.", "input": "", "output": "Red."}, tok)
    n_prompt = sum(t == IGNORE_INDEX for t in ex["labels"])
    batch = collate([ex])
    model = tiny_model("llama")
    logits = model(input_ids=batch["input_ids"]).logits.detach().requires_grad_(True)
    # Reference: cross-entropy at the positions predicting each response token, written out.
    ids = ex["input_ids"]
    ref = sum(-F.log_softmax(logits[0, p - 1], -1)[ids[p]] for p in range(n_prompt, len(ids))) / (len(ids) - n_prompt)
    objective = LMObjective()
    got = objective.sums(lambda **kw: type("O", (), {"logits": logits})(), batch) / objective.counts(batch)
    torch.testing.assert_close(got, ref.reshape(1), rtol=1e-6, atol=1e-6)
    got.sum().backward()
    # No gradient reaches the logits of positions that predict prompt tokens.
    assert logits.grad[0, : n_prompt - 1].abs().max() == 0
    assert logits.grad[0, n_prompt - 1:-1].abs().min() > 0


def test_read_alpaca_json_and_jsonl(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_alpaca_file(tmp_path / "a.json") == rows
    assert read_alpaca_file(tmp_path / "a.jsonl") == rows


@pytest.mark.parametrize("name, text, message", [
    ("empty.json", "", "empty.json is empty"),
    ("blank.jsonl", "\n  \n", "blank.jsonl is empty"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "out\n', "bad.jsonl:2: not valid JSON"),
    ("noout.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', "noout.jsonl:3: record has no string 'output'"),
    ("arr.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": 5, "output": "b"}\n]', "arr.json:3: record has no string 'instruction'"),
    ("broken.json", '[\n {"instruction": "a",\n  "output": }\n]', "broken.json:3: not valid JSON"),
    ("list.jsonl", '["a", "b"]\n', "list.jsonl:1: expected an object"),
])
def test_malformed_data_names_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ShortenedError, match=message.replace("(", r"\(")):
        load_healing_data(tmp_path / name, char_tokenizer())


def test_text_files_are_packed(tmp_path):
    tok = char_tokenizer()
    body = "It is a truth universally acknowledged.\n\nA second paragraph.\n"
    book = ("Title: x\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n" + body.replace("\n", "\r\n")
            + "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nLicence text\r\n")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_bytes(book.encode("cp1252"))
    assert strip_gutenberg(book.replace("\r\n", "\n")).strip() == body.strip()
    data = load_healing_data(tmp_path / "books", tok, seq_len=8, val_fraction=0.25, seed=3)
    stream = tok(body.strip("\n"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    chunks = [stream[i:i + 8] for i in range(0, len(stream) - 7, 8)]
    got = sorted(data.train + data.val, key=lambda e: chunks.index(e["input_ids"]))
    assert [e["input_ids"] for e in got] == chunks and all(e["labels"] == e["input_ids"] for e in got)
    assert len(data.val) == round(len(chunks) * 0.25) and data.kind == "text"
    # The split is a function of the seed.
    again = load_healing_data(tmp_path / "books", tok, seq_len=8, val_fraction=0.25, seed=3)
    assert again.val == data.val
    with pytest.raises(ShortenedError, match="yields no training examples"):
        load_healing_data(tmp_path / "books", tok, seq_len=10_000)


def test_split_and_missing_paths(tmp_path):
    examples = [{"input_ids": [i], "labels": [i]} for i in range(10)]
    train, val = split_examples(examples, 0.2, seed=1)
    assert len(val) == 2 and sorted(e["input_ids"][0] for e in train + val) == list(range(10))
    with pytest.raises(ShortenedError, match="val-fraction"):
        split_examples(examples, 1.0, seed=1)
    with pytest.raises(ShortenedError, match="data path not found"):
        load_healing_data(tmp_path / "nope.json", char_tokenizer())


# ------------------------------------------------------------------------------------------ loop


def test_no_step_has_a_zero_learning_rate():
    """transformers' linear warm-up gives step 0 a rate of 0: a one-step run would train nothing."""
    from shortened.heal.loop import warmup_then_decay

    factors = [warmup_then_decay(s, warmup=3, steps=8) for s in range(8)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and factors[3] == 1.0
    assert factors[3:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2]) and min(factors) > 0
    assert warmup_then_decay(0, warmup=1, steps=1) == 1.0 and warmup_then_decay(0, warmup=0, steps=1) == 1.0

    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = heal(model, pattern_data(), "full", steps=1, batch_size=4, lr=1e-3, **FAST)  # warm-up 2, cut to 1
    assert r.run.train_log[0]["lr"] == pytest.approx(1e-3)
    assert any(not torch.equal(before[n], p) for n, p in r.model.named_parameters())


def test_accumulation_equals_one_big_batch():
    """Token-mean over the global batch: micro-batches x accumulation give the same training."""
    data = pattern_data()
    # Unequal numbers of targets per example, so that averaging micro-batch means would differ.
    for i, e in enumerate(data.train):
        e["labels"] = [IGNORE_INDEX] * (i % 7) + e["labels"][i % 7:]
    runs = []
    for bs, acc in ((8, 1), (2, 4)):
        r = heal(tiny_model("llama"), data, "full", steps=4, batch_size=bs, grad_accum=acc, lr=1e-3, **FAST)
        runs.append(r)
    # float32 sums in another order: equal to rounding, as the parameters below
    torch.testing.assert_close([e["loss"] for e in runs[0].run.train_log], [e["loss"] for e in runs[1].run.train_log],
                               rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(runs[0].model.named_parameters(), runs[1].model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny model that knows the pattern data (full training), to prune and heal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    r = heal(tiny_model("llama"), pattern_data(), "full", steps=40, batch_size=8, grad_accum=1, lr=1e-2, **FAST)
    torch.set_num_threads(threads)
    return r.model


def test_untrained_weights_are_kept_when_no_trained_step_validates_better():
    model = tiny_model("llama")
    before = _weights(model)
    # A learning rate this large wrecks the model at the first step, so step 0 stays the best.
    r = heal(model, pattern_data(), "full", steps=3, batch_size=8, grad_accum=1, lr=50.0, eval_every=1, **FAST)
    losses = {e["step"]: e["val_loss"] for e in r.run.val_log}
    assert set(losses) == {0, 1, 2, 3} and min(losses[s] for s in (1, 2, 3)) > losses[0]
    assert r.run.best_step == 0 and r.record["healing"]["best_step"] == 0
    after = _weights(r.model)
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("method", ["lora", "full", "distill"])
def test_each_method_reduces_validation_loss(method, trained_tiny):
    from shortened.surgery import remove_blocks

    data = pattern_data()
    student = tiny_model("llama")
    student.load_state_dict(trained_tiny.state_dict())
    remove_blocks(student, [1, 2, 3, 4])
    kwargs = dict(teacher=trained_tiny) if method == "distill" else {}  # student: LoRA (the default)
    r = heal(student, data, method, steps=12, batch_size=8, grad_accum=1, lr=1e-2, eval_every=4, **kwargs, **FAST)
    before, best = r.run.val_log[0]["val_loss"], r.run.best_val_loss
    assert best < 0.85 * before, (method, r.run.val_log)
    # The returned (best) model reproduces the best validation loss.
    objective = LMObjective() if method != "distill" else DistillObjective(trained_tiny)
    batch = collate(data.val)
    with torch.no_grad():
        sums, counts = objective.sums(r.model, batch), objective.counts(batch)
    torch.testing.assert_close(float((torch.tensor(objective.weights) * sums / counts).sum()), best, rtol=1e-4, atol=1e-5)


def test_kl_sum_matches_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    T = 2.0
    ref = 0.0
    for b in range(2):
        for p in range(3):
            if mask[b, p]:
                pt, ps = torch.softmax(t[b, p] / T, -1), torch.softmax(s[b, p] / T, -1)
                ref += float((pt * (pt.log() - ps.log())).sum()) * T * T
    assert abs(float(kl_sum(s, t, mask, T)) - ref) < 1e-5


def test_lora_output_is_merged_and_reloads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "in"
    base = tiny_model("llama")
    base.save_pretrained(base_dir)
    out = tmp_path / "out"
    heal(str(base_dir), pattern_data(), "lora", out=out, steps=6, batch_size=8, grad_accum=1, lr=2e-2,
             eval_every=2, **FAST)
    merged = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager"),
                                         out / "adapter").eval()
    x = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b, c = merged(x).logits, unmerged(x).logits, base.eval()(x).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - c).abs().max() > 1e-3  # training changed the function
    record = json.loads((out / "pruning.json").read_text())
    h = record["healing"]
    assert h["method"] == "lora" and h["settings"]["lora_r"] == 8 and h["settings"]["lr"] == 2e-2
    assert h["steps_done"] == 6 and len(h["train_log"]) == 6 and h["val_log"][0]["step"] == 0
    assert h["best_val_loss"] == min(e["val_loss"] for e in h["val_log"] if e["step"] > 0)
    assert "torch" in h["versions"] and (out / "loss.png").stat().st_size > 1000
    assert (out / "healing_log.csv").read_text().splitlines()[0] == "step,split,loss,lr"
    assert not (tmp_path / "out.checkpoints").exists()
    with pytest.raises(ShortenedError, match="already exists"):
        heal(str(base_dir), pattern_data(), "lora", out=out, steps=1, **FAST)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_lora_targets_every_architecture(model_type):
    from shortened.heal.lora import add_lora, merge_lora

    model = tiny_model(model_type)
    peft_model = add_lora(model, r=4, dropout=0.0)
    with torch.no_grad():  # make the adapters non-zero so merging is tested
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0
    x = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = peft_model.eval()(x).logits
        merged = merge_lora(peft_model)
        torch.testing.assert_close(merged(x).logits, before, rtol=1e-4, atol=1e-4)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_gives_the_same_weights(tmp_path, method):
    data = pattern_data()
    # LoRA dropout > 0 checks that RNG states are restored too; 3 epochs check the data position.
    cfg = dict(steps=9, batch_size=4, grad_accum=2, lr=1e-2, eval_every=3, lora_dropout=0.1, **FAST)
    full = heal(tiny_model("llama"), data, method, checkpoint_dir=tmp_path / "a", **cfg)

    def stop(step, entry):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        heal(tiny_model("llama"), data, method, checkpoint_dir=tmp_path / "b", save_every=1, on_step=stop, **cfg)
    # A fresh process would reload the input model; resume must restore everything else.
    resumed = heal(tiny_model("llama"), data, method, checkpoint_dir=tmp_path / "b", resume=True, **cfg)
    assert resumed.run.step == 9 and [e["loss"] for e in resumed.run.train_log] == [e["loss"] for e in full.run.train_log]
    a, b = _weights(full.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.run.best_step == full.run.best_step
    # Different settings refuse to resume.
    with pytest.raises(ShortenedError, match="different settings"):
        heal(tiny_model("llama"), data, method, checkpoint_dir=tmp_path / "b", resume=True, **{**cfg, "lr": 5e-3})


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("lr", [0.0, -1e-4, float("nan")])
def test_bad_learning_rate(lr):
    with pytest.raises(ShortenedError, match="--lr must be a positive number"):
        heal(tiny_model("llama"), pattern_data(), "lora", lr=lr, steps=1, **FAST)


def test_defaults_per_method():
    """The paper's batch shape for lora/full/distill; reconstruct's best measured one; explicit values win."""
    from shortened.heal import HealSettings

    for method in ("lora", "full", "distill"):
        s = HealSettings().for_method(method)
        assert (s.batch_size, s.grad_accum, s.seq_len, s.warmup_steps) == (4, 16, 256, 100)
    s = HealSettings().for_method("reconstruct")
    assert (s.batch_size, s.grad_accum, s.seq_len, s.warmup_steps, s.resolved_lr("reconstruct")) == (8, 1, 128, 10, 3e-3)
    s = HealSettings(batch_size=2, seq_len=64).for_method("reconstruct")
    assert (s.batch_size, s.grad_accum, s.seq_len) == (2, 1, 64)
    with pytest.raises(ShortenedError, match="unknown healing method"):
        HealSettings().for_method("prune")


def test_bad_settings():
    data = pattern_data()
    with pytest.raises(ShortenedError, match="unknown healing method"):
        heal(tiny_model("llama"), data, "prune", steps=1, **FAST)
    with pytest.raises(ShortenedError, match="--steps"):
        heal(tiny_model("llama"), data, "full", steps=0, **FAST)
    with pytest.raises(ShortenedError, match="--resume: no checkpoint"):
        heal(tiny_model("llama"), data, "full", steps=1, checkpoint_dir="/nonexistent/ckpt", resume=True, **FAST)
    with pytest.raises(ShortenedError, match="temperature"):
        heal(tiny_model("llama"), data, "distill", teacher=tiny_model("llama"), temperature=0, steps=1, **FAST)
    with pytest.raises(ShortenedError, match="--max-time must be positive"):
        heal(tiny_model("llama"), data, "full", steps=1, max_time=0, **FAST)


def test_teacher_with_other_vocabulary_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "vocab_size": VOCAB + 3})
    other = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ShortenedError, match=f"teacher's vocabulary has {VOCAB + 3} tokens but the student's {VOCAB}"):
        heal(tiny_model("llama"), pattern_data(), "distill", teacher=other, steps=1, **FAST)
    # Same size, different tokens.
    tok = char_tokenizer()
    other_tok = char_tokenizer()
    other_tok.add_tokens(["zz"])
    with pytest.raises(ShortenedError, match="tokenizer differs"):
        check_same_vocab(tiny_model("llama"), tiny_model("llama", seed=1), tok, other_tok)


# ------------------------------------------------------------------------------------------ CLI


def _cli(argv):
    from shortened.commands import heal as heal_cmd

    parser = argparse.ArgumentParser(prog="shortened")
    heal_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ShortenedError as exc:  # what cli.main does
        return 2, str(exc)


def pruned_folder(tmp_path, removed):
    """A dense tiny model and a pruned copy saved as `shortened prune` does (pruning.json names the
    source), and a small text file; returns (dense dir, pruned dir, text file)."""
    from shortened.io import pruning_record, save_model
    from shortened.surgery import remove_blocks

    tok = char_tokenizer()
    src = tmp_path / "dense"
    save_model(tiny_model("llama"), tok, src)
    model = tiny_model("llama")
    kept = remove_blocks(model, removed)
    save_model(model, tok, tmp_path / "pruned", pruning_record(str(src), 6, kept, model_type="llama"))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return src, tmp_path / "pruned", text


def test_cli_distill_from_pruned_folder(tmp_path, capsys):
    """A pruned folder written like `shortened prune` does: the teacher comes from pruning.json."""
    src, _, text = pruned_folder(tmp_path, [2, 3])

    def argv(data=text, out=tmp_path / "healed", *more):
        return ["heal", str(tmp_path / "pruned"), "--method", "distill", "--data", str(data), "--seq-len", "32",
                "--steps", "3", "--batch-size", "2", "--grad-accum", "1", "--warmup-steps", "1", "--out", str(out),
                "--temperature", "2", "--lm-weight", "0.5", *more]

    assert _cli(argv()) == 0
    assert "validation loss" in capsys.readouterr().out
    record = json.loads((tmp_path / "healed" / "pruning.json").read_text())
    assert record["removed_blocks"] == [2, 3] and record["healing"]["teacher"] == str(src)
    assert record["healing"]["settings"]["temperature"] == 2 and record["healing"]["trainable"] == "lora"
    assert record["healing"]["data"]["kind"] == "text"
    # Refusals: existing output, bad lr, empty data file; nothing is written.
    code, message = _cli(argv())
    assert code == 2 and "already exists" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, message = _cli(argv(text, tmp_path / "x", "--lr", "0"))
    assert code == 2 and "--lr" in message
    code, message = _cli(argv(empty, tmp_path / "x"))
    assert code == 2 and "empty.jsonl is empty" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "empty.jsonl", "healed", "pruned", "text.txt"]


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_lora_on_alpaca(smollm2_folder, shared_data, tmp_path):
    """The paper's recipe end to end on the real model (a handful of short sequences)."""
    from shortened.loading import load_model

    model, tok = load_model(str(smollm2_folder))
    data = load_healing_data(shared_data / "alpaca" / "alpaca_data_2k_subset.json", tok, seq_len=64,
                             max_examples=24, val_fraction=0.25, seed=0)
    assert data.kind == "alpaca" and len(data.val) == 6
    first = data.train[0]
    n_masked = first["labels"].index(next(t for t in first["labels"] if t != IGNORE_INDEX))
    assert tok.decode(first["input_ids"][:n_masked]).endswith("### Response:\n")
    from shortened.surgery import remove_blocks

    remove_blocks(model, [13, 14, 17])
    r = heal(model, data, "lora", tokenizer=tok, out=tmp_path / "out", steps=4, batch_size=6, grad_accum=1,
             lr=1e-3, eval_every=4, **FAST)
    assert r.run.best_val_loss < r.run.val_log[0]["val_loss"]
    reloaded, _ = load_model(str(tmp_path / "out"))
    x = torch.tensor([data.val[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, r.model(x).logits, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ reconstruct


@pytest.mark.parametrize("kept,n,width,expected", [
    ([0, 1, 4, 5], 6, 1, [(1, 1, 1, 4)]),                          # a middle run: the block before it
    ([0, 1, 4, 5], 6, 2, [(1, 2, 1, 5)]),                          # ... and the block after it
    ([2, 3, 4, 5], 6, 1, [(0, 1, 0, 3)]),                          # a run at the start: the first kept block
    ([0, 1, 2, 3], 6, 2, [(3, 1, 3, 6)]),                          # a run at the end: the last output
    ([1, 3, 5], 7, 1, [(0, 1, 0, 3), (1, 1, 3, 5), (2, 1, 5, 7)]),  # every other block
    ([1, 3, 5], 7, 2, [(0, 3, 0, 7)]),                             # bridges sharing blocks merge
    ([0, 3, 4, 5, 8, 9], 10, 2, [(0, 2, 0, 4), (3, 2, 5, 9)]),
    # auto: two blocks for a run of up to four, one more after it per two removed blocks beyond
    ([0, 1, 6, 7, 8, 9], 10, "auto", [(1, 2, 1, 7)]),              # 4 removed: the width 2
    ([0, 1, 7, 8, 9], 10, "auto", [(1, 3, 1, 9)]),                 # 5 removed: 1, 7, 8
    ([0, 1, 8, 9], 10, "auto", [(1, 3, 1, 10)]),                   # 6 removed: 1, 8, 9
    ([0, 9], 10, "auto", [(0, 2, 0, 10)]),                         # 8 removed, 4 wanted, 2 kept: both
    ([0, 1, 2, 3], 10, "auto", [(3, 1, 3, 10)]),                   # a run at the end: the last output
    ([3, 4, 5, 6, 7, 8, 9], 10, "auto", [(0, 2, 0, 5)]),           # a run of 3 at the start
    ([0, 2, 9], 10, "auto", [(0, 3, 0, 10)]),                      # 1 then 6 removed: the bridges merge
    # Block Influence's choice on SmolLM2-135M trains the same blocks as with width 2
    ([b for b in range(30) if b not in (12, 13, 14, 15, 17, 25)], 30, "auto", [(11, 3, 11, 19), (19, 2, 24, 27)]),
    ([b for b in range(30) if b not in range(13, 19)], 30, "auto", [(12, 3, 12, 21)]),  # the searched span
])
def test_find_bridges(kept, n, width, expected):
    from shortened.heal.reconstruct import find_bridges

    assert [(b.index, b.count, b.start, b.end) for b in find_bridges(kept, n, width)] == expected


@pytest.mark.parametrize("removed,expected", [(1, 2), (2, 2), (3, 2), (4, 2), (5, 3), (6, 3), (7, 4), (12, 6)])
def test_auto_bridge_width_is_one_block_per_two_removed(removed, expected):
    from shortened.heal.reconstruct import run_width

    assert run_width("auto", removed) == expected
    assert run_width(3, removed) == 3  # a number is taken as it is


@pytest.mark.parametrize("width", [0, -1, "wide", True, 2.5])
def test_bridge_width_refuses_bad_values(width):
    from shortened.heal.reconstruct import check_options

    with pytest.raises(ShortenedError, match="--bridge-width must be at least 1, or auto"):
        check_options(width)


def test_cli_bridge_width_takes_a_number_or_auto():
    from shortened.commands.heal import bridge_width

    assert bridge_width("auto") == "auto" and bridge_width("3") == 3
    with pytest.raises(ValueError):  # argparse turns it into "invalid bridge_width value" and exit 2
        bridge_width("wide")


def test_auto_width_trains_the_blocks_after_a_long_run():
    """On a 10-block model with blocks 2-7 removed, ``auto`` trains blocks 1, 8 and 9 (width 3) and nothing
    else, and the healing record names them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from shortened.surgery import remove_blocks

    def ten_blocks():  # each model its own config: removing blocks edits the student's
        config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "num_hidden_layers": 10})
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()

    torch.manual_seed(0)
    teacher, student = ten_blocks(), ten_blocks()
    student.load_state_dict(teacher.state_dict())
    kept = remove_blocks(student, list(range(2, 8)))
    before = _weights(student)
    r = heal(student, pattern_data(), "reconstruct", teacher=teacher, kept=kept, steps=2, batch_size=4, grad_accum=1,
             lr=1e-3, **FAST)
    changed = {int(n.split(".")[2]) for n, w in _weights(r.model).items() if not torch.equal(before[n], w)}
    assert changed == {1, 2, 3}  # the student's blocks 1-3 are the teacher's 1, 8, 9
    assert r.record["healing"]["trained_bridges"] == [{"trained": [1, 8, 9], "replaces": [1, 9]}]
    assert r.record["healing"]["settings"]["bridge_width"] == "auto"


@pytest.mark.parametrize("kept,message", [([0, 1, 2], "nothing to reconstruct"), ([0, 3, 9], "do not describe"),
                                          ([2, 1], "do not describe"), ([], "do not describe")])
def test_find_bridges_refuses(kept, message):
    from shortened.heal.reconstruct import find_bridges

    with pytest.raises(ShortenedError, match=message):
        find_bridges(kept, 3 if message == "nothing to reconstruct" else 6)


@pytest.mark.parametrize("removed,width,loss,first_token,weight", [
    ([2, 3], 1, "token", False, "rest"), ([2, 3], 2, "token", False, "rest"), ([4, 5], 2, "token", False, "rest"),
    ([2, 3], 2, "total", False, "rest"), ([2, 3], 2, "token", True, 1.0), ([2, 3], "auto", "token", True, 1.0),
    ([2, 3], 2, "token", True, "rest"), ([4, 5], 2, "total", True, "rest"), ([2, 3], 2, "token", True, 2.5)])
def test_reconstruct_objective_equals_reference(removed, width, loss, first_token, weight):
    """The loss equals a hand computation: run the pruned model with the bridge's input replaced by the
    teacher's, compare its output with the teacher's hidden state after the gap (first position left out,
    or weighted: "rest" = as much as the rest of its row's tokens; [4, 5]: the end, the last output)."""
    from shortened.heal.reconstruct import ReconstructObjective
    from shortened.surgery import remove_blocks

    teacher = tiny_model("llama")
    student = tiny_model("llama", seed=1)  # different weights: the error is not zero
    kept = remove_blocks(student, removed)
    bridge = kept.index(removed[0] - 1)
    last = min(bridge + (2 if width == "auto" else width) - 1, len(kept) - 1)  # the bridge's last student block
    after = kept[last + 1] if last + 1 < len(kept) else 6
    batch = collate(pattern_data().val[:3])
    batch["attention_mask"][1, -4:] = 0  # padding is left out too
    with torch.no_grad():
        states = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True, use_cache=False).hidden_states  # inputs of each block
        outs = {}
        if removed[-1] == 5:
            teacher.model.layers[5].register_forward_hook(lambda m, a, o: outs.setdefault("last", o[0] if isinstance(o, tuple) else o))
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        target = outs["last"] if after == 6 else states[after]
        first, final = student.model.layers[bridge], student.model.layers[last]
        h1 = first.register_forward_pre_hook(lambda m, a, k: ((states[removed[0] - 1],) + a[1:], k), with_kwargs=True)
        h2 = final.register_forward_hook(lambda m, a, o: outs.setdefault("bridge", o[0] if isinstance(o, tuple) else o))
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        h1.remove(), h2.remove()
        w = batch["attention_mask"].clone().double()
        if not first_token:
            w[:, 0] = 0
        else:
            w[:, 0] = w[:, 1:].sum(1) if weight == "rest" else weight
        assert weight != "rest" or not first_token or w[1, 0] == w.shape[1] - 1 - 4  # row 1: 4 padded positions
        err = (outs["bridge"] - target).double().pow(2).sum(-1)
        norm = target.double().pow(2).sum(-1)
        expected = float((w * err / norm).sum() / w.sum() if loss == "token" else (w * err).sum() / (w * norm).sum())
        objective = ReconstructObjective(teacher, kept, width, loss, first_token=first_token, first_token_weight=weight)
        got = float(objective.sums(student, batch) / objective.counts(batch))
    assert got == pytest.approx(expected, rel=1e-5) and expected > 1e-3


@pytest.mark.parametrize("weight", [0, -1.0, "half", True])
def test_reconstruct_first_token_weight_is_checked(weight):
    from shortened.heal.reconstruct import check_first_token_weight

    with pytest.raises(ShortenedError, match="first token's weight"):
        check_first_token_weight(weight)


def test_reconstruct_heals_only_the_bridges(trained_tiny):
    from shortened.surgery import remove_blocks

    student = tiny_model("llama")
    student.load_state_dict(trained_tiny.state_dict())
    kept = remove_blocks(student, [2, 3])
    before = _weights(student)
    data = pattern_data()
    r = heal(student, data, "reconstruct", teacher=trained_tiny, kept=kept, steps=24, batch_size=8, grad_accum=1,
             lr=3e-3, eval_every=4, **FAST)
    assert r.run.best_val_loss < 0.6 * r.run.val_log[0]["val_loss"], r.run.val_log
    after = _weights(r.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {n.split(".")[2] for n in changed} == {"1", "2"}, sorted(changed)  # width 2: blocks 1 and 2
    # The healed model predicts better than the pruned one (the objective is a proxy; this is the point).
    batch = collate(data.val)
    with torch.no_grad():
        pruned_model = tiny_model("llama")
        pruned_model.load_state_dict(trained_tiny.state_dict())
        remove_blocks(pruned_model, [2, 3])
        lm = LMObjective()
        loss = lambda m: float(lm.sums(m, batch) / lm.counts(batch))
        assert loss(r.model) < loss(pruned_model)
    # Without a record of the removed blocks, or with nothing removed, it refuses.
    with pytest.raises(ShortenedError, match="kept_blocks"):
        heal(tiny_model("llama"), data, "reconstruct", teacher=trained_tiny, steps=1, **FAST)
    with pytest.raises(ShortenedError, match="--bridge-width must be at least 1"):
        heal(tiny_model("llama"), data, "reconstruct", teacher=trained_tiny, kept=kept, bridge_width=0, steps=1, **FAST)
    with pytest.raises(ShortenedError, match="--reconstruct-loss must be one of token, total"):
        heal(tiny_model("llama"), data, "reconstruct", teacher=trained_tiny, kept=kept, reconstruct_loss="l1", steps=1,
             **FAST)
    with pytest.raises(ShortenedError, match="nothing to reconstruct"):
        heal(tiny_model("llama"), data, "reconstruct", teacher=trained_tiny, kept=list(range(6)), steps=1, **FAST)


def test_teacher_cache_trains_the_same_with_fewer_teacher_forwards(trained_tiny):
    """With --passes the later passes read the teacher's states from the cache: the same trained weights
    as with the cache off, and the teacher runs only for the first pass (and the first validation)."""
    from shortened.surgery import remove_blocks

    data = pattern_data()
    runs = {}
    for gb in (0.0, 1.0):
        student = tiny_model("llama")
        student.load_state_dict(trained_tiny.state_dict())
        kept = remove_blocks(student, [2, 3])
        forwards = []
        hook = trained_tiny.register_forward_pre_hook(lambda m, a: forwards.append(1))
        try:
            r = heal(student, data, "reconstruct", teacher=trained_tiny, kept=kept, steps=9, passes=3.0,
                     batch_size=4, grad_accum=1, lr=3e-3, eval_every=3, teacher_cache_gb=gb, **FAST)
        finally:
            hook.remove()
        runs[gb] = (r, len(forwards))
    (off, off_forwards), (on, on_forwards) = runs[0.0], runs[1.0]
    assert on.record["healing"]["data"]["train_examples_used"] == 12  # 9 steps x 4 examples / 3 passes
    for a, b in zip(_weights(off.model).values(), _weights(on.model).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    cache = on.record["healing"]["teacher_cache"]
    val_batches = -(-len(data.val) // 4)
    from shortened.heal.data import subset_for_passes

    used = subset_for_passes(data, 9, 4, 3.0, seed=0).train + data.val
    assert cache["examples"] == len({tuple(e["input_ids"]) for e in used}) and not cache["full"]  # repeats: one entry
    assert 0 < cache["batches_from_teacher"] <= 3 + val_batches  # the first pass and the first validation at most
    assert cache["batches_from_cache"] == 9 + 4 * val_batches - cache["batches_from_teacher"]
    assert on_forwards == cache["batches_from_teacher"] and off_forwards == 9 + 4 * val_batches
    assert "teacher_cache" not in off.record["healing"]
    # Fresh examples every step: no cache is kept (it would hold states never read again).
    student = tiny_model("llama")
    kept = remove_blocks(student, [2, 3])
    r = heal(student, data, "reconstruct", teacher=trained_tiny, kept=kept, steps=2, batch_size=4, grad_accum=1,
             **FAST)
    assert 2 * 4 <= len(data.train) and "teacher_cache" not in r.record["healing"]


@pytest.mark.parametrize("loss", ["token", "total"])
def test_student_inputs_carry_the_previous_bridge_through_the_kept_blocks(loss):
    """With --bridge-inputs student the second bridge's input is the pruned model's own hidden state: the
    loss equals a hand computation on the pruned model run with only the first bridge's input replaced."""
    from shortened.heal.reconstruct import ReconstructObjective
    from shortened.surgery import remove_blocks

    teacher = tiny_model("llama")
    student = tiny_model("llama", seed=1)  # other block weights; the embeddings are the teacher's, as after pruning
    student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    kept = remove_blocks(student, [1, 4])  # student blocks 0, 2, 3, 5: bridges [0, 2] and [3, 5] (width 2)
    batch = collate(pattern_data().val[:3])
    with torch.no_grad():
        states = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True, use_cache=False).hidden_states
        outs = {}

        def keep(name):
            def hook(module, args, output):
                outs[name] = output[0] if isinstance(output, tuple) else output
            return hook

        last = teacher.model.layers[5].register_forward_hook(keep("t6"))
        teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        last.remove()
        hooks = [student.model.layers[1].register_forward_hook(keep("b1")),
                 student.model.layers[3].register_forward_hook(keep("b2"))]
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        for h in hooks:
            h.remove()
        # the first position weighted like any token (the weights themselves: the test above)
        mask = batch["attention_mask"].clone().bool()
        objective = ReconstructObjective(teacher, kept, 2, loss, inputs="student", first_token_weight=1.0)
        assert [(b.index, b.count) for b in objective.bridges] == [(0, 2), (2, 2)]
        expected = 0.0
        for out, target in ((outs["b1"], states[3]), (outs["b2"], outs["t6"])):
            err, norm = (out - target)[mask].pow(2).sum(-1), target[mask].pow(2).sum(-1)
            if loss == "token":
                expected += float((err / norm).sum())
            else:  # "total": the micro-batch's summed error over its mean target norm
                expected += float(err.sum() / norm.mean())
        got = float(objective.sums(student, batch))
        assert got == pytest.approx(expected, rel=1e-5)
        teacher_inputs = float(ReconstructObjective(teacher, kept, 2, loss, first_token_weight=1.0).sums(student, batch))
        assert teacher_inputs != pytest.approx(got, rel=1e-3)  # the option changes the second bridge's input
    with pytest.raises(ShortenedError, match="--bridge-inputs must be one of teacher, student"):
        ReconstructObjective(teacher, kept, 2, inputs="mixed")


def test_teacher_cache_keeps_to_its_memory_and_needs_every_example():
    from shortened.heal.reconstruct import TeacherCache

    ids = torch.arange(12).reshape(3, 4)
    mask = torch.ones_like(ids)
    hidden = {0: torch.randn(3, 4, 8), 5: torch.randn(3, 4, 8)}
    row_bytes = 2 * 4 * 8 * 4
    cache = TeacherCache(2 * row_bytes)
    assert cache.get(ids, mask, torch.device("cpu")) is None
    cache.put(ids, mask, hidden, {"calls": "per mask"})
    assert cache.stats()["examples"] == 2 and cache.full and cache.bytes == 2 * row_bytes
    assert cache.get(ids, mask, torch.device("cpu")) is None  # the third example was not kept
    got, calls = cache.get(ids[:2], mask[:2], torch.device("cpu")) or (None, None)
    assert got is None  # a batch of another shape has no calls yet
    cache.put(ids[:2], mask[:2], {i: h[:2] for i, h in hidden.items()}, {"calls": "2 rows"})
    got, calls = cache.get(ids[[1, 0]], mask[:2], torch.device("cpu"))
    assert calls == {"calls": "2 rows"} and torch.equal(got[5], hidden[5][[1, 0]])
    other = mask[:2].clone()
    other[0, -1] = 0  # the same tokens with another mask are other examples
    assert cache.get(ids[:2], other, torch.device("cpu")) is None


def test_passes_subset_and_bad_settings(trained_tiny):
    from shortened.heal.data import subset_for_passes

    data = pattern_data()
    a, b = subset_for_passes(data, 5, 4, 2.0, seed=0), subset_for_passes(data, 5, 4, 2.0, seed=0)
    assert len(a.train) == 10 and a.train == b.train and a.val == data.val
    assert all(e in data.train for e in a.train)
    assert subset_for_passes(data, 5, 4, 2.0, seed=1).train != a.train
    assert len(subset_for_passes(data, 1000, 4, 2.0, seed=0).train) == len(data.train)  # capped at the data
    kept = [0, 1, 4, 5]
    for kwargs, message in [(dict(passes=2.0), "--passes needs --steps"),
                            (dict(passes=0.0, steps=2), "--passes must be a positive number"),
                            (dict(teacher_cache_gb=-1.0, steps=2), "--teacher-cache-gb must be 0 or more")]:
        with pytest.raises(ShortenedError, match=message):
            heal(tiny_model("llama"), data, "reconstruct", teacher=trained_tiny, kept=kept, **kwargs, **FAST)


def _first_linear(block: torch.nn.Module) -> torch.nn.Linear:
    return next(m for m in block.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("method", ["reconstruct", "lora"])
def test_bf16_autocast_reaches_every_forward_and_keeps_float32_weights(trained_tiny, method):
    """--mixed-precision bf16: the student's blocks (called directly by reconstruct) and the teacher run
    their matmuls in bfloat16, the weights stay float32, training lands where float32 training does;
    the setting does not leak into the next run of the same process."""
    from shortened.archs import get_blocks
    from shortened.surgery import remove_blocks

    data = pattern_data()
    runs = {}
    for precision in ("bf16", None):
        student = tiny_model("llama")
        student.load_state_dict(trained_tiny.state_dict())
        kept = remove_blocks(student, [2, 3])
        seen: dict[str, set] = {"student": set(), "teacher": set()}
        hooks = [_first_linear(get_blocks(model)[1]).register_forward_hook(
                 lambda m, a, out, who=who: seen[who].add(out.dtype))
                 for who, model in (("student", student), ("teacher", trained_tiny))]
        try:
            extra = dict(teacher=trained_tiny, kept=kept, lr=3e-3) if method == "reconstruct" else dict(lr=1e-2)
            r = heal(student, data, method, steps=8, batch_size=8, grad_accum=1, eval_every=4,
                     mixed_precision=precision, **extra, **FAST)
        finally:
            for h in hooks:
                h.remove()
        runs[precision] = r
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert seen["student"] == {expected}, seen
        if method == "reconstruct":
            assert seen["teacher"] == {expected}, seen
        assert {p.dtype for p in r.model.parameters()} == {torch.float32}
        assert r.record["healing"]["settings"]["mixed_precision"] == precision
    bf16, fp32 = runs["bf16"].run, runs[None].run
    assert bf16.best_val_loss < (0.8 if method == "reconstruct" else 0.99) * bf16.val_log[0]["val_loss"], bf16.val_log
    torch.testing.assert_close(bf16.best_val_loss, fp32.best_val_loss, rtol=0.05, atol=1e-3)


def test_mixed_precision_auto_and_bad_value(trained_tiny, monkeypatch):
    import importlib

    heal_module = importlib.import_module("shortened.heal")  # the package: `shortened.heal` is also the function

    assert heal_module.resolve_mixed_precision("fp16") == "fp16" and heal_module.resolve_mixed_precision(None) is None
    monkeypatch.setattr(heal_module, "fast_bf16", lambda device=None: True)
    assert heal_module.resolve_mixed_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(heal_module, "fast_bf16", lambda device=None: False)
    assert heal_module.resolve_mixed_precision("auto", "cpu") is None
    r = heal(tiny_model("llama"), pattern_data(), "full", steps=1, mixed_precision="auto", **FAST)
    assert r.record["healing"]["settings"]["mixed_precision"] is None
    with pytest.raises(ShortenedError, match="--mixed-precision must be one of auto, no, fp16, bf16"):
        heal(tiny_model("llama"), pattern_data(), "full", steps=1, mixed_precision="int8", **FAST)


def test_cli_reconstruct_from_pruned_folder(tmp_path, capsys):
    """The removed blocks and the teacher come from pruning.json; the output is a plain model in which
    only the bridge block differs from the pruned input."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src, _, text = pruned_folder(tmp_path, [3, 4])
    assert _cli(["heal", str(tmp_path / "pruned"), "--method", "reconstruct", "--data", str(text), "--seq-len", "32",
                 "--steps", "3", "--batch-size", "2", "--grad-accum", "1", "--warmup-steps", "1", "--bridge-width", "1",
                 "--out", str(tmp_path / "healed")]) == 0
    record = json.loads((tmp_path / "healed" / "pruning.json").read_text())
    assert record["healing"]["method"] == "reconstruct" and record["healing"]["trainable"] == "bridges"
    assert record["healing"]["teacher"] == str(src) and record["healing"]["settings"]["lr"] == 3e-3
    assert record["healing"]["settings"]["bridge_width"] == 1
    assert "trained blocks 2 for 2-4" in capsys.readouterr().out  # the teacher's block 2 stands for 2, 3 and 4
    before = load_file(tmp_path / "pruned" / "model.safetensors")
    after = load_file(tmp_path / "healed" / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("model.layers.2.") for k in changed), changed  # kept[2] == 2: the bridge
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert len(reloaded.model.layers) == 4


@pytest.mark.parametrize("value", ["-2", "0", "abc"])
def test_cli_refuses_a_bad_first_token_weight_before_loading(value, tmp_path, capsys):
    from shortened import cli

    with pytest.raises(SystemExit) as exc:  # argparse's error: before any model is loaded
        cli.main(["heal", str(tmp_path / "no-model"), "--method", "reconstruct", "--data", str(tmp_path),
                  "--out", str(tmp_path / "out"), "--reconstruct-first-token-weight", value])
    assert exc.value.code == 2
    assert "--reconstruct-first-token-weight" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_teacher_with_fewer_blocks_than_the_kept_indices_is_refused():
    from shortened.heal import _check_teacher_blocks

    teacher = tiny_model("llama")  # 6 blocks
    _check_teacher_blocks(teacher, [0, 2, 5])
    _check_teacher_blocks(teacher, None)
    with pytest.raises(ShortenedError, match="give the original"):
        _check_teacher_blocks(teacher, [0, 2, 7])


def test_a_stale_kept_list_is_refused(tmp_path):
    """A folder's kept_blocks no longer describe a model pruned again in memory: training bridges from them
    would pair the wrong blocks."""
    from shortened import load_model
    from shortened.surgery import remove_blocks

    _, pruned, text = pruned_folder(tmp_path, [2, 3])
    model, tok = load_model(str(pruned))
    remove_blocks(model, [1])
    for method in ("reconstruct", "linear"):
        with pytest.raises(ShortenedError, match=r"kept blocks \[0, 1, 4, 5\] do not match the model's 3 blocks"):
            heal(model, str(text), method, tokenizer=tok, steps=1, seq_len=32, batch_size=2, **FAST)
    with pytest.raises(ShortenedError, match="do not match the model's 3 blocks"):
        heal(model, str(text), "reconstruct", tokenizer=tok, kept=[0, 4, 4], steps=1, seq_len=32, **FAST)


def test_a_bf16_model_gets_a_bf16_teacher_and_keeps_its_cache_setting(tmp_path):
    from transformers import AutoConfig

    from shortened import load_model

    _, pruned, text = pruned_folder(tmp_path, [2, 3])
    model, tok = load_model(str(pruned), dtype="bf16")
    assert model.config.use_cache
    r = heal(model, str(text), "reconstruct", tokenizer=tok, steps=2, seq_len=32, batch_size=2, grad_accum=1,
             out=tmp_path / "healed", **FAST)
    assert next(r.model.parameters()).dtype == torch.bfloat16
    # Off while training; the result and the saved folder build a KV cache again.
    assert r.model.config.use_cache and AutoConfig.from_pretrained(tmp_path / "healed").use_cache
    # A teacher given as a module in another dtype is refused with a reason, not a matmul error.
    teacher, _ = load_model(str(tmp_path / "dense"))
    with pytest.raises(ShortenedError, match="the teacher is torch.float32 and the model torch.bfloat16"):
        heal(model, str(text), "reconstruct", tokenizer=tok, teacher=teacher, steps=1, seq_len=32, **FAST)
