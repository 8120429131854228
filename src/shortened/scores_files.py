"""Scores files: what ``shortened score`` writes and ``shortened prune --scores`` reads, also kept by
``shortened run``'s scores stage.

One scores file is three files side by side: ``NAME.json`` (criterion, scores, settings, calibration),
``NAME.csv`` (block, score) and ``NAME.png`` (a bar chart), plus ``NAME-search.png`` (the fitness per
generation) for the search. They are written together, the JSON last, so a JSON that exists is complete.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from .scores import BlockScores
from .errors import ShortenedError


def output_paths(out: str | os.PathLike, *, search: bool = False) -> dict[str, Path]:
    """``a.v1.json`` (or ``a.v1``) -> a.v1.json, a.v1.csv, a.v1.png (and, for the search, the fitness
    plot a.v1-search.png): only a final .json is replaced."""
    base = Path(out)
    stem = base.name[:-len(".json")] if base.suffix.lower() == ".json" else base.name
    paths = {kind: base.with_name(f"{stem}.{kind}") for kind in ("json", "csv", "png")}
    if search:
        paths["search"] = base.with_name(f"{stem}-search.png")
    return paths


def scores_record(source: str, model: Any, scores: BlockScores, calibration: dict[str, Any] | None) -> dict[str, Any]:
    """The content of a scores file: ``scores`` of ``model`` (loaded from ``source``) and the calibration
    record they were computed on."""
    return {"format_version": 1, "tool": "shortened", "kind": "block_scores", "model": source,
            "model_type": model.config.model_type, **scores.to_dict(), "calibration": calibration}


def write_scores_files(record: dict[str, Any], paths: dict[str, Path], highlight: list[int] | None = None,
                       *, overwrite: bool = True) -> None:
    """JSON, CSV and PNG (``highlight``: bars drawn red, e.g. the removed blocks), written to temporary files
    and renamed into place together (the JSON last)."""
    from .io import atomic_outputs, json_text
    from .plots import plot_scores

    scores = record["scores"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["block", "score"])
    for i, s in enumerate(scores):
        w.writerow([i, "" if s is None else repr(float(s))])
    title = f"{record['criterion']} scores, {record.get('model', '')}"
    search = record.get("extra", {}).get("search") if "search" in paths else None
    targets = [paths["csv"], paths["png"], *([paths["search"]] if search else []), paths["json"]]
    with atomic_outputs(targets, overwrite=overwrite) as tmps:
        tmps[0].write_text(buf.getvalue())
        plot_scores(scores, tmps[1], title=title, ylabel=record["criterion"], highlight=highlight or ())
        if search:
            from .plots import plot_search

            plot_search(search, tmps[2], title=f"search, {record.get('model', '')}")
        tmps[-1].write_text(json_text(record))


def read_scores_file(path: str | os.PathLike) -> tuple[BlockScores, dict[str, Any] | None]:
    """The scores of a scores file and the calibration record they were computed on."""
    from .io import read_json

    saved = read_json(path)
    if not isinstance(saved, dict):
        raise ShortenedError(f"{path} is not a scores file written by 'shortened score'")
    return BlockScores.from_dict(saved), saved.get("calibration")


__all__ = ["output_paths", "read_scores_file", "scores_record", "write_scores_files"]
