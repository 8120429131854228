"""The healing loop under `accelerate launch`: 2 CPU processes (gloo), DDP or FSDP2, train exactly like
1 process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_heal import pattern_data
    from tiny_models import tiny_model
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    from shortened.heal import heal

    for method in {methods!r}:
        r = heal(tiny_model("llama"), pattern_data(), method, steps=3, batch_size={batch_size},
                 grad_accum={grad_accum}, lr=1e-2, warmup_steps=1, eval_every=1, lora_dropout=0.0, progress=False)
        state = PartialState()  # after heal: its Accelerator sets the distributed state up
        dtensors = sum(isinstance(t, DTensor) for t in [*r.model.parameters(), *r.model.state_dict().values()])
        if state.is_main_process:
            json.dump({{"processes": state.num_processes, "train": r.run.train_log, "val": r.run.val_log,
                       "mode": AcceleratorState().distributed_type.value, "dtensors": dtensors}},
                      open({out!r} + f"/log-{{method}}.json", "w"))
            save_file({{k: v.contiguous() for k, v in r.model.state_dict().items()}},
                      {out!r} + f"/weights-{{method}}.safetensors")
''')

#: Under FSDP2: an uninterrupted run, one stopped after step 3 (checkpoints every step) and its resumption.
RESUME_WORKER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_heal import pattern_data
    from tiny_models import tiny_model
    from accelerate import PartialState
    from safetensors.torch import save_file
    from shortened.heal import heal

    class Interrupt(Exception):
        pass

    def stop(step, entry):
        if step == 3:
            raise Interrupt

    cfg = dict(steps=5, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, eval_every=2, lora_dropout=0.1,
               progress=False)
    runs = {{"full": heal(tiny_model("llama"), pattern_data(), "lora", checkpoint_dir={out!r} + "/a", **cfg)}}
    try:
        heal(tiny_model("llama"), pattern_data(), "lora", checkpoint_dir={out!r} + "/b", save_every=1, on_step=stop,
             **cfg)
    except Interrupt:
        pass
    runs["resumed"] = heal(tiny_model("llama"), pattern_data(), "lora", checkpoint_dir={out!r} + "/b", resume=True,
                           **cfg)
    if PartialState().is_main_process:
        for name, r in runs.items():
            json.dump({{"train": r.run.train_log, "val": r.run.val_log, "best_step": r.run.best_step}},
                      open({out!r} + f"/log-{{name}}.json", "w"))
            save_file({{k: v.contiguous() for k, v in r.model.state_dict().items()}},
                      {out!r} + f"/weights-{{name}}.safetensors")
''')


def _launch(tmp: Path, script_text: str, processes: int, fsdp: bool = False) -> str:
    """Run ``script_text`` in ``processes`` CPU processes under ``accelerate launch`` (DDP, or FSDP2); its
    stderr."""
    tmp.mkdir()
    script = tmp / "worker.py"
    script.write_text(script_text)
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # On CPU, `accelerate launch --cpu` only starts several processes through mpirun; --multi_gpu (or --use_fsdp)
    # with ACCELERATE_USE_CPU starts them with torch.distributed.run and accelerate picks gloo.
    mode = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"] if fsdp \
        else ["--multi_gpu"]
    cmd = [launcher, "launch", *mode, "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
           str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _results(tmp: Path, name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return json.loads((tmp / f"log-{name}.json").read_text()), load_file(str(tmp / f"weights-{name}.safetensors"))


def _heal_in_two(tmp: Path, methods: list[str], fsdp: bool = False) -> dict[str, tuple[dict, dict]]:
    """Each method healed by 2 processes with global batch 2 x 2 x 2 = 8: its log and weights."""
    _launch(tmp, WORKER.format(tests=str(Path(__file__).parent), methods=methods, batch_size=2, grad_accum=2,
                               out=str(tmp)), 2, fsdp)
    return {m: _results(tmp, m) for m in methods}


def _heal_in_one(method: str):
    """The same run in this process: global batch 4 x 2 = 8."""
    from test_heal import pattern_data
    from tiny_models import tiny_model

    from shortened.heal import heal

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return heal(tiny_model("llama"), pattern_data(), method, steps=3, batch_size=4, grad_accum=2, lr=1e-2,
                    warmup_steps=1, eval_every=1, lora_dropout=0.0, progress=False)
    finally:
        torch.set_num_threads(threads)


def _assert_same_run(two: dict, w2: dict, r, rtol: float) -> None:
    for key, log, log1 in (("loss", two["train"], r.run.train_log), ("val_loss", two["val"], r.run.val_log)):
        torch.testing.assert_close([e[key] for e in log], [e[key] for e in log1], rtol=rtol, atol=1e-6)
    assert r.run.train_log[-1]["loss"] < r.run.train_log[0]["loss"]
    w1 = r.model.state_dict()
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_equal_one(tmp_path):
    (two, w2), = _heal_in_two(tmp_path / "two", ["lora"]).values()
    assert two["processes"] == 2 and two["mode"] == "MULTI_CPU"
    _assert_same_run(two, w2, _heal_in_one("lora"), rtol=1e-5)


def test_fsdp2_equals_one_process(tmp_path):
    """FSDP2 on 2 CPU processes (gloo), each holding shards: the same losses as one process, and a plain
    model with the same whole weights (LoRA merged; every weight trained by full)."""
    runs = _heal_in_two(tmp_path / "two", ["lora", "full"], fsdp=True)
    for method, (two, w2) in runs.items():
        assert two["processes"] == 2 and two["mode"] == "FSDP", method
        assert two["dtensors"] == 0, method  # a plain model: whole tensors, no shards
        _assert_same_run(two, w2, _heal_in_one(method), rtol=1e-4)


def test_fsdp2_resume_gives_the_same_weights(tmp_path):
    """Checkpoints under FSDP2 (whole trainable and best weights, the optimizer gathered by name) resume
    into the same run as an uninterrupted one."""
    tmp = tmp_path / "two"
    stderr = _launch(tmp, RESUME_WORKER.format(tests=str(Path(__file__).parent), out=str(tmp)), 2, fsdp=True)
    assert stderr.count("resuming from step 3") == 2  # each process, from the checkpoint
    (full, a), (resumed, b) = _results(tmp, "full"), _results(tmp, "resumed")
    assert [e["step"] for e in resumed["train"]] == [1, 2, 3, 4, 5]
    assert resumed == full
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_modes_healing_does_not_gather_are_refused(monkeypatch):
    """FSDP1, DeepSpeed and Megatron processes hold shards the loop does not gather: refused in one line
    naming the launch that works, rather than a shard saved as the model. FSDP2 and DDP pass."""
    from types import SimpleNamespace

    import pytest
    from accelerate.utils import DistributedType

    from shortened.errors import ShortenedError
    from shortened.heal import check_distributed, fsdp_on_cpu

    for kind, version in ((DistributedType.FSDP, 1), (DistributedType.DEEPSPEED, None),
                          (DistributedType.MEGATRON_LM, None)):
        with pytest.raises(ShortenedError, match="--fsdp_version 2") as exc:
            check_distributed(kind, version)
        assert "\n" not in str(exc.value)
    check_distributed(DistributedType.FSDP, 2)
    check_distributed(DistributedType.MULTI_GPU)
    check_distributed(DistributedType.MULTI_CPU)
    check_distributed(DistributedType.NO)
    # An FSDP1 launch on CPU processes (which accelerate would run as DDP) is refused the same way.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ShortenedError, match="--fsdp_version 2"):
        fsdp_on_cpu(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2))
