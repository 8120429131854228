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

VLLM_ENV = "SHORTENED_VLLM_PYTHON"
WORKER = Path(__file__).with_name("vllm_worker.py")


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


def vllm_generate(model: str | os.PathLike, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                  dtype: str = "float32", max_model_len: int = 1024, repeats: int = 1,
                  python: str | os.PathLike | None = None, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Greedy generation of ``max_tokens`` tokens for each prompt (token ids) by vLLM serving the model folder
    ``model``: ``{"tokens": [[ids]], "seconds": [per repeat], "vllm": version}``."""
    interpreter = find_vllm_python(python)
    with tempfile.TemporaryDirectory(prefix="shortened-vllm-") as work:
        request, result = Path(work) / "request.json", Path(work) / "result.json"
        request.write_text(json.dumps({"model": str(model), "prompts": [list(map(int, p)) for p in prompts],
                                       "max_tokens": max_tokens, "dtype": dtype, "max_model_len": max_model_len,
                                       "repeats": repeats}))
        env = dict(os.environ, VLLM_TARGET_DEVICE=os.environ.get("VLLM_TARGET_DEVICE", "cpu"))
        out = subprocess.run([str(interpreter), str(WORKER), str(request), str(result)], capture_output=True,
                             text=True, env=env, timeout=timeout_s)
        if out.returncode != 0 or not result.is_file():
            lines = [line for line in (out.stderr or out.stdout).strip().splitlines() if line.strip()]
            raise ShortenedError(f"vLLM could not serve {model}: {lines[-1] if lines else 'no output'}")
        return json.loads(result.read_text())
