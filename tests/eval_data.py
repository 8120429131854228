"""Helpers for the evaluation tests: a small data folder in the original file formats (texts written
here), a tiny random LLaMA whose vocabulary fits SmolLM2's tokenizer, and an independent "by hand"
scorer of multiple-choice items straight from the raw files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import TINY_CONFIGS

SMOLLM2_VOCAB = 49152

# ----------------------------------------------------------------------------------------------
# a tiny model for SmolLM2's tokenizer


def tiny_llama_for_tokenizer(seed: int = 0, vocab: int = SMOLLM2_VOCAB) -> torch.nn.Module:
    config = AutoConfig.for_model("llama", **dict(TINY_CONFIGS["llama"], vocab_size=vocab, max_position_embeddings=512))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------------
# a small data folder in the layout of ../shared/data (items invented for the tests)

WIKI_LINES = [
    " ",
    " = The Lighthouse Keeper = ",
    " ",
    " The lighthouse stood on a rock at the mouth of the bay , and for forty years a single keeper "
    "climbed its stairs each evening to light the lamp . Ships that passed in the night saw the beam "
    "turn slowly across the water , and sailors said that the light had never once failed .",
    " ",
    " = = Construction = = ",
    " ",
    " The tower was built in 1851 from granite quarried on the mainland . Workers carried the stones "
    "across the bay in flat boats when the weather was calm , and the work took three summers to finish .",
    " ",
]

PTB_LINES = [
    " the company said it expects sales to rise N N in the fourth quarter ",
    " analysts said the <unk> results were better than expected ",
    " the board will meet next week to consider the offer of $ N a share ",
    " shares of the company rose N cents to $ N in new york stock exchange trading ",
]

BOOLQ = [
    {"question": "is the moon larger than the earth", "passage": "Moon -- The Moon is Earth's only natural "
     "satellite. It is about one quarter the diameter of Earth.", "idx": 0, "label": "false"},
    {"question": "do penguins live in antarctica", "passage": "Penguin -- Penguins are flightless birds that "
     "live almost exclusively in the Southern Hemisphere, many of them in Antarctica.", "idx": 1, "label": "true"},
    {"question": "is water made of hydrogen and oxygen", "passage": "Water -- Water is a chemical compound "
     "whose molecules contain one oxygen atom and two hydrogen atoms.", "idx": 2, "label": "true"},
]

PIQA = [
    ({"goal": "How do I keep bread fresh longer?", "sol1": "Store it in a sealed bag in a cool place.",
      "sol2": "Store it in an open bowl next to the oven."}, 0),
    ({"goal": "To dry wet shoes quickly,", "sol1": "fill them with water and leave them outside.",
      "sol2": "stuff them with newspaper and leave them somewhere warm."}, 1),
    ({"goal": "How can I sharpen a pencil without a sharpener?", "sol1": "Carefully shave the wood with a knife.",
      "sol2": "Rub the pencil on a pillow."}, 0),
]

HELLASWAG = [
    ("Making tea: A woman fills a kettle with water and sets it on the stove. she", 2,
     ["throws the kettle out of the window.", "starts to paint the wall blue.",
      "pours the hot water over a tea bag in a cup.", "runs a marathon in the rain."]),
    ("Riding a bike: A boy puts on his helmet and climbs onto his bicycle. he", 0,
     ["pedals down the street toward the park.", "eats the helmet for breakfast.",
      "folds the bicycle into a paper airplane.", "sings to the fish in the river."]),
    ("Gardening: A man kneels in the garden and digs a small hole. he", 3,
     ["flies to the moon on a kite.", "reads the newspaper upside down in the hole.",
      "puts the shovel in the oven.", "places a seedling in the hole and covers the roots with soil."]),
]

WINOGRANDE = [
    ({"qID": "t-1", "sentence": "The trophy did not fit in the suitcase because the _ was too big.",
      "option1": "trophy", "option2": "suitcase"}, "1"),
    ({"qID": "t-2", "sentence": "Anna helped Maria with the homework because _ was good at math.",
      "option1": "Anna", "option2": "Maria"}, "1"),
    ({"qID": "t-3", "sentence": "The cup broke when it fell on the floor because the _ was hard.",
      "option1": "cup", "option2": "floor"}, "2"),
]


def _arc(i: str, stem: str, texts: list[str], labels: list[str], key: str) -> dict:
    return {"id": i, "question": {"stem": stem, "choices": [{"text": t, "label": lab} for t, lab in zip(texts, labels)]},
            "answerKey": key}


ARC_EASY = [
    _arc("e1", "Which of these is a source of light?", ["the Sun", "a rock", "a shadow", "a cloud"],
         list("ABCD"), "A"),
    _arc("e2", "What do plants need to make food?", ["darkness", "sunlight", "salt", "plastic"],
         list("ABCD"), "B"),
    _arc("e3", "Which state of matter has a fixed shape?", ["gas", "liquid", "solid"], list("ABC"), "C"),
]

ARC_CHALLENGE = [
    _arc("c1", "Which process changes liquid water into water vapor?", ["condensation", "evaporation",
         "freezing", "melting"], list("1234"), "2"),
    _arc("c2", "What causes the seasons on Earth?", ["the tilt of Earth's axis", "the distance to the Moon",
         "ocean currents", "volcanic activity"], list("ABCD"), "A"),
    _arc("c3", "Which is a renewable energy source?", ["coal", "oil", "natural gas", "wind", "uranium"],
         list("ABCDE"), "D"),
]

OPENBOOKQA = [
    _arc("o1", "A magnet will stick to", ["a wooden spoon", "an iron nail", "a glass cup", "a paper bag"],
         list("ABCD"), "B"),
    _arc("o2", "When it is cold outside, people wear", ["swimsuits", "sandals", "warm coats", "sunglasses"],
         list("ABCD"), "C"),
    _arc("o3", "Which of these would help a plant grow?", ["water", "darkness", "vinegar", "sand only"],
         list("ABCD"), "A"),
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_data_dir(root: Path) -> Path:
    """Write a complete small data folder (every perplexity set and task) under ``root``."""
    (root / "wikitext-2-raw").mkdir(parents=True, exist_ok=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(WIKI_LINES) + "\n", encoding="utf-8")
    (root / "ptb").mkdir(exist_ok=True)
    (root / "ptb" / "ptb.valid.txt").write_text("\n".join(PTB_LINES) + "\n", encoding="utf-8")
    _write_jsonl(root / "boolq" / "val.jsonl", BOOLQ)
    _write_jsonl(root / "piqa" / "valid.jsonl", [r for r, _ in PIQA])
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{y}\n" for _, y in PIQA))
    (root / "hellaswag").mkdir(exist_ok=True)
    (root / "hellaswag" / "hellaswag_val_full.txt").write_text(
        "".join(f"{ctx}\n{y}\n" + "".join(e + "\n" for e in ends) for ctx, y, ends in HELLASWAG), encoding="utf-8")
    _write_jsonl(root / "winogrande" / "dev.jsonl", [dict(r, answer=y) for r, y in WINOGRANDE])
    (root / "winogrande" / "dev-labels.lst").write_text("".join(f"{y}\n" for _, y in WINOGRANDE))
    _write_jsonl(root / "arc_easy" / "ARC-Easy-Test.jsonl", ARC_EASY)
    _write_jsonl(root / "arc_challenge" / "ARC-Challenge-Test.jsonl", ARC_CHALLENGE)
    _write_jsonl(root / "openbookqa" / "test.jsonl", OPENBOOKQA)
    return root


# ----------------------------------------------------------------------------------------------
# scoring by hand, from the raw files and the prompts as the harness's YAML files describe them


def _jsonl(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def _lines(path: Path, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line, _ in zip(f, range(n))]


def _hellaswag_clean(text: str) -> str:
    # hellaswag/utils.py's preprocess, restated
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hand_items(task: str, data_dir: Path, n: int) -> list[dict]:
    """The first ``n`` items of ``task`` as ``{"pairs": [(context, continuation)], "gold", "norm_len"}``."""
    d = Path(data_dir)
    items = []
    if task == "boolq":
        for r in _jsonl(d / "boolq/val.jsonl", n):
            ctx = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
            items.append({"pairs": [(ctx, " no"), (ctx, " yes")], "gold": int(r["label"] == "true"),
                          "choices": ["no", "yes"]})
    elif task == "piqa":
        for r, y in zip(_jsonl(d / "piqa/valid.jsonl", n), _lines(d / "piqa/valid-labels.lst", n)):
            ctx = f"Question: {r['goal']}\nAnswer:"
            items.append({"pairs": [(ctx, " " + r["sol1"]), (ctx, " " + r["sol2"])], "gold": int(y),
                          "choices": [r["sol1"], r["sol2"]]})
    elif task == "hellaswag":
        lines = (d / "hellaswag/hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")
        for i in range(n):
            head, y, ends = lines[6 * i], int(lines[6 * i + 1]), lines[6 * i + 2:6 * i + 6]
            ctx = _hellaswag_clean(head)
            choices = [_hellaswag_clean(e) for e in ends]
            items.append({"pairs": [(ctx, " " + c) for c in choices], "gold": y, "choices": choices})
    elif task == "winogrande":
        for r, y in zip(_jsonl(d / "winogrande/dev.jsonl", n), _lines(d / "winogrande/dev-labels.lst", n)):
            cut = r["sentence"].index("_")
            rest = " " + r["sentence"][cut + 1:].strip()
            contexts = [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]]
            items.append({"pairs": [(c, rest) for c in contexts], "gold": int(y) - 1, "choices": contexts})
    elif task in ("arc_easy", "arc_challenge", "openbookqa"):
        file = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
                "openbookqa": "openbookqa/test.jsonl"}[task]
        for r in _jsonl(d / file, n):
            stem = r["question"]["stem"]
            ctx = stem if task == "openbookqa" else f"Question: {stem}\nAnswer:"
            texts = [c["text"] for c in r["question"]["choices"]]
            labels = [c["label"] for c in r["question"]["choices"]]
            items.append({"pairs": [(ctx, " " + t) for t in texts], "gold": labels.index(r["answerKey"].strip()),
                          "choices": texts})
    else:
        raise ValueError(task)
    return items


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): one forward pass on context+continuation, summed in float64."""
    ctx_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[:len(ctx_ids)] == ctx_ids
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(ctx_ids), len(whole))))


def score_by_hand(model, tokenizer, items: list[dict]) -> dict:
    """Per-item log-likelihoods, predictions and the acc / acc_norm over ``items``."""
    lls, preds, preds_norm = [], [], []
    for item in items:
        ll = [continuation_logprob(model, tokenizer, c, x) for c, x in item["pairs"]]
        norm = [v / len(ch) for v, ch in zip(ll, item["choices"])]
        lls.append(ll)
        preds.append(max(range(len(ll)), key=ll.__getitem__))
        preds_norm.append(max(range(len(norm)), key=norm.__getitem__))
    n = len(items)
    return {
        "lls": lls, "preds": preds, "preds_norm": preds_norm,
        "acc": sum(p == it["gold"] for p, it in zip(preds, items)) / n,
        "acc_norm": sum(p == it["gold"] for p, it in zip(preds_norm, items)) / n,
    }


def reference_perplexity(model, ids: torch.Tensor, seq_len: int, bos_id: int | None = None,
                         limit: int | None = None) -> float:
    """Straightforward loop: one chunk at a time, log-softmax in float64, manual sum."""
    total, count = 0.0, 0
    n_chunks = len(ids) // seq_len if limit is None else min(limit, len(ids) // seq_len)
    with torch.no_grad():
        for c in range(n_chunks):
            chunk = ids[c * seq_len:(c + 1) * seq_len].tolist()
            inp = ([bos_id] if bos_id is not None else []) + chunk
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].double(), dim=-1)
            for t in range(1, len(inp)):
                total -= float(logp[t - 1, inp[t]])
                count += 1
    return math.exp(total / count)
