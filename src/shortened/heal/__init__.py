"""Healing a pruned model by light retraining, or training-free.

The methods live in the registry (:mod:`.registry`), one module each; those that train share one loop
(:mod:`.loop`):

* ``lora``: the paper's recipe: LoRA (r=8, alpha=16, dropout 0.05) on the attention and MLP
  projections, Alpaca with the prompt masked, merged into the weights at the end;
* ``full``: continued pre-training of every weight;
* ``distill``: the unpruned model as teacher (KL on next-token distributions, optionally plus the LM
  loss), training LoRA adapters or every weight of the student;
* ``reconstruct``: block-local: the kept blocks around each removed run learn to output the unpruned
  model's hidden state after the run (:mod:`.reconstruct`); cheapest per token, one process;
* ``linear``: training-free: a least-squares linear map per removed run folded into the MLP output
  projection of the block before it (:mod:`.linear`, after ReplaceMe).

Methods chain: ``"linear,reconstruct"`` runs reconstruct on the bridged model.

``heal(...)`` is the Python API; ``shortened heal`` is its command line.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ShortenedError
from ..loading import LoadOptions
from .data import HealingData, check_healing_source, load_healing_data, subset_for_passes
from .linear import DEFAULT_COSINE_LR, DEFAULT_COSINE_STEPS
from .linear import DEFAULT_RIDGE as DEFAULT_LINEAR_RIDGE, DEFAULT_TOKENS as DEFAULT_LINEAR_TOKENS
from .loop import TrainConfig, TrainResult, load_trainable_state, train
from .registry import HealContext, HealMethod, chain_name, describe_methods, get_method, methods, parse_chain

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
LOG_CSV = "healing_log.csv"
PLOT = "loss.png"


@dataclass
class HealSettings:
    """Every knob of a healing run (defaults: the paper's LoRA recipe)."""

    steps: int | None = None  # optimizer steps; default from epochs
    epochs: float = 2.0
    lr: float | None = None  # default per method (its registry entry)
    batch_size: int | None = None  # micro-batch per process; default per method (its registry entry)
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
    linear_tokens: int = DEFAULT_LINEAR_TOKENS  # linear: calibration tokens of the least-squares fit
    linear_ridge: float = DEFAULT_LINEAR_RIDGE  # linear: ridge towards the identity, relative to the MLP output
    linear_objective: str = "ls"  # linear: least squares, or cosine (Adam steps from the least squares)
    linear_cosine_steps: int = DEFAULT_COSINE_STEPS  # linear, cosine: Adam steps per bridge
    linear_cosine_lr: float = DEFAULT_COSINE_LR  # linear, cosine: Adam's learning rate
    #: reconstruct: kept blocks trained around each removed run, or auto (by the run's length: reconstruct.run_width)
    bridge_width: int | str = "auto"
    reconstruct_loss: str = "token"  # reconstruct: token (mean of per-token ratios) or total (ratio of sums)
    reconstruct_first_token: bool = True  # reconstruct: the first position (the attention sink) in the loss too
    #: reconstruct: the first position's weight in the loss: "rest" (as much as the rest of its text) or a number
    reconstruct_first_token_weight: float | str = "rest"
    bridge_inputs: str = "teacher"  # reconstruct: what a later bridge learns on, the teacher's or the student's states
    teacher_cache_gb: float = 4.0  # reconstruct: host memory for the teacher's states of seen examples (0: off)
    passes: float | None = None  # with steps: train on a seeded random subset that the steps go over this often
    train_on_inputs: bool = False  # Alpaca: also train on the prompt tokens
    max_examples: int | None = None
    max_time: float | None = None
    #: no, fp16 (accelerate's, with its loss scaling), bf16 (torch.autocast around every forward of the
    #: objective, teacher and directly called blocks included: TrainConfig.autocast), auto (bf16 where the
    #: hardware has it: fast_bf16); default: accelerate's config
    mixed_precision: str | None = None
    dtype: str = "auto"

    def for_method(self, method: str) -> "HealSettings":
        """A copy with the fields left unset filled with ``method``'s defaults."""
        from .registry import get_method

        unset = {k: v for k, v in get_method(method).defaults.items() if k != "lr" and getattr(self, k) is None}
        return dataclasses.replace(self, **unset)

    def resolved_lr(self, method: str) -> float | None:
        """The learning rate: the one given, else the method's default (None for a training-free method)."""
        from .registry import get_method

        return self.lr if self.lr is not None else get_method(method).default_lr(self)

    def check(self, method: str) -> None:
        """Refuse settings ``method`` cannot run with (one-line messages naming the CLI flags)."""
        from .registry import get_method

        m = get_method(method)
        if m.check is not None:  # first: a method's own option may be what makes the rest meaningless
            m.check(self)
        if m.trains:
            lr = self.resolved_lr(method)
            if not (lr is not None and lr > 0 and math.isfinite(lr)):
                raise ShortenedError(f"--lr must be a positive number, got {lr}")
            if self.steps is not None and self.steps < 1:
                raise ShortenedError(f"--steps must be at least 1, got {self.steps}")
            if self.steps is None and not self.epochs > 0:
                raise ShortenedError(f"--epochs must be positive, got {self.epochs}")
            if self.passes is not None and self.steps is None:
                raise ShortenedError("--passes needs --steps: it sizes the subset of the data those steps go over")
            if self.passes is not None and not (self.passes > 0 and math.isfinite(self.passes)):
                raise ShortenedError(f"--passes must be a positive number, got {self.passes}")
            if self.max_time is not None and not self.max_time > 0:
                raise ShortenedError(f"--max-time must be positive, got {self.max_time}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ShortenedError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, "
                                 f"got '{self.mixed_precision}'")
        if not self.teacher_cache_gb >= 0:
            raise ShortenedError(f"--teacher-cache-gb must be 0 or more, got {self.teacher_cache_gb}")
        for name in ("batch_size", "grad_accum", "lora_r", "max_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ShortenedError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len is None or self.seq_len < 2:
            raise ShortenedError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not 0 <= self.val_fraction < 1:
            raise ShortenedError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


def fast_bf16(device: str | None = None) -> bool:
    """Whether bfloat16 matmuls run natively where training will run (default: CUDA when available):
    a CUDA device with bf16, or a CPU with AVX512-BF16 or AMX (elsewhere bf16 is emulated, and slower)."""
    import torch

    from ..loading import runs_on_cuda

    if runs_on_cuda(device):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu has no public query
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_mixed_precision(value: str | None, device: str | None = None) -> str | None:
    """``auto``: bf16 where :func:`fast_bf16`, else None (accelerate's config); other values unchanged."""
    if value == "auto":
        return "bf16" if fast_bf16(device) else None
    return value


@dataclass
class HealResult:
    """The healed plain transformers model (adapters merged), its record, and the training run."""

    model: nn.Module
    tokenizer: Any
    record: dict[str, Any]
    run: TrainResult
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_FSDP1 = ("healing under FSDP supports version 2 only (FSDP1 flattens the weights it shards): launch with "
          "accelerate launch --use_fsdp --fsdp_version 2")


def fsdp_on_cpu(accelerator: Any) -> None:
    """Run an FSDP2 launch on CPU processes as FSDP2 rather than DDP.

    accelerate (1.x) marks a launch FSDP only for GPU-like process groups: on CPU processes (gloo) it runs an
    ``accelerate launch --use_fsdp`` as DDP, every process holding the whole model, and an ``fsdp_plugin``
    given to ``Accelerator`` does not change that. FSDP2's ``fully_shard`` works on CPU over gloo, so when the
    launch asked for FSDP version 2 this sets accelerate's state to FSDP with the launch's plugin (read from
    its environment, as accelerate does); ``accelerate.prepare`` then shards. Version 1 is refused, as on GPUs.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU or accelerator.num_processes < 2:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ShortenedError(_FSDP1)
    if accelerator.mixed_precision != "no":  # as accelerate's state does on GPUs
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # As accelerate's state does on GPUs: every later AcceleratorState() (an AcceleratedOptimizer's, say)
    # copies the process state's type over its own. gloo's barrier takes the device ids FSDP passes it.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not accelerator.is_fsdp2:
        raise ShortenedError("could not set accelerate up for FSDP2 on CPU processes: launch with DDP "
                             "(accelerate launch --multi_gpu)")


def check_distributed(kind: Any, fsdp_version: int | None = None) -> None:
    """Refuse the multi-process modes healing cannot run: FSDP1, DeepSpeed and Megatron, whose processes hold
    shards the loop does not gather (the best step, checkpoints and the saved model are whole weights). DDP
    (``accelerate launch --multi_gpu``) and FSDP2 (``--use_fsdp --fsdp_version 2``) are supported; both are
    tested on CPU processes over gloo."""
    from accelerate.utils import DistributedType

    if kind == DistributedType.FSDP and fsdp_version != 2:
        raise ShortenedError(_FSDP1)
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ShortenedError(f"healing under accelerate's {kind.value} is not supported (its processes hold shards "
                             "healing does not gather): launch with FSDP2 (accelerate launch --use_fsdp "
                             "--fsdp_version 2) or DDP (--multi_gpu)")


def heal(
    model: str | os.PathLike | nn.Module,
    data: str | os.PathLike | HealingData,
    method: str | Sequence[str] = "lora",
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
    save_dtype: torch.dtype | None = None,
    offload: str | None = None,
    **overrides: Any,
) -> HealResult:
    """Heal ``model`` (a pruned folder, any model spec, or a loaded model) on ``data``.

    ``method`` is a registered method or a chain (``"linear,reconstruct"`` or a list): each runs on the
    previous one's result. ``data`` is a spec for :func:`load_healing_data` (``alpaca``, ``hf:NAME``, a
    file or folder) or a ready :class:`HealingData`. Keyword ``overrides`` set :class:`HealSettings`
    fields; fields left unset take each method's defaults. With ``out`` the healed model is saved there
    (atomically) with ``pruning.json`` extended by a ``healing`` section, ``adapter/`` (LoRA),
    ``healing_log.csv`` and ``loss.png``; checkpoints go to ``checkpoint_dir`` (default
    ``OUT.checkpoints``) and ``resume`` continues from the latest. ``kept`` (reconstruct, linear) gives
    the teacher's index of each block of ``model``; by default it is read from the input's pruning.json.
    ``load`` is how the model and the teacher are loaded (its dtype replaces the settings'; accelerate
    places the model, so its device map is not used and a device other than ``cpu`` is accelerate's).
    A model given as a module is trained in place (pass a copy to keep the original); a teacher loaded
    here takes the model's dtype. ``save_dtype`` is the dtype of the weights saved at ``out`` (None: as
    trained); the returned model keeps its dtype, its weights rounded to the saved values.

    ``offload="disk"`` (``reconstruct`` only, with ``out``) keeps the model's and the teacher's blocks in
    their safetensors files and trains the bridges one after another, only theirs in memory
    (:func:`shortened.heal.reconstruct.train_bridges_on_disk`); the returned model reads its blocks from
    ``out``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from ..io import check_output_dir, library_versions, now_iso

    chain = parse_chain(method)
    base = dataclasses.replace(settings or HealSettings(), **overrides)
    base = dataclasses.replace(base, mixed_precision=resolve_mixed_precision(base.mixed_precision,
                                                                             load.device if load else None))
    if load is not None:
        base = dataclasses.replace(base, dtype=load.dtype)
    per_method = [base.for_method(m.name) for m in chain]
    for m, s in zip(chain, per_method):
        s.check(m.name)
    load = dataclasses.replace(load or LoadOptions(dtype=base.dtype), device_map=None)
    if out is not None:
        check_output_dir(out, overwrite)  # fail before any slow work
    if not isinstance(data, HealingData):
        check_healing_source(data)  # a missing or binary file is told before the model loads
    # bf16 is the loop's own autocast (TrainConfig.autocast), so accelerate's per-process precision stays as configured
    accelerator = Accelerator(mixed_precision=None if base.mixed_precision == "bf16" else base.mixed_precision,
                              cpu=load.device == "cpu")
    fsdp_on_cpu(accelerator)
    kind = accelerator.distributed_type
    check_distributed(kind, accelerator.state.fsdp_plugin.fsdp_version if kind == DistributedType.FSDP else None)
    device = str(accelerator.device)
    single = [m.name for m in chain if m.one_process]
    if single and accelerator.num_processes > 1:
        raise ShortenedError(f"--method {single[0]} runs in one process (it works on a few blocks directly); "
                             "launch it without accelerate's multi-process mode")

    if offload is not None:
        _check_offload(offload, chain, model, out)
    model_spec, record = _describe_input(model)
    if any(m.needs_kept for m in chain):
        kept = list(kept) if kept is not None else record.get("kept_blocks")
        if not isinstance(kept, list) or not kept:
            raise ShortenedError(f"{model_spec} has no pruning.json with kept_blocks: --method "
                                 f"{next(m.name for m in chain if m.needs_kept)} needs to know which blocks were "
                                 "removed (prune with shortened first)")
    # on disk, the student's forward never runs (only its bridge blocks do): neither table is read
    on_disk = dict(blocks_on_disk=True, unloaded=("head", "embedding")) if offload else {}
    if not isinstance(model, nn.Module):
        model, loaded_tokenizer = load.load(model_spec, device=device, **on_disk)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    from ..offload import check_in_memory, compute_dtype

    if offload is None:
        check_in_memory(model, "healing")
    if any(m.needs_kept for m in chain):
        _check_kept(kept, model)
    use_cache = model.config.use_cache  # off while training (no cache to build), restored on the result
    model.config.use_cache = False
    if not isinstance(data, HealingData):
        from ..archs import check_seq_len

        for s in per_method:
            check_seq_len(model, s.seq_len)

    teacher_spec_used = None
    if any(m.needs_teacher for m in chain):
        student_dtype = compute_dtype(model)
        teacher, teacher_spec_used, loaded_teacher_tokenizer = _load_teacher(teacher, model_spec, load, device,
                                                                              student_dtype, on_disk=bool(offload))
        teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else loaded_teacher_tokenizer
        if not offload:
            teacher.to(device)
        teacher_dtype = compute_dtype(teacher)
        if any(m.needs_kept for m in chain) and teacher_dtype != student_dtype:
            raise ShortenedError(f"the teacher is {teacher_dtype} and the model {student_dtype}: --method "
                                 f"{next(m.name for m in chain if m.needs_kept)} passes hidden states between "
                                 "them, so load both in the same dtype")
        _check_teacher_blocks(teacher, kept if any(m.needs_kept for m in chain) else None)

    datasets: dict[int, HealingData] = {}  # by sequence length: methods of a chain may differ

    def dataset_for(s: HealSettings) -> HealingData:
        if isinstance(data, HealingData):
            return data
        if s.seq_len not in datasets:
            datasets[s.seq_len] = load_healing_data(
                data, tokenizer, seq_len=s.seq_len, val_fraction=s.val_fraction, seed=s.seed,
                train_on_inputs=s.train_on_inputs, max_examples=s.max_examples)
        if not datasets[s.seq_len].train:
            raise ShortenedError("no training examples")
        return datasets[s.seq_len]

    if checkpoint_dir is None and out is not None:
        checkpoint_dir = f"{os.fspath(out).rstrip('/')}.checkpoints"
    sections: list[dict[str, Any]] = []
    run = TrainResult(step=0)
    pad = _pad_id(tokenizer, model)
    for k, (m, s) in enumerate(zip(chain, per_method)):
        last = k == len(chain) - 1
        dataset = dataset_for(s)
        start = time.perf_counter()
        context = HealContext(model=model, tokenizer=tokenizer, settings=s, data=dataset, teacher=teacher,
                              teacher_tokenizer=teacher_tokenizer, kept=kept, device=device, progress=progress)
        prepared = m.prepare(context)
        section: dict[str, Any] = {"method": m.name, "trainable": prepared.trainable, "created": now_iso(),
                                   "input": model_spec, "data": dataset.describe(), "teacher": teacher_spec_used}
        trained = prepared.model
        if prepared.objective is None:
            stage_run = TrainResult(step=0, seconds=time.perf_counter() - start)
            section.update(settings=_settings_record(s, None, accelerator.num_processes), steps_done=0,
                           stopped_early=False, seconds=round(stage_run.seconds, 2), best_step=None,
                           best_val_loss=None, val_loss_before=None, train_log=[], val_log=[])
        else:
            global_batch = s.batch_size * s.grad_accum * accelerator.num_processes
            if s.passes is not None:
                dataset = subset_for_passes(dataset, s.steps, global_batch, s.passes, s.seed)
                section["data"] = {**section["data"], "passes": s.passes, "train_examples_used": len(dataset.train)}
            steps = s.steps or max(1, math.ceil(s.epochs * len(dataset.train) / global_batch))
            config = TrainConfig(
                steps=steps, lr=s.resolved_lr(m.name), batch_size=s.batch_size, grad_accum=s.grad_accum,
                warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
                eval_every=s.eval_every, save_every=s.save_every, seed=s.seed, pad_token_id=pad,
                max_time=s.max_time, autocast="bf16" if s.mixed_precision == "bf16" else None)
            ckpt = checkpoint_dir
            if ckpt is not None and len(chain) > 1:
                ckpt = Path(ckpt) / f"{k}-{m.name}"  # each stage of a chain resumes on its own
            if offload:  # the bridges one after another, each resuming on its own
                from .reconstruct import train_bridges_on_disk

                stage_run, on_disk_bridges = train_bridges_on_disk(
                    trained, prepared.objective,
                    lambda module, objective, name: train(module, objective, dataset.train, dataset.val, config,
                                                          accelerator=accelerator, checkpoint_dir=Path(ckpt) / name,
                                                          resume=resume, on_step=on_step, progress=progress),
                    Path(ckpt) / "trained")
            else:
                stage_run = train(trained, prepared.objective, dataset.train, dataset.val, config,
                                  accelerator=accelerator, checkpoint_dir=ckpt, resume=resume, on_step=on_step,
                                  progress=progress)
            trained = accelerator.unwrap_model(trained)
            if stage_run.best_state is not None and stage_run.best_step != stage_run.step:
                load_trainable_state(trained, stage_run.best_state)
            section.update(
                settings={**_settings_record(s, config, accelerator.num_processes), "steps": steps,
                          "global_batch": global_batch},
                steps_done=stage_run.step, stopped_early=stage_run.stopped_early,
                seconds=round(stage_run.seconds, 2),
                best_step=stage_run.best_step if stage_run.best_state is not None else stage_run.step,
                best_val_loss=stage_run.best_val_loss,
                val_loss_before=(stage_run.val_log[0]["val_loss"]
                                 if stage_run.val_log and stage_run.val_log[0]["step"] == 0 else None),
                train_log=stage_run.train_log, val_log=stage_run.val_log)
            run = stage_run
        section.update({k: v() if callable(v) else v for k, v in prepared.extra.items()})
        if offload and prepared.objective is not None:
            section.update(trained_bridges=on_disk_bridges, offload=offload)
        section["versions"] = library_versions()
        sections.append(section)
        if not last:  # the next method starts from the plain healed model
            model = prepared.finalize(trained)
    healing = sections[0] if len(sections) == 1 else _chain_section(chain_name(chain), sections)
    if "healing" in record:
        record["healing_history"] = record.get("healing_history", []) + [record.pop("healing")]
    record["healing"] = healing

    adapter = None
    if out is not None and accelerator.is_main_process:
        from ..io import atomic_output_dir, save_model
        from .report import plot_losses, write_loss_csv

        with atomic_output_dir(out, overwrite) as tmp:
            if prepared.adapter:
                trained.save_pretrained(tmp / ADAPTER_DIR)
            final = prepared.finalize(trained)
            final.config.use_cache = use_cache
            # save_model writes a complete folder; stage it inside and move its files up beside adapter/.
            from ..archs import num_blocks

            # blocks on disk: the pruned checkpoint's, block for block (its trained ones from their files)
            staged = save_model(final, tokenizer, tmp / ".model", record, dtype=save_dtype,
                                kept=list(range(num_blocks(final))) if offload else None)
            for item in staged.iterdir():
                os.replace(item, tmp / item.name)
            staged.rmdir()
            if run.train_log or run.val_log:
                write_loss_csv(tmp / LOG_CSV, run.train_log, run.val_log)
                plot_losses(tmp / PLOT, run.train_log, run.val_log,
                            title=f"shortened heal --method {healing['method']}", best_step=healing["best_step"])
        adapter = Path(out) / ADAPTER_DIR if prepared.adapter else None
        if offload:  # its blocks from the healed folder now: the bridges' files go with the checkpoints
            from ..offload import disk_blocks, index_checkpoint

            disk_blocks(final).names = index_checkpoint(final, Path(out))
        if checkpoint_dir is not None and not keep_checkpoints:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    else:
        final = prepared.finalize(trained)
    final.config.use_cache = use_cache
    accelerator.wait_for_everyone()
    final.eval()
    return HealResult(final, tokenizer, record, run, Path(out) if out is not None else None, {"adapter": adapter})


def _settings_record(s: HealSettings, config: TrainConfig | None, processes: int) -> dict[str, Any]:
    """The settings of one method's run as recorded: every field, plus what the loop made of them."""
    record = {**dataclasses.asdict(s), "processes": processes}
    if config is not None:
        record.update(lr=config.lr, warmup_steps_effective=min(config.warmup_steps, config.steps),
                      eval_every=config.eval_interval)
    else:  # training-free: no learning rate, steps or batches of the loop
        record.update(lr=None)
    return record


def _chain_section(name: str, sections: list[dict[str, Any]]) -> dict[str, Any]:
    """One healing section for a chain: the last training stage's figures, every stage in ``stages``."""
    trained = [s for s in sections if s["train_log"] or s["val_log"]]
    main = trained[-1] if trained else sections[-1]
    keep = ("steps_done", "stopped_early", "best_step", "best_val_loss", "val_loss_before", "train_log", "val_log")
    return {"method": name, "trainable": "+".join(s["trainable"] for s in sections), "created": sections[-1]["created"],
            "input": sections[0]["input"], "data": sections[0]["data"], "teacher": sections[0]["teacher"],
            "settings": {s["method"]: s["settings"] for s in sections},
            **{k: main[k] for k in keep}, "seconds": round(sum(s["seconds"] for s in sections), 2),
            "stages": sections, "versions": sections[-1]["versions"]}


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


def _check_teacher_blocks(teacher: nn.Module, kept: list[int] | None) -> None:
    """``kept`` indexes the teacher's blocks (pruning.json: the original model's): a teacher with fewer
    blocks, e.g. a model pruned on the way, would pair each bridge with the wrong blocks."""
    from ..archs import num_blocks

    if kept is not None and max(kept) >= num_blocks(teacher):
        raise ShortenedError(f"the teacher has {num_blocks(teacher)} blocks, but the kept blocks {kept} index a "
                             "model with more: give the original (unpruned) model as the teacher")


def _check_kept(kept: list[int], model: nn.Module) -> None:
    """``kept`` must name, in order, the teacher block behind each block of ``model``: a stale list (a model
    pruned again in memory, a record that does not match the weights) would train the wrong blocks."""
    from ..archs import num_blocks
    from ..surgery import is_kept_list

    n = num_blocks(model)
    if len(kept) != n or not is_kept_list(kept):
        raise ShortenedError(f"kept blocks {kept} do not match the model's {n} blocks: give kept= the original "
                             "index of each present block, in order")


def _load_teacher(teacher: Any, model_spec: str, load: LoadOptions, device: str,
                  dtype: torch.dtype, on_disk: bool = False) -> tuple[nn.Module, str, Any]:
    """The teacher model (loaded in the student's ``dtype`` unless the options name one; ``on_disk``: its
    blocks left in its files, its head unloaded), its spec, and its tokenizer (None when given as a module)."""
    if isinstance(teacher, nn.Module):
        return teacher, str(getattr(teacher.config, "_name_or_path", "") or "<in-memory teacher>"), None
    from .distill import teacher_spec

    spec = os.fspath(teacher) if teacher is not None else teacher_spec(model_spec)
    # "auto" would pick the checkpoint's or the device's dtype, not necessarily the model's (a module in bf16).
    extra = dict(blocks_on_disk=True, unloaded=("head",)) if on_disk else {}
    model, tok = load.load(spec, device=device, **({"dtype": dtype} if load.dtype == "auto" else {}), **extra)
    return model, spec, tok


def _check_offload(offload: str, chain: Sequence[HealMethod], model: Any, out: Any) -> None:
    """``offload="disk"``: methods that train a few blocks at a time, a model to load, a folder to write."""
    if offload != "disk":
        raise ShortenedError(f"healing offloads to disk only (--offload disk), got '{offload}'")
    whole = [m.name for m in chain if not m.on_disk]
    if whole:
        usable = ", ".join(name for name, m in methods().items() if m.on_disk)
        raise ShortenedError(f"--offload disk heals with {usable} (a few blocks trained at a time); --method "
                             f"{whole[0]} trains the whole model")
    if isinstance(model, nn.Module):
        raise ShortenedError("--offload disk heals a saved model (its blocks are read from its files), not a "
                             "loaded module")
    if out is None:
        raise ShortenedError("--offload disk writes the healed model block by block: give --out")


def _pad_id(tokenizer: Any, model: nn.Module) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                  getattr(model.config, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


__all__ = ["HealMethod", "HealResult", "HealSettings", "HealingData", "check_distributed", "describe_methods",
           "fsdp_on_cpu", "get_method", "heal", "load_healing_data", "methods", "parse_chain"]
