"""Evolutionary search for the set of blocks to remove (after EvoPress, Sieberling et al., ICML 2025).

Per-block scores ignore how removals interact: the best set of k blocks need not be the k individually
least important. A (1 + lambda) evolutionary search over sets of k removable blocks:

- the parent starts as the best (by the fitness below) of the selections the existing criteria make;
- each generation makes ``offspring`` children of the parent, each by swapping removed and kept blocks
  (one swap, a second with probability 1/2, a third with 1/4, ...: every set can be reached, most
  children are neighbours); children already measured on the whole calibration set are not re-made;
- the children go through ``stages`` of growing token budgets: stage ``(n, keep)`` measures each on the
  first ``n`` calibration samples (only the samples it has not been measured on yet) and keeps the
  ``keep`` best; the last stage measures on every sample, and its best replaces the parent only if its
  fitness is lower (so the result is never worse than the start);
- fitness: the mean over calibration tokens of KL(dense || pruned) of the next-token distributions
  (``kl``); the same KL with each removed run bridged by a closed-form linear map, what the training-free
  ``linear`` healing would give (``linear-kl``, :mod:`shortened.search_bridges`: it ranks sets by what a
  cheap repair leaves, not by the raw damage); or the perplexity of the calibration text (``ppl``);
- ``max_run`` (optional) bounds the length of every run of adjacent removed blocks: children beyond it
  are not made, and the starts are the criteria's lowest-scored blocks taken under the same bound. It was
  made for healing, when ``reconstruct`` trained two blocks per run whatever its length; with its ``auto``
  width (a long run gets more blocks) the unbounded span heals as well as the bounded sets did, or
  better (benchmarks/results/search-reading.md).

Everything is seeded (:class:`random.Random`), and candidates are computed by the cached engine
(:meth:`shortened.engine.Engine.removal_set_outputs`), which shares every candidate's computation with
the dense model and its siblings up to its first removed block.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .engine import Engine, ppl_from_mean_nll
from .errors import ShortenedError
from .search_bridges import LinearBridges

#: kl: KL(dense || pruned) of plain removal; linear-kl: the same after a training-free linear bridge per
#: removed run (:mod:`shortened.search_bridges`); ppl: the calibration perplexity of plain removal.
FITNESSES = ("kl", "linear-kl", "ppl")
#: Default budget stages "SAMPLES:KEEP,...": 16 children screened on 1 sample, the best 4 on 3, the best
#: one on all.
DEFAULT_STAGES = "1:4,3:1,all:1"
DEFAULT_OFFSPRING = 16
DEFAULT_GENERATIONS = 30

Removal = tuple[int, ...]


def parse_stages(spec: str | Sequence[Sequence[Any]], n_samples: int, offspring: int) -> list[tuple[int, int]]:
    """``"1:4,3:1,all:1"`` -> [(1, 4), (3, 1), (n_samples, 1)]: samples measured and children kept per stage.

    Samples must grow and the kept counts must not; the last stage uses every sample (``all``), so the
    parent is always replaced on its full-set fitness.
    """
    items = [s.split(":") for s in spec.split(",")] if isinstance(spec, str) else [list(s) for s in spec]
    stages: list[tuple[int, int]] = []
    try:
        for samples, keep in items:
            n = n_samples if str(samples).strip() == "all" else int(samples)
            stages.append((min(n, n_samples), int(keep)))
    except ValueError:
        raise ShortenedError(f"search stages must look like '1:4,3:1,all:1' (samples:kept,...), got '{spec}'") from None
    if not stages or stages[-1][0] != n_samples:
        raise ShortenedError(f"the last search stage must use all {n_samples} samples ('all:1'), got '{spec}'")
    for (n0, k0), (n1, k1) in zip(stages, stages[1:]):
        if n1 < n0 or k1 > k0:
            raise ShortenedError(f"search stages must use more samples and keep fewer children each time: '{spec}'")
    if stages[0][0] < 1 or stages[-1][1] < 1 or stages[0][1] > offspring:
        raise ShortenedError(f"search stages need at least 1 sample and 1 kept child, at most the "
                             f"{offspring} children: '{spec}'")
    return stages


def check_options(fitness: str, generations: int, offspring: int, stages: str | Sequence[Sequence[Any]],
                  n_samples: int) -> list[tuple[int, int]]:
    """Refuse bad search settings (before any slow work); returns the parsed stages."""
    _check_fitness(fitness)
    if generations < 0 or offspring < 1:
        raise ShortenedError(f"the search needs generations >= 0 and offspring >= 1, got {generations} and {offspring}")
    return parse_stages(stages, n_samples, offspring)


def _check_fitness(fitness: str) -> None:
    if fitness not in FITNESSES:
        raise ShortenedError(f"unknown search fitness '{fitness}': choose {', '.join(FITNESSES)}")


def longest_run(blocks: Sequence[int]) -> int:
    """The length of the longest run of adjacent block indices in ``blocks`` (0 when empty)."""
    best = run = 0
    prev = None
    for b in sorted(set(blocks)):
        run = run + 1 if prev is not None and b == prev + 1 else 1
        best, prev = max(best, run), b
    return best


def check_max_run(max_run: int | None, k: int | None = None, eligible: Sequence[int] = ()) -> None:
    """Refuse a bound below 1, or ``k`` blocks that the ``eligible`` ones (a contiguous range) cannot give in
    runs of at most ``max_run``: such a range of ``m`` blocks holds at most ``m - m // (max_run + 1)``."""
    if max_run is None:
        return
    if max_run < 1:
        raise ShortenedError(f"--search-max-run must be at least 1, got {max_run}")
    m = len(eligible)
    if k is not None and k > m - m // (max_run + 1):
        raise ShortenedError(f"cannot remove {k} of blocks {min(eligible)}-{max(eligible)} in runs of at most "
                             f"{max_run} adjacent blocks: raise --search-max-run or remove fewer")


def lowest_with_max_run(scores: Sequence[float], k: int, eligible: Sequence[int], max_run: int) -> list[int] | None:
    """The ``k`` eligible blocks of lowest score, taken greedily (lowest first) so that no run of adjacent
    blocks exceeds ``max_run``; a block that would make one is passed over. None when the greedy choice gets
    stuck short of ``k`` (possible even when such a set exists)."""
    chosen: list[int] = []
    for b in sorted(eligible, key=lambda i: (scores[i], i)):
        if len(chosen) < k and longest_run(chosen + [b]) <= max_run:
            chosen.append(b)
    return sorted(chosen) if len(chosen) == k else None


class SetFitness:
    """Fitness of removal sets on an engine's calibration micro-batches, each set measured on each
    micro-batch at most once (``sums[set][m]``), so a survivor of a stage only pays for the new samples."""

    def __init__(self, engine: Engine, fitness: str = "kl") -> None:
        _check_fitness(fitness)
        self.engine = engine
        self.fitness = fitness
        self.caps = engine.captures
        self.tokens = [c.ids.shape[0] * (c.ids.shape[1] - 1) for c in self.caps]
        self.samples = [c.batch for c in self.caps]
        self.sums: dict[Removal, list[float]] = {}
        self.targets: list[Any] | None = None
        self.variants: LinearBridges | None = None
        if fitness != "ppl":
            finals = self._dense_finals()
            with torch.inference_mode(), engine.parallel():
                self.targets = engine.map(lambda m: engine.dense_targets(finals[m]), range(len(self.caps)))
            if fitness == "linear-kl":
                self.variants = LinearBridges(engine, finals)

    def _dense_finals(self) -> list[torch.Tensor]:
        """The dense model's last hidden states of every micro-batch (computed once)."""
        eng, last = self.engine, self.engine.num_blocks - 1
        with torch.inference_mode(), eng.parallel(), eng.on_device(last) as block:
            return [outs[0] for outs in eng.run_block(block, last, [(cap, [cap.inputs[last]]) for cap in self.caps])]

    def micro_batches(self, samples: int) -> int:
        """How many micro-batches hold the first ``samples`` samples (rounded up to whole ones)."""
        total = 0
        for m, b in enumerate(self.samples):
            total += b
            if total >= samples:
                return m + 1
        return len(self.samples)

    def measure(self, sets: Sequence[Removal], n_batches: int) -> list[float]:
        """Fitness of each set on the first ``n_batches`` micro-batches, computing only what is missing."""
        todo: dict[int, list[Removal]] = {}  # micro-batches measured already -> sets
        for s in dict.fromkeys(sets):
            have = len(self.sums.setdefault(s, []))
            if have < n_batches:
                todo.setdefault(have, []).append(s)
        for have, group in todo.items():
            self._compute(group, range(have, n_batches))
        return [self.value(s, n_batches) for s in sets]

    def value(self, s: Removal, n_batches: int) -> float:
        mean = sum(self.sums[s][:n_batches]) / sum(self.tokens[:n_batches])
        return ppl_from_mean_nll(mean) if self.fitness == "ppl" else mean

    def _compute(self, sets: list[Removal], batches: range) -> None:
        eng = self.engine
        outs = eng.removal_set_outputs(sets, list(batches), self.variants)
        jobs = [(c, group) for c, m in enumerate(batches) for group in eng.call_groups(self.caps[m], list(range(len(sets))))]

        def loss(job: tuple[int, list[int]]) -> list[float]:
            c, group = job
            m = batches[c]
            hidden = torch.cat([outs[c][i] for i in group], 0)
            if self.targets is not None:
                return eng.kl_sum(hidden, self.targets[m]).tolist()
            return eng.nll_sum(hidden, self.caps[m].ids).tolist()

        with torch.inference_mode(), eng.parallel():
            results = eng.map(loss, jobs)
        for c in range(len(batches)):  # micro-batches in order, so each set's list grows in order
            for (jc, group), sums in zip(jobs, results):
                if jc == c:
                    for i, v in zip(group, sums):
                        self.sums[sets[i]].append(v)


@dataclass
class SearchResult:
    """The set found, how it was found, and the fitness of every generation's parent."""

    removed: list[int]
    fitness: float
    start: str
    starts: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]
    settings: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "fitness": self.fitness, "fitness_kind": self.settings["fitness"],
                "start": self.start, "starts": self.starts, "history": self.history,
                "settings": self.settings, "seconds": round(self.seconds, 2)}


def evolutionary_search(
    engine: Engine,
    k: int,
    eligible: Sequence[int],
    starts: dict[str, Sequence[int]],
    *,
    fitness: str = "kl",
    generations: int = DEFAULT_GENERATIONS,
    offspring: int = DEFAULT_OFFSPRING,
    stages: str | Sequence[Sequence[Any]] = DEFAULT_STAGES,
    seed: int = 0,
    max_run: int | None = None,
    progress: bool = True,
    allowed=None,
) -> SearchResult:
    """Search the sets of ``k`` blocks out of ``eligible`` for the lowest fitness, from the best of
    ``starts`` (name -> a set of ``k`` eligible blocks), among the sets whose runs of adjacent blocks are at
    most ``max_run`` long (None: any) and that ``allowed`` accepts (None: any; see
    :func:`shortened.surgery.removal_check`). Returns the best set found (never worse than the best start) and the
    search history."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    pool = sorted(set(eligible))
    if not starts:
        raise ShortenedError("the search needs at least one starting selection")
    check_max_run(max_run)  # the starts given hold k blocks in bounded runs: the request is feasible
    for name, s in starts.items():
        if len(set(s)) != k or not set(s) <= set(pool):
            raise ShortenedError(f"starting selection {name} is not a set of {k} removable blocks: {sorted(s)}")
        if max_run is not None and longest_run(s) > max_run:
            raise ShortenedError(f"starting selection {name} has a run of more than {max_run} adjacent blocks")
        if allowed is not None and allowed(sorted(s)) is not None:
            raise ShortenedError(f"starting selection {name} cannot be removed: {allowed(sorted(s))}")
    plan = check_options(fitness, generations, offspring, stages, engine.calib_ids.shape[0])
    fit = SetFitness(engine, fitness)
    stage_batches = [(fit.micro_batches(n), keep) for n, keep in plan]
    full = len(fit.caps)

    start_sets = {name: tuple(sorted(s)) for name, s in starts.items()}
    unique = list(dict.fromkeys(start_sets.values()))
    values = dict(zip(unique, fit.measure(unique, full)))
    start_info = {name: {"removed": list(s), "fitness": values[s]} for name, s in start_sets.items()}
    parent = min(unique, key=lambda s: (values[s], s))
    start = next(name for name, s in start_sets.items() if s == parent)
    best = values[parent]
    history = [{"generation": 0, "fitness": best, "removed": list(parent), "accepted": True,
                "candidate": best, "children": 0, "seconds": round(time.perf_counter() - t0, 2)}]

    rng = random.Random(seed)
    with tqdm(total=generations, desc="search", unit="gen", disable=not progress, leave=False) as bar:
        bar.set_postfix({fitness: f"{best:.4g}"})
        for g in range(1, generations + 1):
            children = _mutants(parent, pool, offspring, rng,
                                skip=lambda s: len(fit.sums.get(s, ())) >= full
                                or (max_run is not None and longest_run(s) > max_run)
                                or (allowed is not None and allowed(list(s)) is not None))
            if not children:
                break  # every neighbour reachable has been measured: nothing left to try
            survivors = children
            for n_batches, keep in stage_batches:
                scored = fit.measure(survivors, n_batches)
                survivors = [s for _, s in sorted(zip(scored, survivors))[:keep]]
            candidate, value = survivors[0], fit.value(survivors[0], full)
            accepted = value < best
            if accepted:
                parent, best = candidate, value
            history.append({"generation": g, "fitness": best, "removed": list(parent), "accepted": accepted,
                            "candidate": value, "children": len(children),
                            "seconds": round(time.perf_counter() - t0, 2)})
            bar.set_postfix({fitness: f"{best:.4g}"})
            bar.update()
    settings = {"fitness": fitness, "generations": generations, "offspring": offspring,
                "stages": [[n, keep] for n, keep in plan], "seed": seed, "k": k, "eligible": pool, "max_run": max_run,
                "sets_measured": len(fit.sums)}
    if allowed is not None:
        settings["only_removable"] = True  # sets the model's config cannot express were passed over
    if fit.variants is not None:
        settings["linear_bridges"] = {"ridge": fit.variants.ridge, "folds": fit.variants.folds,
                                      "maps_fitted": len(fit.variants.maps)}
    return SearchResult(list(parent), best, start, start_info, history, settings, time.perf_counter() - t0)


def _mutants(parent: Removal, pool: list[int], n: int, rng: random.Random, skip) -> list[Removal]:
    """Up to ``n`` distinct children of ``parent``, each by 1 + Geometric(1/2) swaps of a removed and a
    kept block (capped by what can be swapped), leaving out the sets ``skip`` says (measured already, or
    not allowed)."""
    removed = list(parent)
    kept = [i for i in pool if i not in set(parent)]
    most = min(len(removed), len(kept))
    if most == 0:
        return []
    children: dict[Removal, None] = {}
    for _ in range(50 * n):
        if len(children) == n:
            break
        swaps = 1
        while swaps < most and rng.random() < 0.5:
            swaps += 1
        out = set(rng.sample(removed, swaps))
        back = rng.sample(kept, swaps)
        child = tuple(sorted((set(removed) - out) | set(back)))
        if child not in children and not skip(child):
            children[child] = None
    return list(children)

