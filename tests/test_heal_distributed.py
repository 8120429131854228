"""The healing loop under `accelerate launch`: 2 CPU processes (gloo) train exactly like 1 process
with the same global batch."""

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
    from safetensors.torch import save_file
    from shortened.heal import heal

    r = heal(tiny_model("llama"), pattern_data(), {method!r}, steps=3, batch_size={batch_size}, grad_accum={grad_accum},
             lr=1e-2, warmup_steps=1, eval_every=1, lora_dropout=0.0, progress=False)
    state = PartialState()  # after heal: its Accelerator sets the distributed state up
    if state.is_main_process:
        json.dump({{"processes": state.num_processes, "train": r.run.train_log, "val": r.run.val_log}},
                  open({out!r} + "/log.json", "w"))
        save_file({{k: v.contiguous() for k, v in r.model.state_dict().items()}}, {out!r} + "/weights.safetensors")
''')


def _launch(tmp: Path, method: str, processes: int, batch_size: int, grad_accum: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    tmp.mkdir()
    script = tmp / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), method=method, batch_size=batch_size,
                                    grad_accum=grad_accum, out=str(tmp)))
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # On CPU, `accelerate launch --cpu` only starts several processes through mpirun; --multi_gpu with
    # ACCELERATE_USE_CPU starts them with torch.distributed.run and accelerate picks gloo.
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
           str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "log.json").read_text()), load_file(str(tmp / "weights.safetensors"))


def test_two_processes_equal_one(tmp_path):
    from test_heal import pattern_data
    from tiny_models import tiny_model

    from shortened.heal import heal

    two, w2 = _launch(tmp_path / "two", "lora", 2, batch_size=2, grad_accum=2)  # 2 x 2 x 2 = 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the same run in this process: global batch 4 x 2 = 8
        r = heal(tiny_model("llama"), pattern_data(), "lora", steps=3, batch_size=4, grad_accum=2, lr=1e-2,
                 warmup_steps=1, eval_every=1, lora_dropout=0.0, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert two["processes"] == 2
    torch.testing.assert_close([e["loss"] for e in two["train"]], [e["loss"] for e in r.run.train_log], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close([e["val_loss"] for e in two["val"]], [e["val_loss"] for e in r.run.val_log], rtol=1e-5, atol=1e-6)
    assert r.run.train_log[-1]["loss"] < r.run.train_log[0]["loss"]
    w1 = r.model.state_dict()
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sharded_modes_are_refused_and_fsdp_on_cpu_is_named_ddp(monkeypatch, caplog):
    """FSDP / DeepSpeed processes hold shards: healing, which saves and picks the best step from whole weights,
    refuses them rather than save a shard. On CPUs accelerate turns an FSDP launch into DDP; that is said."""
    from accelerate.utils import DistributedType

    from shortened.errors import ShortenedError
    from shortened.heal import check_distributed

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        try:
            check_distributed(kind)
        except ShortenedError as exc:
            assert "--multi_gpu" in str(exc) and kind.value in str(exc)
        else:
            raise AssertionError(f"{kind} was not refused")
    check_distributed(DistributedType.MULTI_GPU)
    check_distributed(DistributedType.NO)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level("WARNING"):
        check_distributed(DistributedType.MULTI_CPU)
    assert "train as DDP" in caplog.text
