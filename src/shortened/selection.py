"""Which blocks to remove, given scores: lowest scores, a contiguous span, or iterative re-scoring.

Rules (tested as properties):

- the number of blocks is ``num_blocks``, or ``ratio`` of the model's blocks rounded half up:
  ``k = floor(ratio * L + 0.5)`` (0.2 of 30 -> 6, 0.25 of 6 -> 2 since 1.5 rounds up); ``0 < ratio < 1``
  and ``k`` must be at least 1;
- the first ``protect_first`` and last ``protect_last`` blocks are never removed (the paper's "+"
  heuristic: 4 and 2 by default for ``taylor`` and ``magnitude``, 0 and 0 otherwise);
- ``contiguous``: the span of ``k`` adjacent unprotected blocks with the lowest span score (angular's own
  span distance when available, otherwise the sum of the block scores), lowest start on ties;
- otherwise the ``k`` lowest scores, lower index first on ties;
- scores of ``search`` are its one set written as scores (0 = removed): only the request it was searched
  for selects them (method "search"); any other is refused.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from fractions import Fraction
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .scores import BlockScores
from .errors import ShortenedError

ROUNDING_RULE = "k = floor(ratio * num_blocks + 0.5)"


@dataclass
class PruningPlan:
    """The blocks to remove (original indices, sorted) and why."""

    remove: list[int]
    num_blocks: int
    criterion: str
    method: str                       # "lowest", "contiguous", "iterative" or "search"
    protect_first: int
    protect_last: int
    requested: dict[str, Any] = field(default_factory=dict)
    #: The score of each removed block (or of the span, for contiguous) at the time it was chosen.
    chosen_scores: dict[int, float] = field(default_factory=dict)
    #: Iterative only: one entry per removal, with the scores it was chosen from.
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kept(self) -> list[int]:
        return [i for i in range(self.num_blocks) if i not in set(self.remove)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chosen_scores"] = {str(k): v for k, v in self.chosen_scores.items()}
        d["rounding"] = ROUNDING_RULE
        return d


def blocks_to_remove(num_blocks_total: int, *, num_blocks: int | None = None, ratio: float | None = None) -> int:
    """How many blocks to remove: ``num_blocks``, or ``ratio`` of the total rounded half up."""
    if (num_blocks is None) == (ratio is None):
        raise ShortenedError("give exactly one of --num-blocks and --ratio")
    if ratio is not None:
        if isinstance(ratio, (bool, str)) or not isinstance(ratio, numbers.Real):
            raise ShortenedError(f"ratio must be a number strictly between 0 and 1, got {ratio!r}")
        if not 0 < ratio < 1 or math.isnan(ratio):
            raise ShortenedError(f"ratio must be strictly between 0 and 1, got {ratio}")
        # The decimal the user wrote, not its binary float: 0.29 of 50 is 14.5, so 15 (0.29 * 50 is 14.499...).
        k = math.floor(Fraction(repr(float(ratio))) * num_blocks_total + Fraction(1, 2))
        if k < 1:
            raise ShortenedError(f"ratio {ratio} of {num_blocks_total} blocks rounds to 0 blocks; use a larger ratio")
        if k >= num_blocks_total:
            raise ShortenedError(f"ratio {ratio} of {num_blocks_total} blocks would remove every block")
        return k
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, numbers.Integral) or num_blocks < 1:
        raise ShortenedError(f"number of blocks to remove must be a positive integer, got {num_blocks!r}")
    num_blocks = int(num_blocks)
    if num_blocks >= num_blocks_total:
        raise ShortenedError(f"cannot remove {num_blocks} of {num_blocks_total} blocks: at least one must remain")
    return num_blocks


def check_request(
    total: int,
    criterion: str,
    *,
    num_blocks: int | None = None,
    ratio: float | None = None,
    protect_first: int | None = None,
    protect_last: int | None = None,
) -> int:
    """Validate a selection request before any scoring; returns the number of blocks to remove."""
    k = blocks_to_remove(total, num_blocks=num_blocks, ratio=ratio)
    first, last = _protection(criterion, protect_first, protect_last)
    free = max(0, total - first - last)
    if k > free:
        raise ShortenedError(
            f"cannot remove {k} blocks: only {free} of {total} are unprotected "
            f"(protect-first {first}, protect-last {last}); lower the count or the protection")
    return k


def _protection(criterion: str, protect_first: int | None, protect_last: int | None) -> tuple[int, int]:
    from .criteria import CRITERIA

    default = CRITERIA[criterion].protect if criterion in CRITERIA else (0, 0)
    first = default[0] if protect_first is None else protect_first
    last = default[1] if protect_last is None else protect_last
    for name, v in (("protect-first", first), ("protect-last", last)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ShortenedError(f"--{name} must be a non-negative integer, got {v}")
    return first, last


def select_blocks(
    scores: BlockScores | Sequence[float | None],
    *,
    num_blocks: int | None = None,
    ratio: float | None = None,
    protect_first: int | None = None,
    protect_last: int | None = None,
    contiguous: bool = False,
    allowed: Callable[[list[int]], str | None] | None = None,
) -> PruningPlan:
    """Choose the blocks to remove from per-block ``scores`` (lower = less important).

    ``scores`` is a :class:`BlockScores` or a plain list (None marks a block already removed).
    Protection defaults to the criterion's (4/2 for taylor and magnitude, else 0/0). ``allowed`` (e.g.
    :func:`shortened.surgery.removal_check`) returns None for a set of blocks the model's config can express
    without, else why not: only such sets are chosen (lowest scores: greedily, a block whose addition makes
    the set inexpressible is passed over), and the plan records every block passed over and why.
    """
    bs = scores if isinstance(scores, BlockScores) else BlockScores("custom", _score_list(scores))
    values = bs.scores
    n = len(values)
    if n < 2:
        raise ShortenedError("need scores for at least 2 blocks")
    bad = [i for i, v in enumerate(values) if v is not None and (not isinstance(v, (int, float)) or math.isnan(v))]
    if bad:
        raise ShortenedError(f"the score of block {bad[0]} is not a number")
    k = blocks_to_remove(n, num_blocks=num_blocks, ratio=ratio)
    present = sum(v is not None for v in values)
    if k >= present:
        raise ShortenedError(f"cannot remove {k} blocks: {present} of the {n} are present (None marks a removed "
                             "one), and at least one must remain")
    first, last = _protection(bs.criterion, protect_first, protect_last)
    eligible = [i for i in range(first, n - last) if values[i] is not None]
    requested = {"num_blocks": num_blocks, "ratio": ratio, "k": k}
    if k > len(eligible):
        raise ShortenedError(
            f"cannot remove {k} blocks: only {len(eligible)} of {n} are unprotected "
            f"(protect-first {first}, protect-last {last}); lower the count or the protection")
    plan = PruningPlan([], n, bs.criterion, "contiguous" if contiguous else "lowest", first, last, requested)
    if allowed is not None:
        plan.requested["only_removable"] = True
    if not contiguous:
        chosen = _lowest_allowed(sorted(eligible, key=lambda i: (values[i], i)), k, allowed, plan)
        plan.remove = sorted(chosen)
        plan.chosen_scores = {i: float(values[i]) for i in plan.remove}  # type: ignore[arg-type]
        _check_searched_set(bs, plan)
        return plan
    _check_searched_set(bs, plan)

    ok = set(eligible)
    spans = bs.span_scores
    # angular's span distances are indexed by block when nothing was skipped while scoring.
    use_spans = spans is not None and len(spans) >= k and len(spans[0]) == n
    best: tuple[float, int] | None = None
    for start in range(0, n - k + 1):
        window = range(start, start + k)
        if not all(i in ok for i in window):
            continue
        why = allowed(list(window)) if allowed is not None else None
        if why is not None:
            plan.requested.setdefault("passed_over", []).append({"blocks": list(window), "why": why})
            continue
        value = spans[k - 1][start] if use_spans else sum(values[i] for i in window)  # type: ignore[index,misc]
        if best is None or value < best[0]:
            best = (float(value), start)
    if best is None:
        raise ShortenedError(f"no run of {k} adjacent unprotected blocks (protect-first {first}, protect-last {last})")
    plan.remove = list(range(best[1], best[1] + k))
    plan.chosen_scores = {best[1]: best[0]}
    plan.requested["span_score"] = "span distance" if use_spans else "sum of block scores"
    return plan


def _lowest_allowed(order: list[int], k: int, allowed: Callable[[list[int]], str | None] | None,
                    plan: PruningPlan) -> list[int]:
    """The first ``k`` blocks of ``order``, passing over any whose addition ``allowed`` refuses."""
    if allowed is None or allowed(sorted(order[:k])) is None:
        return order[:k]
    chosen: list[int] = []
    for i in order:
        if len(chosen) == k:
            break
        why = allowed(sorted(chosen + [i]))
        if why is None:
            chosen.append(i)
        else:
            plan.requested.setdefault("passed_over", []).append({"blocks": [i], "why": why})
    if len(chosen) < k or allowed(sorted(chosen)) is not None:
        raise ShortenedError(f"no set of {k} blocks this model's config can express without was found among the "
                             f"unprotected ones: {plan.requested['passed_over'][0]['why']}")
    return chosen


def _score_list(scores: Any) -> list[float | None]:
    """Plain per-block scores as floats (numpy or torch numbers accepted; None kept): a mapping or text is
    refused rather than read as its keys or characters."""
    if hasattr(scores, "tolist") and not isinstance(scores, (list, tuple)):  # a numpy array or torch tensor
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise TypeError(f"scores must be a BlockScores or a list of numbers (None for a removed block), "
                        f"got {type(scores).__name__}")
    values: list[float | None] = []
    for i, v in enumerate(scores):
        if v is None:
            values.append(None)
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            values.append(float(v))
        else:
            raise ShortenedError(f"the score of block {i} is not a number")
    return values


def _check_searched_set(scores: BlockScores, plan: PruningPlan) -> None:
    """Scores of ``--criterion search`` are one set written as scores: only the request it was searched
    for selects that set (another count, protection or a contiguous span would pick an arbitrary one)."""
    search = scores.extra.get("search")
    if not search:
        return
    if plan.method == "contiguous" or plan.remove != sorted(search["removed"]):
        raise ShortenedError(
            f"these scores are a search for {len(search['removed'])} blocks ({sorted(search['removed'])}); "
            "select them with the request they were searched for, or run the search again with this one")
    plan.method = "search"


def iterative_select(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    criterion: str,
    *,
    num_blocks: int | None = None,
    ratio: float | None = None,
    protect_first: int | None = None,
    protect_last: int | None = None,
    progress: bool = True,
    allowed: Callable[[list[int]], str | None] | None = None,
    **score_options: Any,
) -> tuple[PruningPlan, list[BlockScores]]:
    """SLEB-style: score, remove the lowest unprotected block, re-score the smaller model, repeat.

    Removal is simulated (the engine bypasses removed blocks, which computes exactly what the pruned
    model computes), so ``model`` is not modified. Works with every criterion. Returns the plan and the
    scores of every step (``steps[s].scores[i]`` is None for blocks removed before step ``s``).
    """
    from .archs import num_blocks as count_blocks
    from .criteria import score_blocks

    if criterion == "search":
        raise ShortenedError("the search chooses the whole set at once; it cannot be made iterative")
    n = count_blocks(model)
    k = check_request(n, criterion, num_blocks=num_blocks, ratio=ratio,
                      protect_first=protect_first, protect_last=protect_last)
    first, last = _protection(criterion, protect_first, protect_last)
    removed: list[int] = []
    history: list[BlockScores] = []
    plan = PruningPlan([], n, criterion, "iterative", first, last, {"num_blocks": num_blocks, "ratio": ratio, "k": k})
    for step in range(k):
        scores = score_blocks(model, calib_ids, criterion, skip=removed, progress=progress, **score_options)
        one = select_blocks(scores, num_blocks=1, protect_first=first, protect_last=last,
                            allowed=None if allowed is None else (lambda blocks: allowed(sorted(removed + blocks))))
        if "passed_over" in one.requested:
            plan.requested.setdefault("passed_over", []).extend(one.requested["passed_over"])
        # select_blocks counts the already-removed blocks as protected-by-absence, so it cannot re-pick them
        i = one.remove[0]
        removed.append(i)
        history.append(scores)
        plan.chosen_scores[i] = float(scores.scores[i])  # type: ignore[arg-type]
        plan.steps.append({"step": step, "removed": i, "scores": scores.scores})
    plan.remove = sorted(removed)
    if allowed is not None:
        plan.requested["only_removable"] = True
    return plan, history
