"""The one training loop every healing method shares, on top of accelerate.

The loop is written so that the number of processes does not change the result:

* the data is one seeded stream of examples (a fresh permutation per epoch); optimizer step ``s``
  consumes stream positions ``[s*G, (s+1)*G)`` with ``G = batch_size * grad_accum * processes``, and
  each process takes its own micro-batches of that global batch. The data position of a checkpoint is
  therefore just the step number.
* every loss term is a sum over tokens divided by the token count of the whole *global* batch
  (counted across micro-batches and processes before the forward passes), so one process with
  accumulation and several processes with DDP compute the same gradient.

It runs unchanged in a plain Python process or under ``accelerate launch`` (DDP or FSDP2 as configured
there): accelerate places the model and averages gradients; gradient accumulation skips the all-reduce on
all but the last micro-batch. Under FSDP2 each process holds shards (DTensors) of a structural copy of the
model (:func:`shard_copy`); whatever takes whole weights (the best step, checkpoints, the model left at the
end) gathers them, a collective every process takes part in.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShortenedError
from .data import IGNORE_INDEX, Example, collate

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16}


def autocast_context(accelerator: Any, config: "TrainConfig") -> contextlib.AbstractContextManager:
    """accelerate's own autocast (its configured mixed precision), inside ``config.autocast`` if set."""
    stack = contextlib.ExitStack()
    stack.enter_context(accelerator.autocast())
    if config.autocast is not None:
        device_type = torch.device(accelerator.device).type
        stack.enter_context(torch.autocast(device_type, dtype=AUTOCAST_DTYPES[config.autocast]))
    return stack


@dataclass
class TrainConfig:
    """Settings of one training run (all recorded in the output)."""

    steps: int
    lr: float
    batch_size: int = 4  # micro-batch per process and forward pass
    grad_accum: int = 16
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # default: about 10 evaluations per run
    save_every: int | None = None  # default: with every evaluation
    seed: int = 0
    pad_token_id: int = 0
    max_time: float | None = None  # seconds; stop early (after a step) when exceeded
    #: "bf16": every forward of the objective (teacher included) under torch.autocast in bfloat16, the
    #: weights, optimizer and loss staying float32. Done here rather than by accelerate's mixed precision
    #: because objectives that call blocks directly (reconstruct) never go through the prepared model's
    #: forward, and accelerate's precision is fixed once per process.
    autocast: str | None = None

    def check(self) -> None:
        """Raise ShortenedError for settings that cannot train."""
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ShortenedError(f"--lr must be a positive number, got {self.lr}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ShortenedError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ShortenedError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ShortenedError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ShortenedError(f"autocast must be one of {', '.join(map(str, AUTOCAST_DTYPES))}, got {self.autocast!r}")

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 10)

    @property
    def save_interval(self) -> int:
        return self.save_every or self.eval_interval


class Objective(Protocol):
    """A loss made of token-summed terms: ``loss = sum_k weights[k] * sums[k] / global_counts[k]``."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many tokens each term sums over in ``batch`` (float tensor of shape [terms])."""

    def sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each term summed over the batch's tokens (shape [terms], differentiable)."""


def shifted_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token labels aligned with logits[:, :-1]."""
    return batch["labels"][:, 1:]


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labels that are not -100."""
    # The same quantity as shortened.engine.token_nll, but the training step keeps the fused kernel:
    # token_nll's logsumexp - gather backward builds one more [tokens, vocab] tensor (gather's scatter)
    # and is slower, and -100 labels would need masking around it.
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


class LMObjective:
    """Next-token cross-entropy on the labelled tokens (continued pre-training, LoRA fine-tuning)."""

    names = ("lm",)
    weights = (1.0,)

    def counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (shifted_targets(batch) != IGNORE_INDEX).sum().float().reshape(1)

    def sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss_sum(forward_logits(model, batch), batch["labels"]).reshape(1)


@dataclass
class TrainResult:
    """What a run produced: the logs, the last step, and the best validated trainable state."""

    step: int
    train_log: list[dict[str, Any]] = field(default_factory=list)
    val_log: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_val_loss: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False
    seconds: float = 0.0


class ExampleStream:
    """The seeded, epoch-by-epoch shuffled sequence of training examples."""

    def __init__(self, examples: Sequence[Example], seed: int):
        if not examples:
            raise ShortenedError("no training examples")
        self.examples = examples
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def __getitem__(self, position: int) -> Example:
        epoch, i = divmod(position, len(self.examples))
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self.examples[self._perms[epoch][i]]


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 shard)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or the full tensor of a DTensor (an all-gather: every process must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back in shards, so that its parameters are the DTensors: after a
    forward pass without backward FSDP2 leaves the root's weights gathered, registered as plain tensors."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that require gradients, by name, whole (FSDP2 shards are gathered, so
    every process calls it, in the same order)."""
    reshard(model)
    return {n: whole(p.detach()).to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the named parameters (an FSDP2 parameter takes its own shard of each)."""
    reshard(model)
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ShortenedError(f"checkpoint does not match the model (no parameter {missing[0]})")
    with torch.no_grad():
        for name, value in state.items():
            param = params[name]
            value = value.to(param.device, param.dtype)
            if is_sharded(param):
                from torch.distributed.tensor import distribute_tensor

                # Every process holds the whole tensor: src_data_rank=None keeps each one's shard without
                # communication.
                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(value)


def is_fsdp2(accelerator: Any) -> bool:
    """Whether ``accelerator`` shards the models it prepares with FSDP2."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def shard_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules for FSDP2 to shard, sharing its tensors (no memory copied).

    FSDP2's ``fully_shard`` turns a module into a sharded one in place and has no inverse, and healing needs
    a plain model at the end (LoRA merged into whole weights, the best step restored, saved by one process).
    So the copy is sharded, the caller's model keeps its modules (and every reference to them, tied weights
    included) and gets the trained whole weights back from :func:`gather_into`.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():  # tied parameters come once, and stay one parameter in the copy
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for b in model.buffers():  # not sharded by FSDP; rotary tables and the like are shared
        memo[id(b)] = b
    return copy.deepcopy(model, memo)


def release_sharded(model: nn.Module, sharded: nn.Module) -> None:
    """Free the whole weights of ``model`` whose counterpart in ``sharded`` is a shard: while the shards
    train, each process would otherwise keep a whole model besides them."""
    shards = dict(sharded.named_parameters())
    for name, p in model.named_parameters():
        if is_sharded(shards.get(name)):
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def gather_into(model: nn.Module, sharded: nn.Module) -> None:
    """Write the whole weights of ``sharded`` (FSDP2) into ``model``'s parameters, in their dtype and device
    (an all-gather per parameter: every process calls it)."""
    reshard(sharded)
    shards = dict(sharded.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_sharded(shards[name]):
                p.data = shards[name].full_tensor().to(p.device, p.dtype)


def warmup_then_decay(step: int, *, warmup: int, steps: int) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based): linear warm-up to 1 over ``warmup``
    steps, then linear decay towards 0 at ``steps``.

    Unlike transformers' ``get_linear_schedule_with_warmup`` no step gets a zero rate: its first step
    (rate 0) would train nothing, a whole run of ``--steps 1`` included.
    """
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def train(
    model: nn.Module,
    objective: Objective,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    config: TrainConfig,
    *,
    accelerator: Any = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the parameters of ``model`` that require gradients on ``objective``.

    AdamW with linear warm-up and linear decay (as the HF Trainer of alpaca-lora), gradient clipping,
    validation every ``config.eval_interval`` steps (and at step 0 and the end), the best trainable
    state by validation loss (the untrained state included: ``best_step`` 0 when no trained step
    validates better), and resumable checkpoints in ``checkpoint_dir``. The model is left in its last
    state; ``result.best_state`` holds the best one.

    Under FSDP2 a structural copy is sharded (:func:`shard_copy`) and ``model`` stays a plain module: its
    weights are released while the shards train and gathered back whole at the end (on every process). A
    run that raises leaves them released: there is no collective to gather them in an error.
    """
    from accelerate import Accelerator

    config.check()
    accelerator = accelerator or Accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    if not any(p.requires_grad for p in model.parameters()):
        raise ShortenedError("the model has no trainable parameters")
    plain, sharded = model, is_fsdp2(accelerator)
    if sharded:
        model = shard_copy(plain)
    params = [p for p in model.parameters() if p.requires_grad]
    warmup = min(config.warmup_steps, config.steps)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_then_decay, warmup=warmup, steps=config.steps))
    from ..offload import disk_blocks

    # a model with its blocks on disk is already where it runs (a move would touch the unloaded ones)
    placed = disk_blocks(model) is None
    model, optimizer = accelerator.prepare(model, optimizer, device_placement=[placed, placed])
    unwrapped = accelerator.unwrap_model(model)
    if sharded:
        release_sharded(plain, unwrapped)
    device = accelerator.device
    stream = ExampleStream(train_examples, config.seed)
    global_batch = config.batch_size * config.grad_accum * world

    result = TrainResult(step=0)
    ckpt = (Checkpointer(checkpoint_dir, accelerator, _fingerprint(config, world, train_examples, sharded))
            if checkpoint_dir else None)
    if resume:
        if ckpt is None:
            raise ShortenedError("--resume needs a checkpoint folder")
        ckpt.load(unwrapped, optimizer, scheduler, result)
    elif ckpt is not None:
        ckpt.clear()

    def evaluate(step: int) -> None:
        terms = _evaluate(model, objective, val_examples, config, accelerator)
        if terms is None:
            return
        loss = float(sum(w * t for w, t in zip(objective.weights, terms.values())))
        entry = {"step": step, "val_loss": loss, **{f"val_{k}": v for k, v in terms.items()}}
        result.val_log.append(entry)
        # Step 0 competes too: a run whose every trained step validates worse keeps the untrained weights.
        if result.best_val_loss is None or loss < result.best_val_loss:
            result.best_step, result.best_val_loss = step, loss
            result.best_state = trainable_state(unwrapped)

    if result.step == 0 and not result.val_log:
        evaluate(0)

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=result.step, desc="heal", unit="step",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    start = time.perf_counter()
    model.train()
    while result.step < config.steps:
        step = result.step
        base = step * global_batch
        micro = []
        for a in range(config.grad_accum):
            first = base + (rank * config.grad_accum + a) * config.batch_size
            examples = [stream[first + j] for j in range(config.batch_size)]
            micro.append({k: v.to(device) for k, v in collate(examples, config.pad_token_id).items()})
        counts = torch.stack([objective.counts(b) for b in micro]).sum(0).to(device)
        totals = accelerator.reduce(counts, reduction="sum").clamp(min=1)
        weights = torch.tensor(objective.weights, device=device)
        sums_seen = torch.zeros_like(totals)
        for a, batch in enumerate(micro):
            # All-reduce gradients only on the last micro-batch.
            sync = contextlib.nullcontext() if a == len(micro) - 1 else accelerator.no_sync(model)
            with sync:
                with autocast_context(accelerator, config):
                    sums = objective.sums(model, batch)
                sums = sums.float()
                # DDP averages gradients over processes; scaling by `world` makes that a global sum.
                loss = (weights * sums / totals).sum() * world
                accelerator.backward(loss)
            sums_seen += sums.detach()
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.step = step + 1

        term_means = (accelerator.reduce(sums_seen, reduction="sum") / totals).tolist()
        entry = {"step": result.step, "loss": float(sum(w * t for w, t in zip(objective.weights, term_means))),
                 "lr": lr, **{k: v for k, v in zip(objective.names, term_means) if len(objective.names) > 1},
                 "tokens": int(totals.max().item())}
        result.train_log.append(entry)
        last = result.step == config.steps
        out_of_time = config.max_time is not None and time.perf_counter() - start >= config.max_time
        if last or out_of_time or result.step % config.eval_interval == 0:
            evaluate(result.step)
            model.train()
        bar.update(1)
        postfix = {"loss": f"{entry['loss']:.4f}"}
        if result.val_log:
            postfix["val"] = f"{result.val_log[-1]['val_loss']:.4f}"
        bar.set_postfix(postfix)
        if ckpt is not None and (result.step % config.save_interval == 0) and not last:
            ckpt.save(unwrapped, optimizer, scheduler, result)
        if on_step is not None:
            on_step(result.step, entry)
        if out_of_time and not last:
            result.stopped_early = True
            log.warning("stopping after %d of %d steps: --max-time %.0f s reached", result.step, config.steps,
                        config.max_time)
            break
    bar.close()
    model.eval()
    result.seconds = time.perf_counter() - start
    if sharded:
        gather_into(plain, unwrapped)
        plain.eval()
        accelerator.free_memory()  # the shards and their optimizer state: the plain model holds the result
    return result


@torch.no_grad()
def _evaluate(model: nn.Module, objective: Objective, examples: Sequence[Example], config: TrainConfig,
              accelerator: Any) -> dict[str, float] | None:
    """Token-weighted mean of each term over the validation examples (sharded over processes)."""
    if not examples:
        return None
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(examples[rank::world])
    sums = torch.zeros(len(objective.names), device=accelerator.device)
    counts = torch.zeros_like(sums)
    for i in range(0, len(mine), config.batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(mine[i:i + config.batch_size], config.pad_token_id).items()}
        counts += objective.counts(batch).to(sums.device)
        with autocast_context(accelerator, config):
            sums += objective.sums(model, batch).float()
    sums = accelerator.reduce(sums, reduction="sum")
    counts = accelerator.reduce(counts, reduction="sum").clamp(min=1)
    return dict(zip(objective.names, (sums / counts).tolist()))


def _fingerprint(config: TrainConfig, world: int, examples: Sequence[Example],
                 sharded: bool = False) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption (FSDP2 saves the optimizer by
    parameter name, one process by position: they do not resume each other)."""
    keep = ("steps", "lr", "batch_size", "grad_accum", "warmup_steps", "weight_decay", "max_grad_norm", "seed")
    fp = {k: v for k, v in asdict(config).items() if k in keep}
    fp["processes"] = world
    fp["train_examples"] = len(examples)
    fp["train_tokens"] = sum(len(e["input_ids"]) for e in examples)
    if sharded:  # absent otherwise: checkpoints made before FSDP2 was supported still resume
        fp["fsdp"] = 2
    return fp


class Checkpointer:
    """Resumable checkpoints: trainable weights, best weights, optimizer and scheduler, each process's
    RNG state and the logs. ``latest.json`` (written last, atomically) names the complete one."""

    def __init__(self, folder: str | Path, accelerator: Any, fingerprint: dict[str, Any]):
        self.folder = Path(folder)
        self.acc = accelerator
        self.fingerprint = json.loads(json.dumps(fingerprint))

    def clear(self) -> None:
        if self.acc.is_main_process and (self.folder / "latest.json").exists():
            log.warning("starting afresh: removing the old checkpoints in %s (use --resume to continue)", self.folder)
            shutil.rmtree(self.folder)
        self.acc.wait_for_everyone()

    def save(self, model: nn.Module, optimizer: Any, scheduler: Any, result: TrainResult) -> None:
        from safetensors.torch import save_file

        from ..io import write_json

        target = self.folder / f"step-{result.step:07d}"
        if self.acc.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
        self.acc.wait_for_everyone()
        torch.save(_rng_state(), target / f"rng-{self.acc.process_index}.pt")
        sharded = is_fsdp2(self.acc)
        # Under FSDP2 gathering is a collective: every process takes part, the main one writes.
        trainable = trainable_state(model) if sharded or self.acc.is_main_process else None
        optim = _optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
        if self.acc.is_main_process:
            save_file(trainable, str(target / "trainable.safetensors"))
            if result.best_state is not None:
                save_file(result.best_state, str(target / "best.safetensors"))
            torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, target / "optim.pt")
            state = {"step": result.step, "train_log": result.train_log, "val_log": result.val_log,
                     "best_step": result.best_step, "best_val_loss": result.best_val_loss,
                     "fingerprint": self.fingerprint}
            write_json(target / "state.json", state)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            previous = self._latest()
            write_json(self.folder / "latest.json", {"step": result.step, "folder": target.name})
            if previous is not None and previous != target:
                shutil.rmtree(previous, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _latest(self) -> Path | None:
        pointer = self.folder / "latest.json"
        if not pointer.exists():
            return None
        return self.folder / json.loads(pointer.read_text())["folder"]

    def load(self, model: nn.Module, optimizer: Any, scheduler: Any, result: TrainResult) -> None:
        from safetensors.torch import load_file

        target = self._latest()
        if target is None or not target.is_dir():
            raise ShortenedError(f"--resume: no checkpoint in {self.folder}")
        state = json.loads((target / "state.json").read_text())
        if state["fingerprint"] != self.fingerprint:
            diff = [k for k in self.fingerprint if state["fingerprint"].get(k) != self.fingerprint[k]]
            raise ShortenedError(f"--resume: the checkpoint in {self.folder} was made with different settings ({', '.join(diff)})")
        rng_file = target / f"rng-{self.acc.process_index}.pt"
        if not rng_file.exists():
            raise ShortenedError(f"--resume: checkpoint {target} has no state for process {self.acc.process_index}")
        load_trainable_state(model, load_file(str(target / "trainable.safetensors")))
        opt = torch.load(target / "optim.pt", weights_only=True, map_location="cpu")
        if is_fsdp2(self.acc):
            _load_optimizer_state(model, optimizer, opt["optimizer"])
        else:
            optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        _set_rng_state(torch.load(rng_file, weights_only=True))
        result.step = state["step"]
        result.train_log, result.val_log = state["train_log"], state["val_log"]
        result.best_step, result.best_val_loss = state["best_step"], state["best_val_loss"]
        if (target / "best.safetensors").exists():
            result.best_state = load_file(str(target / "best.safetensors"))
        log.warning("resuming from step %d (%s)", result.step, target)


def _optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The whole optimizer state of an FSDP2 model, keyed by parameter name, on the main process (a
    collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a whole optimizer state (:func:`_optimizer_state`) into an FSDP2 model's optimizer: each process
    keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
