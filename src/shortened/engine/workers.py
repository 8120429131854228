"""Scheduling the engine's independent candidate streams: how many go into one block call
(:func:`call_groups`), how many run at once (:func:`default_workers`) and on which threads
(:class:`WorkerPool`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

#: Tokens per block call when several candidate streams are batched together on an accelerator. On a
#: CPU the default is one stream per call: bigger batches only push activations out of the caches.
DEFAULT_BATCH_TOKENS = 16384

T = TypeVar("T")


def default_workers(device: torch.device) -> int:
    """Candidate streams computed concurrently: on a CPU one per core, each single-threaded (independent
    streams in parallel use the cores better than splitting every matrix product between them; measured
    in benchmarks/results/scoring.md); on an accelerator one, since it parallelises each call itself."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


def call_groups(items: list[T], tokens_each: int, batch_tokens: int) -> list[list[T]]:
    """``items`` (streams of ``tokens_each`` tokens) in groups of at most ``batch_tokens`` tokens, one group
    per call (always at least one item per group)."""
    size = max(1, batch_tokens // tokens_each)
    return [items[s:s + size] for s in range(0, len(items), size)]


class WorkerPool:
    """``workers`` threads for independent calls, each on its share of torch's intra-op threads.

    Outside :meth:`parallel`, :meth:`map` is a plain loop with every thread on each call.
    """

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._executor: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(x) for x in items]``; inside :meth:`parallel`, on its worker threads.

        The streams are independent, so the results are those of the sequential loop (up to the rounding
        of a matrix product split over fewer threads).
        """
        if self._executor is None or len(items) <= 1:
            return [fn(x) for x in items]

        def call(x: Any) -> Any:
            with torch.inference_mode():  # thread-local: enter it in the worker
                return fn(x)

        return list(self._executor.map(call, items))

    @contextlib.contextmanager
    def parallel(self) -> Iterator[None]:
        """Run :meth:`map` on ``workers`` threads for the duration, the intra-op threads shared out between
        them (outside it, ``map`` is a plain loop with every thread on each call)."""
        if self.workers <= 1 or self._executor is not None:
            yield
            return
        threads = torch.get_num_threads()
        per_worker = max(1, threads // self.workers)
        torch.set_num_threads(per_worker)
        # Set in every worker too: a new thread's OpenMP team has the default size (all cores) whatever the
        # caller set, so without it each worker's matrix products would run on every core (measured: two
        # OpenMP threads per worker, four busy threads on two cores).
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="shortened-stream",
                                            initializer=torch.set_num_threads, initargs=(per_worker,))
        try:
            yield
        finally:
            self._executor.shutdown()
            self._executor = None
            torch.set_num_threads(threads)
