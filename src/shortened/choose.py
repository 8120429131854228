"""Choosing the blocks to remove: the one way ``shortened prune`` and ``shortened run`` do it.

:func:`choose` scores the blocks (or takes scores already computed, e.g. read from a scores file), selects
the blocks (lowest scores, a contiguous span, iterative re-scoring, or the set the search found) and
returns the ``selection`` record that pruning.json keeps (keys :data:`SELECTION_KEYS`).

The rules every caller shares live here, so that no caller restates them:

- the ``search`` criterion chooses the whole set, so it takes the selection request as its options
  (:func:`scoring_options`) and cannot be iterative or contiguous (:func:`check_choice`);
- calibration data is read only for the criteria that need it, and text sampled from the model itself
  (``self``) needs the model's blocks in memory (:func:`calibration_for`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import Calibration
from .scores import BlockScores
from .errors import ShortenedError
from .selection import PruningPlan, check_request, iterative_select, select_blocks

#: The keys of a ``selection`` record, in the order they are written.
SELECTION_KEYS = ("method", "criterion", "removed", "plan", "scores", "calibration", "scores_file", "iterative_steps")


def check_choice(criterion: str, *, iterative: bool = False, contiguous: bool = False) -> None:
    """Refuse an unknown criterion and the selection methods it cannot be combined with, before any work."""
    from .criteria import get_criterion

    get_criterion(criterion)  # unknown name: one line listing the valid ones
    if criterion == "search":
        for flag, given in (("iterative", iterative), ("contiguous", contiguous)):
            if given:
                raise ShortenedError(f"--{flag} cannot be combined with --criterion search "
                                     "(the search chooses the set itself)")
    if iterative and contiguous:
        raise ShortenedError("--iterative and --contiguous cannot be combined")


def scoring_options(
    criterion: str,
    options: dict[str, Any] | None = None,
    *,
    num_blocks: int | None = None,
    ratio: float | None = None,
    protect_first: int | None = None,
    protect_last: int | None = None,
) -> dict[str, Any]:
    """The options :func:`~shortened.criteria.score_blocks` gets for ``criterion``: ``options``, and for the
    search, which chooses the set itself, the selection request (it must say how many blocks)."""
    from .criteria import get_criterion

    get_criterion(criterion)
    merged = dict(options or {})
    if criterion == "search":
        if num_blocks is None and ratio is None:
            raise ShortenedError("--criterion search chooses a set: say how many blocks, --num-blocks N or --ratio R")
        merged.update(num_blocks=num_blocks, ratio=ratio, protect_first=protect_first, protect_last=protect_last)
    return merged


def calibration_for(
    criterion: str,
    source: str | None,
    tokenizer: Any,
    model: nn.Module,
    *,
    n_samples: int = 10,
    seq_len: int = 128,
    seed: int = 1234,
) -> Calibration | None:
    """The calibration windows ``criterion`` is scored on, read (or sampled, for ``self``) from ``source``;
    None when the criterion needs no data."""
    from .criteria import get_criterion
    from .data import calibration_data
    from .offload import disk_blocks

    if not get_criterion(criterion).needs_data:
        return None
    if source is None:
        raise ShortenedError(
            f"criterion {criterion} needs calibration data: pass --calib PATH, --calib self, or a Hub "
            "dataset (wikitext2, bookcorpus, c4, hf:NAME) when online")
    if str(source) == "self" and disk_blocks(model) is not None:
        raise ShortenedError("--calib self samples text from the model, which needs its blocks in memory: "
                             "give a text source (--calib PATH or a dataset) with --offload disk")
    return calibration_data(source, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, model=model)


def choose(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    criterion: str | None,
    *,
    num_blocks: int | None = None,
    ratio: float | None = None,
    protect_first: int | None = None,
    protect_last: int | None = None,
    iterative: bool = False,
    contiguous: bool = False,
    scores: BlockScores | None = None,
    calibration_info: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    offload: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    scores_file: str | None = None,
) -> dict[str, Any]:
    """Choose the blocks of ``model`` to remove and return the ``selection`` record (:data:`SELECTION_KEYS`).

    ``scores`` given (e.g. read from ``scores_file``): select from them, no scoring; ``criterion`` may be
    None (it is theirs). Otherwise score with ``criterion`` on ``calib_ids`` (``options``: the criterion's
    options), once, or after every removal with ``iterative``. ``num_blocks`` / ``ratio`` and the protection
    are the request of :func:`~shortened.selection.select_blocks`; ``batch_size``, ``offload`` and ``device``
    (where offloaded blocks run) go to the scoring. ``calibration_info`` is recorded as the calibration.
    The model is not modified.
    """
    from .archs import num_blocks as count_blocks
    from .surgery import check_family, removal_check
    from .verify import check_source_cache

    request = dict(num_blocks=num_blocks, ratio=ratio, protect_first=protect_first, protect_last=protect_last)
    n = count_blocks(model)
    check_family(model)  # a family whose blocks cannot be renumbered is refused before any scoring
    check_source_cache(model)  # and one whose own KV cache is broken, which no pruned copy could pass
    allowed = removal_check(model)  # None: every set can be removed
    steps: list[dict[str, Any]] = []
    if scores is not None:
        if iterative:
            raise ShortenedError("--iterative re-scores after each removal, so it cannot start from given scores")
        if criterion is not None and criterion != scores.criterion:
            raise ShortenedError(f"the given scores are {scores.criterion}'s, not {criterion}'s: pass criterion=None "
                                 "to select from them, or no scores to score with the criterion")
        check_request(n, scores.criterion, **request)
        _check_given_scores(scores, n, scores_file)
        plan = select_blocks(scores, contiguous=contiguous, allowed=allowed, **request)
    else:
        if criterion is None:
            raise ShortenedError("choose needs a criterion or scores")
        check_choice(criterion, iterative=iterative, contiguous=contiguous)
        check_request(n, criterion, **request)
        engine = dict(batch_size=batch_size, offload=offload, device=device, progress=progress)
        if iterative:
            plan, history = iterative_select(model, calib_ids, criterion, **request, **engine, allowed=allowed,
                                             **(options or {}))
            scores = history[0]
            steps = plan.steps
        else:
            from .criteria import score_blocks

            scores = score_blocks(model, calib_ids, criterion, **engine,
                                  **scoring_options(criterion, options, **request))
            plan = select_blocks(scores, contiguous=contiguous, allowed=allowed, **request)
    return selection_record(plan, scores, calibration_info, scores_file=scores_file, steps=steps)


def selection_record(plan: PruningPlan, scores: BlockScores, calibration: dict[str, Any] | None, *,
                     scores_file: str | None = None, steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``selection`` record of pruning.json: the plan (without its steps, which are kept apart as
    ``iterative_steps``), the scores it was chosen from (the first step's, for iterative) and their origin."""
    plan_dict = plan.to_dict()
    plan_dict.pop("steps", None)
    return {
        "method": plan.method,
        "criterion": scores.criterion,
        "removed": plan.remove,
        "plan": plan_dict,
        "scores": scores.to_dict(),
        "calibration": calibration,
        "scores_file": scores_file,
        "iterative_steps": list(steps or []),
    }


def _check_given_scores(scores: BlockScores, n: int, source: str | None) -> None:
    what = source or "the scores"
    if scores.num_blocks != n:
        raise ShortenedError(f"{what} scores {scores.num_blocks} blocks but the model has {n}")
    if any(s is None for s in scores.scores):
        raise ShortenedError(f"{what} lacks the score of some blocks")


__all__ = ["SELECTION_KEYS", "calibration_for", "check_choice", "choose", "scoring_options", "selection_record"]
