"""``shortened bench MODEL --baseline MODEL``: generation latency, throughput and memory, pruned vs original."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ._common import HelpFormatter, add_model_args, load_options, parse_int_list

EXAMPLES = """examples:
  shortened bench runs/p --baseline smollm2-135m --batch-sizes 1,8 --output-lens 128 --out bench.json
  shortened bench runs/p --baseline meta-llama/Llama-2-7b-hf --batch-sizes 1,8,32 --output-lens 128,512
  shortened bench runs/p --baseline smollm2-135m --engine llamacpp --batch-sizes 1,8 --out bench-llamacpp.json
  shortened bench runs/p --baseline smollm2-135m --engine vllm --batch-sizes 1,8 --out bench-vllm.json

Each model is loaded and measured in its own process, so its peak memory is its own (CUDA peak allocated
on a GPU, process peak RSS on CPU). Both are loaded at once and their runs alternate (ABBA), so that a
busy machine's slow drifts hit both alike; --sequential measures one after the other. Warm-up runs are
discarded; latencies are medians of --repeats runs.

--engine times the models where they are served: llamacpp exports each folder to a temporary GGUF
(--engine-dtype: f32, f16, bf16 or q8_0) and serves it with llama-server, one slot per sequence of the
largest batch, a batch being that many concurrent requests (llama.cpp's continuous batching); vllm loads each
folder in a worker of vLLM's own environment (--engine-dtype: float32, bfloat16, float16) and times one
LLM.generate per batch. Both need saved local folders; 'make llamacpp' / 'make vllm' install the engines.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..bench import ENGINES

    p = sub.add_parser("bench", help="measure generation speed and memory against a baseline",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--baseline", default=None, help="the original model to compare with (any MODEL spec)")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--output-lens", default="128,512", help="comma-separated numbers of generated tokens (forced)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens")
    p.add_argument("--warmup", type=int, default=1, help="discarded runs before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch in each measuring process")
    p.add_argument("--sequential", action="store_true",
                   help="measure the models one after the other instead of interleaving their runs "
                        "(for when both do not fit in memory at once)")
    p.add_argument("--engine", choices=ENGINES, default="hf",
                   help="where generation is timed: transformers (hf), vLLM or llama.cpp")
    p.add_argument("--engine-dtype", default=None,
                   help="weight type in the engine (llamacpp: f32|f16|bf16|q8_0, default bf16; vllm: "
                        "float32|bfloat16|float16, default bfloat16)")
    p.add_argument("--out", default="bench.json", help="JSON with every measurement; the plot goes beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import claim_outputs

    with claim_outputs([args.out, Path(args.out).with_suffix(".png")], overwrite=args.overwrite):  # before any work
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..bench import check_settings, format_bench, plot_bench, run_benchmark
    from ..io import library_versions, now_iso, write_file, write_json

    out = Path(args.out)
    batch_sizes = parse_int_list(args.batch_sizes, "batch sizes")
    output_lens = parse_int_list(args.output_lens, "output lengths")
    check_settings(batch_sizes, output_lens, prompt_len=args.prompt_len, repeats=args.repeats, warmup=args.warmup,
                   threads=args.threads, engine=args.engine, engine_dtype=args.engine_dtype)
    # Resolve (and convert GGUF) here, so a bad spec fails with one line before any child process starts.
    model, baseline = (_resolve(s, args.cache_dir) for s in (args.model, args.baseline))
    from ..loading import local_config
    from ..plan import Request, check_memory

    # the workers load one model at a time: the larger, the source, sets the peak
    check_memory("bench", local_config(baseline or model, load_options(args)),
                 Request(remove=0, bench_batch=max(batch_sizes), bench_tokens=max(output_lens), dtype=args.dtype),
                 device=args.device)
    result = run_benchmark(
        model, baseline,
        load_kwargs=load_options(args).kwargs(),  # every worker process loads with the command's options
        batch_sizes=batch_sizes, output_lens=output_lens, prompt_len=args.prompt_len,
        warmup=args.warmup, repeats=args.repeats, threads=args.threads, interleave=not args.sequential,
        engine=args.engine, engine_dtype=args.engine_dtype,
    )
    result["models"]["model"]["model"] = args.model
    if args.baseline:
        result["models"]["baseline"]["model"] = args.baseline
    result.update(command=shlex.join(["shortened", *sys.argv[1:]]) if sys.argv else "",
                  created=now_iso(), versions=library_versions())
    write_json(out, result, overwrite=args.overwrite)
    plot = out.with_suffix(".png")
    write_file(plot, lambda tmp: plot_bench(result, str(tmp)), overwrite=args.overwrite)
    print(format_bench(result))
    print(f"\nwrote {out} and {plot}")
    return 0


def _resolve(spec: str | None, cache_dir: str | None) -> str | None:
    from ..loading import resolve_local_folder

    if spec is None:
        return None
    folder = resolve_local_folder(spec, cache_dir)
    return str(folder) if folder is not None else spec
