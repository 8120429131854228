"""The seven zero-shot tasks of the paper, run by lm-evaluation-harness on an in-memory model.

The harness is used as a library, never copied: the model is wrapped in its ``HFLM`` class and its
``evaluate`` runs the tasks (:mod:`.harness` builds and runs them, the same for vLLM's backend). Online, the tasks are the harness's own (Hub datasets). Offline,
with a data folder, each task is built from the harness's own YAML definition of that task (prompt,
choices, target, metrics, ``process_docs``) with only the dataset swapped, through the task config's
``custom_dataset`` hook, for the original files read by :mod:`shortened.evaluation.sources`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from ..errors import ShortenedError
from .harness import SEEDS, evaluate_task, hub_task, local_task, quiet_harness, task_config
from .sources import TASKS, task_records

__all__ = ["PAPER_METRICS", "SEEDS", "build_task", "harness_task_config", "make_lm", "run_task", "run_tasks",
           "task_result"]

#: The paper's metric for each task, in its column order.
PAPER_METRICS: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}

def harness_task_config(task: str) -> dict[str, Any]:
    """The harness's own configuration of ``task`` (its YAML, includes merged, ``!function`` resolved)."""
    try:
        return task_config(task)
    except LookupError as exc:
        raise ShortenedError(str(exc)) from None


def build_task(task: str, data_dir: str | os.PathLike | None = None, *, limit: int | None = None) -> Any:
    """A harness task object for ``task``: from local files when ``data_dir`` is given, else the Hub.

    With ``limit`` only the first ``limit`` local records are handed to the harness (the same items
    its own ``limit`` would take), so that ``process_docs`` does not run over the whole file.
    """
    if task not in PAPER_METRICS:
        raise ShortenedError(f"unknown task '{task}': choose from {', '.join(PAPER_METRICS)}")
    if data_dir is None:
        return _hub_task(task)

    records = task_records(task, data_dir)
    return local_task(task, records[:limit] if limit is not None else records, TASKS[task].split,
                      {"data_dir": str(data_dir), "n_total": len(records)})


def _hub_task(task: str) -> Any:
    try:
        return hub_task(task)
    except Exception as exc:  # offline or missing dataset: the harness surfaces many error types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        files = ", ".join(TASKS[task].files)
        raise ShortenedError(
            f"task '{task}': its Hub dataset could not be loaded ({reason[:160]}); offline, pass a data "
            f"folder (--data-dir) holding {files}"
        ) from None


def make_lm(model: nn.Module, tokenizer: Any, *, batch_size: int = 8, add_bos_token: bool | None = None) -> Any:
    """Wrap an in-memory model in the harness's ``HFLM`` (it runs on whatever device the model is on)."""
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise ShortenedError("zero-shot tasks need a tokenizer, and this model has none")
    kwargs: dict[str, Any] = {}
    if add_bos_token is not None:
        kwargs["add_bos_token"] = add_bos_token
    if add_bos_token and getattr(tokenizer, "add_bos_token", None) is False and tokenizer.bos_token_id is not None:
        # HFLM then encodes with add_special_tokens=True, which puts a BOS first only where the tokenizer is set
        # to (SmolLM2's is not): a copy set so, as lm-eval's vLLM backend loads its own; the caller's is kept.
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_bos_token = True
    with quiet_harness():
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def run_task(
    lm: Any,
    task: str,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run one zero-shot task through the harness's ``evaluator.evaluate``.

    Returns ``{"metric", "value", "metrics": {name: value, name_stderr: ...}, "n_items", "n_total",
    "seconds", "source", "samples"?}`` where ``metric``/``value`` are the paper's.
    """
    if limit is not None and limit < 1:
        raise ShortenedError(f"limit must be a positive number of items, got {limit}")
    raw = evaluate_task(lm, task, build_task(task, data_dir, limit=limit), limit=limit, log_samples=log_samples)
    return task_result(task, raw, source="local" if data_dir is not None else "hub")


def task_result(task: str, raw: dict[str, Any], *, source: str) -> dict[str, Any]:
    """One task's entry of the results from :func:`harness.evaluate_task`'s ``raw`` (whichever backend ran
    it): the paper's metric and value first, then every metric, counts, time and where the data came from."""
    result: dict[str, Any] = {
        "metric": PAPER_METRICS[task],
        "value": raw["metrics"][PAPER_METRICS[task]],
        "metrics": raw["metrics"],
        "n_items": raw["n_items"],
        "n_total": raw["n_total"],
        "seconds": raw["seconds"],
        "source": source,
        "task_version": raw["task_version"],
    }
    if "samples" in raw:
        result["samples"] = raw["samples"]
    return result


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    add_bos_token: bool | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run several tasks (one harness call each, so each has its own wall time); see :func:`run_task`."""
    from tqdm.auto import tqdm

    unknown = [t for t in tasks if t not in PAPER_METRICS]
    if unknown:
        raise ShortenedError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(PAPER_METRICS)}")
    if data_dir is not None:  # name every missing file before the (slow) scoring starts
        for task in tasks:
            for rel in TASKS[task].files:
                path = os.path.join(os.path.expanduser(str(data_dir)), rel)
                if not os.path.isfile(path):
                    raise ShortenedError(f"task '{task}' needs {path} (missing in the data folder)")
    lm = make_lm(model, tokenizer, batch_size=batch_size, add_bos_token=add_bos_token)
    if not progress:  # the harness's own per-request bars: it calls these methods without disable_tqdm
        for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))
    results = {}
    with contextlib.nullcontext() if progress else _harness_request_bars_off():
        for task in tqdm(list(tasks), desc="zero-shot tasks", unit="task", disable=not progress or len(tasks) < 2):
            results[task] = run_task(lm, task, data_dir=data_dir, limit=limit)
    return results


@contextlib.contextmanager
def _harness_request_bars_off() -> Iterator[None]:
    """The harness builds each task's requests under a bar it offers no switch for (lm_eval.api.task's
    module-level ``tqdm``): swap in a disabled one for the block."""
    import lm_eval.api.task as harness_task

    original = harness_task.tqdm
    harness_task.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        harness_task.tqdm = original


def paper_average(results: dict[str, dict[str, Any]]) -> float | None:
    """Plain mean of the paper's metric over the seven tasks; None unless all seven are present."""
    if not all(task in results for task in PAPER_METRICS):
        return None
    return sum(results[task]["value"] for task in PAPER_METRICS) / len(PAPER_METRICS)
