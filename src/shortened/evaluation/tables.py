"""Results tables in the paper's layout, and side-by-side comparison of result files.

One row per model: WikiText-2 and PTB perplexity, then the seven zero-shot tasks (accuracy in %, with
the paper's metric for each task) and their plain average. Columns that no result has are left out;
cells a result lacks show "-".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ShortenedError
from ..io import read_json
from .zeroshot import PAPER_METRICS

#: Column titles of the paper's table.
PPL_TITLES = {"wikitext2": "WikiText-2", "ptb": "PTB"}
TASK_TITLES = {
    "boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
    "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA",
}

RESULTS_KIND = "shortened-evaluation"


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file written by ``shortened eval``, refusing anything else with a clear error."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("kind") != RESULTS_KIND:
        raise ShortenedError(f"{path} is not a results file of 'shortened eval'")
    return data


def _ppl_columns(results: Sequence[dict[str, Any]]) -> list[str]:
    present = [name for r in results for name in r.get("perplexity", {})]
    named = [n for n in PPL_TITLES if n in present]
    others = sorted(set(present) - set(PPL_TITLES))
    return named + others


def _kl_columns(results: Sequence[dict[str, Any]], ppl_cols: Sequence[str]) -> list[str]:
    """The perplexity sets some result also measured the KL to a reference model on."""
    return [p for p in ppl_cols if any("kl_to_reference" in r.get("perplexity", {}).get(p, {}) for r in results)]


def _task_columns(results: Sequence[dict[str, Any]]) -> list[str]:
    present = {name for r in results for name in r.get("zeroshot", {})}
    return [t for t in PAPER_METRICS if t in present]


def _title(ppl_name: str) -> str:
    return PPL_TITLES.get(ppl_name) or Path(ppl_name).name


def markdown_table(results: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> str:
    """A Markdown table with one row per result (perplexity: lower is better; accuracy in %)."""
    if not results:
        raise ShortenedError("no results to tabulate")
    names = list(names) if names is not None else [r.get("name") or f"model {i + 1}" for i, r in enumerate(results)]
    ppl_cols, task_cols = _ppl_columns(results), _task_columns(results)
    kl_cols = _kl_columns(results, ppl_cols)
    header = ["Model", *(f"{_title(p)} PPL↓" for p in ppl_cols), *(f"{_title(p)} KL↓" for p in kl_cols),
              *(f"{TASK_TITLES[t]} ({PAPER_METRICS[t]})" for t in task_cols)]
    if task_cols:
        header.append("Average↑")
    rows = []
    for name, r in zip(names, results):
        row = [name]
        for p in ppl_cols:
            entry = r.get("perplexity", {}).get(p)
            row.append(f"{entry['value']:.2f}" if entry else "-")
        for p in kl_cols:
            kl = r.get("perplexity", {}).get(p, {}).get("kl_to_reference")
            row.append(f"{kl:.4f}" if kl is not None else "-")
        for t in task_cols:
            entry = r.get("zeroshot", {}).get(t)
            row.append(f"{100 * entry['value']:.2f}" if entry else "-")
        if task_cols:
            avg = r.get("average")
            row.append(f"{100 * avg:.2f}" if avg is not None else "-")
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = _notes(results, names)
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def _notes(results: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """Footnotes that keep rows honest: limits, settings that differ between rows, averages over fewer than
    seven tasks; each names the rows it applies to when they are not all alike."""
    notes = []
    limits = [r.get("settings", {}).get("limit") for r in results]
    if len(set(limits)) == 1 and limits[0] is not None:
        notes.append(f"Partial evaluation: --limit {limits[0]} "
                     "(first N items per task, first N chunks per perplexity set).")
    elif any(x is not None for x in limits):
        notes.append("Partial evaluation (first N items per task, first N chunks per perplexity set): "
                     + _by_row(limits, names, lambda x: f"--limit {x}" if x is not None else "full") + ".")
    differing = []
    for label, values in (("seq_len", [r.get("settings", {}).get("seq_len") for r in results]),
                          ("bos", [r.get("settings", {}).get("bos") for r in results]),
                          ("dtype", [r.get("model", {}).get("dtype") for r in results])):
        if len(set(map(str, values))) > 1:
            differing.append(f"{label}: " + _by_row(values, names, str))
    if differing:
        notes.append("**Settings differ between rows, so their numbers are not directly comparable:** "
                     + "; ".join(differing) + ".")
    if any("kl_to_reference" in e for r in results for e in r.get("perplexity", {}).values()):
        notes.append("KL: mean per-token KL(reference || model) of the next-token distributions on the same chunks "
                     "(--reference).")
    partial = [name for name, r in zip(names, results)
               if r.get("average") is not None and len(r.get("average_over", [])) < len(PAPER_METRICS)]
    if partial:
        notes.append("Average over fewer than the seven tasks for: " + "; ".join(f"*{p}*" for p in partial) + ".")
    return notes


def _by_row(values: Sequence[Any], names: Sequence[str], show: Any) -> str:
    """"A (*row 1*, *row 2*), B (*row 3*)": each distinct value with the rows that have it."""
    groups: dict[str, list[str]] = {}
    for value, name in zip(values, names):
        groups.setdefault(show(value), []).append(f"*{name}*")
    return ", ".join(f"{value} ({', '.join(rows)})" for value, rows in groups.items())


def compare_files(paths: Sequence[str | os.PathLike]) -> str:
    """The Markdown table of several results files side by side (names from the files)."""
    results = [load_results(p) for p in paths]
    names = [r.get("name") or Path(p).stem for r, p in zip(results, paths)]
    if len(set(names)) < len(names):  # same model name twice: tell the rows apart by file
        names = [f"{n} ({Path(p).name})" for n, p in zip(names, paths)]
    return markdown_table(results, names)
