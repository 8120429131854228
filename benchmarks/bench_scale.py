"""Scale: models with real shapes (random bf16 weights, SmolLM2's tokenizer) through the stages of a run, the
cost of each stage measured as models grow (issue 31).

Each shape's config is written by this script and its weights generated tensor by tensor straight into
sharded bf16 safetensors (no download, never a whole model in memory). Each stage is the CLI command a
user runs, in its own process; per stage: wall time, CPU time (user + system, the process and the children
it waited for), peak RSS (the largest VmHWM of the process and its children, polled), and bytes read from / written to disk by the stage's
main process (the page cache is dropped before each stage where this machine allows it, so the reads are
cold). Forward-only stages get a bound: their FLOPs over the fp32 GEMM rate measured in the same run.

    .venv/bin/python benchmarks/bench_scale.py --shapes llama-3.2-1b,llama-3.1-8b --work /tmp/scale \\
        --section benchmarks/results/scale.md

Stages a shape does not fit on this machine (24 GB RAM, 2 cores) are skipped with the memory they need.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from shortened.plan import GIB, Estimate, Machine, Request, Shape, plan

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

#: name -> (model_type, config fields): the published configs' shapes (rope scaling and other fields that do
#: not change the cost are left out).
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "qwen3-4b": ("qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                               max_position_embeddings=40960, rms_norm_eps=1e-6,
                               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
}
N_SAMPLES, SEQ_LEN = 10, 128       # calibration: the paper's sizes
EVAL_CHUNKS = 8                    # perplexity: the first 8 chunks of 128 tokens
HEAL_STEPS = 3
HEAL_EXAMPLES = 64                 # examples read for healing (5% of them validated)


def write_model(name: str, folder: Path, shard_bytes: int = 2 * GIB) -> dict[str, Any]:
    """Config, tokenizer and random bf16 weights of shape ``name`` in ``folder``; one shard in memory at a time."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from shortened.loading import resolve_local_folder
    from transformers import AutoTokenizer

    model_type, fields = SHAPES[name]
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_local_folder("smollm2-135m")))
    config = AutoConfig.for_model(model_type, **fields, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = {k: v for k, v in skeleton.state_dict().items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}
    params = sum(v.numel() for v in tensors.values())
    if (folder / "config.json").is_file() and (folder / "model.safetensors.index.json").is_file():
        return {"params": params, "bytes": 2 * params}  # written by an earlier run
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        index += 1
        file = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        shard, size = {}, 0

    for key, meta in tensors.items():
        if meta.dim() == 1:  # norms
            t = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(meta.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g).to(torch.bfloat16)
        if shard and size + t.numel() * 2 > shard_bytes:
            flush()
        shard[key] = t
        size += t.numel() * 2
    flush()
    total = index
    renamed = {}
    for i in range(1, total + 1):  # the Hub's names: model-0000i-of-0000n.safetensors
        old, new = f"model-{i:05d}.safetensors", f"model-{i:05d}-of-{total:05d}.safetensors"
        os.replace(folder / old, folder / new)
        renamed[old] = new
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * params}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}},
        indent=2))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"params": params, "bytes": 2 * params}


def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """fp32 matrix-multiply FLOP/s of this process's torch threads (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
    except (OSError, ValueError):
        return []
    return children + [d for c in children for d in _descendants(c)]


def disk_read_rate(folder: Path) -> float | None:
    """Bytes/s of a cold sequential read of ``folder``'s safetensors files; None where the cache cannot be dropped."""
    if not drop_caches():
        return None
    files = sorted(folder.glob("*.safetensors"))
    start = time.perf_counter()
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while chunk := f.read(64 * 2**20):
                total += len(chunk)
    return total / (time.perf_counter() - start)


def disk_write_rate(folder: Path, size: int = GIB) -> float:
    """Bytes/s of a sequential write of ``size`` bytes into ``folder``, synced to the disk."""
    path = folder / "write-test.bin"
    block = os.urandom(64 * 2**20)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    rate = size / (time.perf_counter() - start)
    path.unlink()
    return rate


def request(remove: int, criterion: str, offload: str | None = "disk") -> Request:
    """The plan's request for the stages as this script runs them."""
    return Request(criterion=criterion, n_samples=N_SAMPLES, seq_len=SEQ_LEN, remove=remove, offload=offload,
                   heal="reconstruct", heal_steps=HEAL_STEPS, heal_batch=1, heal_seq_len=SEQ_LEN,
                   heal_examples=HEAL_EXAMPLES, eval_chunks=EVAL_CHUNKS, eval_seq_len=SEQ_LEN, eval_batch=8,
                   bench_batch=1, bench_tokens=16)


def with_bridges(req: Request, pruned: Path) -> Request:
    """``req`` with the bridges reconstruct trains for the blocks the prune stage removed (the plan's worst case
    otherwise: a bridge of two blocks per removed block)."""
    from shortened.heal.reconstruct import find_bridges

    record = json.loads((pruned / "pruning.json").read_text())
    bridges = find_bridges(record["kept_blocks"], record["original_num_blocks"], "auto")
    return dataclasses.replace(req, heal_bridges=len(bridges), heal_bridge_blocks=max(b.count for b in bridges))


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd``; its wall and CPU time, peak RSS and disk bytes (see the module docstring)."""
    cold = drop_caches()
    io: dict[str, int] = {}
    # Peak RSS is each process's VmHWM (per address space, reset at exec), polled: the rusage of a child
    # counts the RSS of this (large) process at the fork that started it.
    hwm: dict[int, int] = {}
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll() -> None:  # /proc/PID/* vanish with the process: keep the last readings
            while not done.is_set():
                try:
                    for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines():
                        key, value = line.split(":")
                        io[key] = int(value)
                except (OSError, ValueError):
                    pass
                for pid in [proc.pid, *_descendants(proc.pid)]:
                    hwm[pid] = max(hwm.get(pid, 0), _vm_hwm(pid))
                done.wait(0.1)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": shlex.join(cmd), "rc": proc.returncode, "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": max(hwm.values(), default=0) / GIB,
            "read_gib": io.get("read_bytes", 0) / GIB, "written_gib": io.get("write_bytes", 0) / GIB,
            "cold_cache": cold}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--work", type=Path, default=Path("/tmp/shortened-scale"), help="models and outputs (deleted "
                    "at the end unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--ram-gib", type=float, default=None, help="memory a stage may use (default: this machine's)")
    ap.add_argument("--section", type=Path, help="write the BENCHMARKS.md section here")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    ap.add_argument("--merge", action="store_true", help="keep the other shapes' rows of --json (measured by an "
                    "earlier run) and replace those of the shapes measured now")
    ap.add_argument("--render", action="store_true", help="measure nothing: write the section and plot from "
                    "--json, the plan's estimates recomputed with the current cost model")
    args = ap.parse_args()
    if args.render:
        return render(args)

    exe = str(Path(sys.executable).with_name("shortened"))
    ram = args.ram_gib or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    calib = DATA / "gutenberg" if (DATA / "gutenberg").is_dir() else None
    args.work.mkdir(parents=True, exist_ok=True)
    if calib is None:  # text written here: the benchmark measures cost, not quality
        calib = args.work / "text.txt"
        calib.write_text(" ".join(f"word{i % 997} and the {i % 31} of it." for i in range(60000)))
    # perplexity reads one UTF-8 file: the calibration text's, decoded as calibration decodes it
    from shortened.data import read_text

    text = args.work / "eval.txt"
    text.write_text(read_text(calib if calib.is_file() else sorted(calib.glob("*.txt"))[0]), encoding="utf-8")
    rate = gemm_rate()
    write = disk_write_rate(args.work)
    print(f"fp32 GEMM rate {rate / 1e9:.1f} GFLOP/s, disk write {write / 2**20:.0f} MiB/s", flush=True)
    log = args.work / "log.txt"
    started = measure([exe, "score", "--help"], log)  # imports (torch, transformers): in every stage
    startup = started["wall_s"]
    print(f"process start {startup:.1f} s, {started['peak_rss_gib']:.2f} GiB", flush=True)
    results: list[dict[str, Any]] = []
    try:
        for name in args.shapes.split(","):
            model = args.work / name
            start = time.perf_counter()
            info = write_model(name, model)
            print(f"{name}: {info['params'] / 1e9:.2f}B parameters, {info['bytes'] / GIB:.1f} GiB bf16 "
                  f"({time.perf_counter() - start:.0f} s to write)", flush=True)
            disk = disk_read_rate(model)
            if disk:
                print(f"cold read {disk / 2**20:.0f} MiB/s", flush=True)
            remove = round(0.2 * shape_of(name).num_blocks)
            rates = {"gemm_gflops": rate / 1e9, "read_mib_s": (disk or 2e9) / 2**20, "write_mib_s": write / 2**20,
                     "ram_gib": ram}
            pruned, healed = args.work / f"{name}-pruned", args.work / f"{name}-healed"
            healed_disk = args.work / f"{name}-healed-disk"
            heal = [exe, "heal", str(pruned), "--method", "reconstruct", "--data", str(calib), "--steps",
                    str(HEAL_STEPS), "--batch-size", "1", "--grad-accum", "1", "--max-examples", str(HEAL_EXAMPLES),
                    "--seq-len", str(SEQ_LEN), "--device", "cpu", "--no-progress"]
            scores = args.work / f"{name}-bi.json"
            stages: list[tuple[str, list[str], str, Request]] = [
                # (stage, command, the plan's stage, the plan's request)
                ("score bi (--offload disk)", [exe, "score", str(model), "--criterion", "bi", "--offload", "disk",
                                               "--calib", str(calib), "--n-samples", str(N_SAMPLES), "--seq-len",
                                               str(SEQ_LEN), "--no-progress", "--out", str(scores), "--overwrite"],
                 "score", request(remove, "bi")),
                ("prune (--offload disk)", [exe, "prune", str(model), "--scores", str(scores), "--num-blocks",
                                            str(remove), "--offload", "disk", "--out", str(pruned), "--overwrite"],
                 "prune", request(remove, "bi")),
            ]
            if info["params"] < 2e9:
                stages.insert(1, ("score ppl (--offload disk)",
                                  [exe, "score", str(model), "--criterion", "ppl", "--offload", "disk", "--calib",
                                   str(calib), "--n-samples", str(N_SAMPLES), "--seq-len", str(SEQ_LEN),
                                   "--no-progress", "--out", str(args.work / f"{name}-ppl.json"), "--overwrite"],
                                  "score", request(remove, "ppl")))
            stages += [
                ("heal reconstruct", [*heal, "--out", str(healed), "--overwrite"],
                 "heal reconstruct", request(remove, "bi", offload=None)),
                ("heal reconstruct (--offload disk)", [*heal, "--offload", "disk", "--out", str(healed_disk),
                                                       "--overwrite"],
                 "heal reconstruct", request(remove, "bi")),
                ("eval perplexity", [exe, "eval", str(pruned), "--ppl", str(text), "--tasks", "none", "--limit",
                                     str(EVAL_CHUNKS), "--seq-len", str(SEQ_LEN), "--no-progress", "--out",
                                     str(args.work / f"{name}-eval.json"), "--overwrite"],
                 "eval perplexity", request(remove, "bi", offload=None)),
                ("eval perplexity (--offload disk)",
                 [exe, "eval", str(pruned), "--ppl", str(text), "--tasks", "none", "--limit", str(EVAL_CHUNKS),
                  "--seq-len", str(SEQ_LEN), "--offload", "disk", "--no-progress", "--out",
                  str(args.work / f"{name}-eval-disk.json"), "--overwrite"],
                 "eval perplexity", request(remove, "bi")),
                ("bench (b1, 16 tokens)", [exe, "bench", str(pruned), "--baseline", str(model), "--batch-sizes", "1",
                                           "--output-lens", "16", "--repeats", "1", "--sequential", "--overwrite",
                                           "--out", str(args.work / f"{name}-bench.json")],
                 "bench", request(remove, "bi")),
            ]
            for stage, cmd, planned, req in stages:
                if planned == "heal reconstruct" and req.offload == "disk" and (pruned / "pruning.json").is_file():
                    req = with_bridges(req, pruned)
                row: dict[str, Any] = {"shape": name, "params": info["params"], "stage": stage,
                                       "plan_stage": planned, "request": asdict(req), **rates}
                estimate = estimate_for(row)
                row.update(plan_memory_gib=estimate.memory_bytes / GIB, plan_seconds=estimate.seconds)
                if not estimate.fits:
                    row["skipped"] = skip_reason(row)
                    print(row, flush=True)
                    results.append(row)
                    continue
                row.update(measure(cmd, log))
                row.update(bounds(row, estimate))
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                       if k not in ("command", "request")}, flush=True)
                results.append(row)
                if row["rc"] != 0:
                    print(f"  failed: see {log}", flush=True)
            shutil.rmtree(pruned, ignore_errors=True)
            shutil.rmtree(healed, ignore_errors=True)
            shutil.rmtree(healed_disk, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(model, ignore_errors=True)
    finally:
        if not args.keep:
            for p in args.work.glob("*"):
                if p.name != "log.txt":
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    if args.merge and args.json.is_file():
        measured = {r["shape"] for r in results}
        earlier = json.loads(args.json.read_text())
        results = sorted([r for r in earlier["results"] if r["shape"] not in measured] + results,
                         key=lambda r: r["params"])
        command = f"{earlier.get('command', '')}; then {shlex.join(sys.argv[1:])}"
    else:
        command = shlex.join(sys.argv[1:])
    args.json.write_text(json.dumps({"gemm_gflops": rate / 1e9, "write_mib_s": write / 2**20, "ram_gib": ram,
                                     "startup_s": startup, "startup_rss_gib": started["peak_rss_gib"], "command": command,
                                     "results": results}, indent=1))
    text = section(results, rate, startup, command)
    if args.section:
        write_section(args.section, text)
        plot(results, args.section.with_suffix(".png"))
    print(text)
    return 0


@functools.lru_cache(maxsize=None)
def shape_of(name: str) -> Shape:
    """The plan's counts for shape ``name`` (its config, bf16 as the script writes it)."""
    model_type, fields = SHAPES[name]
    return Shape.from_config(AutoConfig.for_model(model_type, **fields, dtype="bfloat16"))


def machine_of(row: dict[str, Any]) -> Machine:
    """This machine with the rates measured in the row's run."""
    return Machine("cpu", gemm_flops=row["gemm_gflops"] * 1e9, read_bytes_s=row["read_mib_s"] * 2**20,
                   write_bytes_s=row["write_mib_s"] * 2**20, memory_bytes=row["ram_gib"] * GIB)


def estimate_for(row: dict[str, Any]) -> Estimate:
    """The plan's estimate of a row's stage, for its shape, request and the rates measured with it."""
    return next(e for e in plan(shape_of(row["shape"]), machine_of(row), Request(**row["request"]))
                if e.stage == row["plan_stage"])


def bounds(row: dict[str, Any], estimate: Estimate) -> dict[str, float]:
    """What a measured stage cannot beat: its FLOPs over the GEMM rate, or its disk traffic (cold reads at the
    read rate, writes past what the page cache takes at the write rate), the larger of the two."""
    machine = machine_of(row)
    compute = estimate.flops / machine.gemm_flops
    io = row["read_gib"] * GIB / machine.read_bytes_s + machine.write_seconds(row["written_gib"] * GIB)
    return {"compute_s": compute, "io_s": io, "bound_s": max(compute, io)}


def skip_reason(row: dict[str, Any]) -> str:
    return f"the plan puts it at {row['plan_memory_gib']:.0f} GiB, this machine has {row['ram_gib']:.0f}"


def replan(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the plan's estimate recomputed by the current cost model, for the row's rates."""
    estimate = estimate_for(row)
    row = {**row, "plan_memory_gib": estimate.memory_bytes / GIB, "plan_seconds": estimate.seconds}
    if "wall_s" in row:
        row.update(bounds(row, estimate))
    if "skipped" in row:
        row["skipped"] = skip_reason(row)
    return row


def write_section(path: Path, text: str) -> None:
    """Write the section, keeping the dated reading an earlier version of the file ends with."""
    old = path.read_text() if path.is_file() else ""
    reading = old[old.index("\nReading ("):] if "\nReading (" in old else ""
    path.write_text(text + reading)


def render(args: argparse.Namespace) -> int:
    data = json.loads(args.json.read_text())
    results = [replan(r) for r in data["results"]]
    text = section(results, data["gemm_gflops"] * 1e9, data["startup_s"], data["command"])
    if args.section:
        write_section(args.section, text)
        plot(results, args.section.with_suffix(".png"))
    print(text)
    return 0


def section(results: list[dict[str, Any]], rate: float, startup: float, command: str) -> str:
    ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB)
    rates = " and ".join(sorted({f"{r['gemm_gflops']:.0f}" for r in results if "gemm_gflops" in r}))
    lines = ["## Scale: real shapes through every stage (issue 31)", "",
             f"Random bf16 weights in the published shapes, SmolLM2's tokenizer, on this machine "
             f"({platform.machine()}, {os.cpu_count()} cores, {ram} GiB RAM, no GPU); fp32 GEMM rate measured in "
             f"each run: {rates} GFLOP/s; a command's start (imports) takes {startup:.1f} s of every "
             f"stage's wall time. Calibration: {N_SAMPLES} x {SEQ_LEN} tokens of book text; 20% of the blocks "
             f"removed; healing {HEAL_STEPS} steps of 1 x {SEQ_LEN} tokens ({HEAL_EXAMPLES} examples read, 5% of "
             f"them validated); perplexity on {EVAL_CHUNKS} chunks of {SEQ_LEN}. Peak RSS: the largest VmHWM "
             "of the stage's processes, polled; read/written: the stage's main process, page cache dropped before each stage. "
             "Bound: the stage's FLOPs over the GEMM rate, or its disk traffic (cold reads; writes past the page cache's dirty limit, 20% of RAM) over the disk's sequential rates "
             "measured in the run, whichever is larger. Plan: what `shortened plan` estimates for the stage, "
             "from the config and the same rates.", "",
             "| shape | parameters | stage | wall s | CPU s | peak RSS GiB | read GiB | written GiB | bound s | "
             "wall / bound | plan: GiB, s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        head = f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {r['stage']} |"
        planned = f"{r['plan_memory_gib']:.1f}, {r['plan_seconds']:.0f}"
        if "skipped" in r:
            lines.append(f"{head} not run: {r['skipped']} | | | | | | | {planned} |")
            continue
        # bench decodes one token at a time: memory traffic and loading, not FLOPs or disk, set its time
        bound = (f"{r['bound_s']:.1f} | {r['wall_s'] / r['bound_s']:.2f}" if r.get("bound_s") and
                 r["plan_stage"] != "bench" else " | ")
        failed = "" if r["rc"] == 0 else " (failed)"
        lines.append(f"{head} {r['wall_s']:.1f}{failed} | {r['cpu_s']:.1f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['read_gib']:.2f} | {r['written_gib']:.2f} | {bound} | {planned} |")
    runs = "`; then `".join(f".venv/bin/python benchmarks/bench_scale.py {c.strip()}" for c in command.split("; then "))
    lines += ["", f"Written by `{runs}`; "
              "raw figures in `benchmarks/results/scale.json`, plot `scale.png`."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    from shortened.plots import plot_two_panels

    lines = []
    for stage in dict.fromkeys(r["stage"] for r in results):
        rows = sorted((r for r in results if r["stage"] == stage and "wall_s" in r and r["rc"] == 0),
                      key=lambda r: r["params"])
        if rows:
            lines.append((stage, "-o", [r["params"] / 1e9 for r in rows], [r["wall_s"] for r in rows],
                          [r["peak_rss_gib"] for r in rows]))
    plot_two_panels(lines, path, xlabel="parameters (billions)", ylabels=("wall time (s)", "peak RSS (GiB)"),
                    title="Cost of each stage against model size (2 CPU cores)")


if __name__ == "__main__":
    sys.exit(main())
