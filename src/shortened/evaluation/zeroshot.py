"""The seven zero-shot tasks of the paper, run by lm-evaluation-harness on an in-memory model.

The harness is used as a library, never copied: the model is wrapped in its ``HFLM`` class and its
``simple_evaluate`` runs the tasks. Online, the tasks are the harness's own (Hub datasets). Offline,
with a data folder, each task is built from the harness's own YAML definition of that task (prompt,
choices, target, metrics, ``process_docs``) with only the dataset swapped, through the task config's
``custom_dataset`` hook, for the original files read by :mod:`shortened.evaluation.sources`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from ..errors import ShortenedError
from .sources import TASKS, task_records

__all__ = ["PAPER_METRICS", "build_task", "harness_task_config", "make_lm", "run_task", "run_tasks"]

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

#: Fixed seeds handed to the harness (its defaults, recorded with the results).
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


@contextlib.contextmanager
def quiet_harness(level: int = logging.ERROR) -> Iterator[None]:
    """Silence the harness's per-task INFO/WARNING chatter (our own progress bars remain)."""
    import datasets

    logger = logging.getLogger("lm_eval")
    old = logger.level
    bars_were_on = datasets.is_progress_bar_enabled()
    logger.setLevel(level)
    datasets.disable_progress_bars()  # the per-task "Map" bars of process_docs
    try:
        yield
    finally:
        logger.setLevel(old)
        if bars_were_on:
            datasets.enable_progress_bars()


@functools.lru_cache(maxsize=1)
def task_manager() -> Any:
    """The harness's task index (built once: it scans every YAML the harness ships)."""
    from lm_eval.tasks import TaskManager

    with quiet_harness():
        return TaskManager()


def harness_task_config(task: str) -> dict[str, Any]:
    """The harness's own configuration of ``task`` (its YAML, includes merged, ``!function`` resolved)."""
    entry = task_manager().task_index.get(task)
    if entry is None or getattr(entry, "yaml_path", None) is None:
        raise ShortenedError(f"lm-evaluation-harness has no task '{task}'")
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = dict(load_yaml(entry.yaml_path, resolve_func=True))
    for key in ("tag", "group", "task_list"):  # structural keys, as the harness's own factory drops them
        cfg.pop(key, None)
    return cfg


def build_task(task: str, data_dir: str | os.PathLike | None = None, *, limit: int | None = None) -> Any:
    """A harness task object for ``task``: from local files when ``data_dir`` is given, else the Hub.

    With ``limit`` only the first ``limit`` local records are handed to the harness (the same items
    its own ``limit`` would take), so that ``process_docs`` does not run over the whole file.
    """
    from lm_eval.api.task import ConfigurableTask

    if task not in PAPER_METRICS:
        raise ShortenedError(f"unknown task '{task}': choose from {', '.join(PAPER_METRICS)}")
    if data_dir is None:
        return _hub_task(task)

    import datasets

    split = TASKS[task].split
    records = task_records(task, data_dir)
    n_total = len(records)
    local = datasets.Dataset.from_list(records[:limit] if limit is not None else records)
    cfg = harness_task_config(task)
    cfg.update(
        # The one hook the harness offers for a dataset from elsewhere; it is called with the task's
        # metadata as keyword arguments, which a fixed local split does not need.
        custom_dataset=lambda **_: datasets.DatasetDict({split: local}),
        dataset_kwargs=None,
        # Only the evaluated split exists locally; zero-shot needs no training/few-shot split.
        training_split=None,
        validation_split=split if split == "validation" else None,
        test_split=split if split == "test" else None,
    )
    cfg["metadata"] = dict(cfg.get("metadata") or {}, data_dir=str(data_dir), n_total=n_total)
    with quiet_harness():
        return ConfigurableTask(config=cfg)


def _hub_task(task: str) -> Any:
    try:
        with quiet_harness(logging.CRITICAL):
            loaded = task_manager().load([task])
    except Exception as exc:  # offline or missing dataset: the harness surfaces many error types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        files = ", ".join(TASKS[task].files)
        raise ShortenedError(
            f"task '{task}': its Hub dataset could not be loaded ({reason[:160]}); offline, pass a data "
            f"folder (--data-dir) holding {files}"
        ) from None
    return loaded["tasks"][task]


def make_lm(model: nn.Module, tokenizer: Any, *, batch_size: int = 8, add_bos_token: bool | None = None) -> Any:
    """Wrap an in-memory model in the harness's ``HFLM`` (it runs on whatever device the model is on)."""
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise ShortenedError("zero-shot tasks need a tokenizer, and this model has none")
    kwargs: dict[str, Any] = {}
    if add_bos_token is not None:
        kwargs["add_bos_token"] = add_bos_token
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
    from lm_eval.evaluator import evaluate

    if limit is not None and limit < 1:
        raise ShortenedError(f"limit must be a positive number of items, got {limit}")
    task_obj = build_task(task, data_dir, limit=limit)
    # What simple_evaluate would set up, without its environment report (pip and git subprocesses).
    _seed_everything()
    task_obj.set_config(key="num_fewshot", value=0)
    task_obj.set_fewshot_seed(seed=SEEDS["fewshot_random_seed"])
    start = time.perf_counter()
    with quiet_harness():
        out = evaluate(lm=lm, task_dict=task_manager().load([task_obj]), limit=limit,
                       bootstrap_iters=1000, log_samples=log_samples)
    seconds = time.perf_counter() - start
    raw = out["results"][task]
    metrics = {key.split(",")[0]: value for key, value in raw.items()
               if key != "alias" and isinstance(value, (int, float))}
    counts = out.get("n-samples", {}).get(task, {})
    n_total = (task_obj.config.metadata or {}).get("n_total", counts.get("original"))
    result: dict[str, Any] = {
        "metric": PAPER_METRICS[task],
        "value": metrics[PAPER_METRICS[task]],
        "metrics": metrics,
        "n_items": counts.get("effective"),
        "n_total": n_total,
        "seconds": round(seconds, 2),
        "source": "local" if data_dir is not None else "hub",
        "task_version": out.get("versions", {}).get(task),
    }
    if log_samples:
        result["samples"] = out["samples"][task]
    return result


def _seed_everything() -> None:
    import random

    import numpy as np
    import torch

    random.seed(SEEDS["random_seed"])
    np.random.seed(SEEDS["numpy_random_seed"])
    torch.manual_seed(SEEDS["torch_random_seed"])


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
