"""llama.cpp as a serving engine: its own ``llama-server`` on a local port, reached through its HTTP API.

Used to check an exported GGUF against transformers (next-token probabilities on the same token ids) and to
time generation where users serve. The server binary is found in the llama.cpp tree of
:func:`shortened.export.find_llama_cpp` (``build/bin/llama-server``, what ``make llamacpp`` builds).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ShortenedError
from . import EngineRunner, vocab_size_of

SERVER = Path("build") / "bin" / "llama-server"


#: Written by ``make llamacpp`` into the llama.cpp tree: the source package it was built from.
SOURCE_FILE = "shortened-source.txt"


def find_server(llama_cpp: str | os.PathLike | None = None) -> Path:
    """The ``llama-server`` binary of the llama.cpp tree (a one-line error when it was not built)."""
    from ..export import find_llama_cpp

    tree = find_llama_cpp(llama_cpp)
    binary = tree / SERVER
    if not binary.is_file():
        raise ShortenedError(f"llama.cpp's server is not built in {tree} ({SERVER}): run 'make llamacpp'")
    return binary


class LlamaServer:
    """A running ``llama-server`` for one GGUF file (start with ``with``; stopped at the end)."""

    def __init__(self, gguf: str | os.PathLike, *, llama_cpp: str | os.PathLike | None = None, ctx: int = 4096,
                 threads: int | None = None, parallel: int = 1, timeout_s: float = 120.0) -> None:
        self.binary = find_server(llama_cpp)
        self.gguf, self.ctx, self.parallel, self.timeout_s = Path(gguf), ctx, parallel, timeout_s
        self.threads = threads or os.cpu_count() or 1
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "LlamaServer":
        command = [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
                   "-c", str(self.ctx), "-t", str(self.threads), "-np", str(self.parallel), "--no-webui",
                   "-ngl", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace")
                raise ShortenedError(f"llama-server stopped loading {self.gguf}: {_last_line(err)}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if self._get("/health").get("status") == "ok":
                    return self
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise ShortenedError(f"llama-server did not get ready within {self.timeout_s:.0f} s")

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def completion(self, ids: Sequence[int], *, n_predict: int, n_probs: int = 0,
                   ignore_eos: bool = True) -> dict[str, Any]:
        """POST /completion for the token ids ``ids`` (no BOS added), greedy. ``ignore_eos`` sets the
        end-of-generation tokens' logits to -inf (so their probability mass is lost too)."""
        body = {"prompt": [int(i) for i in ids], "n_predict": n_predict, "n_probs": n_probs, "temperature": 0.0,
                "top_k": 1, "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"],
                "ignore_eos": ignore_eos}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as r:
            return json.loads(r.read())

    def next_token_probs(self, ids: Sequence[int], n_probs: int = 20) -> dict[int, float] | None:
        """The probabilities of the ``n_probs`` likeliest next tokens after ``ids`` (a softmax of the logits),
        or None where the server withholds them: when the likeliest token is an incomplete UTF-8 character it
        sends no entry for it."""
        out = self.completion(ids, n_predict=1, n_probs=n_probs, ignore_eos=False)
        entries = out.get("completion_probabilities") or []
        if not entries or int(entries[0]["id"]) != int(out["tokens"][0]):
            return None
        return {int(t["id"]): math.exp(t["logprob"]) for t in entries[0]["top_logprobs"]}

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``ids``."""
        return [int(t) for t in self.completion(ids, n_predict=n)["tokens"]]


class LlamaCppRunner(EngineRunner):
    """Times generation of a saved model folder in llama.cpp, for :func:`shortened.bench.run_benchmark`: the
    folder is exported to a temporary GGUF (``outtype``), served by ``llama-server`` with one slot per
    sequence of the largest batch, and a batch is that many concurrent requests, decoded together by the
    server's own continuous batching. Peak memory is the server process's peak RSS."""

    engine, memory_kind = "llamacpp", "server_peak_rss"

    def __init__(self, folder: str | os.PathLike, *, outtype: str = "bf16", threads: int | None = None,
                 max_batch: int = 1, prompt_len: int = 32, max_tokens: int = 160, seed: int = 0,
                 llama_cpp: str | os.PathLike | None = None) -> None:
        import tempfile
        from concurrent.futures import ThreadPoolExecutor

        from ..bench import random_prompt
        from ..export import export_gguf

        self._work = tempfile.TemporaryDirectory(prefix="shortened-bench-")
        try:
            self.export = export_gguf(folder, Path(self._work.name) / "model.gguf", outtype=outtype,
                                      llama_cpp=llama_cpp)
            vocab = vocab_size_of(Path(folder))
            self.prompts = random_prompt(vocab, max_batch, prompt_len, seed).tolist()
            # llama-server splits its context evenly over the slots.
            self.server = LlamaServer(self.export["file"], llama_cpp=llama_cpp, threads=threads, parallel=max_batch,
                                      ctx=max_batch * (max_tokens + 16)).__enter__()
        except BaseException:
            self._work.cleanup()
            raise
        self._pool = ThreadPoolExecutor(max_batch)
        self.info = {"engine": self.engine, "engine_version": server_version(self.server.binary),
                     "engine_dtype": outtype}

    @property
    def pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    def time(self, new_tokens: int) -> float:
        """Seconds for ``batch`` concurrent requests of ``new_tokens`` greedy tokens each (EOS ignored)."""
        start = time.perf_counter()
        replies = list(self._pool.map(lambda ids: self.server.completion(ids, n_predict=new_tokens),
                                      self.prompts[: self._batch]))
        seconds = time.perf_counter() - start
        made = {len(r.get("tokens") or []) for r in replies}
        if made != {new_tokens}:
            raise ShortenedError(f"llama-server generated {sorted(made)} tokens where {new_tokens} were asked")
        return seconds

    def close(self) -> None:
        self._pool.shutdown()
        self.server.__exit__(None, None, None)
        self._work.cleanup()


def server_version(binary: Path) -> str:
    """llama.cpp's build number and commit, as ``llama-server --version`` prints them; a server built from a
    source package (no git: it prints build 0) is named by the package ``make llamacpp`` recorded beside it."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version:")]
    version = lines[0].removeprefix("version:").strip() if lines else "unknown"
    source = binary.resolve().parents[2] / SOURCE_FILE  # TREE/build/bin/llama-server
    if source.is_file() and ("build 0" in version or version == "unknown"):
        return f"{source.read_text().strip()} (llama-server {version})"
    return version


def probability_difference(model: Any, server: LlamaServer, prompts: Sequence[Sequence[int]], *,
                           shortest: int = 4, n_probs: int = 20) -> tuple[float, int]:
    """Max abs difference between transformers' next-token probabilities (``model`` in memory) and llama.cpp's
    (its ``n_probs`` likeliest) after every prefix of at least ``shortest`` tokens of each prompt, and how
    many prefixes were compared (llama.cpp withholds those whose likeliest token is an incomplete character)."""
    import torch

    worst, measured = 0.0, 0
    for ids in prompts:
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([list(ids)])).logits[0].double(), -1)
        for end in range(shortest, len(ids) + 1):
            theirs = server.next_token_probs(ids[:end], n_probs=n_probs)
            if theirs is not None:
                measured += 1
                worst = max(worst, max(abs(probs[end - 1, t].item() - p) for t, p in theirs.items()))
    return worst, measured


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
