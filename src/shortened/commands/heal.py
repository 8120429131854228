"""``shortened heal DIR --method METHOD[,METHOD...] --data ... --out DIR2``: heal a pruned model.

The methods (several joined by commas run one after the other, each on the previous one's result):
{methods}

Runs unchanged under `accelerate launch` (reconstruct and linear excepted: one process).
"""

from __future__ import annotations

import argparse

from ._common import (MODEL_HELP, HelpFormatter, add_loading_args, add_progress_arg, add_save_dtype_arg, load_options,
                      saving_dtypes)

EXAMPLES = """examples:
  shortened heal runs/p --method lora --data alpaca --out runs/p-lora
  shortened heal runs/p --method lora --data alpaca_data.json --epochs 2 --out runs/p-lora
  shortened heal runs/p --method distill --data books/ --seq-len 256 --steps 200 --out runs/p-kd
  shortened heal runs/p --method distill --student full --teacher smollm2-135m --data hf:yahma/alpaca-cleaned --out runs/p-kd
  shortened heal runs/p --method full --data corpus.txt --steps 500 --lr 2e-5 --out runs/p-cpt
  shortened heal runs/p --method reconstruct --data books/ --steps 300 --out runs/p-rec
  shortened heal runs/p --method linear --data books/ --out runs/p-lin                 # no training, ~1 minute
  shortened heal runs/p --method linear,reconstruct --data books/ --max-time 540 --out runs/p-best
  shortened heal runs/p --method lora --data alpaca --out runs/p-lora --resume      # after an interruption
  accelerate launch --num_processes 4 -m shortened.cli heal runs/p --method lora --data alpaca --out runs/p-lora
  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m shortened.cli heal runs/p ...  # CPU, gloo

data: 'alpaca' (yahma/alpaca-cleaned from the Hub), hf:NAME[:CONFIG] (instruction/output or text
columns), an Alpaca .json/.jsonl file (instruction, input, output), a .jsonl of {"text": ...}, or a
plain text file / folder of .txt files (packed into --seq-len token sequences).
The global batch is --batch-size x --grad-accum x processes (paper: 4 x 16 = 64; reconstruct's default
8 x 1 with 128-token texts, its best measured setting).
Output: the merged model, pruning.json with a 'healing' section, adapter/ (LoRA), healing_log.csv, loss.png.
"""


def bridge_width(value: str) -> int | str:
    """``--bridge-width``: a number of blocks, or ``auto`` (checked by the method, with a one-line message)."""
    return value if value == "auto" else int(value)


def first_token_weight(value: str) -> float | str:
    """``--reconstruct-first-token-weight``: ``rest`` or a positive number (argparse's one-line error otherwise)."""
    from ..errors import ShortenedError
    from ..heal.reconstruct import FIRST_TOKEN_REST, check_first_token_weight

    weight = value if value == FIRST_TOKEN_REST else float(value)
    try:
        check_first_token_weight(weight)
    except ShortenedError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return weight


def _method_defaults(name: str) -> str:
    from ..heal import HealSettings, get_method

    m = get_method(name)
    lr = m.default_lr(HealSettings())
    shape = {k: v for k, v in m.defaults.items() if k != "lr"}
    return f"{name}: " + ", ".join([*(["lr " + f"{lr:g}"] if lr else []), *(f"{k} {v}" for k, v in shape.items())])


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..heal import HealSettings, describe_methods, methods
    from ..heal.linear import COSINE_BATCH_TOKENS, OBJECTIVES
    from ..heal.reconstruct import BRIDGE_INPUTS, LOSSES

    d = HealSettings()
    p = sub.add_parser("heal", help="heal a pruned model (LoRA, full, distillation, reconstruction, linear bridge)",
                       description=__doc__.format(methods=describe_methods()),
                       epilog=EXAMPLES + "\ndefaults per method:\n" +
                       "\n".join("  " + _method_defaults(n) for n in methods()) + "\n",
                       formatter_class=HelpFormatter)
    p.add_argument("model", metavar="DIR", help="the pruned model folder (or any " + MODEL_HELP + ")")
    p.add_argument("--method", default="lora", metavar="METHOD[,METHOD...]",
                   help=f"healing method ({', '.join(methods())}), or a chain such as linear,reconstruct")
    p.add_argument("--data", required=True, help="alpaca, hf:NAME, an Alpaca JSON/JSONL file, or text file/folder")
    p.add_argument("--out", required=True, help="output folder (a plain Hugging Face model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_save_dtype_arg(p)
    p.add_argument("--offload", choices=("disk",), default=None,
                   help="reconstruct only: keep the model's and the teacher's blocks in their safetensors files and "
                        "train the bridges one after another, only theirs in memory (a model larger than memory)")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    t.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training split when --steps is not given")
    t.add_argument("--passes", type=float, default=None,
                   help="with --steps: train on a seeded random subset of the data that the steps go over this many "
                        "times (reconstruct: passes after the first skip the teacher, see --teacher-cache-gb)")
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the method's, listed below; distill: 5e-4 with a LoRA student, "
                        "2e-5 full)")
    t.add_argument("--batch-size", type=int, default=None, help="micro-batch per process (default: the method's)")
    t.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps (default: the method's)")
    t.add_argument("--seq-len", type=int, default=None,
                   help="Alpaca cut-off / packed text length in tokens (default: the method's)")
    t.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of the data held out for validation")
    t.add_argument("--seed", type=int, default=d.seed, help="seed for the split, shuffling, LoRA init and dropout")
    t.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps, capped at --steps (default: the method's)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: off)")
    t.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: 10 times per run)")
    t.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: with validation)")
    t.add_argument("--max-examples", type=int, default=None, help="use only the first N examples of the data")
    t.add_argument("--max-time", type=float, default=None, help="stop after this many seconds of training")
    t.add_argument("--train-on-inputs", action="store_true", help="Alpaca: train on the prompt tokens too")
    t.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                   help="bf16: forwards (teacher too) under bfloat16 autocast, weights and optimizer in float32 "
                        "(~2.7x faster steps on a CPU with AVX512-BF16); fp16: accelerate's, with loss scaling; "
                        "no: float32; auto (default): bf16 where the hardware has it (CUDA with bf16, a CPU with "
                        "AVX512-BF16 or AMX), else accelerate's config")

    lo = p.add_argument_group("LoRA (method lora, or distill --student lora)")
    lo.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    lo.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha")
    lo.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout")

    ds = p.add_argument_group("distillation (methods distill and reconstruct)")
    ds.add_argument("--teacher", default=None, help="teacher model (default: 'source' of DIR/pruning.json)")
    ds.add_argument("--student", choices=("lora", "full"), default=d.student, help="trainable part of the student")
    ds.add_argument("--temperature", type=float, default=d.temperature, help="softmax temperature of the KL term")
    ds.add_argument("--lm-weight", type=float, default=d.lm_weight, help="weight of the LM loss added to the KL")

    rc = p.add_argument_group("block reconstruction (method reconstruct)")
    rc.add_argument("--bridge-width", type=bridge_width, default=d.bridge_width,
                    help="kept blocks trained per removed run: the one before it, and the next width-1 after it; "
                         "auto (default): 2, and one more per two removed blocks beyond four")
    rc.add_argument("--reconstruct-loss", choices=LOSSES, default=d.reconstruct_loss,
                    help="token: mean of per-token relative errors; total: summed error over summed target norm")
    rc.add_argument("--reconstruct-first-token", action=argparse.BooleanOptionalAction,
                    default=d.reconstruct_first_token,
                    help="fit the first position of each text too (the attention sink; per-token relative error); "
                         "without it long runs can break that position and the model with it")
    rc.add_argument("--reconstruct-first-token-weight", type=first_token_weight,
                    default=d.reconstruct_first_token_weight,
                    help="the first position's weight in the loss: rest (default: as much as the rest of its text, "
                         "so that losing the attention sink is never cheap) or a positive number (1: like any token)")
    rc.add_argument("--bridge-inputs", choices=BRIDGE_INPUTS, default=d.bridge_inputs,
                    help="input of each bridge after the first: the unpruned model's hidden state (teacher) or the "
                         "pruned model's own, carried from the previous bridge (student)")
    rc.add_argument("--teacher-cache-gb", type=float, default=d.teacher_cache_gb,
                    help="host memory for the teacher's states of examples already seen, so that later passes "
                         "skip the teacher's forward; kept only when the run sees an example twice (0: off)")

    li = p.add_argument_group("linear bridge (method linear)")
    li.add_argument("--linear-tokens", type=int, default=d.linear_tokens,
                    help="calibration tokens of the least-squares fit (drawn from --data's training split)")
    li.add_argument("--linear-ridge", type=float, default=d.linear_ridge,
                    help="ridge towards the identity (plain removal), relative to the MLP output's energy")
    li.add_argument("--linear-objective", choices=OBJECTIVES, default=d.linear_objective,
                    help="ls: weighted least squares (closed form); cosine: then Adam steps on the mean cosine "
                         "distance to the unpruned hidden state (ReplaceMe's second variant)")
    li.add_argument("--linear-cosine-steps", type=int, default=d.linear_cosine_steps,
                    help=f"cosine: Adam steps per bridge, {COSINE_BATCH_TOKENS} tokens each")
    li.add_argument("--linear-cosine-lr", type=float, default=d.linear_cosine_lr, help="cosine: Adam's learning rate")

    # Model and teacher load alike; accelerate places them (no --device-map; --device cpu forces the CPU).
    add_loading_args(p, device_map=False)
    add_progress_arg(p)

    ck = p.add_argument_group("checkpoints")
    ck.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT.checkpoints)")
    ck.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ck.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints after success")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..io import check_writable, claim_outputs

    check_writable(args.checkpoint_dir or f"{args.out.rstrip('/')}.checkpoints")
    main_process = PartialState(cpu=args.device == "cpu").is_main_process  # under accelerate launch, only it writes OUT
    with claim_outputs([args.out] if main_process else [], overwrite=args.overwrite, kind="dir"):  # before any work
        return _run(args)


#: Options read by some methods only: which methods, and the HealSettings fields (= argparse dests).
_METHOD_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lora", ("lora_r", "lora_alpha", "lora_dropout")),
    ("distill", ("student", "temperature", "lm_weight")),
    ("reconstruct", ("bridge_width", "reconstruct_loss", "reconstruct_first_token", "reconstruct_first_token_weight",
                     "bridge_inputs", "teacher_cache_gb")),
    ("linear", ("linear_tokens", "linear_ridge", "linear_objective", "linear_cosine_steps", "linear_cosine_lr")),
)


def check_method_options(args: argparse.Namespace) -> None:
    """Refuse an option that no method of the chain reads (set to other than its default), rather than
    ignore it: a --bridge-width given to lora was meant for a method that is not running."""
    from ..errors import ShortenedError
    from ..heal import HealSettings, parse_chain

    chain = parse_chain(args.method)
    names = {m.name for m in chain}
    if "distill" in names and args.student == "lora":
        names.add("lora")  # distill's LoRA student reads the LoRA options
    defaults = HealSettings()
    for method, fields in _METHOD_OPTIONS:
        given = [f for f in fields if getattr(args, f) != getattr(defaults, f)]
        if given and method not in names:
            flag = "--" + given[0].replace("_", "-")
            raise ShortenedError(f"{flag} applies to --method {method}, which this run does not use "
                                 f"(--method {args.method})")
    if args.teacher is not None and not any(m.needs_teacher for m in chain):
        raise ShortenedError(f"--teacher applies to methods that learn from the unpruned model "
                             f"(distill, reconstruct, linear), not --method {args.method}")


def _run(args: argparse.Namespace) -> int:
    from ..heal import HealSettings, heal

    check_method_options(args)
    settings = HealSettings(
        steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=args.seq_len, val_fraction=args.val_fraction, seed=args.seed, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, eval_every=args.eval_every,
        save_every=args.save_every, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        student=args.student, temperature=args.temperature, lm_weight=args.lm_weight, bridge_width=args.bridge_width,
        reconstruct_loss=args.reconstruct_loss, teacher_cache_gb=args.teacher_cache_gb, passes=args.passes,
        bridge_inputs=args.bridge_inputs, reconstruct_first_token=args.reconstruct_first_token,
        reconstruct_first_token_weight=args.reconstruct_first_token_weight,
        linear_tokens=args.linear_tokens, linear_ridge=args.linear_ridge,
        linear_objective=args.linear_objective, linear_cosine_steps=args.linear_cosine_steps,
        linear_cosine_lr=args.linear_cosine_lr,
        train_on_inputs=args.train_on_inputs, max_examples=args.max_examples, max_time=args.max_time,
        mixed_precision=args.mixed_precision, dtype=args.dtype,
    )
    from ..heal import parse_chain
    from ..loading import local_config
    from ..plan import Request, check_memory

    config = local_config(args.model, load_options(args))
    for method in parse_chain(args.method):  # before the model loads: one that cannot fit is told now
        d = Request()  # a setting left to the method: the plan's default
        check_memory(f"heal {method.name}", config,
                     Request(remove=0, heal=method.name, heal_steps=args.steps or d.heal_steps,
                             heal_batch=args.batch_size or d.heal_batch, heal_seq_len=args.seq_len or d.heal_seq_len,
                             dtype=args.dtype, offload=args.offload), device=args.device)
    result = heal(args.model, args.data, args.method, out=args.out, settings=settings, teacher=args.teacher,
                  checkpoint_dir=args.checkpoint_dir, resume=args.resume, overwrite=args.overwrite,
                  keep_checkpoints=args.keep_checkpoints, load=load_options(args), progress=not args.no_progress,
                  save_dtype=saving_dtypes(args)[0], offload=args.offload)
    h = result.record["healing"]
    before = f"{h['val_loss_before']:.4f}" if h["val_loss_before"] is not None else "n/a"
    best = f"{h['best_val_loss']:.4f}" if h["best_val_loss"] is not None else "n/a"
    from accelerate import PartialState

    if PartialState().is_main_process:
        bridges = [b for st in h.get("stages", [h]) for b in st.get("bridges", [])]
        fitted = "; bridges fitted, relative error " + ", ".join(
            f"{b['error_removed']:.3f}->{b['error_bridged']:.3f}" for b in bridges) if bridges else ""
        trained = [b for st in h.get("stages", [h]) for b in st.get("trained_bridges", [])]
        if trained:  # reconstruct: which blocks learned which removed run (--bridge-width)
            fitted += "; trained blocks " + ", ".join(
                f"{'/'.join(map(str, b['trained']))} for {b['replaces'][0]}-{b['replaces'][1]}" for b in trained)
        trained_steps = (f" for {h['steps_done']} steps" if h["steps_done"] else " (no training steps)")
        validation = (f"; validation loss {before} -> {best} (best step {h['best_step']})"
                      if h["val_loss_before"] is not None else "")
        if h["steps_done"] and h["best_step"] == 0:
            validation += "; no trained step validated better, so the untrained weights are kept"
        print(f"healed with {h['method']}{trained_steps} ({h['seconds']:.0f} s){fitted}{validation} -> {args.out}")
    return 0
