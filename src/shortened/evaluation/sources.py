"""Reading the evaluation data: perplexity texts and zero-shot task records.

Every reader takes the original files of a data folder (the layout of ``../shared/data``, described in
its README) and returns exactly what the Hugging Face Hub copy of the same data would give, so the
evaluation is the same online and offline:

* perplexity texts are the HF rows joined with ``"\\n\\n"`` (the perplexity literature's convention);
* task records have the field names and types of the Hub dataset the harness's task reads, so the
  harness's own ``process_docs`` / ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` apply as they are.

Without a data folder the same data come from the Hub through ``datasets`` (when online).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ShortenedError

#: Perplexity sets: name -> (file inside the data folder, Hub dataset, Hub config, split, text field).
PPL_SETS: dict[str, tuple[str, str, str | None, str, str]] = {
    "wikitext2": ("wikitext-2-raw/wiki.test.raw", "Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb/ptb.valid.txt", "ptb-text-only/ptb_text_only", "penn_treebank", "validation", "sentence"),
}

#: What the literature joins perplexity rows with.
ROW_SEPARATOR = "\n\n"


# ---------------------------------------------------------------------------------------------------
# perplexity texts


def wikitext_rows(raw: str) -> list[str]:
    """HF ``wikitext-2-raw-v1`` rows from the text of ``wiki.test.raw``.

    HF's builder yields, for each line ``L`` of the file, ``""`` when ``L`` is blank and ``L + "\\n"``
    otherwise. Split on ``"\\n"`` only: ``str.splitlines`` would also split on Unicode separators that
    occur inside WikiText lines.
    """
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with a newline
    return ["" if line.strip() == "" else line + "\n" for line in lines]


def ptb_rows(raw: str) -> list[str]:
    """HF ``ptb_text_only`` sentences from the text of ``ptb.*.txt`` (the builder strips each line)."""
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


_ROW_READERS: dict[str, Callable[[str], list[str]]] = {"wikitext2": wikitext_rows, "ptb": ptb_rows}


def read_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file as it is (LF line ends), through the one text reader: one-line errors for a
    missing, undecodable or binary file."""
    from ..data import read_text

    return read_text(path, encodings=("utf-8",), gutenberg=False)


def ppl_rows(name: str, data_dir: str | os.PathLike | None) -> list[str]:
    """The rows of a named perplexity set, from ``data_dir`` or (when None) the Hub."""
    rel, hub_path, hub_name, split, field = PPL_SETS[name]
    if data_dir is not None:
        path = Path(data_dir).expanduser() / rel
        if not path.is_file():
            raise ShortenedError(f"perplexity set '{name}' needs {path} (missing in the data folder)")
        return _ROW_READERS[name](read_text_file(path))
    dataset = _hub_dataset(hub_path, hub_name, split, what=f"perplexity set '{name}'", local_file=rel)
    return list(dataset[field])


# ---------------------------------------------------------------------------------------------------
# zero-shot task records


@dataclass(frozen=True)
class TaskData:
    """Where one harness task's evaluation split lives in a data folder."""

    #: harness task name
    task: str
    #: files read, relative to the data folder (the first one is named in errors)
    files: tuple[str, ...]
    #: the split the harness evaluates (its test split when it has one, else validation)
    split: str
    #: reads the files (absolute paths, in the order of ``files``) into HF-schema records
    reader: Callable[..., list[dict[str, Any]]]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _check_same_length(records: list, labels: list, files: tuple[Path, Path]) -> None:
    if len(records) != len(labels):
        raise ShortenedError(f"{files[0]} has {len(records)} items but {files[1]} has {len(labels)} labels")


def read_boolq(path: Path) -> list[dict[str, Any]]:
    """SuperGLUE BoolQ ``val.jsonl`` -> ``aps/super_glue`` boolq rows (label 1 = true)."""
    to_int = {"true": 1, "false": 0, True: 1, False: 0}  # bools also match the ints 1 and 0
    out = []
    for r in _jsonl(path):
        try:
            label = to_int[r["label"]]
        except KeyError:
            raise ShortenedError(f"{path}: unexpected BoolQ label {r['label']!r}") from None
        out.append({"question": r["question"], "passage": r["passage"], "idx": int(r["idx"]), "label": label})
    return out


def read_piqa(path: Path, labels_path: Path) -> list[dict[str, Any]]:
    """PIQA ``valid.jsonl`` + ``valid-labels.lst`` -> ``baber/piqa`` rows."""
    records, labels = _jsonl(path), _labels(labels_path)
    _check_same_length(records, labels, (path, labels_path))
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
            for r, y in zip(records, labels)]


def read_hellaswag(path: Path) -> list[dict[str, Any]]:
    """The 6-line HellaSwag text format -> ``Rowan/hellaswag`` rows.

    Each item is ``activity_label: ctx``, the gold index and four endings. The file does not split
    ``ctx`` into ``ctx_a``/``ctx_b``, so the whole context goes to ``ctx_a`` and ``ctx_b`` is empty: the
    harness then builds ``activity_label: ctx`` without capitalising the start of ``ctx_b``, which is
    the only (small) difference from the Hub rows.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ShortenedError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    out = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or label not in {"0", "1", "2", "3"}:
            raise ShortenedError(f"{path}, line {i + 1}: not a HellaSwag item (expected 'label: context' then 0-3)")
        out.append({"ind": i // 6, "activity_label": activity, "ctx_a": ctx, "ctx_b": "",
                    "ctx": ctx, "endings": endings, "label": label})
    return out


def read_winogrande(path: Path, labels_path: Path) -> list[dict[str, Any]]:
    """WinoGrande ``dev.jsonl`` (+ labels) -> ``allenai/winogrande`` rows (answer ``"1"``/``"2"``)."""
    records, labels = _jsonl(path), _labels(labels_path)
    _check_same_length(records, labels, (path, labels_path))
    out = []
    for r, y in zip(records, labels):
        if r.get("answer") not in (None, "", y):
            raise ShortenedError(f"{path}: answer of {r.get('qID')} disagrees with {labels_path}")
        out.append({"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": y})
    return out


def _choices(question: dict[str, Any]) -> dict[str, list[str]]:
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def read_arc(path: Path) -> list[dict[str, Any]]:
    """AI2 ARC ``*.jsonl`` -> ``allenai/ai2_arc`` rows."""
    return [{"id": r["id"], "question": r["question"]["stem"], "choices": _choices(r["question"]),
             "answerKey": r["answerKey"]} for r in _jsonl(path)]


def read_openbookqa(path: Path) -> list[dict[str, Any]]:
    """OpenBookQA main ``test.jsonl`` -> ``allenai/openbookqa`` (main) rows."""
    return [{"id": r["id"], "question_stem": r["question"]["stem"], "choices": _choices(r["question"]),
             "answerKey": r["answerKey"]} for r in _jsonl(path)]


#: The seven zero-shot tasks of the paper, in its column order.
TASKS: dict[str, TaskData] = {
    "boolq": TaskData("boolq", ("boolq/val.jsonl",), "validation", read_boolq),
    "piqa": TaskData("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", read_piqa),
    "hellaswag": TaskData("hellaswag", ("hellaswag/hellaswag_val_full.txt",), "validation", read_hellaswag),
    "winogrande": TaskData("winogrande", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), "validation",
                           read_winogrande),
    "arc_easy": TaskData("arc_easy", ("arc_easy/ARC-Easy-Test.jsonl",), "test", read_arc),
    "arc_challenge": TaskData("arc_challenge", ("arc_challenge/ARC-Challenge-Test.jsonl",), "test", read_arc),
    "openbookqa": TaskData("openbookqa", ("openbookqa/test.jsonl",), "test", read_openbookqa),
}


def task_records(task: str, data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The evaluation records of ``task`` read from ``data_dir``, in the Hub dataset's schema."""
    if task not in TASKS:
        raise ShortenedError(f"no local data layout for task '{task}' (known: {', '.join(TASKS)})")
    spec = TASKS[task]
    paths = [Path(data_dir).expanduser() / rel for rel in spec.files]
    for path in paths:
        if not path.is_file():
            raise ShortenedError(f"task '{task}' needs {path} (missing in the data folder)")
    try:
        return spec.reader(*paths)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ShortenedError(f"task '{task}': cannot read {paths[0]}: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# Hub


def _hub_dataset(path: str, name: str | None, split: str, *, what: str, local_file: str) -> Any:
    """``datasets.load_dataset`` with a one-line error naming the local file that would replace it."""
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # offline, missing, gated...: datasets raises many unrelated types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShortenedError(
            f"{what}: cannot load {path}{'/' + name if name else ''} ({split}) from the Hugging Face Hub "
            f"({reason[:200]}); offline, pass a data folder holding {local_file}"
        ) from None


def check_local_files(ppl: list[str], tasks: list[str], data_dir: str | os.PathLike) -> None:
    """Name the first file of ``data_dir`` that the requested sets and tasks need but lack."""
    root = Path(data_dir).expanduser()
    needed = [(f"perplexity set '{name}'", PPL_SETS[name][0]) for name in ppl if name in PPL_SETS]
    needed += [(f"task '{task}'", rel) for task in tasks if task in TASKS for rel in TASKS[task].files]
    for what, rel in needed:
        if not (root / rel).is_file():
            raise ShortenedError(f"{what} needs {root / rel} (missing in the data folder)")
