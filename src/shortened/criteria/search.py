"""``search``: an evolutionary search for the whole set of blocks to remove (see :mod:`shortened.search`).

Unlike the other criteria it chooses a set, so it takes the selection request itself (``num_blocks`` or
``ratio``, ``protect_first``, ``protect_last``). Its per-block scores are that set written as scores: 0
for the blocks it removes, 1 for the others (so the usual selection of the k lowest picks the set);
``extra["search"]`` holds the fitness, the starting selections and the history of every generation.
"""

from __future__ import annotations

from typing import Any

from ..engine import Engine
from ..errors import ShortenedError
from ..scores import BlockScores
from ..search import (DEFAULT_GENERATIONS, DEFAULT_OFFSPRING, DEFAULT_STAGES, check_max_run, check_options,
                      evolutionary_search, lowest_with_max_run)
from ..search_bridges import check_supported

#: Criteria whose selections the search starts from (the best of them by the search's fitness): those that
#: cost at most one dense pass over the captured inputs. ``ppl`` costs one ppl criterion's time and
#: ``taylor`` (at the search's one sample per micro-batch) more; ``--search-start`` adds them.
DEFAULT_START = "bi,angular,magnitude"


def score(engine: Engine, num_blocks: int | None = None, ratio: float | None = None, protect_first: int | None = None,
          protect_last: int | None = None, fitness: str = "kl", generations: int = DEFAULT_GENERATIONS,
          offspring: int = DEFAULT_OFFSPRING, stages: str = DEFAULT_STAGES, start: str = DEFAULT_START,
          seed: int = 1234, max_run: int | None = None) -> tuple[list[float], dict[str, Any]]:
    from ..selection import check_request

    if engine.skip:
        raise ShortenedError("the search chooses the whole set; it cannot run with blocks already removed "
                             "(--iterative)")
    n = engine.num_blocks
    k = check_request(n, "search", num_blocks=num_blocks, ratio=ratio, protect_first=protect_first,
                      protect_last=protect_last)
    check_options(fitness, generations, offspring, stages, engine.calib_ids.shape[0])  # before the starts
    if fitness == "linear-kl":
        check_supported(engine)
    first, last = protect_first or 0, protect_last or 0  # the search's own default protection: none
    eligible = list(range(first, n - last))
    check_max_run(max_run, k, eligible)  # before the starts are computed
    from ..surgery import removal_check

    allowed = removal_check(engine.model, engine.spec)  # None: the config can express every set
    starts = starting_selections(engine, k, first, last, start, seed, max_run, allowed=allowed)
    result = evolutionary_search(engine, k, eligible, starts, fitness=fitness, generations=generations,
                                 offspring=offspring, stages=stages, seed=seed, max_run=max_run,
                                 progress=engine.progress, allowed=allowed)
    removed = set(result.removed)
    return [0.0 if i in removed else 1.0 for i in engine.active], {"search": result.to_dict()}


def starting_selections(engine: Engine, k: int, protect_first: int, protect_last: int, start: str,
                        seed: int, max_run: int | None = None, allowed=None) -> dict[str, list[int]]:
    """The blocks each criterion in ``start`` (comma list) would remove under the same request, on the
    same engine (one capture for all); ``angular`` also gives its best contiguous span. With ``max_run``,
    each criterion's lowest-scored blocks taken so that no run is longer (and a span only if it fits)."""
    from ..selection import select_blocks
    from . import get_criterion

    eligible = range(protect_first, engine.num_blocks - protect_last)
    names = [s.strip() for s in start.split(",") if s.strip()]
    if not names or "search" in names:
        raise ShortenedError(f"the search starts from other criteria's selections (e.g. {DEFAULT_START}), got '{start}'")
    crits = [get_criterion(name) for name in names]  # every name checked before any is computed
    out: dict[str, list[int]] = {}
    for name, crit in zip(names, crits):
        values, extra = crit.fn(engine, **({"seed": seed} if crit.takes_seed else {}))
        scores = BlockScores(name, list(values), span_scores=extra.get("span_scores"))
        sel = dict(num_blocks=k, protect_first=protect_first, protect_last=protect_last)
        if max_run is not None:
            chosen = lowest_with_max_run(scores.scores, k, eligible, max_run)
            if chosen is not None:  # else the greedy choice got stuck: no start from this criterion
                out[name] = chosen
        else:
            out[name] = select_blocks(scores, allowed=allowed, **sel).remove
        if scores.span_scores is not None and (max_run is None or k <= max_run):
            try:
                out[f"{name} contiguous"] = select_blocks(scores, contiguous=True, allowed=allowed, **sel).remove
            except ShortenedError:  # no run of k adjacent unprotected blocks
                pass
    if not out:  # a bound every greedy choice got stuck under: the blocks packed from the first eligible one
        out["packed"] = lowest_with_max_run([0.0] * engine.num_blocks, k, eligible, max_run)
    return out


from . import Criterion  # noqa: E402

CRITERION = Criterion("search", score, cost="search", needs_data=True, uses_head=True, protect=(0, 0), micro_batch=1,
                      description="evolutionary search for the set of blocks (KL to the dense model)")
