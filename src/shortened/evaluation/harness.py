"""lm-evaluation-harness plumbing shared by both backends of ``shortened eval``: transformers (``HFLM``, in
shortened's environment) and vLLM (lm-eval's ``VLLM``, in a worker of vLLM's own environment).

It imports only the standard library, ``datasets`` and ``lm_eval`` (never shortened: vLLM's environment has
another transformers), so that vLLM's worker loads this file by its path and builds and runs each task
exactly as the transformers path does. Errors are plain exceptions; :mod:`.zeroshot` words them for users.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

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


def task_config(task: str) -> dict[str, Any]:
    """The harness's own configuration of ``task`` (its YAML, includes merged, ``!function`` resolved);
    LookupError when the harness has no such task."""
    entry = task_manager().task_index.get(task)
    if entry is None or getattr(entry, "yaml_path", None) is None:
        raise LookupError(f"lm-evaluation-harness has no task '{task}'")
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = dict(load_yaml(entry.yaml_path, resolve_func=True))
    for key in ("tag", "group", "task_list"):  # structural keys, as the harness's own factory drops them
        cfg.pop(key, None)
    return cfg


def local_task(task: str, records: Sequence[dict[str, Any]], split: str, metadata: dict[str, Any]) -> Any:
    """The harness's task ``task`` with its dataset swapped for ``records`` (Hub schema) as split ``split``;
    ``metadata`` is added to the task's (``n_total``: the items of the whole local file)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    local = datasets.Dataset.from_list(list(records))
    cfg = task_config(task)
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
    cfg["metadata"] = dict(cfg.get("metadata") or {}, **metadata)
    with quiet_harness():
        return ConfigurableTask(config=cfg)


def hub_task(task: str) -> Any:
    """The harness's own task ``task``, its dataset read from the Hub (the harness's errors pass through)."""
    with quiet_harness(logging.CRITICAL):
        return task_manager().load([task])["tasks"][task]


def _seed_everything() -> None:
    import random

    import numpy as np
    import torch

    random.seed(SEEDS["random_seed"])
    np.random.seed(SEEDS["numpy_random_seed"])
    torch.manual_seed(SEEDS["torch_random_seed"])


def evaluate_task(lm: Any, task: str, task_obj: Any, *, limit: int | None = None,
                  log_samples: bool = False) -> dict[str, Any]:
    """Run one built task zero-shot on the harness model ``lm`` through ``lm_eval.evaluator.evaluate``:
    ``{"metrics": {name: value, name_stderr: ...}, "n_items", "n_total", "seconds", "task_version",
    "samples"?}`` (JSON-ready: what vLLM's worker hands back)."""
    from lm_eval.evaluator import evaluate

    # What simple_evaluate would set up, without its environment report (pip and git subprocesses).
    _seed_everything()
    task_obj.set_config(key="num_fewshot", value=0)
    task_obj.set_fewshot_seed(seed=SEEDS["fewshot_random_seed"])
    start = time.perf_counter()
    with quiet_harness():
        out = evaluate(lm=lm, task_dict=task_manager().load([task_obj]), limit=limit,
                       bootstrap_iters=1000, log_samples=log_samples)
    seconds = time.perf_counter() - start
    metrics = {key.split(",")[0]: value for key, value in out["results"][task].items()
               if key != "alias" and isinstance(value, (int, float))}
    counts = out.get("n-samples", {}).get(task, {})
    result: dict[str, Any] = {
        "metrics": metrics,
        "n_items": counts.get("effective"),
        "n_total": (task_obj.config.metadata or {}).get("n_total", counts.get("original")),
        "seconds": round(seconds, 2),
        "task_version": out.get("versions", {}).get(task),
    }
    if log_samples:
        result["samples"] = out["samples"][task]
    return result
