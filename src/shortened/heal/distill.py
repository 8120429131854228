"""Distillation from the unpruned model: KL divergence between the teacher's and the student's
next-token distributions (with a temperature), optionally plus the language-modelling loss."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShortenedError
from ..io import RECORD_FILE, read_json
from .loop import forward_logits, lm_loss_sum
from .registry import PAPER_BATCH, HealContext, HealMethod, Prepared


class DistillObjective:
    """``kl_weight * T^2 * KL(teacher_T || student_T) + lm_weight * CE``, both token means.

    The KL is taken at every position whose next token is real (prompt tokens included: the teacher
    has something to teach there too); the CE only on labelled tokens.
    """

    names = ("kl", "lm")

    def __init__(self, teacher: nn.Module, temperature: float = 1.0, lm_weight: float = 0.0, kl_weight: float = 1.0):
        if not temperature > 0:
            raise ShortenedError(f"--temperature must be positive, got {temperature}")
        if lm_weight < 0 or kl_weight < 0 or lm_weight + kl_weight == 0:
            raise ShortenedError(f"loss weights must be >= 0 and not both 0 (kl {kl_weight}, lm {lm_weight})")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.weights = (kl_weight, lm_weight)

    def counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from .data import IGNORE_INDEX

        kl = batch["attention_mask"][:, 1:].sum()
        lm = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return torch.stack([kl, lm]).float()

    def sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = forward_logits(self.teacher, batch)[:, :-1].float()
        logits = forward_logits(model, batch)
        kl = kl_sum(logits[:, :-1].float(), teacher_logits, batch["attention_mask"][:, 1:], self.temperature)
        lm = lm_loss_sum(logits, batch["labels"])
        return torch.stack([kl, lm])


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
           temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * sum_t KL(softmax(teacher_t / T) || softmax(student_t / T))`` over positions where ``mask``."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    return (per_token * mask.to(per_token.dtype)).sum() * temperature**2


def teacher_spec(model_dir: str | os.PathLike) -> str:
    """The unpruned model a pruned folder came from (``source`` in its pruning.json)."""
    record_path = Path(model_dir) / RECORD_FILE
    if not record_path.is_file():
        raise ShortenedError(f"{model_dir} has no {RECORD_FILE} naming the unpruned model: pass --teacher")
    source = read_json(record_path).get("source")
    if not isinstance(source, str) or not source:
        raise ShortenedError(f"{record_path} has no 'source': pass --teacher")
    return source


def vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_same_vocab(student: nn.Module, teacher: nn.Module, student_tokenizer: Any = None,
                     teacher_tokenizer: Any = None) -> None:
    """Refuse a teacher whose output vocabulary (or tokenizer) differs from the student's."""
    s, t = vocab_size(student), vocab_size(teacher)
    if s != t:
        raise ShortenedError(f"the teacher's vocabulary has {t} tokens but the student's {s}: "
                             "distillation needs the same tokenizer")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise ShortenedError("the teacher's tokenizer differs from the student's: distillation needs the same tokenizer")


#: Default learning rate by trainable part of the student.
DEFAULT_LR = {"lora": 5e-4, "full": 2e-5}


def _prepare(ctx: HealContext) -> Prepared:
    s = ctx.settings
    check_same_vocab(ctx.model, ctx.teacher, ctx.tokenizer, ctx.teacher_tokenizer)
    objective = DistillObjective(ctx.teacher, s.temperature, s.lm_weight)
    if s.student == "lora":
        from .lora import add_lora, merge_lora

        model = add_lora(ctx.model, s.lora_r, s.lora_alpha, s.lora_dropout, s.seed)
        return Prepared(model, objective, "lora", finalize=merge_lora, adapter=True)
    from .full import make_all_trainable

    return Prepared(make_all_trainable(ctx.model), objective, "full")


def _check(settings) -> None:
    if settings.student not in DEFAULT_LR:
        raise ShortenedError(f"--student must be lora or full, got '{settings.student}'")


METHOD = HealMethod(
    name="distill",
    summary="the student (--student lora|full) matches the unpruned model's next-token distributions (KL)",
    prepare=_prepare,
    defaults=dict(PAPER_BATCH),
    needs_teacher=True,
    lr_rule=lambda settings: DEFAULT_LR[settings.student],
    check=_check,
)
