"""``shortened eval MODEL``: perplexity (WikiText-2, PTB, any text file) and the seven zero-shot tasks
through lm-evaluation-harness, online or offline from a data folder; ``--compare`` puts result files
side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import HelpFormatter, add_data_dir_arg, add_model_args, add_progress_arg, load_from_args

EXAMPLES = """examples:
  shortened eval smollm2-135m --data-dir ../shared/data --out runs/dense.json
  shortened eval runs/pruned --data-dir ../shared/data --limit 50 --out runs/pruned-50.json
  shortened eval runs/pruned --ppl wikitext2,my_notes.txt --tasks none --seq-len 2048
  shortened eval runs/llama-8b-pruned --ppl wikitext2 --tasks none --limit 40 --offload disk   (blocks read from disk)
  shortened eval google/gemma-2-2b --bos --tasks boolq,piqa       (online: Hub data)
  shortened eval runs/pruned --reference smollm2-135m --tasks none   (+ KL to the source model)
  shortened eval runs/pruned --backend vllm --data-dir ../shared/data --limit 100   (scored by vLLM)
  shortened eval --compare runs/dense.json runs/pruned.json

The paper's protocol is the default: WikiText-2 (raw v1, test) and PTB (validation) perplexity over
non-overlapping 128-token chunks, and boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
openbookqa zero-shot (acc for boolq/piqa/winogrande/arc_easy, acc_norm for the others) and their
average. --data-dir defaults to $SHORTENED_DATA; without it the data come from the Hugging Face Hub.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..evaluation import PAPER_PPL, PAPER_TASKS

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy (paper protocol); compare results",
                       description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    add_model_args(p)
    # MODEL is not needed with --compare
    for action in p._actions:
        if action.dest == "model":
            action.nargs, action.required, action.default = "?", False, None
    what = p.add_argument_group("what to evaluate")
    what.add_argument("--ppl", default=",".join(PAPER_PPL),
                      help="perplexity sets: wikitext2, ptb and/or paths of UTF-8 text files; 'none' for no perplexity")
    what.add_argument("--tasks", default=",".join(PAPER_TASKS),
                      help="zero-shot tasks (of: " + ", ".join(PAPER_TASKS) + "); 'none' for no tasks")
    add_data_dir_arg(what)
    what.add_argument("--reference", default=None, metavar="MODEL",
                      help="also the mean token KL(MODEL || the evaluated model) on each perplexity set: how far "
                           "pruning and healing moved the model from its source (loaded with the same options)")
    what.add_argument("--limit", type=int, default=None,
                      help="first N chunks per perplexity set and first N items per task (quick runs)")
    how = p.add_argument_group("how")
    how.add_argument("--seq-len", type=int, default=128, help="perplexity chunk length (2048 is the other convention)")
    how.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    how.add_argument("--bos", action="store_true", help="put a BOS token before every chunk and prompt (Gemma needs it)")
    how.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                     help="hf: transformers in this process; vllm: a saved model folder scored by vLLM in its own "
                          "environment ('make vllm'), same chunks and tasks (lm-eval's vLLM backend), --dtype "
                          "float32 (auto) or bfloat16")
    how.add_argument("--offload", choices=("disk",), default=None,
                     help="perplexity only: keep the blocks in the model's safetensors files and read each once per "
                          "pass over many chunks (a model larger than memory; see 'shortened plan')")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None, help="write every metric, the settings and library versions to this JSON file")
    out.add_argument("--table", default=None, help="also write the Markdown table to this file")
    out.add_argument("--name", default=None, help="the model's name in the table; MODEL when not given")
    out.add_argument("--overwrite", action="store_true", help="replace existing --out/--table files")
    add_progress_arg(out)
    out.add_argument("--compare", nargs="+", metavar="RESULTS", default=None,
                     help="print the table of these results files side by side (no model is loaded)")
    p.set_defaults(func=run)


def _names(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [] if items == ["none"] else items


def run(args: argparse.Namespace) -> int:
    from ..io import claim_outputs

    with claim_outputs([args.out, args.table], overwrite=args.overwrite):  # before any work
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..errors import ShortenedError
    from ..evaluation import check_request, compare_files, evaluate
    from ..io import write_text

    if args.compare:
        if args.model is not None:
            raise ShortenedError("--compare takes results files only; drop MODEL")
        if args.out is not None:
            raise ShortenedError("--out is for evaluations; with --compare use --table to save the table")
        table = compare_files(args.compare)
        print(table, end="")
        if args.table:
            write_text(args.table, table, overwrite=args.overwrite)
        return 0
    if args.model is None:
        raise ShortenedError("give MODEL to evaluate, or --compare RESULTS...")

    ppl, tasks = _names(args.ppl), _names(args.tasks)
    if not ppl and not tasks:
        raise ShortenedError("nothing to evaluate: --ppl and --tasks are both 'none'")
    check_request(ppl, tasks, data_dir=args.data_dir, limit=args.limit, seq_len=args.seq_len,
                  batch_size=args.batch_size)  # before the (slow) model load
    if args.reference is not None and not ppl:
        raise ShortenedError("--reference measures the KL on the perplexity sets: give --ppl")
    if args.backend == "vllm":
        return _report(args, _evaluate_in_vllm(args, ppl, tasks))

    if args.offload and tasks:
        raise ShortenedError("--offload disk evaluates perplexity only (lm-eval holds the whole model): add "
                             "--tasks none")
    if args.offload and args.reference is not None:
        raise ShortenedError("--offload disk and --reference cannot be combined (the KL holds both models)")
    from ..loading import local_config
    from ..plan import Request, check_memory
    from ._common import load_options

    check_memory("eval perplexity", local_config(args.model, load_options(args)),
                 Request(remove=0, offload=args.offload, eval_chunks=args.limit or 256, eval_seq_len=args.seq_len,
                         eval_batch=args.batch_size, dtype=args.dtype), device=args.device)
    model, tokenizer = load_from_args(args, blocks_on_disk=args.offload == "disk")
    reference = None
    if args.reference is not None:
        reference, _ = load_options(args).load(args.reference)
    name = args.name or args.model
    results = evaluate(model, tokenizer, ppl=ppl, tasks=tasks, data_dir=args.data_dir, seq_len=args.seq_len,
                       batch_size=args.batch_size, bos=args.bos, limit=args.limit, name=name,
                       progress=not args.no_progress, reference=reference)
    return _report(args, results)


def _evaluate_in_vllm(args: argparse.Namespace, ppl: list[str], tasks: list[str]) -> dict:
    """The results of ``--backend vllm``, after refusing the options vLLM's backend cannot honour."""
    from ..errors import ShortenedError
    from ..evaluation.vllm_backend import evaluate_in_vllm

    for flag, value in (("--reference", args.reference), ("--offload", args.offload), ("--device", args.device),
                        ("--device-map", args.device_map), ("--revision", args.revision)):
        if value is not None:  # each needs the model in transformers (vLLM places and loads it itself)
            raise ShortenedError(f"--backend vllm cannot honour {flag}: drop it, or use --backend hf")
    return evaluate_in_vllm(args.model, ppl=ppl, tasks=tasks, data_dir=args.data_dir, seq_len=args.seq_len,
                            batch_size=args.batch_size, bos=args.bos, limit=args.limit, name=args.name or args.model,
                            progress=not args.no_progress, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                            cache_dir=args.cache_dir)


def _report(args: argparse.Namespace, results: dict) -> int:
    """Record where the model came from, then print the table and write the files asked for."""
    from ..evaluation import markdown_table
    from ..io import write_json, write_text

    name = args.name or args.model
    results["source"] = args.model
    if args.reference is not None:
        results["reference"] = args.reference
    pruning = Path(args.model) / "pruning.json"
    if pruning.is_file():  # a model pruned by shortened: keep which blocks it lacks beside its scores
        from ..io import read_json

        record = read_json(pruning)
        results["model"]["removed_blocks"] = record.get("removed_blocks")
        results["model"]["original_num_blocks"] = record.get("original_num_blocks")
    table = markdown_table([results], [name])
    if args.out:
        write_json(args.out, results, overwrite=args.overwrite)
    if args.table:
        write_text(args.table, table, overwrite=args.overwrite)
    print(table, end="")
    if args.out:
        print(f"results -> {args.out}", file=sys.stderr)
    return 0
