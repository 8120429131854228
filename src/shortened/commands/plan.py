"""``shortened plan MODEL``: the memory and time each stage of a run will need on a device, from the config
alone (no weight is read), and which options make a stage fit.

The estimates come from a cost model (``shortened.plan``): the weights each stage holds in the compute
dtype, the activations and shards it keeps, the teacher and optimizer state of healing; FLOPs over this
machine's matrix-multiply rate (measured in a second, or ``--gemm-gflops``), bytes over the disk's rates.
They are checked against the measurements in BENCHMARKS.md ("Scale").
"""

from __future__ import annotations

import argparse
import json

from ._common import HelpFormatter

EXAMPLES = """examples:
  shortened plan meta-llama/Llama-3.1-8B                      (online: the config only)
  shortened plan ./llama-8b --offload disk --heal reconstruct --heal-steps 100
  shortened plan ./llama-8b --device cuda --criterion ppl --json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..plan import Request

    d = Request()
    p = sub.add_parser("plan", help="estimate each stage's memory and time from the config alone",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a model folder, Hub id (config only) or alias")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the stages will run")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own config code")
    s = p.add_argument_group("stages (as the commands take them)")
    s.add_argument("--criterion", default=d.criterion, help="scoring criterion")
    size = s.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=float, default=None, help="share of blocks to remove (default 0.2)")
    size.add_argument("--num-blocks", type=int, default=None, help="number of blocks to remove")
    s.add_argument("--n-samples", type=int, default=d.n_samples, help="calibration samples")
    s.add_argument("--seq-len", type=int, default=d.seq_len, help="calibration sample length")
    s.add_argument("--offload", choices=("cpu", "disk"), default=None, help="score, prune (cpu or disk), heal with reconstruct and evaluate perplexity (disk) with blocks offloaded")
    s.add_argument("--heal", default=d.heal, help="healing method, or none")
    s.add_argument("--heal-steps", type=int, default=d.heal_steps)
    s.add_argument("--heal-batch-size", type=int, default=d.heal_batch)
    s.add_argument("--heal-seq-len", type=int, default=d.heal_seq_len)
    s.add_argument("--eval-limit", type=int, default=d.eval_chunks, help="perplexity chunks evaluated")
    s.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len)
    s.add_argument("--bench-batch", type=int, default=d.bench_batch)
    s.add_argument("--bench-tokens", type=int, default=d.bench_tokens)
    m = p.add_argument_group("machine (measured or typical unless given)")
    m.add_argument("--gemm-gflops", type=float, default=None, help="matrix-multiply rate (default: measured now)")
    m.add_argument("--read-mbps", type=float, default=None, help="disk read MiB/s (default 2000)")
    m.add_argument("--write-mbps", type=float, default=None, help="disk write MiB/s (default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ShortenedError
    from ..plan import Machine, Request, Shape, format_plan, plan

    for flag in ("n_samples", "seq_len", "heal_steps", "heal_batch_size", "heal_seq_len", "eval_limit",
                 "eval_seq_len", "bench_batch", "bench_tokens"):
        if getattr(args, flag) < 1:
            raise ShortenedError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    shape = Shape.from_config(_config(args.model, args.trust_remote_code))
    if args.num_blocks is not None:
        if not 0 < args.num_blocks < shape.num_blocks:
            raise ShortenedError(f"--num-blocks must be between 1 and {shape.num_blocks - 1}, got {args.num_blocks}")
        remove = args.num_blocks
    else:
        ratio = 0.2 if args.ratio is None else args.ratio
        if not 0 < ratio < 1:
            raise ShortenedError(f"--ratio must be strictly between 0 and 1, got {ratio}")
        remove = max(1, int(ratio * shape.num_blocks + 0.5))
    from ..criteria import get_criterion

    get_criterion(args.criterion)  # an unknown name: the registry's message
    request = Request(criterion=args.criterion, n_samples=args.n_samples, seq_len=args.seq_len, remove=remove,
                      offload=args.offload, heal=None if args.heal == "none" else args.heal,
                      heal_steps=args.heal_steps, heal_batch=args.heal_batch_size, heal_seq_len=args.heal_seq_len,
                      eval_chunks=args.eval_limit, eval_seq_len=args.eval_seq_len, bench_batch=args.bench_batch,
                      bench_tokens=args.bench_tokens, dtype=args.dtype)
    machine = Machine.measure(args.device, read_mbps=args.read_mbps, write_mbps=args.write_mbps,
                              gemm_gflops=args.gemm_gflops)
    estimates = plan(shape, machine, request)
    if args.json:
        print(json.dumps({"shape": vars(shape), "machine": vars(machine), "remove": remove,
                          "stages": [e.to_dict() for e in estimates]}, indent=2))
    else:
        print(format_plan(estimates, shape, machine))
    return 0


def _config(spec: str, trust_remote_code: bool):
    from pathlib import Path

    from transformers import AutoConfig

    from ..errors import ShortenedError
    from ..loading import LoadOptions, local_config, resolve_local_folder

    folder = Path(spec).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():  # a config alone is enough here
        try:
            return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise ShortenedError(f"{folder / 'config.json'} does not read as a config: "
                                 f"{str(exc).splitlines()[0]}") from None
    options = LoadOptions(trust_remote_code=trust_remote_code)
    config = local_config(spec, options)
    if config is not None:
        return config
    if resolve_local_folder(spec) is not None:
        raise ShortenedError(f"{spec} has no readable config.json")
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ShortenedError(f"cannot read the config of {spec} (offline, or no such model?): "
                             f"{str(exc).splitlines()[0]}") from None
