"""Recipes: the selection criterion and healing that ``shortened run`` uses when not told otherwise.

``best`` is the recipe that measured best in BENCHMARKS.md (SmolLM2-135M, 6 of 30 blocks, equal CPU
budget); ``paper`` is Shortened LLaMA's own (PPL criterion, LoRA on Alpaca). A recipe only fills in
what the user left unset: ``--criterion``, ``--heal`` and ``--protect-first`` given on the command line
always win.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ShortenedError


@dataclass(frozen=True)
class Recipe:
    name: str
    criterion: str
    heal: str  # a healing method or chain (shortened.heal.registry)
    #: Which healing text the recipe prefers from a data folder: "books" (plain text, the calibration
    #: kind) or "alpaca" (instructions). Without one, text sampled from the original model is used.
    heal_data: str
    summary: str
    #: Blocks at the start never removed, unless --protect-first says otherwise (None: the criterion's).
    #: A recipe whose healing starts with the linear bridge must keep block 0 (it needs a kept block
    #: before every removed run).
    protect_first: int | None = None
    #: With --heal-steps: the steps go this many times over a random subset of the healing text
    #: (reconstruct's teacher cache makes the passes after the first cheap); the recipe's healing only.
    heal_passes: float | None = None


RECIPES: dict[str, Recipe] = {
    r.name: r for r in (
        Recipe("best", criterion="bi", heal="reconstruct", heal_data="books", heal_passes=4.0,
               summary="Block Influence selection, then block-local reconstruction on plain text, four passes "
                       "over a quarter of the text the steps would read, bf16 autocast where the hardware has it "
                       "(the best measured: BENCHMARKS.md, 'Replace, don't just remove')"),
        Recipe("paper", criterion="ppl", heal="lora", heal_data="alpaca",
               summary="Shortened LLaMA: PPL criterion, LoRA (r 8) on Alpaca"),
    )
}
DEFAULT_RECIPE = "best"


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ShortenedError(f"unknown recipe '{name}': choose {', '.join(RECIPES)}") from None
