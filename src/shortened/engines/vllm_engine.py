"""vLLM as a serving engine: its CPU (or GPU) build in its own environment, driven through a worker script.

vLLM pins its own transformers (the CPU build 0.32: >=5.16,<5.20), so it cannot share shortened's
environment: ``make vllm`` makes one (``~/.cache/shortened/vllm``), ``$SHORTENED_VLLM_PYTHON`` names another.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ShortenedError
from . import EngineRunner, vocab_size_of

VLLM_ENV = "SHORTENED_VLLM_PYTHON"
WORKER = Path(__file__).with_name("vllm_worker.py")
EVAL_WORKER = Path(__file__).with_name("vllm_eval_worker.py")  # shortened eval --backend vllm


def find_vllm_python(path: str | os.PathLike | None = None) -> Path:
    """The Python of vLLM's environment: ``path``, ``$SHORTENED_VLLM_PYTHON``, else the one ``make vllm``
    makes; a one-line error when none imports vllm."""
    from ..loading import default_cache_dir

    candidates = [Path(p) for p in (path, os.environ.get(VLLM_ENV)) if p]
    candidates += [Path.home() / ".cache" / "shortened" / "vllm" / "bin" / "python",
                   default_cache_dir() / "vllm" / "bin" / "python"]
    for python in candidates:
        if python.is_file() and subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode == 0:
            return python
    raise ShortenedError(f"no Python environment with vLLM found ({candidates[0]}): run 'make vllm', or name one "
                         f"with ${VLLM_ENV}")


def run_worker(script: Path, request: dict[str, Any], *, what: str, python: str | os.PathLike | None = None,
               timeout_s: float | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script`` (standard library and vLLM's environment only) in vLLM's Python as
    ``script REQUEST.json RESULT.json`` and return the result it writes; a one-line error beginning
    "vLLM could not {what}" with the worker's last output line when it fails."""
    interpreter = find_vllm_python(python)
    with tempfile.TemporaryDirectory(prefix="shortened-vllm-") as work:
        request_file, result = Path(work) / "request.json", Path(work) / "result.json"
        request_file.write_text(json.dumps(request))
        env = dict(os.environ, VLLM_TARGET_DEVICE=os.environ.get("VLLM_TARGET_DEVICE", "cpu"), **(env or {}))
        out = subprocess.run([str(interpreter), str(script), str(request_file), str(result)], capture_output=True,
                             text=True, env=env, timeout=timeout_s)
        if out.returncode != 0 or not result.is_file():
            lines = [line for line in (out.stderr or out.stdout).strip().splitlines() if line.strip()]
            raise ShortenedError(f"vLLM could not {what}: {lines[-1] if lines else 'no output'}")
        return json.loads(result.read_text())


def vllm_generate(model: str | os.PathLike, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                  dtype: str = "float32", max_model_len: int = 1024, repeats: int = 1,
                  python: str | os.PathLike | None = None, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Greedy generation of ``max_tokens`` tokens for each prompt (token ids) by vLLM serving the model folder
    ``model``: ``{"tokens": [[ids]], "seconds": [per repeat], "vllm": version}``."""
    request = {"model": str(model), "prompts": [list(map(int, p)) for p in prompts], "max_tokens": max_tokens,
               "dtype": dtype, "max_model_len": max_model_len, "repeats": repeats}
    return run_worker(WORKER, request, what=f"serve {model}", python=python, timeout_s=timeout_s)


class VllmRunner(EngineRunner):
    """Times generation of a saved model folder in vLLM, for :func:`shortened.bench.run_benchmark`: a worker in
    vLLM's environment loads it once (engine in-process, so the worker's peak RSS is the engine's, KV cache
    reservation included) and runs each timed batch as one ``LLM.generate`` call, batched by vLLM's scheduler."""

    engine, memory_kind = "vllm", "worker_peak_rss"

    def __init__(self, folder: str | os.PathLike, *, dtype: str = "bfloat16", threads: int | None = None,
                 max_batch: int = 1, prompt_len: int = 32, max_tokens: int = 160, seed: int = 0,
                 python: str | os.PathLike | None = None) -> None:
        from ..bench import random_prompt

        interpreter = find_vllm_python(python)
        self._work = tempfile.TemporaryDirectory(prefix="shortened-vllm-")
        request = Path(self._work.name) / "request.json"
        prompts = random_prompt(vocab_size_of(Path(folder)), max_batch, prompt_len, seed).tolist()
        request.write_text(json.dumps({"model": str(folder), "prompts": prompts, "dtype": dtype,
                                       "max_model_len": max_tokens + 16}))
        env = dict(os.environ, VLLM_TARGET_DEVICE=os.environ.get("VLLM_TARGET_DEVICE", "cpu"),
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")  # the engine in the worker: one process to measure
        if threads:
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
        self._log = open(Path(self._work.name) / "log.txt", "w+")
        self.process = subprocess.Popen([str(interpreter), str(WORKER), "--serve", str(request)], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)
        try:
            self.info = {"engine": self.engine, "engine_version": self._reply()["vllm"], "engine_dtype": dtype}
        except BaseException:
            self.close()
            raise

    def _reply(self) -> dict[str, Any]:
        from .vllm_worker import REPLY

        assert self.process.stdout is not None
        for line in self.process.stdout:  # vLLM's own log lines pass by
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self.process.wait()
        self._log.seek(0)
        lines = [line for line in self._log.read().splitlines() if line.strip()]
        raise ShortenedError(f"vLLM's worker stopped (exit {self.process.returncode}): "
                             f"{lines[-1] if lines else 'no output'}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def time(self, new_tokens: int) -> float:
        """Seconds (measured in the worker) for one batch of ``new_tokens`` greedy tokens per prompt."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"batch": self._batch, "max_tokens": new_tokens}) + "\n")
        self.process.stdin.flush()
        reply = self._reply()
        if set(reply["lengths"]) != {new_tokens}:
            raise ShortenedError(f"vLLM generated {sorted(set(reply['lengths']))} tokens where {new_tokens} were asked")
        return float(reply["seconds"])

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"stop": True}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._work.cleanup()
