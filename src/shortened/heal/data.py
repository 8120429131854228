"""Healing data: Alpaca instructions (the paper's template, prompt tokens masked), packed plain text,
Hub datasets, or ready token ids.

Every example is a dict ``{"input_ids": [...], "labels": [...]}`` of equal-length int lists; a label
of ``-100`` is not trained on (the Alpaca prompt). Reading and tokenising are done once, before
training, and are deterministic (the validation split is drawn with an explicit seed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import read_text, strip_gutenberg  # noqa: F401  (strip_gutenberg: re-exported, the one Gutenberg rule)
from ..errors import ShortenedError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: ``--data alpaca``: the Alpaca set the paper heals on (cleaned 52k Stanford Alpaca).
ALPACA_HUB_ID = "yahma/alpaca-cleaned"

# The Alpaca template of tloen/alpaca-lora (templates/alpaca.json), which the paper's code uses.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Example = dict[str, list[int]]


@dataclass
class HealingData:
    """Tokenised training and validation examples, plus where they came from."""

    train: list[Example]
    val: list[Example]
    kind: str = "tokens"  # "alpaca", "text" or "tokens"
    source: str = "token ids"

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "train_examples": len(self.train),
                "val_examples": len(self.val),
                "train_target_tokens": sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in self.train)}


# ----------------------------------------------------------------------------------------------------
# Alpaca


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (everything before the response) for one record."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _encode_cut(tokenizer: Any, text: str, cutoff: int) -> list[int]:
    """The ids of ``text`` cut to ``cutoff`` tokens on the tokenizer's truncation side. Cut here rather
    than by ``truncation=True``, which leaves the truncation setting in a fast tokenizer's backend, so the
    saved tokenizer.json would cut every later user's input at ``cutoff``."""
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) <= cutoff:
        return ids
    return ids[-cutoff:] if getattr(tokenizer, "truncation_side", "right") == "left" else ids[:cutoff]


def tokenize_alpaca(record: dict[str, str], tokenizer: Any, cutoff: int = 256,
                    train_on_inputs: bool = False) -> Example:
    """Tokenise one Alpaca record as alpaca-lora does: prompt + response, truncated to ``cutoff``
    tokens, EOS appended when it fits, and the prompt tokens labelled -100 (unless ``train_on_inputs``)."""
    prompt = alpaca_prompt(record["instruction"], record.get("input") or "")
    full = _encode_cut(tokenizer, prompt + record["output"], cutoff)
    eos = tokenizer.eos_token_id
    if eos is not None and len(full) < cutoff and (not full or full[-1] != eos):
        full = full + [eos]
    labels = list(full)
    if not train_on_inputs:
        prompt_ids = _encode_cut(tokenizer, prompt, cutoff)
        # The prompt's tokens are a prefix of the full text's, except where the tokenizer merges across
        # the prompt/response boundary; then only the common prefix counts as prompt.
        n = 0
        while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
            n += 1
        labels[:n] = [IGNORE_INDEX] * n
    return {"input_ids": list(full), "labels": labels}


def read_alpaca_file(path: str | os.PathLike) -> list[dict[str, str]]:
    """Records ``{instruction, input, output}`` from a JSON array or JSONL file.

    Raises ShortenedError naming the file and line for an empty file, invalid JSON, or a record
    without a string ``instruction`` and ``output``.
    """
    path = Path(path)
    text = read_text(path, gutenberg=False)
    if not text.strip():
        raise ShortenedError(f"{path} is empty")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShortenedError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        lines = _array_element_lines(text) if rows else []
        records = list(zip(rows, lines or [0] * len(rows)))
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), lineno))
            except json.JSONDecodeError as exc:
                raise ShortenedError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not records:
        raise ShortenedError(f"{path} holds no records")
    out = []
    for row, lineno in records:
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise ShortenedError(f"{where}: expected an object with instruction, input, output; got {type(row).__name__}")
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise ShortenedError(f"{where}: record has no string '{key}' (Alpaca format: instruction, input, output)")
        if not isinstance(row.get("input", ""), (str, type(None))):
            raise ShortenedError(f"{where}: 'input' must be a string")
        out.append({"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]})
    return out


def _array_element_lines(text: str) -> list[int]:
    """The line on which each element of a top-level JSON array starts (for error messages)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    lines = []
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)


# ----------------------------------------------------------------------------------------------------
# Plain text

def text_files(path: str | os.PathLike) -> list[Path]:
    """A text file, or every ``*.txt`` under a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ShortenedError(f"no .txt files under {path}")
        return files
    if path.is_file():
        return [path]
    raise ShortenedError(f"data path not found: {path}")


def read_text_files(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(name, text)`` for a text file, or every ``*.txt`` under a folder (sorted)."""
    docs = [(str(p), read_text(p)) for p in text_files(path)]
    for name, text in docs:
        if not text.strip():
            raise ShortenedError(f"{name} is empty")
    return docs


def pack_tokens(docs: Sequence[Sequence[int]], seq_len: int, eos_token_id: int | None = None) -> list[Example]:
    """Concatenate token lists (EOS between documents) and cut them into ``seq_len`` chunks (the
    incomplete tail is dropped); every token is a target."""
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        if eos_token_id is not None:
            stream.append(eos_token_id)
    return [{"input_ids": stream[i:i + seq_len], "labels": stream[i:i + seq_len]}
            for i in range(0, len(stream) - seq_len + 1, seq_len)]


def tokenize_texts(texts: Sequence[str], tokenizer: Any, seq_len: int) -> list[Example]:
    """Tokenise documents and pack them into ``seq_len``-token training sequences."""
    # Long documents tokenise in paragraphs: fast tokenizers are slow on megabyte strings.
    docs = []
    for text in texts:
        ids: list[int] = []
        for part in re.split(r"(?<=\n\n)", text):
            if part:
                ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
        docs.append(ids)
    return pack_tokens(docs, seq_len, tokenizer.eos_token_id)


# ----------------------------------------------------------------------------------------------------
# Splitting, loading, batching


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split into (train, val); ``val_fraction`` of the examples (at least one when
    the fraction is positive) go to validation."""
    if not 0 <= val_fraction < 1:
        raise ShortenedError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, round(len(examples) * val_fraction)) if val_fraction > 0 else 0
    if len(examples) - n_val < 1:
        raise ShortenedError(f"only {len(examples)} example(s): too few to keep a validation split of {val_fraction}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    val = [examples[i] for i in sorted(order[:n_val])]
    train = [examples[i] for i in sorted(order[n_val:])]
    return train, val


def subset_for_passes(data: HealingData, steps: int, global_batch: int, passes: float,
                      seed: int) -> HealingData:
    """The seeded random subset of ``data.train`` that ``steps`` optimizer steps of ``global_batch``
    examples go over ``passes`` times (all of it when the data is smaller); validation unchanged."""
    if not passes > 0 or not math.isfinite(passes):
        raise ShortenedError(f"--passes must be a positive number, got {passes}")
    n = min(len(data.train), max(1, math.ceil(steps * global_batch / passes)))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    train = [data.train[i] for i in sorted(order[:n])]
    return HealingData(train, data.val, data.kind, data.source)


def check_healing_source(spec: str | os.PathLike) -> None:
    """Fail fast on healing data of local files that :func:`load_healing_data` would refuse (missing,
    empty, not text), from each file's first megabyte; ``alpaca`` and ``hf:`` are checked when read."""
    from ..data import check_text_file

    spec = str(spec)
    if spec == "alpaca" or spec.startswith("hf:"):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise ShortenedError(f"data path not found: {spec} (use alpaca, hf:NAME, a .json/.jsonl file, or text)")
    for file in text_files(path):
        check_text_file(file)


def load_healing_data(
    spec: str | os.PathLike,
    tokenizer: Any,
    *,
    seq_len: int = 256,
    val_fraction: float = 0.05,
    seed: int = 0,
    train_on_inputs: bool = False,
    max_examples: int | None = None,
) -> HealingData:
    """Read and tokenise ``spec``: ``alpaca`` (the Hub's yahma/alpaca-cleaned), ``hf:NAME[:CONFIG]``
    (a Hub dataset with instruction/output or text columns), an Alpaca ``.json``/``.jsonl`` file, or a
    plain text file or folder of ``.txt`` files (packed into ``seq_len``-token sequences).

    Alpaca records are cut off at ``seq_len`` tokens with the prompt masked from the loss.
    ``max_examples`` keeps the first N examples (after tokenising, before splitting).
    """
    if tokenizer is None:
        raise ShortenedError("healing text needs a tokenizer: pass tokenizer= with a model given as a module (or a "
                             "ready HealingData of token ids)")
    if seq_len < 2:
        raise ShortenedError(f"--seq-len must be at least 2, got {seq_len}")
    spec = str(spec)
    if spec == "alpaca":
        spec = f"hf:{ALPACA_HUB_ID}"
    if spec.startswith("hf:"):
        rows, kind = _load_hub(spec[3:])
        source = spec
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ShortenedError(f"data path not found: {spec} (use alpaca, hf:NAME, a .json/.jsonl file, or text)")
        source = str(path)
        if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
            rows, kind = _read_json_rows(path)
        else:
            rows, kind = [text for _, text in read_text_files(path)], "text"
    if kind == "alpaca":
        examples = [tokenize_alpaca(r, tokenizer, seq_len, train_on_inputs) for r in rows]
        examples = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"][1:])]
    else:
        examples = tokenize_texts(rows, tokenizer, seq_len)
    if max_examples is not None:
        examples = examples[:max_examples]
    if not examples:
        raise ShortenedError(f"{source} yields no training examples (text shorter than --seq-len {seq_len}?)")
    train, val = split_examples(examples, val_fraction, seed)
    return HealingData(train, val, kind, source)


def _read_json_rows(path: Path) -> tuple[list, str]:
    """Alpaca records, or the ``text`` field of JSONL rows."""
    text = read_text(path, gutenberg=False)
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        head = json.loads(first) if not first.lstrip().startswith("[") else None
    except json.JSONDecodeError:
        head = None
    if isinstance(head, dict) and "text" in head and "instruction" not in head:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                raise ShortenedError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
            if not isinstance(value, str):
                raise ShortenedError(f"{path}:{lineno}: 'text' must be a string")
            rows.append(value)
        return rows, "text"
    return read_alpaca_file(path), "alpaca"


def _load_hub(name: str) -> tuple[list, str]:
    """Rows of a Hub dataset's train split: ``NAME`` or ``NAME:CONFIG``."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise ShortenedError("hf: data needs the 'datasets' package") from exc
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as exc:  # datasets raises many types for offline/missing; all mean "cannot get it"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShortenedError(f"cannot load Hub dataset '{name}' (offline?): {first}; pass a local file instead") from exc
    columns = set(ds.column_names)
    if {"instruction", "output"} <= columns:
        return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in ds], "alpaca"
    if "text" in columns:
        return [t for t in ds["text"] if t and t.strip()], "text"
    raise ShortenedError(f"Hub dataset '{name}' has neither instruction/output nor text columns: {sorted(columns)}")


def collate(examples: Sequence[Example], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
