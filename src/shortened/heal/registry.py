"""The healing-method registry: each method is one module of this package that defines ``METHOD``.

A method says what it needs (a teacher, the kept-block map, a single process), its default settings,
and how to *prepare* a model: return what the shared training loop should train and with which
objective, or, for a training-free method, do its work right there and return no objective. ``heal()``
is then the same for every method: load -> prepare -> train (if there is an objective) -> finalize ->
save. Adding a method is one file here plus its name in :func:`_registry`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import ShortenedError

if TYPE_CHECKING:
    from . import HealSettings
    from .data import HealingData


#: The paper's batch shape and warm-up (4 x 16 = 64 sequences of 256 tokens, 100 warm-up steps): the
#: default of the methods that train the whole model's forward.
PAPER_BATCH = {"batch_size": 4, "grad_accum": 16, "seq_len": 256, "warmup_steps": 100}


@dataclass
class HealContext:
    """What a method's ``prepare`` gets: the student and everything loaded for it."""

    model: nn.Module
    tokenizer: Any
    settings: "HealSettings"
    data: "HealingData"
    teacher: nn.Module | None = None
    teacher_tokenizer: Any = None
    kept: list[int] | None = None
    device: str = "cpu"
    progress: bool = True


def _unchanged(model: nn.Module) -> nn.Module:
    return model


@dataclass
class Prepared:
    """A model ready for the training loop (or already healed, when ``objective`` is None)."""

    model: nn.Module  # what the loop updates (a peft wrapper for LoRA)
    objective: Any | None  # None: nothing to train
    trainable: str  # recorded: lora, full, bridges, none
    #: Turns the trained model into the plain transformers model to save (LoRA: merge the adapters).
    finalize: Callable[[nn.Module], nn.Module] = _unchanged
    #: Saved as adapter/ beside the merged model (peft's save_pretrained) when the method is the last.
    adapter: bool = False
    #: Recorded in the healing section (e.g. the fitted bridges' errors); a callable value is called when
    #: the section is written, after training (e.g. figures the objective gathers while it runs).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HealMethod:
    """A registered healing method."""

    name: str
    summary: str  # one line, for help texts
    prepare: Callable[[HealContext], Prepared]
    #: HealSettings fields filled in when left unset (None), e.g. lr, batch shape, warm-up.
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_teacher: bool = False  # the unpruned model (pruning.json's source or --teacher)
    needs_kept: bool = False  # which blocks of the teacher the student kept (pruning.json)
    one_process: bool = False  # refuses accelerate's multi-process mode
    #: trains with its model's and the teacher's blocks on disk (``--offload disk``), a few blocks in memory
    on_disk: bool = False
    trains: bool = True  # False: training-free, no steps or learning rate
    #: The default learning rate when it depends on other settings (distill: on the student).
    lr_rule: Callable[["HealSettings"], float] | None = None
    #: Extra checks of the method's own settings (one-line ShortenedError), run before any loading.
    check: Callable[["HealSettings"], None] | None = None

    def default_lr(self, settings: "HealSettings") -> float | None:
        if self.lr_rule is not None:
            return self.lr_rule(settings)
        return self.defaults.get("lr")


def _registry() -> dict[str, HealMethod]:
    from . import distill, full, linear, lora, reconstruct

    return {m.METHOD.name: m.METHOD for m in (lora, full, distill, reconstruct, linear)}


@functools.cache
def methods() -> dict[str, HealMethod]:
    """Every registered method by name (in the order of the help texts)."""
    return _registry()


def get_method(name: str) -> HealMethod:
    """The method ``name``; a one-line error listing the valid names otherwise."""
    try:
        return methods()[name]
    except KeyError:
        raise ShortenedError(f"unknown healing method '{name}': use {', '.join(methods())}, "
                             "or several joined by commas (e.g. linear,reconstruct)") from None


def parse_chain(spec: str | Sequence[str]) -> list[HealMethod]:
    """``"linear,reconstruct"`` (or a list of names) -> the methods, applied in that order."""
    if not isinstance(spec, (str, list, tuple)):
        raise ShortenedError(f"healing method must be a name, names joined by commas, or a list, got {spec!r}")
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    if not names or any(not n for n in names):
        raise ShortenedError(f"healing method '{spec}': give one name or several joined by commas")
    return [get_method(n) for n in names]


def chain_name(chain: Sequence[HealMethod]) -> str:
    return ",".join(m.name for m in chain)


def describe_methods() -> str:
    """One line per method, for help texts."""
    return "\n".join(f"  {m.name:<12} {m.summary}" for m in methods().values())
