"""LoRA through peft, on the attention and MLP projections named in the architecture table (found in the
blocks for other families) and, in MoE blocks, on the fused expert weights."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..archs import get_arch, get_blocks
from ..errors import ShortenedError
from .loop import LMObjective
from .registry import PAPER_BATCH, HealContext, HealMethod, Prepared

log = logging.getLogger(__name__)

#: The paper's LoRA settings (Kim et al. 2024, following alpaca-lora).
PAPER_LORA = dict(r=8, alpha=16, dropout=0.05)


#: Linear layers inside a block that LoRA leaves alone, whatever the family: routers and gates decide, they
#: do not transform.
_NOT_ADAPTED = frozenset({"gate", "router", "shared_expert_gate", "wg", "router_gate"})
#: Linear layers of a state-space mixer (a module owning ``A_log``) whose weights the mixer reads itself, past
#: a peft wrapper: Mamba's fused kernel takes ``x_proj``, ``dt_proj`` and ``out_proj`` weights, and the slow
#: path subtracts ``dt_proj``'s bias (measured on a tiny Jamba: an adapted ``dt_proj`` put the logits 7e-4
#: from those of the merged model). peft refuses ``out_proj`` of Mamba models for the same reason.
_SSM_READS_ITSELF = ("x_proj", "dt_proj", "out_proj")


def lora_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(modules, parameters)`` LoRA can adapt: linear projections by name (``ArchSpec.lora_targets`` for a
    table entry, else every linear layer inside the blocks but routers and what SSM mixers read themselves)
    and the fused expert weights of MoE blocks (3-D parameters under ``experts``, adapted through peft's
    ``target_parameters``, which needs ``dropout`` 0), named relative to a block."""
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    linear = {name.rsplit(".", 1)[-1] for block in blocks for name, m in block.named_modules()
              if name and isinstance(m, nn.Linear)}
    ssm = {child for block in blocks for m in block.modules() if "A_log" in m._parameters
           for child in _SSM_READS_ITSELF if isinstance(getattr(m, child, None), nn.Linear)}
    if spec.lora_targets:  # the table's names (GPT-2's are Conv1D layers, which peft adapts too)
        present = {name.rsplit(".", 1)[-1] for block in blocks for name, _ in block.named_modules() if name}
        modules = [t for t in spec.lora_targets if t in present]
        if not modules:
            raise ShortenedError(f"none of the LoRA targets {list(spec.lora_targets)} exist in this "
                                 f"{model.config.model_type} model")
    else:
        modules = sorted(linear - _NOT_ADAPTED - ssm)
    parameters = sorted({name for block in blocks for name, p in block.named_parameters()
                         if p.dim() >= 3 and "experts" in name.split(".")})
    if not modules and not parameters:
        raise ShortenedError(f"no linear projections or expert weights found in the blocks of this "
                             f"{model.config.model_type} model for LoRA: use --method full")
    return modules, parameters


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05, seed: int = 0,
             plan: dict[str, Any] | None = None) -> Any:
    """Wrap ``model`` in a peft LoRA model (only the adapters trainable) on the targets of ``plan`` (default:
    :func:`lora_plan`); initialisation is seeded."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ShortenedError(f"--lora-r must be at least 1, got {r}")
    if not 0 <= dropout < 1:
        raise ShortenedError(f"--lora-dropout must be in [0, 1), got {dropout}")
    plan = plan or lora_plan(model, dropout)
    modules, parameters = plan["modules"], plan["expert_parameters"]
    if not modules and not parameters:
        raise ShortenedError("the only LoRA targets of this model are its expert weights, which peft adapts only "
                             "without dropout: pass --lora-dropout 0")
    # Full module names: peft 0.22 also matches a bare name ("down_proj") against MoE experts' fused parameters
    # of that name, which it adapts only without dropout.
    wanted = set(modules)
    names = sorted(n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in wanted)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                        target_parameters=parameters or None, bias="none", task_type="CAUSAL_LM")
    # get_peft_model draws lora_A from the global RNG: seed it so runs (and processes) agree.
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def lora_plan(model: nn.Module, dropout: float) -> dict[str, Any]:
    """What LoRA trains on ``model``, as recorded in the healing section."""
    modules, parameters = lora_targets(model)
    plan: dict[str, Any] = {"modules": modules, "expert_parameters": [] if dropout else parameters}
    if dropout and parameters:
        plan["not_adapted"] = {"expert_parameters": parameters,
                               "why": f"peft adapts fused expert weights only without dropout (--lora-dropout "
                                      f"{dropout}); pass --lora-dropout 0 to adapt them too"}
    return plan


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the adapters into the base weights and return the plain transformers model."""
    return peft_model.merge_and_unload()



def _prepare(ctx: HealContext) -> Prepared:
    s = ctx.settings
    plan = lora_plan(ctx.model, s.lora_dropout)
    if "not_adapted" in plan:
        log.warning("LoRA leaves the expert weights alone: %s", plan["not_adapted"]["why"])
    return Prepared(add_lora(ctx.model, s.lora_r, s.lora_alpha, s.lora_dropout, s.seed, plan=plan), LMObjective(),
                    "lora",
                    finalize=merge_lora, adapter=True, extra={"lora_targets": plan})


METHOD = HealMethod(
    name="lora",
    summary="the paper's recipe: LoRA (r 8, alpha 16) on the attention and MLP projections, merged at the end",
    prepare=_prepare,
    defaults={"lr": 1e-4, **PAPER_BATCH},
)
