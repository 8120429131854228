"""Evaluation of a (pruned) model: perplexity with the paper's protocol and the seven zero-shot tasks
through lm-evaluation-harness, online (Hub) or offline (a folder of the original data files).

    from shortened.evaluation import evaluate
    results = evaluate(model, tokenizer, data_dir="../shared/data", limit=20)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import ShortenedError
from ..io import library_versions, now_iso
# The function ``perplexity`` is not re-exported: it would shadow the submodule of the same name.
from .perplexity import load_ppl_text, perplexity_on
from .tables import RESULTS_KIND, compare_files, load_results, markdown_table
from .zeroshot import PAPER_METRICS, SEEDS, run_tasks

__all__ = [
    "PAPER_METRICS", "PAPER_PPL", "PAPER_TASKS", "check_request", "compare_files", "evaluate", "load_ppl_text", "load_results",
    "markdown_table", "perplexity_on",
]

#: The paper's perplexity sets and zero-shot tasks (in its column order).
PAPER_PPL: tuple[str, ...] = ("wikitext2", "ptb")
PAPER_TASKS: tuple[str, ...] = tuple(PAPER_METRICS)


def check_request(
    ppl: Sequence[str],
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    names: Sequence[str] = (),
    flag_prefix: str = "--",
) -> None:
    """Refuse an evaluation request that cannot run, with one line, before any model is loaded: unknown
    perplexity sets (``names`` adds set names the caller resolves itself) and tasks, bad numbers (named
    ``{flag_prefix}limit`` and so on in the message), a data folder that lacks a file the request needs."""
    from pathlib import Path

    from ..data import check_text_file
    from .sources import PPL_SETS, check_local_files

    if limit is not None and limit < 1:
        raise ShortenedError(f"{flag_prefix}limit must be a positive number, got {limit}")
    if seq_len < 2 or batch_size < 1:
        raise ShortenedError(f"{flag_prefix}seq-len must be at least 2 and {flag_prefix}batch-size at least 1, "
                             f"got {seq_len} and {batch_size}")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise ShortenedError(f"data folder not found: {data_dir}")
    for name in ppl:
        if name in PPL_SETS or name in names:
            continue
        if not Path(name).expanduser().is_file():
            known = ", ".join([*PPL_SETS, *names])
            raise ShortenedError(f"unknown perplexity set '{name}': use {known} or the path of a text file")
        check_text_file(Path(name).expanduser())  # empty or binary: told before the model loads
    unknown = [t for t in tasks if t not in PAPER_TASKS]
    if unknown:
        raise ShortenedError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(PAPER_TASKS)}")
    if data_dir is not None:
        check_local_files(list(ppl), list(tasks), data_dir)


def _check_vocabulary(model: nn.Module, tokenizer: Any, role: str) -> None:
    """The tokenizer's ids must index the model's embedding (else an IndexError deep in a forward pass)."""
    embeddings = model.get_input_embeddings()
    size = getattr(embeddings, "num_embeddings", None)
    if tokenizer is not None and isinstance(size, int) and len(tokenizer) > size:
        raise ShortenedError(f"the tokenizer has {len(tokenizer)} tokens but {role} embeds only {size}: "
                             "use the model's own tokenizer")


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    *,
    ppl: Sequence[str] = PAPER_PPL,
    tasks: Sequence[str] = PAPER_TASKS,
    data_dir: str | os.PathLike | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    bos: bool = False,
    limit: int | None = None,
    name: str | None = None,
    progress: bool = True,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    """Perplexity on each set of ``ppl`` and accuracy on each task of ``tasks``, as one results dict.

    With ``reference`` (the source model of a pruned one) each perplexity entry also has
    ``kl_to_reference``, the mean token KL(reference || model) on the same chunks, and
    ``reference_value``, the reference's perplexity (:mod:`shortened.evaluation.fidelity`).

    ``data_dir`` holds the original data files (the layout of ``../shared/data``); None reads the Hub.
    ``limit`` takes the first N chunks of each perplexity set and the first N items of each task.
    The dict (what ``shortened eval --out`` writes) has ``perplexity`` and ``zeroshot`` entries with
    every metric and wall time, ``average`` (plain mean of the paper's metric over the tasks run),
    ``settings`` and library ``versions``.
    """
    from ..offload import check_in_memory, disk_blocks

    ppl = [ppl] if isinstance(ppl, str) else list(ppl)  # one name, not its characters
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not ppl and not tasks:
        raise ShortenedError("nothing to evaluate: give at least one perplexity set or task")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ShortenedError(f"limit must be a positive integer, got {limit!r}")
    if disk_blocks(model) is not None and (tasks or reference is not None):
        # perplexity streams the blocks (evaluation/perplexity.py); lm-eval and the KL hold the whole model
        check_in_memory(model, "evaluating zero-shot tasks" if tasks else "the KL to --reference")
    for m, role in ((model, "the model"), (reference, "the reference")):
        if m is not None:
            if m is reference:
                check_in_memory(m, "evaluation")
            _check_vocabulary(m, tokenizer, role)
    if batch_size < 1:
        raise ShortenedError(f"batch size must be positive, got {batch_size}")
    unknown = [t for t in tasks if t not in PAPER_METRICS]
    if unknown:
        raise ShortenedError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(PAPER_METRICS)}")
    if ppl:
        from ..archs import check_seq_len

        check_seq_len(model, seq_len + int(bos), "--seq-len" + (" + BOS" if bos else ""))
    start = time.perf_counter()
    was_training = model.training
    pad_token = getattr(tokenizer, "pad_token", None)  # lm-eval sets one; the caller's tokenizer gets its own back
    model.eval()
    try:
        perplexities = {
            set_name: perplexity_on(model, tokenizer, set_name, data_dir=data_dir, seq_len=seq_len,
                                    batch_size=batch_size, bos=bos, limit=limit, progress=progress)
            if reference is None else _with_reference(model, reference, tokenizer, set_name, data_dir=data_dir,
                                                      seq_len=seq_len, batch_size=batch_size, bos=bos,
                                                      limit=limit, progress=progress)
            for set_name in ppl
        }
        zeroshot = run_tasks(model, tokenizer, list(tasks), data_dir=data_dir, batch_size=batch_size,
                             limit=limit, add_bos_token=True if bos else None, progress=progress) if tasks else {}
    finally:
        model.train(was_training)
        if tokenizer is not None and getattr(tokenizer, "pad_token", None) != pad_token:
            tokenizer.pad_token = pad_token
    settings = evaluation_settings(ppl, tasks, data_dir=data_dir, seq_len=seq_len, batch_size=batch_size, bos=bos,
                                   limit=limit)
    settings["reference"] = model_summary(reference) if reference is not None else None
    return results_record(name=name, model=model_summary(model), settings=settings, perplexities=perplexities,
                          zeroshot=zeroshot, start=start)


def evaluation_settings(ppl: Sequence[str], tasks: Sequence[str], *, data_dir: str | os.PathLike | None,
                        seq_len: int, batch_size: int, bos: bool, limit: int | None) -> dict[str, Any]:
    """The request as the results record it (the same for every backend)."""
    return {
        "ppl": list(ppl), "tasks": list(tasks), "data_dir": str(data_dir) if data_dir is not None else None,
        "seq_len": seq_len, "batch_size": batch_size, "bos": bos, "limit": limit,
        "num_fewshot": 0, "seeds": SEEDS, "reference": None,
    }


def results_record(*, name: str | None, model: dict[str, Any], settings: dict[str, Any],
                   perplexities: dict[str, Any], zeroshot: dict[str, Any], start: float,
                   backend: str = "hf") -> dict[str, Any]:
    """The results dict of an evaluation (what ``shortened eval --out`` writes), whichever backend ran it:
    the per-set and per-task entries, the paper's average, the wall time since ``start`` (a
    ``time.perf_counter()`` reading) and library versions."""
    values = [zeroshot[t]["value"] for t in PAPER_METRICS if t in zeroshot]
    return {
        "format_version": 1,
        "kind": RESULTS_KIND,
        "name": name,
        "created": now_iso(),
        "backend": backend,
        "model": model,
        "settings": settings,
        "perplexity": perplexities,
        "zeroshot": zeroshot,
        "average": sum(values) / len(values) if values else None,
        "average_over": [t for t in PAPER_METRICS if t in zeroshot],
        "seconds": round(time.perf_counter() - start, 2),
        "versions": library_versions(),
    }


def _with_reference(model: nn.Module, reference: nn.Module, tokenizer: Any, set_name: str,
                    **kwargs: Any) -> dict[str, Any]:
    """A perplexity entry (as :func:`perplexity_on`'s) with the KL to the reference measured in the same pass."""
    from .fidelity import fidelity_on

    was_training = reference.training
    reference.eval()
    try:
        r = fidelity_on(model, reference, tokenizer, set_name, **kwargs)
    finally:
        reference.train(was_training)
    return {"value": r["ppl"], "kl_to_reference": r["kl"], "reference_value": r["reference_ppl"],
            "n_chunks": r["n_chunks"], "n_tokens": r["n_tokens"], "seconds": r["seconds"], "settings": r["settings"]}


def model_summary(model: nn.Module) -> dict[str, Any]:
    """What a results file says of the evaluated model: type, path, parameters, dtype, blocks (offload)."""
    from ..archs import num_blocks

    config = getattr(model, "config", None)
    summary: dict[str, Any] = {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    from ..offload import disk_blocks

    store = disk_blocks(model)
    if store is not None:  # its tables may be held narrower; it computes in the store's dtype
        summary.update(dtype=str(store.dtype).replace("torch.", ""), offload="disk")
    try:
        summary["num_blocks"] = num_blocks(model)
    except ShortenedError:
        summary["num_blocks"] = None
    return summary
