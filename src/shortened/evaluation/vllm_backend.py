"""``shortened eval --backend vllm``: the same perplexity chunks and zero-shot tasks, scored by vLLM.

vLLM runs in its own environment (``make vllm``), in a worker (:mod:`shortened.engines.vllm_eval_worker`)
that loads the saved model folder once through lm-eval's own vLLM backend. Everything that defines the
measurement is prepared here, as on the transformers path: the perplexity text is read, tokenized and cut
into chunks (BOS included) by :mod:`.perplexity`, and the task records are read from the data folder by
:mod:`.sources`; the worker builds and runs each task with the same :mod:`.harness` code as ``HFLM`` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ShortenedError

#: Weight types vLLM computes in; "auto" is float32, as transformers on a CPU.
VLLM_DTYPES = ("float32", "bfloat16", "float16")
#: Share of the machine's memory vLLM may take (on a CPU its KV cache is a share of RAM).
MEMORY_SHARE = 0.25
#: vLLM's context (unless a chunk needs more, or the model has less): far beyond the seven tasks' prompts.
CONTEXT = 4096


def _check_harness_version(python: Path) -> str:
    """lm-eval's version in vLLM's environment; a one-line error unless it is shortened's own (the task
    definitions ship with it, so a different version would run different tasks)."""
    from importlib.metadata import version

    ours = version("lm_eval")
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
                         capture_output=True, text=True)
    theirs = out.stdout.strip() if out.returncode == 0 else None
    if theirs != ours:
        found = f"lm-eval {theirs}" if theirs else "no lm-eval"
        raise ShortenedError(f"vLLM's environment ({python}) has {found}, shortened's has lm-eval {ours}: run "
                             f"'make vllm' (it installs lm-eval=={ours} there)")
    return theirs


def _folder_summary(folder: Path, dtype: str, trust_remote_code: bool) -> tuple[dict[str, Any], Any]:
    """The results' model summary of a saved folder (the model built on the meta device: no weight is read)
    and that meta model, for the request's checks."""
    import torch

    from ..loading import meta_model
    from . import model_summary

    model = meta_model(folder, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    return model_summary(model), model


def evaluate_in_vllm(
    model: str,
    *,
    ppl: Sequence[str],
    tasks: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    bos: bool = False,
    limit: int | None = None,
    name: str | None = None,
    progress: bool = True,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    python: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """:func:`shortened.evaluation.evaluate`'s results for the saved model folder ``model`` (a GGUF file or
    alias is converted to one) scored by vLLM: the same structure, plus ``backend: "vllm"`` and ``engine``
    (vLLM's version, dtype and environment)."""
    from ..archs import check_seq_len, position_limit
    from ..engine.loss import ppl_from_mean_nll
    from ..engines import served_folder
    from ..engines.vllm_engine import EVAL_WORKER, find_vllm_python, run_worker
    from ..loading import load_tokenizer
    from . import evaluation_settings, harness, results_record
    from .perplexity import set_chunks, set_settings
    from .sources import TASKS, task_records
    from .zeroshot import task_result

    engine_dtype = "float32" if dtype == "auto" else dtype
    if engine_dtype not in VLLM_DTYPES:
        raise ShortenedError(f"--backend vllm computes in {', '.join(VLLM_DTYPES)} (or auto: float32), "
                             f"got --dtype {dtype}")
    folder = served_folder(model, "--backend vllm", cache_dir)
    interpreter = find_vllm_python(python)
    _check_harness_version(interpreter)  # the worker loads the model through lm-eval, tasks or not
    summary, meta_model = _folder_summary(folder, engine_dtype, trust_remote_code)
    tokenizer = load_tokenizer(str(folder), trust_remote_code, None)
    if tokenizer is None:
        raise ShortenedError(f"--backend vllm needs the model's tokenizer, and {folder} has none")
    if ppl:
        check_seq_len(meta_model, seq_len + int(bos), "--seq-len" + (" + BOS" if bos else ""))
    # vLLM starts only if its KV cache (on a CPU a share of RAM) holds one sequence of its whole context: not the
    # model's 128k tokens for prompts of a few hundred (the seven tasks) or a chunk and the one token generated.
    context = max(CONTEXT, seq_len + int(bos) + 1)
    limit_of_model = position_limit(meta_model)
    context = min(context, limit_of_model) if limit_of_model else context

    start = time.perf_counter()
    chunked = {}
    for set_name in ppl:
        ids, chunks, bos_id = set_chunks(tokenizer, set_name, data_dir=data_dir, seq_len=seq_len, bos=bos,
                                         limit=limit)
        rows = chunks.tolist() if bos_id is None else [[bos_id, *row] for row in chunks.tolist()]
        chunked[set_name] = (ids, rows, bos_id)
    task_requests, sources = [], {}
    for task in tasks:
        records, metadata = None, {}
        if data_dir is not None:  # read here, by the readers of the transformers path
            records = task_records(task, data_dir)
            metadata = {"data_dir": str(data_dir), "n_total": len(records)}
            records = records[:limit] if limit is not None else records
        task_requests.append({"task": task, "split": TASKS[task].split, "records": records, "metadata": metadata})
        sources[task] = "local" if data_dir is not None else "hub"
    request = {"model": str(folder), "dtype": engine_dtype, "trust_remote_code": trust_remote_code,
               "batch_size": batch_size, "add_bos_token": True if bos else None, "limit": limit,
               "memory": MEMORY_SHARE, "max_model_len": context, "harness": harness.__file__,
               "ppl": {set_name: rows for set_name, (_, rows, _) in chunked.items()}, "tasks": task_requests}
    if progress:  # the worker's output is kept for its errors: say what the wait is for
        print(f"evaluating {folder} in vLLM ({interpreter})...", file=sys.stderr, flush=True)
    # The engine in the worker's own process: no engine process to start, stop or leave behind.
    out = run_worker(EVAL_WORKER, request, what=f"evaluate {folder}", python=interpreter,
                     env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})

    perplexities = {}
    for set_name, (ids, rows, bos_id) in chunked.items():
        scored = out["ppl"][set_name]
        perplexities[set_name] = {
            "value": ppl_from_mean_nll(scored["nll"] / scored["tokens"]),
            "n_chunks": len(rows),
            "n_tokens": scored["tokens"],
            "seconds": scored["seconds"],
            "settings": set_settings(set_name, data_dir, ids, bos_id, seq_len=seq_len, batch_size=batch_size,
                                     bos=bos, limit=limit),
        }
    zeroshot = {task: task_result(task, out["tasks"][task], source=sources[task]) for task in tasks}
    settings = evaluation_settings(ppl, tasks, data_dir=data_dir, seq_len=seq_len, batch_size=batch_size, bos=bos,
                                   limit=limit)
    results = results_record(name=name, model=summary, settings=settings, perplexities=perplexities,
                             zeroshot=zeroshot, start=start, backend="vllm")
    results["engine"] = {"name": "vllm", "version": out["versions"]["vllm"], "dtype": engine_dtype,
                         "max_model_len": context, "python": str(interpreter), "versions": out["versions"]}
    return results
