"""The scoring engine: one capture pass, then every "model without block i" from cached block inputs.

A calibration batch is run through the model once with ``use_cache=False``; forward pre-hooks keep each
block's input hidden states and its call arguments (attention mask, position embeddings: they can differ
per block, e.g. sliding-window layers in Gemma 2/3). The model with block ``i`` removed is then block
``i``'s cached input run through the later blocks only (each with its own cached arguments), then the
head. Blocks are visited once, in order, each applied to every candidate stream that needs it (batched
together), so only one block's weights must be on the accelerator at a time: that is the offloaded mode.

Everything here is exact: the streams compute the same function as a pruned copy of the model (the
reference tests check it to 1e-4 against :func:`shortened.surgery.remove_blocks` and a full forward).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .archs import ArchSpec, get_arch, get_blocks, get_submodule
from .errors import ShortenedError
from .offload import BlockHome, MemoryHome, disk_blocks

#: Tokens per head chunk when computing the loss over the vocabulary (keeps [chunk, vocab] logits small).
DEFAULT_LOSS_CHUNK = 1024
#: Vocabulary slice for the loss on a CPU (0: the whole vocabulary at once). Each slice's [tokens, 1024]
#: float32 logits go into one reused buffer and stay in cache between the projection and the log-sum-exp.
#: Measured on SmolLM2's 49k x 576 head, one thread, 635 tokens: median 695 ms against 765 ms for the
#: earlier 2048-word slices with fresh logits per slice (1,270 tokens: 1.10 s against 1.52 s unsliced).
DEFAULT_VOCAB_CHUNK = 1024
#: Below this log-sum-exp (float32 sums near the subnormal range) the unshifted sum is not trusted.
_LSE_FLOOR = -60.0
#: Tokens per block call when several candidate streams are batched together on an accelerator. On a
#: CPU the default is one stream per call: bigger batches only push activations out of the caches.
DEFAULT_BATCH_TOKENS = 16384


def default_workers(device: torch.device) -> int:
    """Candidate streams computed concurrently: on a CPU one per core, each single-threaded (independent
    streams in parallel use the cores better than splitting every matrix product between them; measured
    in benchmarks/results/scoring.md); on an accelerator one, since it parallelises each call itself."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


class _StopForward(Exception):
    """Raised by the capture hook at the last block: nothing after it is needed."""


@dataclass
class _Call:
    """How a block was called: positional args after the hidden states, kwargs, where the hidden goes."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_key: str | None  # None: the hidden states are the first positional argument


@dataclass
class Capture:
    """One micro-batch of calibration samples after the capture pass."""

    ids: torch.Tensor                       # [b, seq]
    inputs: list[torch.Tensor | None]       # input of each block in the dense model (None past the stop)
    calls: list[_Call]                      # per block

    @property
    def batch(self) -> int:
        return self.ids.shape[0]


_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def split_block_call(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, _Call]:
    """A block's hidden-states input and the rest of its call, as seen by a forward pre-hook."""
    if args:
        return args[0], _Call(tuple(args[1:]), dict(kwargs), None)
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return kwargs["hidden_states"], _Call((), rest, "hidden_states")


def without_cache(call: _Call) -> _Call:
    """The call with no KV-cache object (re-runs would update it: wrong results) and ``use_cache`` off."""
    call.kwargs = {k: (None if k in _CACHE_ARGS else v) for k, v in call.kwargs.items()}
    if "use_cache" in call.kwargs:
        call.kwargs["use_cache"] = False
    return call


def check_calib_ids(calib_ids: Any, vocab_size: int | None = None) -> torch.Tensor:
    """Validate ``calib_ids`` as a LongTensor[n_samples, seq_len] with seq_len >= 2."""
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2:
        raise ShortenedError("calibration ids must be a LongTensor of shape [n_samples, seq_len]")
    if calib_ids.dtype not in (torch.int64, torch.int32):
        raise ShortenedError(f"calibration ids must be integer token ids, got {calib_ids.dtype}")
    n, seq = calib_ids.shape
    if n < 1 or seq < 2:
        raise ShortenedError(f"need at least 1 calibration sample of at least 2 tokens, got shape {tuple(calib_ids.shape)}")
    if vocab_size is not None and (calib_ids.min() < 0 or calib_ids.max() >= vocab_size):
        raise ShortenedError(f"calibration ids must lie in 0..{vocab_size - 1} (the model's vocabulary)")
    return calib_ids.long()


def _expand(obj: Any, n: int, r: int) -> Any:
    """Tile a captured argument built for a batch of ``n`` to ``r`` stacked copies of that batch.

    Tensors whose first dimension is the batch are tiled (stream-major, matching ``torch.cat``); others
    (broadcast masks, position embeddings of batch 1, scalars) are left alone.
    """
    if r == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[0] == n and n > 1:
            return obj.repeat(r, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(_expand(o, n, r) for o in obj)
    if isinstance(obj, list):
        return [_expand(o, n, r) for o in obj]
    if isinstance(obj, dict):
        return {k: _expand(v, n, r) for k, v in obj.items()}
    return obj


def call_block(block: nn.Module, call: _Call, hidden: torch.Tensor, n: int) -> torch.Tensor:
    """Run ``block`` on ``hidden`` (``r * n`` sequences) with its captured arguments for ``n``."""
    r = hidden.shape[0] // n
    args, kwargs = _expand(call.args, n, r), _expand(call.kwargs, n, r)
    if call.hidden_key is None:
        out = block(hidden, *args, **kwargs)
    else:
        out = block(*args, **{**kwargs, call.hidden_key: hidden})
    return out[0] if isinstance(out, tuple) else out


class Engine:
    """Cached block inputs and arguments of a calibration set, and the computations built on them.

    ``skip`` lists blocks that are treated as already removed (they are bypassed, which computes exactly
    what the pruned model computes); ``offload`` keeps blocks off ``device`` and brings one at a time
    (always so for a model whose blocks are on disk, see :func:`shortened.offload.load_blocks_on_disk`).
    """

    def __init__(
        self,
        model: nn.Module,
        calib_ids: torch.Tensor | None,
        *,
        skip: Sequence[int] = (),
        batch_size: int | None = None,
        offload: bool = False,
        device: str | torch.device | None = None,
        batch_tokens: int | None = None,
        loss_chunk: int = DEFAULT_LOSS_CHUNK,
        vocab_chunk: int | None = None,
        workers: int | None = None,
        progress: bool = True,
        spec: ArchSpec | None = None,
    ) -> None:
        self.model = model
        self.spec = spec or get_arch(model)
        self.blocks = get_blocks(model, self.spec)
        self.num_blocks = len(self.blocks)
        bad = [i for i in skip if not 0 <= i < self.num_blocks]
        if bad:
            raise ShortenedError(f"block {bad[0]} to skip is out of range (the model has {self.num_blocks} blocks)")
        self.skip = sorted(set(skip))
        self.active = [i for i in range(self.num_blocks) if i not in set(self.skip)]
        if not self.active:
            raise ShortenedError("every block is skipped: nothing to score")
        disk = disk_blocks(model)
        self.offload = offload or disk is not None
        self.loss_chunk = max(1, loss_chunk)
        self.progress = progress
        self._home: BlockHome | None = None
        if self.offload:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self._home = disk or MemoryHome(next(self.blocks[0].parameters()).device)
        else:
            self.device = _module_device(model) if device is None else torch.device(device)
        if batch_tokens is None:
            batch_tokens = DEFAULT_BATCH_TOKENS if self.device.type != "cpu" else 1
        self.batch_tokens = max(1, batch_tokens)
        self.workers = max(1, workers if workers is not None else default_workers(self.device))
        if vocab_chunk is None:
            vocab_chunk = DEFAULT_VOCAB_CHUNK if self.device.type == "cpu" else 0
        self.vocab_chunk = max(0, vocab_chunk)
        self.calib_ids = None if calib_ids is None else check_calib_ids(
            calib_ids, getattr(model.config, "vocab_size", None))
        n_samples = self.calib_ids.shape[0] if self.calib_ids is not None else 1
        # One micro-batch per worker, so every block visit has a multiple of `workers` equal calls to share
        # out (one batch of 10 samples leaves a core idle for half a call at every odd stream count).
        self.batch_size = batch_size or -(-n_samples // self.workers)
        if self.batch_size < 1:
            raise ShortenedError("batch size must be at least 1")
        self._captures: list[Capture] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._head = [m for m in (get_submodule(model, p) for p in self.spec.head) if m is not None]
        cap = getattr(model.config, self.spec.logit_softcap_field, None) if self.spec.logit_softcap_field else None
        self.softcap: float | None = float(cap) if cap else None

    # ----------------------------------------------------------------- capture
    @property
    def captures(self) -> list[Capture]:
        if self._captures is None:
            if self.calib_ids is None:
                raise ShortenedError("this criterion needs calibration data")
            self._captures = [self._capture(chunk) for chunk in self.calib_ids.split(self.batch_size)]
        return self._captures

    def _capture(self, ids: torch.Tensor) -> Capture:
        """Run ``ids`` through the model with ``use_cache=False`` and record every block's call."""
        n_blocks = self.num_blocks
        inputs: list[torch.Tensor | None] = [None] * n_blocks
        calls: list[_Call | None] = [None] * n_blocks
        handles = []

        def make_hook(i: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden, call = split_block_call(args, kwargs)
                inputs[i], calls[i] = hidden.detach(), call
                if i == n_blocks - 1:
                    raise _StopForward
                if self._home is not None:
                    self._home.fetch(module, i, self.device)

            return hook

        def make_post(i: int):
            def post(module: nn.Module, args: tuple, output: Any) -> None:
                self._home.release(module, i)  # type: ignore[union-attr]

            return post

        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(make_hook(i), with_kwargs=True))
            if self._home is not None:
                handles.append(block.register_forward_hook(make_post(i)))
        try:
            with torch.no_grad():
                self.model(input_ids=ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if any(c is None for c in calls):
            raise ShortenedError("the model's forward did not call every block; cannot score its blocks")
        for c in calls:
            without_cache(c)  # type: ignore[arg-type]
        return Capture(ids=ids.to(self.device), inputs=inputs, calls=calls)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- blocks
    @contextlib.contextmanager
    def on_device(self, index: int) -> Iterator[nn.Module]:
        """Block ``index``, on the execution device for the duration (offloaded mode moves it back)."""
        block = self.blocks[index]
        if self._home is not None:
            self._home.fetch(block, index, self.device)
        try:
            yield block
        finally:
            if self._home is not None:
                self._home.release(block, index)

    def run_streams(self, block: nn.Module, index: int, cap: Capture, streams: list[torch.Tensor]) -> list[torch.Tensor]:
        """Apply one block to several streams of the same micro-batch, batched up to ``batch_tokens``."""
        return self.run_block(block, index, [(cap, streams)])[0]

    def run_block(self, block: nn.Module, index: int,
                  work: Sequence[tuple[Capture, list[torch.Tensor]]]) -> list[list[torch.Tensor]]:
        """Apply one block to the streams of several micro-batches (``work``: pairs of a capture and its
        streams), all calls in one :meth:`map` so the workers share them out with no barrier in between;
        streams of one micro-batch are batched together up to ``batch_tokens``."""
        jobs = [(k, group) for k, (cap, streams) in enumerate(work) for group in self._per_call(cap, streams)]

        def run(job: tuple[int, list[torch.Tensor]]) -> list[torch.Tensor]:
            cap, group = work[job[0]][0], job[1]
            x = group[0] if len(group) == 1 else torch.cat(group, 0)
            y = call_block(block, cap.calls[index], x, cap.batch)
            return list(y.split(cap.batch, 0)) if len(group) > 1 else [y]

        outs: list[list[torch.Tensor]] = [[] for _ in work]
        for (k, _), ys in zip(jobs, self.map(run, jobs)):
            outs[k] += ys
        return outs

    def _per_call(self, cap: Capture, items: list[Any]) -> list[list[Any]]:
        """``items`` (streams of micro-batch ``cap``) in groups of at most ``batch_tokens`` tokens per call."""
        size = max(1, self.batch_tokens // cap.ids.numel())
        return [items[s:s + size] for s in range(0, len(items), size)]

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

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="block", disable=not self.progress, leave=False)

    # ----------------------------------------------------------------- head and loss
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, optional projection, LM head and logit soft-cap (as the model's own forward)."""
        for module in self._head:
            hidden = module(hidden)
        return self._softcap(hidden)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def token_nll(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-token NLL (float32) of final hidden states ``x`` [tokens, h] against ``targets`` [tokens].

        With ``vocab_chunk``, the output projection runs on slices of the vocabulary with a running
        log-sum-exp, each slice written into the same buffer and reduced in place, so its [tokens, slice]
        logits are still in cache when the log-sum-exp reads them and no new memory is touched per slice
        (on a CPU this is faster than the plain projection alone); the target's logit is one dot product
        per token.
        """
        proj = self._head[-1]
        if not self.vocab_chunk or not isinstance(proj, nn.Linear):
            logits = self.head(x).float()
            return torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None]).squeeze(1)
        x = self._pre_projection(x)
        lse = self._logsumexp(x)
        weight, bias = proj.weight, proj.bias
        target = (x.float() * weight[targets].float()).sum(-1)
        if bias is not None:
            target = target + bias[targets].float()
        return lse - self._softcap(target)

    def _pre_projection(self, x: torch.Tensor) -> torch.Tensor:
        """The head's modules before the output projection (the final norm) applied to ``x``."""
        for module in self._head[:-1]:
            x = module(x)
        return x

    def _logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """log-sum-exp over the vocabulary of the (linear) projection's logits for ``x`` (after the final
        norm), in ``vocab_chunk`` slices when set."""
        if not self.vocab_chunk:
            return torch.logsumexp(self._softcap(self._head[-1](x)).float(), -1)
        lse = self._sliced_logsumexp(x, shift=False)
        # Unshifted sums are exact where they stay in float32's normal range; rows where a logit passed
        # ~88 (inf) or every exp underflowed are recomputed with each slice shifted by its maximum.
        bad = ~torch.isfinite(lse) | (lse < _LSE_FLOOR)
        if bad.any():
            lse[bad] = self._sliced_logsumexp(x[bad], shift=True)
        return lse

    def _sliced_logsumexp(self, x: torch.Tensor, shift: bool) -> torch.Tensor:
        """log-sum-exp over the vocabulary of the head's logits for ``x`` [tokens, h] (after the final norm),
        one ``vocab_chunk`` slice at a time, each written into the same buffer and reduced in place.

        ``shift=False`` sums ``exp`` of the raw logits (two passes over a slice instead of four); ``shift``
        subtracts each slice's row maximum first, as :func:`torch.logsumexp` does.
        """
        proj = self._head[-1]
        weight, bias, step = proj.weight, proj.bias, self.vocab_chunk
        n = x.shape[0]
        buffer = x.new_empty(n * min(step, weight.shape[0]))
        parts = []
        for v in range(0, weight.shape[0], step):
            w = weight[v:v + step]
            out = buffer[:n * w.shape[0]].view(n, w.shape[0])
            if bias is None:
                torch.mm(x, w.t(), out=out)
            else:
                torch.addmm(bias[v:v + step], x, w.t(), out=out)
            logits = self._softcap_(out.float())
            if not shift:
                parts.append(logits.exp_().sum(-1))
                continue
            top = logits.amax(-1, keepdim=True)
            top = top.masked_fill_(top.isinf(), 0)  # as torch.logsumexp: rows of +-inf stay finite-safe
            parts.append(logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1)))
        if not shift:
            return torch.stack(parts).sum(0).log_()
        return torch.stack(parts).logsumexp(0)

    def _softcap_(self, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`_softcap` in place."""
        return logits.div_(self.softcap).tanh_().mul_(self.softcap) if self.softcap else logits

    def nll_sum(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum of next-token NLL of ``hidden`` [r*b, seq, h] against ``ids`` [b, seq], per stream ([r]).

        The head runs on chunks of tokens so [tokens, vocab] logits are never materialised whole, and the
        last position (no target) is not computed at all.
        """
        b, seq = ids.shape
        r = hidden.shape[0] // b
        x = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = ids[:, 1:].reshape(1, -1).expand(r, -1).reshape(-1)
        per_token = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], self.loss_chunk):
            end = start + self.loss_chunk
            per_token[start:end] = self.token_nll(x[start:end], targets[start:end])
        return per_token.view(r, -1).double().sum(1)

    def dense_targets(self, hidden: torch.Tensor) -> "DenseTargets":
        """What :meth:`kl_sum` needs of the dense model's next-token distributions, from its final hidden
        states ``hidden`` [b, seq, h] (computed once, then every candidate is compared with it).

        With a linear, uncapped head, ``KL(p || q) = sum p log p - sum p logit_q + lse_q`` and
        ``sum p logit_q = x_q . (p W) + p . bias``: per token, the expected output embedding ``p W`` [h] and
        one constant are all that is kept, not the [tokens x vocabulary] log-probabilities. Otherwise (soft
        cap) the dense log-probabilities themselves are kept.
        """
        x = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        if not self._linear_kl:
            logp = torch.cat([self.head(x[s:s + self.loss_chunk]).float().log_softmax(-1)
                              for s in range(0, x.shape[0], self.loss_chunk)])
            return DenseTargets(log_probs=logp)
        proj = self._head[-1]
        weight, bias = proj.weight, proj.bias
        step = self.vocab_chunk or weight.shape[0]
        means, consts = [], []
        for s in range(0, x.shape[0], self.loss_chunk):
            xn = self._pre_projection(x[s:s + self.loss_chunk])
            lse = self._logsumexp(xn)
            mean = torch.zeros(xn.shape[0], weight.shape[1], dtype=torch.float32, device=xn.device)
            p_logit = torch.zeros(xn.shape[0], dtype=torch.float64, device=xn.device)
            p_bias = torch.zeros_like(p_logit)
            for v in range(0, weight.shape[0], step):
                w = weight[v:v + step]
                logits = (xn @ w.t() if bias is None else torch.addmm(bias[v:v + step], xn, w.t())).float()
                prob = (logits - lse[:, None]).exp_()
                mean.addmm_(prob, w.float())
                p_logit += (prob * logits).sum(-1).double()
                if bias is not None:
                    p_bias += (prob @ bias[v:v + step].float()).double()
            means.append(mean)
            consts.append(p_logit - lse.double() - p_bias)  # sum p log p - p . bias
        return DenseTargets(mean_embedding=torch.cat(means), const=torch.cat(consts))

    @property
    def _linear_kl(self) -> bool:
        return isinstance(self._head[-1], nn.Linear) and not self.softcap

    def kl_sum(self, hidden: torch.Tensor, target: "DenseTargets") -> torch.Tensor:
        """Sum over tokens of KL(dense || candidate) of the next-token distributions, per stream ([r]):
        ``hidden`` [r*b, seq, h] is ``r`` candidates' final hidden states for the micro-batch of ``target``."""
        x = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        n = target.num_tokens
        sums = torch.zeros(x.shape[0] // n, dtype=torch.float64, device=x.device)
        for i in range(sums.shape[0]):
            for start in range(0, n, self.loss_chunk):
                chunk = x[i * n + start:i * n + min(n, start + self.loss_chunk)]
                sums[i] += self._token_kl(chunk, target, start).sum()
        return sums

    def _token_kl(self, x: torch.Tensor, target: "DenseTargets", offset: int) -> torch.Tensor:
        """Per-token KL of the candidate's final hidden states ``x`` against the dense rows from ``offset``."""
        rows = slice(offset, offset + x.shape[0])
        if target.log_probs is not None:
            logp = target.log_probs[rows]
            logq = self.head(x).float().log_softmax(-1)
            return (logp.exp() * (logp - logq)).sum(-1).double()
        xn = self._pre_projection(x)
        dot = (xn.double() * target.mean_embedding[rows].double()).sum(-1)
        return target.const[rows] - dot + self._logsumexp(xn).double()

    # ----------------------------------------------------------------- computations
    def removal_nll(self, candidates: Sequence[int] | None = None) -> dict[int, float]:
        """Mean next-token NLL of the model with each candidate block (one at a time) also removed.

        Streams: candidate ``i`` starts from block ``i``'s input and runs the later active blocks. One
        visit per block applies it to every stream that needs it.
        """
        cands = set(self.active if candidates is None else candidates)
        caps = self.captures
        use_captured = not self.skip  # the dense stream is the captured inputs themselves
        streams: list[dict[int, torch.Tensor]] = [{} for _ in caps]
        dense: list[torch.Tensor | None] = [c.inputs[0] for c in caps]
        last = self.active[-1]
        with torch.inference_mode(), self.parallel(), self._bar(len(self.active), "ppl") as bar:
            for j in self.active:
                with self.on_device(j) as block:
                    need_dense = not use_captured and j != last
                    keys = [sorted(s) for s in streams]
                    work = [(cap, [streams[m][i] for i in keys[m]] + ([dense[m]] if need_dense else []))
                            for m, cap in enumerate(caps)]
                    h_in = [cap.inputs[j] if use_captured else dense[m] for m, cap in enumerate(caps)]
                    for m, outs in enumerate(self.run_block(block, j, work)):
                        for i, y in zip(keys[m], outs):
                            streams[m][i] = y
                        if need_dense:
                            dense[m] = outs[-1]
                        if j in cands:
                            streams[m][j] = h_in[m]
                bar.update()
        totals = {i: 0.0 for i in cands}
        count = sum(cap.ids.shape[0] * (cap.ids.shape[1] - 1) for cap in caps)
        # (micro-batch, candidates whose losses one call computes)
        jobs = [(m, group) for m, cap in enumerate(caps) for group in self._per_call(cap, sorted(streams[m]))]

        def nll(job: tuple[int, list[int]]) -> list[float]:
            m, group = job
            return self.nll_sum(torch.cat([streams[m][i] for i in group], 0), caps[m].ids).tolist()

        with torch.inference_mode(), self.parallel():
            # in rounds of `workers` calls, freeing each round's streams as soon as it is done
            for r in range(0, len(jobs), self.workers):
                batch = jobs[r:r + self.workers]
                for (m, group), sums in zip(batch, self.map(nll, batch)):
                    for i, v in zip(group, sums):
                        totals[i] += v
                        del streams[m][i]
        return {i: totals[i] / count for i in sorted(totals)}

    def removal_set_outputs(self, sets: Sequence[Sequence[int]], captures: Sequence[int]) -> list[list[torch.Tensor]]:
        """Final hidden states (before the head) of the model with each set of blocks removed, for the
        micro-batches ``captures`` (indices into :attr:`captures`): ``out[c][s]`` for set ``s``.

        Blocks are visited once, in order. Streams are shared while sets agree on the blocks so far: at
        block ``j`` the candidates whose removals before ``j`` are the same have one stream, the dense
        prefix is the captured inputs themselves, and a stream splits only where one candidate keeps
        ``j`` and another removes it; so a set is computed from its first removed block on, and
        offspring of one parent share the parent's stream up to their first change.
        """
        if self.skip:
            raise ShortenedError("removal sets are computed on an engine with no skipped blocks")
        removed = [frozenset(s) for s in sets]
        caps = [self.captures[m] for m in captures]
        prefix: list[tuple[int, ...]] = [() for _ in sets]  # removed blocks before the current one
        streams: list[dict[tuple[int, ...], torch.Tensor]] = [{} for _ in caps]  # () = captured input
        last = self.num_blocks - 1
        with torch.inference_mode(), self.parallel():
            for j in range(self.num_blocks):
                keep = sorted({p for p, r in zip(prefix, removed) if j not in r})
                drop = sorted({p for p, r in zip(prefix, removed) if j in r})
                run = [p for p in keep if p or j == last]  # the dense stream is the next captured input
                inputs = [{p: cap.inputs[j] if not p else streams[m][p] for p in {*run, *drop}}
                          for m, cap in enumerate(caps)]
                outs: list[list[torch.Tensor]] = [[] for _ in caps]
                if run:
                    with self.on_device(j) as block:
                        outs = self.run_block(block, j, [(cap, [inputs[m][p] for p in run])
                                                         for m, cap in enumerate(caps)])
                streams = [{**{p + (j,): inputs[m][p] for p in drop}, **dict(zip(run, outs[m]))}
                           for m in range(len(caps))]
                prefix = [p + (j,) if j in r else p for p, r in zip(prefix, removed)]
        return [[streams[m][p] for p in prefix] for m in range(len(caps))]

    def dense_hiddens(self, reduce: str = "all") -> list[list[torch.Tensor]]:
        """Per micro-batch, the residual stream at every active block boundary: inputs of the active
        blocks in order, then the last active block's output (``len(active) + 1`` tensors).

        ``reduce="last"`` keeps only the last token of each sample ([b, h]) to save memory.
        """
        caps = self.captures
        use_captured = not self.skip
        out: list[list[torch.Tensor]] = [[] for _ in caps]
        pick = (lambda t: t[:, -1]) if reduce == "last" else (lambda t: t)
        h = [c.inputs[0] for c in caps]
        with torch.no_grad(), self._bar(len(self.active), "hidden states") as bar:
            for k, j in enumerate(self.active):
                need_run = (not use_captured) or j == self.active[-1]
                with contextlib.ExitStack() as stack:
                    block = stack.enter_context(self.on_device(j)) if need_run else None
                    for m, cap in enumerate(caps):
                        h_in = cap.inputs[j] if use_captured else h[m]
                        out[m].append(pick(h_in))
                        if need_run:
                            h[m] = self.run_streams(block, j, cap, [h_in])[0]
                bar.update()
        for m in range(len(caps)):
            out[m].append(pick(h[m]))
        return out

    def num_targets(self) -> int:
        return sum(c.ids.shape[0] * (c.ids.shape[1] - 1) for c in self.captures)


@dataclass
class DenseTargets:
    """The dense model's next-token distributions of one micro-batch, as :meth:`Engine.kl_sum` uses them:
    per token, the expected output embedding and a constant (linear head), or the log-probabilities."""

    mean_embedding: torch.Tensor | None = None  # [tokens, h]
    const: torch.Tensor | None = None           # [tokens], float64
    log_probs: torch.Tensor | None = None       # [tokens, vocab]

    @property
    def num_tokens(self) -> int:
        return (self.log_probs if self.log_probs is not None else self.const).shape[0]  # type: ignore[union-attr]


def _module_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def perplexity(mean_nll: float) -> float:
    """``exp`` of a mean token NLL (inf past float range)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return float("inf")


@dataclass
class BlockScores:
    """One importance score per block (lower = less important) and how they were computed."""

    criterion: str
    #: ``scores[i]`` for original block ``i``; None for blocks skipped as already removed.
    scores: list[float | None]
    settings: dict[str, Any] = field(default_factory=dict)
    #: For ``angular``: ``span_scores[n - 1][l]`` = distance when removing blocks ``l .. l+n-1``.
    span_scores: list[list[float]] | None = None
    #: Extra figures (e.g. the mean NLL per removal for ``ppl``).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.scores)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"criterion": self.criterion, "num_blocks": self.num_blocks,
                             "scores": list(self.scores), "settings": dict(self.settings)}
        if self.span_scores is not None:
            d["span_scores"] = self.span_scores
        if self.extra:
            d["extra"] = self.extra
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlockScores":
        try:
            scores = [None if s is None else float(s) for s in d["scores"]]
            criterion = str(d["criterion"])
        except (KeyError, TypeError, ValueError):
            raise ShortenedError("not a scores file: expected 'criterion' and a list of numeric 'scores'") from None
        return cls(criterion=criterion, scores=scores, settings=dict(d.get("settings", {})),
                   span_scores=d.get("span_scores"), extra=dict(d.get("extra", {})))
