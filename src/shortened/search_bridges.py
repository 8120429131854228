"""The linear bridges of the search's ``linear-kl`` fitness: every candidate set measured as it would be
after the training-free ``linear`` healing (:mod:`shortened.heal.linear`, ReplaceMe).

Why: the one-shot KL ranks sets by the damage of plain removal, and healing repairs some damage far more
easily than other (benchmarks/results/search-reading.md: the set with the lowest one-shot KL was not the
one that healed best). A linear map per removed run, fitted in closed form, is the cheapest repair there
is, so a search can afford it for every candidate.

For a set whose run ``a..b`` of removed blocks follows kept block ``a - 1``, that block's MLP output
``M`` becomes ``M T``, with ``T`` the weighted ridge least squares of :class:`~shortened.heal.linear.BridgeSums`
fitted on the **dense** model's calibration states (cross-fitted: a micro-batch is measured with the map
fitted on the other folds): ``M`` and ``Y = out - M`` of block ``a - 1`` and the
target ``H`` = the dense hidden state after block ``b``. The healing method fits each run on the
progressively bridged student instead; fitting on the dense states makes ``T`` depend on ``(a - 1, b)``
alone, so one map serves every candidate with that run, and costs one solve the first time it is needed.
A run that starts at block 0 has no block before it and stays a plain removal.

The fitted maps are folded into a copy of the block (:func:`~shortened.heal.linear.fold_into_linear`) when
the engine visits it (:meth:`shortened.engine.Engine.removal_set_outputs` with ``variants``), so the
streams compute exactly what the bridged pruned model computes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .archs import get_submodule
from .engine import Engine, call_block
from .errors import ShortenedError
from .heal.linear import DEFAULT_RIDGE, BridgeSums, fold_into_linear, mlp_out_path, mlp_output, token_weights


def check_supported(engine: Engine) -> str:
    """The engine's ``ArchSpec.mlp_out`` (where the bridges go), or a one-line error for an architecture
    without one (before any slow work)."""
    return mlp_out_path(engine.spec, engine.model.config.model_type, "--fitness linear-kl")


def copy_along(module: nn.Module, path: str) -> tuple[nn.Module, nn.Module]:
    """A copy of ``module`` with its own copy of the submodule at ``path`` and every other weight shared
    (the module objects are copied, their tensors are not), and that submodule's copy. A block's variant
    then costs one layer's weights, not the block's."""
    layer = get_submodule(module, path)
    own = {id(t) for t in (*layer.parameters(), *layer.buffers())}
    shared = {id(t): t for t in (*module.parameters(), *module.buffers()) if id(t) not in own}
    variant = copy.deepcopy(module, shared)  # deepcopy's memo: the tensors it holds are taken as they are
    return variant, get_submodule(variant, path)


#: Cross-fitting folds: micro-batch ``m`` is measured with maps fitted on the micro-batches of the other
#: folds (``m % folds`` is its fold), so the fitness is what the bridge does on text it was not fitted on.
DEFAULT_FOLDS = 5


class LinearBridges:
    """The bridged variants of an engine's blocks (:class:`shortened.engine.BlockVariants`): block ``i``
    before a removed run ending at ``b`` becomes block ``i`` with the map of ``(i, b)`` folded in.

    ``finals`` are the dense model's last hidden states per micro-batch (the target of a run that ends at the
    last block). Each micro-batch gets the map fitted without its fold (``folds`` of them, at most one per
    micro-batch): fitted on the tokens it is measured on, a map of ``hidden x hidden`` numbers would
    memorise a small calibration set (measured on SmolLM2-135M, 10 x 128 tokens: in-sample KL 0.18 for
    Block Influence's set, where the bridge fitted on 32k tokens leaves most of the one-shot damage). With a
    single micro-batch there is nothing to hold out and the map is fitted on it.
    """

    def __init__(self, engine: Engine, finals: list[torch.Tensor], ridge: float = DEFAULT_RIDGE,
                 folds: int = DEFAULT_FOLDS) -> None:
        self.path = check_supported(engine)
        if not ridge >= 0:
            raise ShortenedError(f"the linear bridges' ridge must be >= 0, got {ridge}")
        if folds < 1:
            raise ShortenedError(f"the linear bridges need at least one fold, got {folds}")
        self.engine = engine
        self.finals = finals
        self.ridge = ridge
        self.folds = min(folds, len(engine.captures))
        self._mlp: dict[int, list[torch.Tensor]] = {}  # block -> its dense MLP output per micro-batch
        #: (block, run end) -> T (float32) per fold: fitted without that fold's micro-batches
        self.maps: dict[tuple[int, int], list[torch.Tensor]] = {}

    def fold(self, capture: int) -> int:
        """The fold of micro-batch ``capture``."""
        return capture % self.folds

    def key(self, index: int, removed: frozenset[int]) -> int | None:
        """The last block of the removed run right after block ``index``, or None (no run follows it)."""
        if index + 1 not in removed:
            return None
        end = index + 1
        while end + 1 in removed:
            end += 1
        return end

    def make(self, block: nn.Module, index: int, key: int, captures: Sequence[int]) -> list[nn.Module]:
        """Copies of ``block`` whose MLP output is mapped by the bridge of the run ending at ``key``, one per
        micro-batch of ``captures`` (micro-batches of one fold share theirs)."""
        maps = self.bridge(block, index, key)
        variants: dict[int, nn.Module] = {}
        for c in captures:
            f = self.fold(c)
            if f not in variants:
                variants[f], layer = copy_along(block, self.path)
                fold_into_linear(layer, maps[f])
        return [variants[self.fold(c)] for c in captures]

    def bridge(self, block: nn.Module, index: int, end: int) -> list[torch.Tensor]:
        """The maps ``T`` of block ``index`` for a removed run ending at ``end``, one per fold (fitted once)."""
        if (index, end) not in self.maps:
            mlp = self._mlp_outputs(block, index)
            sums: list[BridgeSums] = []
            for m in range(len(self.engine.captures)):
                target = self._dense_after(m, end)
                out = self._dense_after(m, index)
                dim = out.shape[-1]
                if not sums:
                    sums = [BridgeSums(dim, device=out.device) for _ in range(self.folds)]
                sums[self.fold(m)].add(mlp[m].reshape(-1, dim), (target - (out - mlp[m])).reshape(-1, dim),
                                       token_weights(target))
            self.maps[(index, end)] = [self._solve(sums, f).float() for f in range(self.folds)]
        return self.maps[(index, end)]

    def _solve(self, sums: list[BridgeSums], fold: int) -> torch.Tensor:
        """The map fitted on every fold but ``fold`` (on all of them when there is only one)."""
        return BridgeSums.merged([s for f, s in enumerate(sums) if f != fold] or sums).solve(self.ridge)

    def _dense_after(self, m: int, index: int) -> torch.Tensor:
        """The dense model's hidden state after block ``index``, micro-batch ``m``."""
        if index + 1 < self.engine.num_blocks:
            return self.engine.captures[m].inputs[index + 1]
        return self.finals[m]

    def _mlp_outputs(self, block: nn.Module, index: int) -> list[torch.Tensor]:
        """Block ``index``'s MLP output (the layer ``ArchSpec.mlp_out``) on its dense inputs, per micro-batch."""
        if index not in self._mlp:
            layer = get_submodule(block, self.path)
            if layer is None:
                raise ShortenedError(f"block {index} has no module '{self.path}' (ArchSpec.mlp_out)")
            seen: list[torch.Tensor] = []
            handle = layer.register_forward_hook(lambda mod, args, out: seen.append(out))
            outs = []
            try:
                for cap in self.engine.captures:
                    seen.clear()
                    y = call_block(block, cap.calls[index], cap.inputs[index], cap.batch)
                    outs.append(mlp_output(seen, y, self.path, index))
            finally:
                handle.remove()
            self._mlp[index] = outs
        return self._mlp[index]
