"""Serving engines other than transformers (llama.cpp, vLLM), reached through their own programs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ShortenedError


class EngineRunner:
    """What the engines' runners share for :func:`shortened.bench.run_benchmark`: warm-up at the start of a
    timing point, then the peak RSS of the engine's process (``pid``) over the point's timed runs. A runner
    sets ``engine``, ``memory_kind``, ``info`` and ``pid``, and times one batch in ``time``."""

    engine: str
    memory_kind: str
    info: dict[str, Any]
    _batch: int = 1
    _rss: Any = None

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def time(self, new_tokens: int) -> float:
        raise NotImplementedError

    def start_point(self, batch_size: int, output_len: int, warmup: int) -> None:
        from ..bench import PeakRSS

        self._batch = batch_size
        for _ in range(warmup):
            self.time(1)
            self.time(output_len)
        self._rss = PeakRSS(pid=self.pid).__enter__()

    def end_point(self) -> tuple[float, str]:
        self._rss.__exit__(None, None, None)
        return self._rss.peak / 2**20, self.memory_kind


def vocab_size_of(folder: Path) -> int:
    """The vocabulary size in a saved model's config (its text config for a multimodal one)."""
    config = json.loads((folder / "config.json").read_text())
    return int((config.get("text_config") or config)["vocab_size"])


def served_folder(spec: str, flag: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local model folder an engine serves for ``spec`` (a GGUF file or alias converted once); a one-line
    error naming ``flag`` (the option that chose the engine) for a Hub id."""
    from ..loading import resolve_local_folder

    folder = resolve_local_folder(spec, cache_dir)
    if folder is None or not folder.is_dir():
        raise ShortenedError(f"{flag} serves a saved model folder; {spec} is not one "
                             "(save it first, or give its local folder)")
    return folder
