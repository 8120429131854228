"""Healing a pruned model by light retraining.

Three methods share one training loop (:mod:`.loop`):

* ``lora``: the paper's recipe: LoRA (r=8, alpha=16, dropout 0.05) on the attention and MLP
  projections, Alpaca with the prompt masked, merged into the weights at the end;
* ``full``: continued pre-training of every weight;
* ``distill``: the unpruned model as teacher (KL on next-token distributions, optionally plus the LM
  loss), training LoRA adapters or every weight of the student;
* ``reconstruct``: block-local: the kept blocks around each removed run learn to output the unpruned
  model's hidden state after the run (:mod:`.reconstruct`); cheapest per token, one process.

``heal(...)`` is the Python API; ``shortened heal`` is its command line.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ShortenedError
from ..loading import LoadOptions
from .data import HealingData, load_healing_data
from .loop import LMObjective, TrainConfig, TrainResult, load_trainable_state, train

log = logging.getLogger(__name__)

METHODS = ("lora", "full", "distill", "reconstruct")
#: Learning rate per method when none is given (lora: the paper's; see benchmarks/results/healing.md).
DEFAULT_LR = {"lora": 1e-4, "full": 2e-5, "distill": 5e-4, "reconstruct": 3e-3}
#: Batch shape and warm-up per method when none is given: the paper's for lora, full and distill; for
#: reconstruct the settings of its best measured run (benchmarks/results/healing.md: many short steps).
PAPER_BATCH = {"batch_size": 4, "grad_accum": 16, "seq_len": 256, "warmup_steps": 100}
METHOD_DEFAULTS = {"lora": PAPER_BATCH, "full": PAPER_BATCH, "distill": PAPER_BATCH,
                   "reconstruct": {"batch_size": 8, "grad_accum": 1, "seq_len": 128, "warmup_steps": 10}}
#: Default distillation student learning rates by trainable part.
DEFAULT_DISTILL_LR = {"lora": 5e-4, "full": 2e-5}
ADAPTER_DIR = "adapter"
LOG_CSV = "healing_log.csv"
PLOT = "loss.png"


@dataclass
class HealSettings:
    """Every knob of a healing run (defaults: the paper's LoRA recipe)."""

    steps: int | None = None  # optimizer steps; default from epochs
    epochs: float = 2.0
    lr: float | None = None  # default per method (DEFAULT_LR)
    batch_size: int | None = None  # micro-batch per process; default per method (METHOD_DEFAULTS)
    grad_accum: int | None = None  # global batch = batch_size * grad_accum * processes (paper: 4 x 16 = 64)
    seq_len: int | None = None  # Alpaca cut-off / packed text length (paper: 256)
    val_fraction: float = 0.05
    seed: int = 0
    warmup_steps: int | None = None  # paper: 100
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    save_every: int | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    student: str = "lora"  # distill: trainable part of the student, lora or full
    temperature: float = 1.0  # distill
    lm_weight: float = 0.0  # distill: weight of the LM loss beside the KL
    bridge_width: int = 2  # reconstruct: kept blocks trained around each removed run
    reconstruct_loss: str = "token"  # reconstruct: token (mean of per-token ratios) or total (ratio of sums)
    train_on_inputs: bool = False  # Alpaca: also train on the prompt tokens
    max_examples: int | None = None
    max_time: float | None = None
    mixed_precision: str | None = None  # accelerate: no, fp16, bf16 (default: accelerate's config)
    dtype: str = "auto"

    def for_method(self, method: str) -> "HealSettings":
        """A copy with the fields left unset filled with ``method``'s defaults."""
        if method not in METHODS:
            raise ShortenedError(f"unknown healing method '{method}': use {', '.join(METHODS)}")
        unset = {k: v for k, v in METHOD_DEFAULTS[method].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **unset)

    def resolved_lr(self, method: str) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_DISTILL_LR[self.student] if method == "distill" else DEFAULT_LR[method]

    def check(self, method: str) -> None:
        if method not in METHODS:
            raise ShortenedError(f"unknown healing method '{method}': use {', '.join(METHODS)}")
        if self.student not in ("lora", "full"):
            raise ShortenedError(f"--student must be lora or full, got '{self.student}'")
        lr = self.resolved_lr(method)
        if not (lr > 0 and math.isfinite(lr)):
            raise ShortenedError(f"--lr must be a positive number, got {lr}")
        for name in ("batch_size", "grad_accum", "lora_r"):
            if getattr(self, name) < 1:
                raise ShortenedError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ShortenedError(f"--seq-len must be at least 2, got {self.seq_len}")
        if method == "reconstruct":  # checked here too, so that a bad value fails before any loading
            from .reconstruct import check_options

            check_options(self.bridge_width, self.reconstruct_loss)
        if self.steps is not None and self.steps < 1:
            raise ShortenedError(f"--steps must be at least 1, got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            raise ShortenedError(f"--epochs must be positive, got {self.epochs}")
        if not 0 <= self.val_fraction < 1:
            raise ShortenedError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_time is not None and not self.max_time > 0:
            raise ShortenedError(f"--max-time must be positive, got {self.max_time}")


@dataclass
class HealResult:
    """The healed plain transformers model (adapters merged), its record, and the training run."""

    model: nn.Module
    tokenizer: Any
    record: dict[str, Any]
    run: TrainResult
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def heal(
    model: str | os.PathLike | nn.Module,
    data: str | os.PathLike | HealingData,
    method: str = "lora",
    *,
    out: str | os.PathLike | None = None,
    settings: HealSettings | None = None,
    tokenizer: Any = None,
    teacher: str | os.PathLike | nn.Module | None = None,
    teacher_tokenizer: Any = None,
    kept: list[int] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    keep_checkpoints: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    progress: bool = True,
    load: LoadOptions | None = None,
    **overrides: Any,
) -> HealResult:
    """Heal ``model`` (a pruned folder, any model spec, or a loaded model) on ``data``.

    ``data`` is a spec for :func:`load_healing_data` (``alpaca``, ``hf:NAME``, a file or folder) or a
    ready :class:`HealingData`. Keyword ``overrides`` set :class:`HealSettings` fields. With ``out``
    the merged model is saved there (atomically) with ``pruning.json`` extended by a ``healing``
    section, ``adapter/`` (LoRA), ``healing_log.csv`` and ``loss.png``; checkpoints go to
    ``checkpoint_dir`` (default ``OUT.checkpoints``) and ``resume`` continues from the latest.
    ``kept`` (reconstruct) gives the teacher's index of each block of ``model``; by default it is read
    from the input's pruning.json. ``load`` is how the model and the teacher are loaded (its dtype
    replaces the settings'; accelerate places the model, so its device map is not used and a device
    other than ``cpu`` is accelerate's).
    """
    from accelerate import Accelerator

    from ..io import check_output_dir, library_versions, now_iso

    settings = dataclasses.replace(settings or HealSettings(), **overrides).for_method(method)
    if load is not None:
        settings = dataclasses.replace(settings, dtype=load.dtype)
    settings.check(method)
    load = dataclasses.replace(load or LoadOptions(dtype=settings.dtype), device_map=None)
    if out is not None:
        check_output_dir(out, overwrite)  # fail before any slow work
    accelerator = Accelerator(mixed_precision=settings.mixed_precision, cpu=load.device == "cpu")
    device = str(accelerator.device)

    model_spec, record = _describe_input(model)
    if not isinstance(model, nn.Module):
        model, loaded_tokenizer = load.load(model_spec, device=device)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    model.config.use_cache = False

    if isinstance(data, HealingData):
        dataset = data
    else:
        from ..archs import check_seq_len

        check_seq_len(model, settings.seq_len)
        dataset = load_healing_data(data, tokenizer, seq_len=settings.seq_len, val_fraction=settings.val_fraction,
                                    seed=settings.seed, train_on_inputs=settings.train_on_inputs,
                                    max_examples=settings.max_examples)
    if not dataset.train:
        raise ShortenedError("no training examples")

    teacher_spec_used = None
    trainable = {"full": "full", "lora": "lora", "reconstruct": "bridges"}.get(method, settings.student)
    if method == "reconstruct":
        if accelerator.num_processes > 1:
            raise ShortenedError("--method reconstruct runs in one process (it trains a few blocks directly); "
                                 "launch it without accelerate's multi-process mode")
        kept = list(kept) if kept is not None else record.get("kept_blocks")
        if not isinstance(kept, list) or not kept:
            raise ShortenedError(f"{model_spec} has no pruning.json with kept_blocks: --method reconstruct needs "
                                 "to know which blocks were removed (prune with shortened first)")
        teacher, teacher_spec_used, _ = _load_teacher(teacher, model_spec, load, device)
        from .reconstruct import ReconstructObjective

        teacher.to(device)
        objective: Any = ReconstructObjective(teacher, kept, settings.bridge_width, settings.reconstruct_loss)
    elif method == "distill":
        teacher, teacher_spec_used, loaded_teacher_tokenizer = _load_teacher(teacher, model_spec, load, device)
        from .distill import DistillObjective, check_same_vocab

        teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else loaded_teacher_tokenizer
        check_same_vocab(model, teacher, tokenizer, teacher_tokenizer)
        teacher.to(device)
        objective = DistillObjective(teacher, settings.temperature, settings.lm_weight)
    else:
        objective = LMObjective()

    if trainable == "bridges":
        from .reconstruct import make_bridges_trainable

        trained = make_bridges_trainable(model, objective.bridges)
    elif trainable == "lora":
        from .lora import add_lora

        trained = add_lora(model, settings.lora_r, settings.lora_alpha, settings.lora_dropout, settings.seed)
    else:
        from .full import make_all_trainable

        trained = make_all_trainable(model)

    global_batch = settings.batch_size * settings.grad_accum * accelerator.num_processes
    steps = settings.steps or max(1, math.ceil(settings.epochs * len(dataset.train) / global_batch))
    pad = _pad_id(tokenizer, model)
    config = TrainConfig(
        steps=steps, lr=settings.resolved_lr(method), batch_size=settings.batch_size, grad_accum=settings.grad_accum,
        warmup_steps=settings.warmup_steps, weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
        eval_every=settings.eval_every, save_every=settings.save_every, seed=settings.seed, pad_token_id=pad,
        max_time=settings.max_time,
    )
    if checkpoint_dir is None and out is not None:
        checkpoint_dir = f"{os.fspath(out).rstrip('/')}.checkpoints"
    run = train(trained, objective, dataset.train, dataset.val, config, accelerator=accelerator,
                checkpoint_dir=checkpoint_dir, resume=resume, on_step=on_step, progress=progress)
    trained = accelerator.unwrap_model(trained)
    if run.best_state is not None and run.best_step != run.step:
        load_trainable_state(trained, run.best_state)

    healing = {
        "method": method,
        "trainable": trainable,
        "created": now_iso(),
        "input": model_spec,
        "data": dataset.describe(),
        "teacher": teacher_spec_used,
        "settings": {**dataclasses.asdict(settings), "lr": config.lr, "steps": steps,
                     "warmup_steps_effective": min(config.warmup_steps, steps), "global_batch": global_batch,
                     "processes": accelerator.num_processes, "eval_every": config.eval_interval},
        "steps_done": run.step,
        "stopped_early": run.stopped_early,
        "seconds": round(run.seconds, 2),
        "best_step": run.best_step if run.best_state is not None else run.step,
        "best_val_loss": run.best_val_loss,
        "val_loss_before": run.val_log[0]["val_loss"] if run.val_log and run.val_log[0]["step"] == 0 else None,
        "train_log": run.train_log,
        "val_log": run.val_log,
        "versions": library_versions(),
    }
    if "healing" in record:
        record["healing_history"] = record.get("healing_history", []) + [record.pop("healing")]
    record["healing"] = healing

    adapter = None
    if out is not None and accelerator.is_main_process:
        from ..io import atomic_output_dir, save_model
        from .report import plot_losses, write_loss_csv

        with atomic_output_dir(out, overwrite) as tmp:
            if trainable == "lora":
                trained.save_pretrained(tmp / ADAPTER_DIR)
            final = _merged(trained, trainable)
            # save_model writes a complete folder; stage it inside and move its files up beside adapter/.
            staged = save_model(final, tokenizer, tmp / ".model", record)
            for item in staged.iterdir():
                os.replace(item, tmp / item.name)
            staged.rmdir()
            write_loss_csv(tmp / LOG_CSV, run.train_log, run.val_log)
            plot_losses(tmp / PLOT, run.train_log, run.val_log, title=f"shortened heal --method {method}",
                        best_step=healing["best_step"])
        adapter = Path(out) / ADAPTER_DIR if trainable == "lora" else None
        if checkpoint_dir is not None and not keep_checkpoints:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    else:
        final = _merged(trained, trainable)
    accelerator.wait_for_everyone()
    final.eval()
    return HealResult(final, tokenizer, record, run, Path(out) if out is not None else None, {"adapter": adapter})


def _merged(trained: nn.Module, trainable: str) -> nn.Module:
    if trainable != "lora":
        return trained
    from .lora import merge_lora

    return merge_lora(trained)


def _describe_input(model: str | os.PathLike | nn.Module) -> tuple[str, dict[str, Any]]:
    """The input's spec string and a copy of its pruning.json (or a minimal record)."""
    from ..io import RECORD_FILE, read_json

    if isinstance(model, nn.Module):
        spec = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "<in-memory model>")
    else:
        spec = os.fspath(model)
    record_path = Path(spec) / RECORD_FILE
    if record_path.is_file():
        return spec, copy.deepcopy(read_json(record_path))
    return spec, {"format_version": 1, "tool": "shortened", "source": spec, "selection": None}


def _load_teacher(teacher: Any, model_spec: str, load: LoadOptions, device: str) -> tuple[nn.Module, str, Any]:
    """The teacher model, its spec, and its tokenizer (None when given as a module)."""
    if isinstance(teacher, nn.Module):
        return teacher, str(getattr(teacher.config, "_name_or_path", "") or "<in-memory teacher>"), None
    from .distill import teacher_spec

    spec = os.fspath(teacher) if teacher is not None else teacher_spec(model_spec)
    model, tok = load.load(spec, device=device)
    return model, spec, tok


def _pad_id(tokenizer: Any, model: nn.Module) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                  getattr(model.config, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


__all__ = ["HealResult", "HealSettings", "HealingData", "METHODS", "heal", "load_healing_data"]
