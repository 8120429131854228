"""Calibration data: ``n_samples`` random windows of ``seq_len`` tokens, as in the paper.

Sources (``--calib``):

- local text: a file, a folder (searched recursively) or a glob of ``.txt`` files (one document each,
  as is a file named explicitly whatever its suffix;
  UTF-8, else cp1252; CRLF normalised; a Project Gutenberg header and footer are stripped) and ``.jsonl``
  files (one document per line, in its ``text`` field);
- ``self``: text sampled from the model itself (seeded), so pruning needs no data at all;
- Hugging Face datasets when online: ``wikitext2``, ``bookcorpus``, ``c4`` or ``hf:NAME[:CONFIG][:SPLIT]``
  (the ``text`` column, else the first string column).

Windows are drawn as in the paper's code: pick a document at random among those at least ``seq_len``
tokens long, then a random window of it (Python ``random.Random(seed)``). Text is tokenized without
special tokens. For Hub datasets, whose rows may be short (BookCorpus rows are sentences), a document is
a run of consecutive rows starting at a random row, extended until it is ``seq_len`` tokens long.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ShortenedError

TEXT_SUFFIXES = (".txt", ".text")
#: Encodings of text files, tried in order: UTF-8, else cp1252 (older Project Gutenberg files).
TEXT_ENCODINGS = ("utf-8", "cp1252")
JSONL_SUFFIXES = (".jsonl",)

#: Short names of Hub datasets: (path, config, split, load_dataset extra kwargs).
HUB_ALIASES: dict[str, tuple[str, str | None, str, dict[str, Any]]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", {}),
    "bookcorpus": ("bookcorpus", None, "train", {}),
    # One shard of C4's English training set, as SparseGPT and the pruning literature use.
    "c4": ("allenai/c4", None, "train", {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}),
}

_PG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)
_PG_END = re.compile(r"^\s*\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)


@dataclass
class Calibration:
    """Calibration token ids and what produced them (recorded in scores files and pruning.json)."""

    ids: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def calibration_ids(
    source: str,
    tokenizer: Any,
    *,
    n_samples: int = 10,
    seq_len: int = 128,
    seed: int = 1234,
    model: Any = None,
) -> torch.Tensor:
    """A LongTensor[n_samples, seq_len] of calibration windows from ``source`` (see the module doc)."""
    return calibration_data(source, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, model=model).ids


def calibration_data(
    source: str,
    tokenizer: Any,
    *,
    n_samples: int = 10,
    seq_len: int = 128,
    seed: int = 1234,
    model: Any = None,
) -> Calibration:
    """Like :func:`calibration_ids`, with a record of the settings, files and a checksum of the ids."""
    for name, v, low in (("n-samples", n_samples, 1), ("seq-len", seq_len, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ShortenedError(f"--{name} must be an integer >= {low}, got {v}")
    if isinstance(seed, bool) or not isinstance(seed, int):  # None would draw other windows on every call
        raise ShortenedError(f"--seed must be an integer, got {seed!r}")
    if isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError("calibration needs a tokenizer object (load_model returns one), not a name or path")
    source = str(source)
    info: dict[str, Any] = {"source": source, "n_samples": n_samples, "seq_len": seq_len, "seed": seed}
    if source == "self":
        if model is None:
            raise ShortenedError("--calib self samples text from the model, so it needs the model")
        from .offload import check_in_memory

        check_in_memory(model, "--calib self (text sampled from the model)")
        _check_position_limit(model, seq_len)  # before generating: far too long would not end
        ids = _self_generated(model, tokenizer, n_samples, seq_len, seed)
        info["kind"] = "self"
    else:
        if tokenizer is None:
            raise ShortenedError("calibration text needs a tokenizer, and the model has none")
        if source in HUB_ALIASES or source.startswith("hf:"):
            ids, extra = _from_hub(source, tokenizer, n_samples, seq_len, seed)
        else:
            ids, extra = _from_files(source, tokenizer, n_samples, seq_len, seed)
        info.update(extra)
        _check_position_limit(model, seq_len)  # after the text: a text too short for seq_len says so first
    info["ids_sha256"] = hashlib.sha256(ids.numpy().astype("int64").tobytes()).hexdigest()
    return Calibration(ids=ids, info=info)


def _check_position_limit(model: Any, seq_len: int) -> None:
    if model is not None:
        from .archs import check_seq_len

        check_seq_len(model, seq_len)


# ------------------------------------------------------------------------------------------ local files
def find_files(source: str) -> list[Path]:
    """The calibration files named by a path, a folder (recursive) or a glob."""
    path = Path(source).expanduser()
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    if path.is_file():  # a file named explicitly is read as text whatever its suffix (e.g. wiki.test.raw)
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise ShortenedError(f"no .txt or .jsonl files in calibration folder {path}")
        return files
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    files = [p for p in matches if p.is_file() and p.suffix.lower() in suffixes]
    if not files:
        raise ShortenedError(
            f"calibration source '{source}' is not a file, folder or glob of .txt/.jsonl files, nor one of "
            f"self, {', '.join(HUB_ALIASES)}, hf:NAME[:CONFIG][:SPLIT]")
    return files


def read_text(path: str | os.PathLike, *, encodings: Sequence[str] = TEXT_ENCODINGS, gutenberg: bool = True) -> str:
    """A text file as one string, the one reader of every text input (calibration, healing data,
    evaluation texts): decoded with the first of ``encodings`` that fits (UTF-8: a BOM is dropped;
    cp1252: undefined bytes become U+FFFD), LF line ends, and with ``gutenberg`` a Project Gutenberg
    header and footer stripped (:func:`strip_gutenberg`).

    A file that is not text is refused with one line naming it and saying why: NUL bytes (binary data,
    UTF-16), or more than 1% of its bytes control characters or bytes that no encoding of ``encodings``
    defines (random bytes decode as cp1252 otherwise).
    """
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ShortenedError(f"text file not found: {path}") from None
    except OSError as exc:
        raise ShortenedError(f"cannot read {path}: {exc.strerror or exc}") from None
    text, encoding, error = None, None, None
    for encoding in encodings:
        try:
            text = raw.decode("utf-8-sig" if encoding == "utf-8" else encoding)
            break
        except UnicodeDecodeError as exc:
            error = error or exc
    _refuse_binary(path, raw, undefined=b"" if text is not None else _UNDEFINED_BYTES.get(encoding, b""))
    if text is None:
        if len(encodings) == 1 and encodings[0] == "utf-8":
            raise ShortenedError(f"{path} is not UTF-8 text (byte {error.start}); convert it to UTF-8 first")
        text = raw.decode(encodings[-1], errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return strip_gutenberg(text) if gutenberg else text


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg book (after the START marker, up to the END marker when there is
    one, without blank lines at its ends), else ``text`` unchanged."""
    start = _PG_START.search(text)
    if not start:
        return text
    end = _PG_END.search(text, start.end())
    return text[start.end():end.start() if end else len(text)].strip("\n")


#: Bytes an encoding leaves undefined (decoded as U+FFFD, and counted as not text).
_UNDEFINED_BYTES = {"cp1252": bytes([0x81, 0x8D, 0x8F, 0x90, 0x9D])}
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\x0b\x0c") + b"\x7f"
#: Share of control (or undefined) bytes above which a file is not text; real text has next to none.
MAX_CONTROL_SHARE = 0.01


def _refuse_binary(path: Path, raw: bytes, undefined: bytes = b"") -> None:
    nul = raw.find(b"\x00")
    if nul >= 0:
        hint = " (UTF-16? convert it to UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ShortenedError(f"{path} is not text: it holds NUL bytes (the first at byte {nul}){hint}")
    bad = [bytes([b]) for b in _CONTROL_BYTES + undefined]
    count = sum(raw.count(b) for b in bad)
    if count > MAX_CONTROL_SHARE * len(raw):
        first = min(i for i in (raw.find(b) for b in bad) if i >= 0)
        raise ShortenedError(f"{path} is not text: {100 * count / len(raw):.0f}% of its bytes are control "
                             f"characters or undefined (the first at byte {first})")


#: How much of each file the up-front checks read: enough to tell text from binary, cheap for large corpora.
CHECK_BYTES = 1 << 20


def check_text_file(path: str | os.PathLike) -> None:
    """Refuse a file that the full read would refuse as empty or not text, from its first megabyte (the
    checks of a long command, run before any model is loaded)."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            head = f.read(CHECK_BYTES)
    except FileNotFoundError:
        raise ShortenedError(f"text file not found: {path}") from None
    except OSError as exc:
        raise ShortenedError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head.strip():
        raise ShortenedError(f"{path} is empty")
    undefined = b""
    try:
        head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the megabyte
            undefined = _UNDEFINED_BYTES["cp1252"]
    _refuse_binary(path, head, undefined=undefined)


def check_source(source: str) -> None:
    """Fail fast on a calibration source of local files that cannot work (missing, empty, not text);
    ``self`` and Hub sources are checked where they are read."""
    source = str(source)
    if source == "self" or source in HUB_ALIASES or source.startswith("hf:"):
        return
    for path in find_files(source):
        check_text_file(path)


def read_documents(path: Path) -> list[str]:
    """The documents of one calibration file (a .txt file is one document)."""
    if path.suffix.lower() in JSONL_SUFFIXES:
        docs = []
        for n, line in enumerate(read_text(path, encodings=("utf-8",), gutenberg=False).split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ShortenedError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ShortenedError(f"{path}:{n}: expected a JSON object with a string 'text' field")
            if record["text"].strip():
                docs.append(record["text"])
    else:
        text = read_text(path).strip("\n")
        docs = [text] if text.strip() else []
    return docs


def _from_files(source: str, tokenizer: Any, n: int, seq_len: int, seed: int) -> tuple[torch.Tensor, dict]:
    files = find_files(source)
    docs: list[str] = []
    for path in files:
        found = read_documents(path)
        if not found and len(files) == 1:
            raise ShortenedError(f"calibration file {path} is empty")
        docs.extend(found)
    if not docs:
        raise ShortenedError(f"the calibration files of '{source}' are all empty")
    tokenized = [_tokenize(tokenizer, d) for d in docs]
    ids = sample_windows(tokenized, n, seq_len, seed, what=f"'{source}'")
    return ids, {"kind": "files", "files": [str(p) for p in files], "documents": len(docs)}


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def sample_windows(docs: list[list[int]], n: int, seq_len: int, seed: int, *, what: str = "the text") -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens: a random document of at least ``seq_len`` tokens, then a
    random start in it (``random.Random(seed)``)."""
    eligible = [d for d in docs if len(d) >= seq_len]
    if not eligible:
        longest = max((len(d) for d in docs), default=0)
        raise ShortenedError(
            f"calibration text {what} is shorter than --seq-len {seq_len}: its longest document has "
            f"{longest} tokens")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        doc = eligible[rng.randrange(len(eligible))]
        start = rng.randint(0, len(doc) - seq_len)
        rows.append(doc[start:start + seq_len])
    return torch.tensor(rows, dtype=torch.long)


# ------------------------------------------------------------------------------------------ Hub datasets
def parse_hub_source(source: str) -> tuple[str, str | None, str, dict[str, Any]]:
    """``wikitext2`` / ``bookcorpus`` / ``c4`` or ``hf:NAME[:CONFIG][:SPLIT]`` -> load_dataset arguments."""
    if source in HUB_ALIASES:
        return HUB_ALIASES[source]
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise ShortenedError(f"cannot read '{source}': expected hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split, {}


def _from_hub(source: str, tokenizer: Any, n: int, seq_len: int, seed: int) -> tuple[torch.Tensor, dict]:
    name, config, split, extra = parse_hub_source(source)
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, config, split=split, **extra)
    except Exception as exc:  # datasets raises many types (connection, missing config, offline mode)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShortenedError(
            f"cannot load Hugging Face dataset '{name}' ({first}); when offline use local files "
            f"(--calib PATH) or --calib self") from exc
    column = "text" if "text" in dataset.column_names else next(
        (c for c, f in dataset.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None or len(dataset) == 0:
        raise ShortenedError(f"Hugging Face dataset '{name}' has no text column or no rows")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        for _attempt in range(100):
            tokens: list[int] = []
            i = rng.randrange(len(dataset))
            while len(tokens) < seq_len and i < len(dataset):
                text = dataset[i][column]
                if text and text.strip():
                    tokens.extend(_tokenize(tokenizer, ("\n" if tokens else "") + text))
                i += 1
            if len(tokens) >= seq_len:
                break
        else:
            raise ShortenedError(f"Hugging Face dataset '{name}' has too little text for --seq-len {seq_len}")
        start = rng.randint(0, len(tokens) - seq_len)
        rows.append(tokens[start:start + seq_len])
    info = {"kind": "hub", "dataset": name, "config": config, "split": split, "column": column}
    return torch.tensor(rows, dtype=torch.long), info


# ------------------------------------------------------------------------------------------ self
def _self_generated(model: Any, tokenizer: Any, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` sequences sampled from the model (temperature 1, no top-k/top-p), from its BOS token."""
    from transformers import GenerationConfig

    cfg = model.config
    gen_cfg = getattr(model, "generation_config", None)
    start = next((t for t in (getattr(gen_cfg, "bos_token_id", None), getattr(cfg, "bos_token_id", None),
                              getattr(tokenizer, "bos_token_id", None), getattr(cfg, "eos_token_id", None))
                  if isinstance(t, int)), 0)
    eos = getattr(cfg, "eos_token_id", None)
    pad = getattr(cfg, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else (eos if isinstance(eos, int) else start)
    device = next(model.parameters()).device
    prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
    generation = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1,
        min_new_tokens=seq_len - 1, pad_token_id=pad, eos_token_id=eos, bos_token_id=start)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(prompt, generation_config=generation, attention_mask=torch.ones_like(prompt))
    if out.shape != (n, seq_len):
        raise ShortenedError(f"the model generated {tuple(out.shape)} tokens instead of {(n, seq_len)}")
    return out.cpu().long()
