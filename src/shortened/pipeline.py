"""``shortened run``: score, prune, heal, evaluate, benchmark and write the model card, as resumable stages.

Layout of the output folder ``OUT``::

    OUT/                      the final model (healed if healing ran), a ready Hugging Face model repo
      README.md               the model card
      pruning.json            the run record
      scores.png, bench.png, loss.png, results/*.json
      model-OUTTYPE.gguf      with --gguf: the final model for llama.cpp and Ollama
      stages/                 every stage's own output (kept; a re-run skips finished stages)
        calibration/ scores/ pruned/ healed/ heldout/ eval-dense/ eval-pruned/ eval-healed/ bench/ gguf/
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ShortenedError
from .io import RECORD_FILE, read_json, write_file, write_json, write_text
from .stages import STAGE_FILE, StageRunner

#: Files of the final model copied (hard-linked when possible) from its stage folder to OUT.
_MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".txt", ".gguf")
#: Plots put beside the model: (stage, file); stage None is the final model's own stage.
_PLOTS: tuple[tuple[str | None, str], ...] = (("scores", "scores.png"), ("scores", "scores-search.png"),
                                              ("bench", "bench.png"), (None, "loss.png"))
HEAL_TEXT_SAMPLES = 32  # texts sampled from the source model for healing when no healing data is at hand
HELDOUT_NOTE = ("Perplexity on held-out text sampled from the dense model itself (no data folder was given): "
                "a quick sanity check of how much of the original distribution survives, not a benchmark.")


@dataclass
class RunConfig:
    """Every setting of a ``shortened run``; stages record the parts they depend on."""

    model: str
    out: Path
    recipe: str | None = None  # recorded: the recipe the CLI filled the unset settings from
    # selection
    criterion: str = "ppl"
    ratio: float | None = None
    num_blocks: int | None = None
    protect_first: int | None = None
    protect_last: int | None = None
    iterative: bool = False
    contiguous: bool = False
    search: dict[str, Any] = field(default_factory=dict)  # options of criterion "search" (generations, ...)
    # calibration
    calib: str = "self"
    n_samples: int = 10
    seq_len: int = 128
    seed: int = 1234
    # healing (None: no healing)
    heal: str | None = None  # a method or chain ("linear,reconstruct")
    heal_data: str | None = None
    heal_data_kind: str = "alpaca"  # without heal_data: "alpaca" or "books" from data_dir (recipes.py)
    heal_options: dict[str, Any] = field(default_factory=dict)
    # evaluation
    data_dir: str | None = None
    eval_ppl: Sequence[str] | None = None      # None: wikitext2,ptb with a data dir, else held-out text
    eval_tasks: Sequence[str] | None = None    # None: the seven tasks with a data dir, else none
    eval_limit: int | None = None
    eval_batch_size: int = 8
    eval_seq_len: int = 128
    heldout_samples: int = 8
    # benchmark (empty batch sizes: no benchmark)
    bench_batch_sizes: Sequence[int] = (1, 8)
    bench_output_lens: Sequence[int] = (128,)
    bench_repeats: int = 3
    # loading and control
    load: dict[str, Any] = field(default_factory=dict)  # the fields of loading.LoadOptions
    progress: bool = True
    force: bool = False
    push_to_hub: str | None = None
    save_dtype: str = "source"  # dtype of the saved models: the source checkpoint's, or one of loading.SAVE_DTYPES
    gguf: str | None = None  # a GGUF outtype: export the final model for llama.cpp at the end; None: no export
    command_line: str | None = None  # recorded only: the command that started the run

    def check(self) -> None:
        """Refuse bad settings before any (slow) work; the block count is checked against the model later."""
        from .choose import check_choice

        if (self.ratio is None) == (self.num_blocks is None):
            raise ShortenedError("give exactly one of --ratio and --num-blocks")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ShortenedError(f"ratio must be strictly between 0 and 1, got {self.ratio}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ShortenedError(f"number of blocks to remove must be positive, got {self.num_blocks}")
        check_choice(self.criterion, iterative=self.iterative, contiguous=self.contiguous)
        if self.heal is not None:
            from .heal import parse_chain

            parse_chain(self.heal)
        if self.heal_data_kind not in ("alpaca", "books"):
            raise ShortenedError(f"heal_data_kind must be alpaca or books, got '{self.heal_data_kind}'")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ShortenedError(f"data folder not found: {self.data_dir}")
        self._check_inputs()

    def _check_inputs(self) -> None:
        """Every input and number a later stage reads, so that a mistake fails in a second, not after the
        stages before it (scoring, healing) have run for minutes or hours."""
        from .bench import check_settings
        from .criteria import get_criterion
        from .data import check_source
        from .evaluation import check_request
        from .loading import SAVE_DTYPES, check_device

        check_device(self.load.get("device"))
        if self.save_dtype not in SAVE_DTYPES:
            raise ShortenedError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got '{self.save_dtype}'")
        for flag, value, low in (("--n-samples", self.n_samples, 1), ("--seq-len", self.seq_len, 2)):
            if value < low:
                raise ShortenedError(f"{flag} must be at least {low}, got {value}")
        if get_criterion(self.criterion).needs_data:
            check_source(self.calib)
        if self.heal is not None:
            self._check_heal_options()
            if self.heal_data:
                from .heal.data import check_healing_source

                check_healing_source(self.heal_data)
        check_request(self.ppl_sets, self.task_names, data_dir=self.data_dir, limit=self.eval_limit,
                      seq_len=self.eval_seq_len, batch_size=self.eval_batch_size, names=("heldout",),
                      flag_prefix="--eval-")
        if self.bench_batch_sizes:
            check_settings(self.bench_batch_sizes, self.bench_output_lens, repeats=self.bench_repeats)
        self._check_family()

    def _check_family(self) -> None:
        """A model whose blocks cannot be renumbered exactly is refused from its config, before any stage."""
        from .loading import LoadOptions, local_config
        from .surgery import check_config

        options = {k: v for k, v in self.load.items() if k in ("cache_dir", "trust_remote_code", "revision")}
        config = local_config(self.model, LoadOptions(**options))
        if config is not None:
            check_config(config)
        if self.gguf is not None:  # llama.cpp present and able to take this architecture, before any stage
            from .export import check_gguf_export

            check_gguf_export(config.to_dict() if config is not None else None, self.gguf)

    def _check_heal_options(self) -> None:
        o = self.heal_options
        for key, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seq_len", 2)):
            if o.get(key) is not None and o[key] < low:
                raise ShortenedError(f"--heal-{key.replace('_', '-')} must be at least {low}, got {o[key]}")
        for key in ("lr", "max_time", "passes"):
            if o.get(key) is not None and not o[key] > 0:
                raise ShortenedError(f"--heal-{key.replace('_', '-')} must be positive, got {o[key]}")

    @property
    def ppl_sets(self) -> list[str]:
        """The perplexity sets evaluated: ``eval_ppl``, else the paper's with a data folder, else held-out text."""
        if self.eval_ppl is not None:
            return list(self.eval_ppl)
        return ["wikitext2", "ptb"] if self.data_dir else ["heldout"]

    @property
    def task_names(self) -> list[str]:
        """The zero-shot tasks evaluated: ``eval_tasks``, else the paper's seven with a data folder, else none."""
        if self.eval_tasks is not None:
            return list(self.eval_tasks)
        from .evaluation import PAPER_TASKS

        return list(PAPER_TASKS) if self.data_dir else []


#: Load options that change what a loaded model computes, with their defaults (the keys of LoadOptions).
_SOURCE_DEFAULTS: dict[str, Any] = {"dtype": "auto", "revision": None, "trust_remote_code": False}


class Pipeline:
    """Runs the stages of a ``RunConfig``; each stage is a method, the dense model is loaded once."""

    def __init__(self, config: RunConfig, log: Callable[[str], None] = print):
        self.c = config
        self.out = Path(config.out)
        self.log = log
        self.stages = StageRunner(self.out / "stages", force=config.force, log=log)
        self._dense: tuple[Any, Any] | None = None
        self._data_labels: dict[str, str] = {}  # data paths the card describes instead (text sampled by the run)

    # -- helpers -----------------------------------------------------------------------------------
    def dense(self) -> tuple[Any, Any]:
        if self._dense is None:
            from .loading import load_model

            self._dense = load_model(self.c.model, **self.c.load)
        return self._dense

    def _load(self, folder: Path) -> tuple[Any, Any]:
        from .loading import load_model

        return load_model(str(folder), **self.c.load)

    @property
    def source(self) -> str | dict[str, Any]:
        """The source model as the stages that load it depend on it: its spec, plus the load options that
        change its weights or numerics (dtype, revision, remote code) where they differ from the defaults,
        so that changing one re-runs those stages (and, through their tokens, everything after them)."""
        changed = {k: self.c.load.get(k) for k, default in _SOURCE_DEFAULTS.items() if self.c.load.get(k, default) != default}
        return {"model": self.c.model, **changed} if changed else self.c.model

    # -- stages ------------------------------------------------------------------------------------
    def calibration(self) -> tuple[torch.Tensor, dict[str, Any]]:
        from safetensors.torch import load_file, save_file

        from .choose import calibration_for

        settings = dict(model=self.source, calib=self.c.calib, n_samples=self.c.n_samples,
                        seq_len=self.c.seq_len, seed=self.c.seed)

        def work(tmp: Path) -> None:
            model, tokenizer = self.dense()
            calib = calibration_for(self.c.criterion, self.c.calib, tokenizer, model, n_samples=self.c.n_samples,
                                    seq_len=self.c.seq_len, seed=self.c.seed)
            assert calib is not None, "the calibration stage runs only for criteria that need data"
            save_file({"input_ids": calib.ids.contiguous()}, str(tmp / "calibration.safetensors"))
            write_json(tmp / "calibration.json", calib.info)

        folder = self.stages.run("calibration", settings, work)
        return load_file(str(folder / "calibration.safetensors"))["input_ids"], read_json(folder / "calibration.json")

    def selection(self) -> dict[str, Any]:
        """Score the blocks and choose the ones to remove; returns the ``selection`` record."""
        from .criteria import get_criterion

        settings = dict(model=self.source, criterion=self.c.criterion, ratio=self.c.ratio,
                        num_blocks=self.c.num_blocks, protect_first=self.c.protect_first,
                        protect_last=self.c.protect_last, iterative=self.c.iterative, contiguous=self.c.contiguous,
                        search=self.c.search)
        criterion = get_criterion(self.c.criterion)
        # --seed reaches the criteria that take one (random, search); only their stage depends on it
        seeded = {"seed": self.c.seed} if criterion.takes_seed else {}
        settings.update(seeded)
        needs_data = criterion.needs_data
        if needs_data:
            ids, calib = self.calibration()
            settings["calibration"] = self.stages.token("calibration")
        else:
            ids, calib = None, None

        def work(tmp: Path) -> None:
            from .choose import choose
            from .scores import BlockScores
            from .scores_files import output_paths, scores_record, write_scores_files

            model, _ = self.dense()
            options = {**(self.c.search if self.c.criterion == "search" else {}), **seeded}
            selection = choose(model, ids, self.c.criterion, num_blocks=self.c.num_blocks, ratio=self.c.ratio,
                               protect_first=self.c.protect_first, protect_last=self.c.protect_last,
                               iterative=self.c.iterative, contiguous=self.c.contiguous, calibration_info=calib,
                               options=options, progress=self.c.progress)
            record = scores_record(self.c.model, model, BlockScores.from_dict(selection["scores"]), calib)
            write_scores_files(record, output_paths(str(tmp / "scores.json"), search=self.c.criterion == "search"),
                               highlight=selection["removed"])
            write_json(tmp / "selection.json", selection)

        folder = self.stages.run("scores", settings, work)
        return read_json(folder / "selection.json")

    @functools.cached_property
    def source_dtype(self) -> torch.dtype | None:
        """The dtype the source checkpoint is stored in (None where its config does not say)."""
        from .loading import LoadOptions, checkpoint_dtype

        return checkpoint_dtype(self.c.model, LoadOptions(**self.c.load))

    @property
    def save_dtype(self) -> torch.dtype | None:
        """The dtype the pruned and healed models are saved in (None: as computed)."""
        from .loading import save_dtype

        return save_dtype(self.c.save_dtype, self.source_dtype)

    def pruned(self) -> Path:
        selection = self.selection()
        settings = {"scores": self.stages.token("scores"), "model": self.source, "save_dtype": self.c.save_dtype}

        def work(tmp: Path) -> None:
            from .io import pruning_record, save_model
            from .loading import dtype_name, load_model
            from .surgery import remove_blocks

            # A fresh copy: the dense model stays intact for evaluation and as the teacher.
            model, tokenizer = load_model(self.c.model, **self.c.load)
            n = len(selection["scores"]["scores"])
            kept = remove_blocks(model, selection["removed"])
            record = pruning_record(self.c.model, n, kept, model_type=model.config.model_type, selection=selection)
            record["source_dtype"] = dtype_name(self.source_dtype)
            save_model(model, tokenizer, tmp / "model", record, dtype=self.save_dtype)
            for item in (tmp / "model").iterdir():
                os.replace(item, tmp / item.name)
            (tmp / "model").rmdir()

        return self.stages.run("pruned", settings, work)

    def heal_text(self) -> str:
        """Healing data: the user's; else the recipe's kind, books (the calibration text when it is local
        files, else the data folder's Gutenberg books) or Alpaca from the data folder; else text sampled
        from the dense model."""
        if self.c.heal_data:
            return self.c.heal_data
        if self.c.heal_data_kind == "books" and self.c.calib != "self" and Path(self.c.calib).exists():
            return self.c.calib
        if self.c.data_dir:
            name = "gutenberg" if self.c.heal_data_kind == "books" else "alpaca/alpaca_data_2k_subset.json"
            if (Path(self.c.data_dir) / name).exists():
                return str(Path(self.c.data_dir) / name)
        seed = self.c.seed + 2
        path = str(self._sampled_text("heal-data", n=HEAL_TEXT_SAMPLES, seed=seed) / "heal-data.txt")
        self._data_labels[path] = (f"text sampled from the source model ({HEAL_TEXT_SAMPLES} samples of "
                                   f"{self.c.seq_len} tokens, seed {seed})")
        return path

    def healed(self, pruned: Path) -> Path | None:
        if self.c.heal is None:
            return None
        data = self.heal_text()
        settings = {"pruned": self.stages.token("pruned"), "method": self.c.heal, "data": data,
                    "options": self.c.heal_options}

        def work(tmp: Path) -> None:
            from .heal import heal
            from .loading import LoadOptions

            from .heal import parse_chain

            needs_teacher = any(m.needs_teacher for m in parse_chain(self.c.heal))
            teacher = self.dense()[0] if needs_teacher else None
            out = tmp / "model"
            heal(str(pruned), data, self.c.heal, out=out, teacher=teacher, checkpoint_dir=tmp / "checkpoints",
                 load=LoadOptions(**self.c.load), progress=self.c.progress, save_dtype=self.save_dtype,
                 **self.c.heal_options)
            for item in out.iterdir():
                os.replace(item, tmp / item.name)
            out.rmdir()
            shutil.rmtree(tmp / "checkpoints", ignore_errors=True)

        return self.stages.run("healed", settings, work)

    def _sampled_text(self, name: str, n: int, seed: int) -> Path:
        settings = dict(model=self.source, n=n, seq_len=self.c.seq_len, seed=seed)

        def work(tmp: Path) -> None:
            from .data import calibration_ids

            model, tokenizer = self.dense()  # same sampler as --calib self, another seed: unseen text
            ids = calibration_ids("self", tokenizer, n_samples=n, seq_len=self.c.seq_len, seed=seed, model=model)
            text = "\n\n".join(tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids)
            (tmp / f"{name}.txt").write_text(text + "\n")

        return self.stages.run(name, settings, work)

    def evaluation(self, role: str, folder: Path | None, name: str) -> dict[str, Any]:
        ppl = self.c.ppl_sets
        if "heldout" in ppl:
            held = self._sampled_text("heldout", n=self.c.heldout_samples, seed=self.c.seed + 1)
            ppl = [str(held / "heldout.txt") if p == "heldout" else p for p in ppl]
        settings = dict(model=self.source if folder is None else self.stages.token(folder.name), ppl=ppl,
                        tasks=self.c.task_names, data_dir=self.c.data_dir, limit=self.c.eval_limit,
                        seq_len=self.c.eval_seq_len, batch_size=self.c.eval_batch_size)

        def work(tmp: Path) -> None:
            from .evaluation import evaluate

            model, tokenizer = self.dense() if folder is None else self._load(folder)
            result = evaluate(model, tokenizer, ppl=ppl, tasks=self.c.task_names, data_dir=self.c.data_dir,
                              limit=self.c.eval_limit, batch_size=self.c.eval_batch_size,
                              seq_len=self.c.eval_seq_len, name=name, progress=self.c.progress)
            write_json(tmp / "results.json", result)

        done = self.stages.run(f"eval-{role}", settings, work)
        return read_json(done / "results.json")

    def benchmark(self, final: Path) -> dict[str, Any] | None:
        if not self.c.bench_batch_sizes:
            return None
        settings = dict(model=self.c.model, final=self.stages.token(final.name),
                        batch_sizes=list(self.c.bench_batch_sizes), output_lens=list(self.c.bench_output_lens),
                        repeats=self.c.bench_repeats, load=self.c.load)

        def work(tmp: Path) -> None:
            from .bench import plot_bench, run_benchmark
            from .loading import resolve_local_folder

            source = resolve_local_folder(self.c.model, self.c.load.get("cache_dir"))
            result = run_benchmark(str(final), str(source) if source else self.c.model, load_kwargs=self.c.load,
                                   batch_sizes=list(self.c.bench_batch_sizes),
                                   output_lens=list(self.c.bench_output_lens), repeats=self.c.bench_repeats)
            result["models"]["baseline"]["model"] = self.c.model
            write_json(tmp / "bench.json", result)
            plot_bench(result, str(tmp / "bench.png"))

        done = self.stages.run("bench", settings, work)
        return read_json(done / "bench.json")

    def gguf(self, final: Path) -> dict[str, Any] | None:
        """The final model as a GGUF file for llama.cpp (``shortened export``), named after its weight type."""
        if self.c.gguf is None:
            return None
        settings = dict(final=self.stages.token(final.name), outtype=self.c.gguf)

        def work(tmp: Path) -> None:
            from .export import export_gguf

            info = export_gguf(final, tmp / f"model-{self.c.gguf}.gguf", outtype=self.c.gguf)
            info["file"] = Path(info["file"]).name
            info.pop("converter")  # a path on this machine: the record says what, not where
            write_json(tmp / "gguf.json", info)

        done = self.stages.run("gguf", settings, work)
        info = read_json(done / "gguf.json")
        return info | {"path": str(done / info["file"])}

    # -- the whole run -----------------------------------------------------------------------------
    def run(self) -> Path:
        pruned = self.pruned()
        healed = self.healed(pruned)
        final = healed or pruned
        evaluations: list[tuple[str, dict[str, Any]]] = []
        if self.c.ppl_sets or self.c.task_names:  # --eval none: no evaluation stage at all
            evaluations = [("original", self.evaluation("dense", None, "original")),
                           ("pruned, one-shot", self.evaluation("pruned", pruned, "pruned, one-shot"))]
        if healed is not None and evaluations:
            name = f"pruned + {self.c.heal}"
            evaluations.append((name, self.evaluation("healed", healed, name)))
        bench = self.benchmark(final)
        self.assemble(final, evaluations, bench, self.gguf(final))
        return self.out

    def assemble(self, final: Path, evaluations: list[tuple[str, dict[str, Any]]], bench: dict[str, Any] | None,
                 gguf: dict[str, Any] | None = None) -> None:
        """Put the final model, plots, results, the GGUF file and the model card at the top of OUT."""
        from .card import model_card, source_license
        from .loading import resolve_local_folder

        model_files = set()
        for item in final.iterdir():
            if item.is_file() and item.suffix in _MODEL_FILE_SUFFIXES and item.name != STAGE_FILE:
                _link_or_copy(item, self.out / item.name)
                model_files.add(item.name)
        if gguf is not None:
            _link_or_copy(Path(gguf.pop("path")), self.out / gguf["file"])
            model_files.add(gguf["file"])
        plots = []
        for stage, name in _PLOTS:
            src = self.stages.folder(stage if stage else final.name) / name
            if src.is_file():
                _link_or_copy(src, self.out / name)
                plots.append(name)
        results = self.out / "results"
        written = {f"eval-{_slug(role)}.json" for role, _ in evaluations} | ({"bench.json"} if bench else set())
        if written:
            results.mkdir(exist_ok=True)
        for role, r in evaluations:
            write_json(results / f"eval-{_slug(role)}.json", r)
        if bench:
            write_json(results / "bench.json", bench)
        # What an earlier run with other settings put here and this one did not (a loss plot after --heal
        # none, another model's results) would be published with this model: remove it.
        stale = [p for p in self.out.iterdir() if p.is_file() and not p.name.startswith(".") and
                 ((p.suffix in _MODEL_FILE_SUFFIXES and p.name not in model_files and p.name != RECORD_FILE) or
                  (p.name in {n for _, n in _PLOTS} and p.name not in plots))]
        if results.is_dir():
            stale += [p for p in results.iterdir() if p.is_file() and p.name not in written]
        for path in stale:
            path.unlink()
        if results.is_dir() and not any(results.iterdir()):
            results.rmdir()
        record = read_json(final / RECORD_FILE)
        record["run"] = {"config": _jsonable(dataclasses.asdict(self.c)), "stages_run": self.stages.ran,
                         "stages_skipped": self.stages.skipped}
        write_json(self.out / RECORD_FILE, record)
        local = resolve_local_folder(self.c.model, self.c.load.get("cache_dir"))
        notes = [HELDOUT_NOTE] if "heldout" in self.c.ppl_sets else []
        card = model_card(record, evaluations=evaluations, bench=bench, plots=plots, data_labels=self._data_labels,
                          license=source_license(self.c.model, local), notes=notes, repo_name=self.c.push_to_hub,
                          gguf=gguf)
        write_text(self.out / "README.md", card)


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and os.path.samefile(src, dst):
        return  # already linked (renaming a hard link onto itself would leave the temporary name behind)

    def link(tmp: Path) -> None:
        tmp.unlink()  # the atomic writer's empty temporary: the link takes its name
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)

    write_file(dst, link)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def run_pipeline(config: RunConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) every stage of ``config`` and return the output folder."""
    from .io import output_lock

    config.check()
    new = not Path(config.out).exists()
    _check_output(config)
    with output_lock(config.out):  # a second run into the same folder fails at start
        try:
            return Pipeline(config, log).run()
        except BaseException:
            finished = sorted(m.parent.name for m in (Path(config.out) / "stages").glob(f"*/{STAGE_FILE}"))
            if new and not finished:  # nothing worth resuming: leave no folder behind
                shutil.rmtree(config.out, ignore_errors=True)
            elif finished:
                log(f"finished stages kept in {Path(config.out) / 'stages'} ({', '.join(finished)}): "
                    "the same command resumes after them")
            raise


def _check_output(config: RunConfig) -> None:
    from .loading import resolve_local_folder

    out = Path(config.out).resolve()
    source = resolve_local_folder(config.model, config.load.get("cache_dir"))
    if source is not None:
        src = Path(source).resolve()
        if out == src or src in out.parents:
            raise ShortenedError(f"the output {config.out} lies inside the source model folder {source}")
    if out.exists() and not out.is_dir():
        raise ShortenedError(f"output {config.out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (out / "stages").is_dir():
        raise ShortenedError(f"output {config.out} exists and is not a 'shortened run' folder; choose another")
    try:
        (out / "stages").mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ShortenedError(f"cannot write to {config.out}: {exc.strerror or exc}") from None
