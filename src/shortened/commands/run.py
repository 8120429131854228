"""``shortened run MODEL ...``: the whole paper in one command.

Scores the blocks, prunes, heals (optional), evaluates the original and the pruned model, benchmarks
generation, and writes the model card. Every stage keeps its output under OUT/stages; running the same
command again skips the finished stages (``--force`` re-runs them), and changing a setting re-runs only
the stages that depend on it.
"""

from __future__ import annotations

import argparse

from ._common import (HelpFormatter, add_data_dir_arg, add_model_args, add_progress_arg, add_save_dtype_arg, load_options,
                      parse_int_list)

EXAMPLES = """examples:
  shortened run smollm2-135m --ratio 0.2 --out runs/demo          # offline: calibration sampled from the model
  shortened run smollm2-135m --ratio 0.2 --calib ../shared/data/gutenberg --data-dir ../shared/data \\
      --heal-max-time 600 --out runs/best                          # the best measured recipe
  shortened run smollm2-135m --recipe paper --ratio 0.2 --calib ../shared/data/gutenberg \\
      --heal-steps 50 --data-dir ../shared/data --eval-limit 200 --out runs/paper
  shortened run meta-llama/Llama-2-7b-hf --criterion taylor --ratio 0.35 --calib bookcorpus \\
      --heal lora --data-dir data/ --bench 1,8,32 --out runs/llama-35 --push-to-hub me/llama-2-5.5b
  shortened run smollm2-135m --ratio 0.2 --gguf --gguf-outtype q8_0 --out runs/q8   # + a GGUF for llama.cpp

recipes (--recipe; --criterion, --heal and --protect-first override its parts):
{recipes}

--eval takes perplexity sets (wikitext2, ptb, heldout, or a text file) and zero-shot tasks (boolq, piqa,
hellaswag, winogrande, arc_easy, arc_challenge, openbookqa) in one list; the default is the paper's
(wikitext2, ptb and the seven tasks) with --data-dir, else 'heldout': text sampled from the original model.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..export import OUTTYPES
    from ..recipes import DEFAULT_RECIPE, RECIPES

    recipes = "\n".join(f"  {r.name:<6} {r.summary}: --criterion {r.criterion} --heal {r.heal}"
                        + (f" --protect-first {r.protect_first}" if r.protect_first is not None else "")
                        for r in RECIPES.values())
    p = sub.add_parser("run", help="score, prune, heal, evaluate, benchmark and write a model card",
                       description=__doc__, epilog=EXAMPLES.format(recipes=recipes), formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder: the final model, its card, and every stage")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULT_RECIPE,
                   help="criterion and healing used unless --criterion / --heal say otherwise")
    s = p.add_argument_group("selection")
    s.add_argument("--criterion", default=None,
                   help="block importance criterion (see 'shortened score --help'; default: the recipe's)")
    size = s.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=float, default=None, help="share of blocks to remove (default 0.2)")
    size.add_argument("--num-blocks", type=int, default=None, help="number of blocks to remove")
    s.add_argument("--protect-first", type=int, default=None, help="never remove the first K blocks (default: the criterion's)")
    s.add_argument("--protect-last", type=int, default=None, help="never remove the last M blocks (default: the criterion's)")
    s.add_argument("--iterative", action="store_true", help="remove one block at a time, re-scoring the rest")
    s.add_argument("--contiguous", action="store_true", help="remove one contiguous span of blocks")
    from .score import add_search_args

    add_search_args(p)
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default="self", help="calibration text: files/folders/globs, self, wikitext2, hf:NAME...")
    c.add_argument("--n-samples", type=int, default=10, help="calibration samples")
    c.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample")
    c.add_argument("--seed", type=int, default=1234, help="seed of the window sampling (and of --calib self, random)")
    h = p.add_argument_group("healing")
    from ..heal import methods

    h.add_argument("--heal", default=None, metavar="METHOD[,METHOD...]",
                   help=f"healing method or chain ({', '.join(methods())}; e.g. linear,reconstruct), or none "
                        "(default: the recipe's)")
    h.add_argument("--heal-data", default=None,
                   help="healing data (default: the recipe's kind from --data-dir (best: the calibration text or "
                        "the Gutenberg books; paper: Alpaca), else text sampled from the original model)")
    h.add_argument("--heal-steps", type=int, default=None, help="optimizer steps (default: the method's epochs)")
    h.add_argument("--heal-lr", type=float, default=None, help="learning rate (default: the method's)")
    h.add_argument("--heal-batch-size", type=int, default=None, help="micro-batch size")
    h.add_argument("--heal-grad-accum", type=int, default=None, help="gradient accumulation steps")
    h.add_argument("--heal-seq-len", type=int, default=None, help="training sequence length")
    h.add_argument("--heal-passes", type=float, default=None,
                   help="with --heal-steps: go this many times over a random subset of the healing text (default: "
                        "the recipe's, with its healing: best 4; 1 reads fresh text every step)")
    h.add_argument("--heal-mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="training precision (auto: bfloat16 autocast where the hardware has it, CUDA or a CPU with "
                        "AVX512-BF16/AMX; weights stay float32)")
    h.add_argument("--heal-max-time", type=float, default=None,
                   help="stop each training method of the chain after this many seconds")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", default=None, help="comma list of perplexity sets and tasks, or 'none'")
    add_data_dir_arg(e)
    e.add_argument("--eval-limit", type=int, default=None, help="first N chunks / items per set and task")
    e.add_argument("--eval-batch-size", type=int, default=8, help="evaluation batch size")
    e.add_argument("--eval-seq-len", type=int, default=128, help="perplexity chunk length (the paper: 128)")
    b = p.add_argument_group("benchmark")
    b.add_argument("--bench", default="1,8", help="batch sizes to benchmark, or 'none'")
    b.add_argument("--bench-output-lens", default="128", help="generated tokens per benchmark run")
    b.add_argument("--bench-repeats", type=int, default=3, help="timed runs per point")
    g = p.add_argument_group("export")
    add_save_dtype_arg(g)
    g.add_argument("--gguf", action="store_true",
                   help="also write the final model as OUT/model-OUTTYPE.gguf for llama.cpp and Ollama (needs "
                        "llama.cpp: 'make llamacpp' or $SHORTENED_LLAMA_CPP); the card names it and its SHA-256")
    g.add_argument("--gguf-outtype", default=None, choices=OUTTYPES, help="weight type in the GGUF file (default f32)")
    o = p.add_argument_group("control")
    o.add_argument("--force", action="store_true", help="re-run every stage even if it finished earlier")
    add_progress_arg(o)
    o.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the output folder to this Hub repo")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import ShortenedError
    from ..pipeline import RunConfig, run_pipeline
    from ..recipes import get_recipe

    from .score import search_options

    recipe = get_recipe(args.recipe)
    heal = args.heal if args.heal is not None else recipe.heal
    args.criterion = args.criterion or recipe.criterion
    ratio = args.ratio if args.ratio is not None or args.num_blocks is not None else 0.2
    search = search_options(args)  # the run's --seed reaches the search through RunConfig.seed
    ppl, tasks = _split_eval(args.eval)
    passes = args.heal_passes
    if passes is not None and args.heal_steps is None:
        raise ShortenedError("--heal-passes needs --heal-steps: it sizes the subset of the text those steps go over")
    if passes is None and args.heal is None and args.heal_steps is not None:
        passes = recipe.heal_passes  # the recipe's healing, as measured
    heal_options = {k: v for k, v in dict(steps=args.heal_steps, lr=args.heal_lr, batch_size=args.heal_batch_size,
                                          grad_accum=args.heal_grad_accum, seq_len=args.heal_seq_len,
                                          max_time=args.heal_max_time, passes=passes,
                                          mixed_precision=args.heal_mixed_precision).items()
                    if v is not None}
    if heal == "none":
        given = [key for key, value in vars(args).items() if key.startswith("heal_") and value is not None
                 and not (key == "heal_mixed_precision" and value == "auto")]  # the one --heal-* with a default
        if given:
            raise ShortenedError(f"--{given[0].replace('_', '-')} sets the healing, and --heal none turns it off")
    if args.bench_repeats < 1:
        raise ShortenedError("--bench-repeats must be at least 1")
    if args.gguf_outtype and not args.gguf:
        raise ShortenedError("--gguf-outtype sets the GGUF export, which --gguf turns on")
    config = RunConfig(
        model=args.model, out=Path(args.out), recipe=recipe.name, criterion=args.criterion,
        ratio=ratio, num_blocks=args.num_blocks,
        protect_first=args.protect_first if args.protect_first is not None else recipe.protect_first,
        protect_last=args.protect_last, iterative=args.iterative, contiguous=args.contiguous, search=search,
        calib=args.calib, n_samples=args.n_samples, seq_len=args.seq_len,
        seed=args.seed, heal=None if heal == "none" else heal, heal_data=args.heal_data,
        heal_data_kind=recipe.heal_data,
        heal_options=heal_options, data_dir=args.data_dir, eval_ppl=ppl, eval_tasks=tasks,
        eval_limit=args.eval_limit, eval_batch_size=args.eval_batch_size,
        eval_seq_len=args.eval_seq_len,
        bench_batch_sizes=[] if args.bench == "none" else parse_int_list(args.bench, "batch sizes"),
        bench_output_lens=parse_int_list(args.bench_output_lens, "output lengths"),
        bench_repeats=args.bench_repeats,
        load=load_options(args).kwargs(), progress=not args.no_progress,
        force=args.force, push_to_hub=args.push_to_hub, gguf=(args.gguf_outtype or "f32") if args.gguf else None,
        save_dtype=args.save_dtype, command_line=getattr(args, "command_line", None),
    )
    out = run_pipeline(config)
    if args.push_to_hub:
        _push(out, args.push_to_hub)
    print(f"\nmodel card: {out / 'README.md'}")
    return 0


def _split_eval(text: str | None) -> tuple[list[str] | None, list[str] | None]:
    """'wikitext2,ptb,boolq' -> (['wikitext2', 'ptb'], ['boolq']); None keeps the defaults."""
    if text is None:
        return None, None
    if text.strip().lower() == "none":
        return [], []
    from ..evaluation import PAPER_TASKS

    items = [t.strip() for t in text.split(",") if t.strip()]
    return [t for t in items if t not in PAPER_TASKS], [t for t in items if t in PAPER_TASKS]


def _push(folder, repo: str) -> None:
    from ..errors import ShortenedError

    try:
        from huggingface_hub import create_repo, upload_folder

        create_repo(repo, exist_ok=True)
        upload_folder(repo_id=repo, folder_path=str(folder), ignore_patterns=["stages/*", ".*"])
    except Exception as exc:  # network, auth: the run itself succeeded, say why the upload did not
        raise ShortenedError(f"the run finished in {folder}, but the upload to {repo} failed: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    print(f"uploaded {folder} to https://huggingface.co/{repo}")
