"""Training-free healing: a linear bridge per removed run, folded into an existing weight (ReplaceMe).

A block of the architectures in the table computes ``out = Y + M`` where ``M`` is the output of its
last linear layer (the MLP's output projection, ``ArchSpec.mlp_out``) and ``Y`` everything else (the
residual after attention). When blocks ``a..b`` are removed, the kept block before them (``a - 1``)
should hand on the unpruned model's hidden state after block ``b``, ``H``. A linear map ``T`` on the
MLP output gets as close as least squares allows::

    T = argmin_T sum_t w_t ||M_t T - (H_t - Y_t)||^2 + lambda ||T - I||^2     (calibration tokens t)

Then ``M T`` is folded into the output projection (``W <- T^T W``, ``bias <- T^T bias``), so the
pruned model keeps its plain architecture and loads with plain transformers. The ridge pulls ``T``
towards the identity (plain removal), ``lambda = ridge * mean(diag(M^T M))``.

Runs are fitted first to last on the progressively bridged model: the student's ``Y`` and ``M`` at run
``r`` come from the student with the bridges of runs ``< r`` already folded in. One teacher forward per
micro-batch (stopped after the last block needed) gives every target; the student's stream then runs
block by block from the first bridge on. Only the sums ``M^T M`` and ``M^T (H - Y)`` are kept, in
float64; memory holds the student's stream and one target per run, never every block's hidden states.

Each token's squared error is weighted by ``1 / ||H||^2`` (its relative error): the attention sink's
huge activation at the first position would otherwise dominate the fit, and leaving that position out
lets the fitted map break it (the pruned model's perplexity then explodes: measured, BENCHMARKS.md).

``objective="cosine"`` (ReplaceMe's second variant) starts from that least-squares ``T`` and takes a few
Adam steps on the mean cosine distance between ``Y + M T`` and ``H``, over the run's calibration tokens
kept in memory (3 x tokens x hidden floats per run): the direction of the hidden state is what the next
block's normalisation sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..archs import ArchSpec, get_arch, get_blocks, get_submodule
from ..engine import call_block
from ..errors import ShortenedError
from .data import pack_tokens
from .reconstruct import capture_teacher
from .registry import HealContext, HealMethod, Prepared

#: Ridge strength relative to the mean diagonal of M^T W M, and calibration tokens of the fit: the best
#: measured on SmolLM2-135M, Block Influence blocks (WikiText-2, first 100 chunks, book text): ridge
#: 1e-3 / 1e-2 / 0.1 / 0.3 -> 120.6 / 119.3 / 115.7 / - at 16k tokens, - / 115.4 / 113.3 / 113.7 at 32k.
DEFAULT_RIDGE = 0.1
DEFAULT_TOKENS = 32768
#: The bridge's objectives: least squares (closed form) or cosine distance (Adam from the least squares).
OBJECTIVES = ("ls", "cosine")
#: Adam steps, learning rate and tokens per step of the cosine refinement.
DEFAULT_COSINE_STEPS = 200
DEFAULT_COSINE_LR = 1e-4
COSINE_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class BridgeFit:
    """One fitted bridge: teacher blocks ``start..end`` removed, ``T`` folded into student ``block``."""

    start: int
    end: int
    block: int  # student index of the kept block before the run
    teacher_block: int  # its index in the unpruned model
    tokens: int
    #: Mean over calibration tokens of ||out - H||^2 / ||H||^2 for the block's output, with plain removal
    #: (T = I) and with the fitted bridge (measured on the folded block).
    error_removed: float
    error_bridged: float
    objective: str = "ls"
    #: Mean cosine distance of the block's output to H: least-squares T, and the refined T (cosine only).
    cosine_ls: float | None = None
    cosine_refined: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def removed_runs(kept: Sequence[int], num_teacher_blocks: int) -> list[tuple[int, int]]:
    """The maximal runs ``(a, b)`` of teacher blocks not in ``kept`` (both ends included)."""
    kept_set = set(kept)
    runs: list[tuple[int, int]] = []
    for i in range(num_teacher_blocks):
        if i in kept_set:
            continue
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def mlp_out_path(spec: ArchSpec, model_type: str, option: str = "--method linear") -> str:
    """``spec.mlp_out``, or a one-line error naming the ``option`` that needs it, the architecture and the
    table field."""
    if not spec.mlp_out:
        why = spec.mlp_out_why or "its blocks are not known to end in 'h + linear(...)'"
        raise ShortenedError(f"{option} does not support model_type '{model_type}': {why} "
                             "(ArchSpec.mlp_out in shortened/archs.py)")
    return spec.mlp_out


class BridgeSums:
    """Running float64 sums of a least-squares problem ``min ||X T - Z||^2`` over micro-batches."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.xtz = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add rows ``x`` [tokens, dim] and targets ``z`` [tokens, dim], each row's squared error weighted
        by ``weight`` [tokens] (default 1)."""
        x, z = x.to(self.xtx.device, torch.float64), z.to(self.xtx.device, torch.float64)
        xw = x if weight is None else x * weight.to(x.device, torch.float64)[:, None]
        self.xtx += xw.T @ x
        self.xtz += xw.T @ z
        self.tokens += x.shape[0]

    @classmethod
    def merged(cls, parts: Sequence[BridgeSums]) -> BridgeSums:
        """The sums of several parts (e.g. the folds of a calibration set) together."""
        total = cls(parts[0].xtx.shape[0], device=parts[0].xtx.device)
        for part in parts:
            total.xtx += part.xtx
            total.xtz += part.xtz
            total.tokens += part.tokens
        return total

    def solve(self, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
        """``argmin_T sum_t w_t ||X_t T - Z_t||^2 + lambda ||T - I||^2``, ``lambda = ridge * mean(diag(X^T W X))``."""
        if self.tokens == 0:
            raise ShortenedError("no calibration tokens for the linear bridge")
        dim = self.xtx.shape[0]
        eye = torch.eye(dim, dtype=torch.float64, device=self.xtx.device)
        lam = ridge * self.xtx.diagonal().mean()
        return torch.linalg.solve(self.xtx + lam * eye, self.xtz + lam * eye)


def fold_into_linear(layer: nn.Module, t: torch.Tensor) -> None:
    """Make ``layer``'s output ``y`` become ``y @ t`` by changing its weight (and bias) in place."""
    with torch.no_grad():
        w = layer.weight
        t = t.to(torch.float64)
        if isinstance(layer, nn.Linear):  # weight [out, in]: y = x W^T + b
            new = t.T @ w.to(torch.float64)
        elif w.dim() == 2 and getattr(layer, "nf", None) == w.shape[1]:  # transformers Conv1D: y = x W + b
            new = w.to(torch.float64) @ t
        else:
            raise ShortenedError(f"cannot fold a linear map into a {type(layer).__name__}")
        w.copy_(new.to(w.dtype))
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.copy_((bias.to(torch.float64) @ t).to(bias.dtype))


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``1 - cos(pred_t, target_t)``."""
    return (1 - nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-12)).mean()


def refine_cosine(t: torch.Tensor, m: torch.Tensor, y: torch.Tensor, h: torch.Tensor, *,
                  steps: int = DEFAULT_COSINE_STEPS, lr: float = DEFAULT_COSINE_LR,
                  batch_tokens: int = COSINE_BATCH_TOKENS, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """Adam steps on ``T`` (from ``t``) lowering the mean cosine distance of ``y + m T`` to ``h`` (rows are
    tokens). Returns the refined ``T`` (float64) and the distance over all rows before and after; ``t`` is
    returned unchanged if the steps did not lower it."""
    g = torch.Generator().manual_seed(seed)
    param = nn.Parameter(t.detach().to(m.dtype).clone())
    opt = torch.optim.Adam([param], lr=lr)

    def full(x: torch.Tensor) -> float:  # over all rows, in slices of batch_tokens
        with torch.no_grad():
            total = sum(float(cosine_distance(yy + mm @ x, hh)) * len(mm)
                        for mm, yy, hh in zip(m.split(batch_tokens), y.split(batch_tokens), h.split(batch_tokens)))
        return total / len(m)

    before = full(param.detach())
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(len(m), (min(batch_tokens, len(m)),), generator=g).to(m.device)
            loss = cosine_distance(y[rows] + m[rows] @ param, h[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    after = full(param.detach())
    if not after < before:
        return t.to(torch.float64), before, before
    return param.detach().to(torch.float64), before, after


def fit_linear_bridges(
    model: nn.Module,
    teacher: nn.Module,
    kept: Sequence[int],
    ids: torch.Tensor,
    *,
    ridge: float = DEFAULT_RIDGE,
    objective: str = "ls",
    cosine_steps: int = DEFAULT_COSINE_STEPS,
    cosine_lr: float = DEFAULT_COSINE_LR,
    batch_size: int = 8,
    progress: bool = True,
) -> list[BridgeFit]:
    """Fit and fold one linear bridge per removed run of ``model`` (block ``i`` = teacher's ``kept[i]``).

    ``ids`` (LongTensor[n, seq]) is the calibration text; ``model`` is changed in place. ``objective``
    ``"cosine"`` refines each least-squares map with ``cosine_steps`` Adam steps (:func:`refine_cosine`).
    """
    from tqdm.auto import tqdm

    spec = get_arch(model)
    path = mlp_out_path(spec, model.config.model_type)
    if not ridge >= 0:
        raise ShortenedError(f"--linear-ridge must be >= 0, got {ridge}")
    if objective not in OBJECTIVES:
        raise ShortenedError(f"--linear-objective must be one of {', '.join(OBJECTIVES)}, got '{objective}'")
    refine = dict(steps=cosine_steps, lr=cosine_lr) if objective == "cosine" else None
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ShortenedError("the linear bridge needs calibration ids of shape [samples, tokens >= 2]")
    blocks, n_teacher = get_blocks(model, spec), len(get_blocks(teacher))
    kept = list(kept)
    if len(kept) != len(blocks):
        raise ShortenedError(f"kept blocks {kept} do not match the model's {len(blocks)} blocks")
    runs = removed_runs(kept, n_teacher)
    if not runs:
        raise ShortenedError("no block was removed: there is nothing to bridge")
    if runs[0][0] == 0:
        raise ShortenedError(f"blocks {runs[0][0]}..{runs[0][1]} were removed from the very start: the linear "
                             "bridge needs a kept block before every removed run")
    # student block of each run's bridge, and the teacher input index holding its target
    at = {kept.index(a - 1): (a, b) for a, b in runs}
    first, last = min(at), max(at)
    targets = {b + 1 for _, b in runs}
    device = next(model.parameters()).device
    teacher.eval().requires_grad_(False)

    streams: list[torch.Tensor] = []
    goals: list[dict[int, torch.Tensor]] = []
    calls: list[dict[int, Any]] = []
    for chunk in ids.split(batch_size):
        hidden, call = capture_teacher(teacher, chunk.to(device), None, {kept[first]} | targets,
                                       {kept[i] for i in range(first, last + 1)})
        streams.append(hidden[kept[first]])
        goals.append({t: hidden[t] for t in targets})
        calls.append(call)

    fits: list[BridgeFit] = []
    bar = tqdm(range(first, last + 1), desc="linear bridge", unit="block", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for i in bar:
            block = blocks[i]
            if i in at:
                fits.append(_fit_one(block, get_submodule(block, path), path, i, kept[i], at[i], streams, goals,
                                     calls, ridge, refine))
                bar.set_postfix(error=f"{fits[-1].error_removed:.3f}->{fits[-1].error_bridged:.3f}")
            else:
                for k, h in enumerate(streams):
                    streams[k] = call_block(block, calls[k][kept[i]], h, h.shape[0])
    return fits


def mlp_output(seen: list[torch.Tensor], out: torch.Tensor, path: str, index: int) -> torch.Tensor:
    """The output of layer ``path`` that a forward hook ``seen`` in one call of block ``index`` (whose output
    is ``out``), shaped like ``out``; a one-line error when the layer is not the one that writes into the
    residual stream (ArchSpec.mlp_out)."""
    if len(seen) != 1:
        raise ShortenedError(f"'{path}' ran {len(seen)} times in one call of block {index}: "
                             "ArchSpec.mlp_out must name the block's last linear layer")
    if seen[0].numel() != out.numel():
        raise ShortenedError(f"the output of '{path}' does not have the block output's size: ArchSpec.mlp_out "
                             "must name the layer that writes into the residual stream")
    return seen[0].reshape(out.shape)  # OPT runs its MLP on flattened tokens


def relative_errors(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token ``||out - target||^2 / ||target||^2`` (float64, flattened over the batch)."""
    t = target.reshape(-1, target.shape[-1]).double()
    return (out.reshape(t.shape).double() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-30)


def _fit_one(block: nn.Module, out_proj: nn.Module | None, path: str, index: int, teacher_index: int,
             run: tuple[int, int], streams: list[torch.Tensor], goals: list[dict[int, torch.Tensor]],
             calls: list[dict[int, Any]], ridge: float, refine: dict[str, Any] | None = None) -> BridgeFit:
    """Accumulate, solve (and with ``refine``, refine by cosine distance) and fold the bridge of ``block``;
    advance ``streams`` through the folded block."""
    if out_proj is None:
        raise ShortenedError(f"block {index} has no module '{path}' (ArchSpec.mlp_out)")
    seen: list[torch.Tensor] = []
    handle = out_proj.register_forward_hook(lambda m, a, out: seen.append(out))
    sums: BridgeSums | None = None
    removed_err: list[torch.Tensor] = []
    kept_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (M, Y, H) for the refinement
    try:
        for k, h in enumerate(streams):
            seen.clear()
            out = call_block(block, calls[k][teacher_index], h, h.shape[0])
            m = mlp_output(seen, out, path, index)
            y = out - m
            target = goals[k][run[1] + 1]
            dim = m.shape[-1]
            if sums is None:
                sums = BridgeSums(dim, device=m.device)
                first = (y, m)
            sums.add(m.reshape(-1, dim), (target - y).reshape(-1, dim), token_weights(target))
            removed_err.append(relative_errors(out, target))
            if refine is not None:
                kept_rows.append((m.reshape(-1, dim).float(), y.reshape(-1, dim).float(), target.reshape(-1, dim).float()))
    finally:
        handle.remove()
    assert sums is not None
    t = sums.solve(ridge)
    cosine: tuple[float, float] | None = None  # distance with the least-squares T, then the refined one
    if refine is not None:
        m_all, y_all, h_all = (torch.cat(parts) for parts in zip(*kept_rows))
        kept_rows.clear()
        t, before, after = refine_cosine(t, m_all, y_all, h_all, seed=index, **refine)
        cosine = (before, after)
        del m_all, y_all, h_all
    fold_into_linear(out_proj, t)
    # The folded block must compute Y + M T (up to the weights' precision); else its output is not
    # "rest + linear output" and the table entry is wrong.
    expected = first[0].double() + first[1].double() @ t
    bridged_err: list[torch.Tensor] = []
    for k, h in enumerate(streams):
        streams[k] = call_block(block, calls[k][teacher_index], h, h.shape[0])
        if k == 0:
            tol = 1e-4 if streams[0].dtype == torch.float32 else 5e-2
            gap = (streams[0].double() - expected).norm() / expected.norm().clamp_min(1e-12)
            if gap > tol:
                raise ShortenedError(
                    f"folding the bridge into '{path}' of block {index} does not reproduce the fitted map (relative "
                    f"gap {float(gap):.2e}): the block's output is not 'rest + {path}(...)', check ArchSpec.mlp_out")
        bridged_err.append(relative_errors(streams[k], goals[k][run[1] + 1]))
    return BridgeFit(start=run[0], end=run[1], block=index, teacher_block=teacher_index, tokens=sums.tokens,
                     error_removed=float(torch.cat(removed_err).mean()), error_bridged=float(torch.cat(bridged_err).mean()),
                     objective="ls" if refine is None else "cosine",
                     cosine_ls=cosine[0] if cosine else None, cosine_refined=cosine[1] if cosine else None)


def token_weights(target: torch.Tensor) -> torch.Tensor:
    """1 / ||target||^2 per token: every token's error counts relative to its size, so the attention
    sink's huge activation (first position) is fitted like any other token instead of dominating."""
    return 1.0 / target.reshape(-1, target.shape[-1]).double().pow(2).sum(-1).clamp_min(1e-30)


def pack_ids(examples: Sequence[dict[str, list[int]]], seq_len: int, max_tokens: int) -> torch.Tensor:
    """The examples' tokens packed into rows of ``seq_len`` (:func:`.data.pack_tokens`), at most
    ``max_tokens`` in all."""
    rows = pack_tokens([e["input_ids"] for e in examples], seq_len)[: max_tokens // seq_len]
    if not rows:
        raise ShortenedError(f"the data holds fewer than {seq_len} tokens (--seq-len), or --linear-tokens is below "
                             "it: the linear bridge needs at least one row")
    return torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)


def _prepare(ctx: HealContext) -> Prepared:
    s = ctx.settings
    examples = list(ctx.data.train)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(s.seed)).tolist()
    ids = pack_ids([examples[i] for i in order], s.seq_len, s.linear_tokens)
    fits = fit_linear_bridges(ctx.model, ctx.teacher, ctx.kept, ids, ridge=s.linear_ridge,
                              objective=s.linear_objective, cosine_steps=s.linear_cosine_steps,
                              cosine_lr=s.linear_cosine_lr, batch_size=s.batch_size, progress=ctx.progress)
    return Prepared(ctx.model, None, "none", extra={"bridges": [f.to_dict() for f in fits],
                                                    "calibration_tokens": int(ids.numel())})


def _check(settings: Any) -> None:
    if settings.linear_tokens < 2:
        raise ShortenedError(f"--linear-tokens must be at least 2, got {settings.linear_tokens}")
    if not settings.linear_ridge >= 0:
        raise ShortenedError(f"--linear-ridge must be >= 0, got {settings.linear_ridge}")
    if settings.linear_objective not in OBJECTIVES:
        raise ShortenedError(f"--linear-objective must be one of {', '.join(OBJECTIVES)}, "
                             f"got '{settings.linear_objective}'")
    if settings.linear_cosine_steps < 1 or not settings.linear_cosine_lr > 0:
        raise ShortenedError("--linear-cosine-steps must be >= 1 and --linear-cosine-lr > 0, got "
                             f"{settings.linear_cosine_steps} and {settings.linear_cosine_lr}")


METHOD = HealMethod(
    name="linear",
    summary="training-free: one least-squares linear map per removed run, folded into the MLP output "
            "projection of the block before it (ReplaceMe)",
    prepare=_prepare,
    defaults={"batch_size": 8, "seq_len": 128},
    needs_teacher=True,
    needs_kept=True,
    trains=False,
    check=_check,
)
