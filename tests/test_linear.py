"""The training-free linear bridge (heal --method linear): the fold, the least-squares solution, what it
does to each removed run's hidden-state error, saving, chaining with reconstruct, and the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from shortened.archs import get_arch, get_blocks, get_submodule
from shortened.errors import ShortenedError
from shortened.heal import heal
from shortened.heal.linear import BridgeSums, fit_linear_bridges, fold_into_linear, relative_errors, removed_runs
from shortened.surgery import remove_blocks
from tiny_models import TINY_CONFIGS, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SUPPORTED = sorted(t for t in TINY_CONFIGS if get_arch(tiny_model(t)).mlp_out)
UNSUPPORTED = sorted(set(TINY_CONFIGS) - set(SUPPORTED))


def test_supported_architectures_are_the_table_entries_with_mlp_out():
    assert UNSUPPORTED == ["gemma2", "gemma3_text"]  # post-feedforward norm: nothing linear to fold into


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_folded_weight_equals_applying_t_after_the_mlp(model_type):
    """Folding T into the output projection computes what applying T to that projection's output does."""
    model = tiny_model(model_type)
    path = get_arch(model).mlp_out
    dim = model.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    t = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=g)
    blocks = [1, 4]
    folded = copy.deepcopy(model)
    for b in blocks:
        fold_into_linear(get_submodule(get_blocks(folded)[b], path), t)
    handles = [get_submodule(get_blocks(model)[b], path).register_forward_hook(lambda m, a, out: out @ t)
               for b in blocks]
    ids = tiny_inputs()
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states
        got = folded(ids, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_closed_form_equals_lstsq(ridge):
    """Sums accumulated over micro-batches, solved, equal torch.linalg.lstsq on the stacked, weighted data
    (the ridge as extra rows pulling T towards the identity)."""
    g = torch.Generator().manual_seed(1)
    x, z, w = torch.randn(300, 12, generator=g), torch.randn(300, 12, generator=g), torch.rand(300, generator=g) + 0.1
    sums = BridgeSums(12)
    for xs, zs, ws in zip(x.split(70), z.split(70), w.split(70)):
        sums.add(xs, zs, ws)
    got = sums.solve(ridge)
    x64, z64, r = x.double(), z.double(), w.double().sqrt()[:, None]
    a, b = r * x64, r * z64
    if ridge:
        lam = ridge * (x64 * w.double()[:, None] * x64).sum(0).mean()
        a = torch.cat([a, lam.sqrt() * torch.eye(12, dtype=torch.float64)])
        b = torch.cat([b, lam.sqrt() * torch.eye(12, dtype=torch.float64)])
    want = torch.linalg.lstsq(a, b).solution
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_removed_runs():
    assert removed_runs([0, 1, 4, 6], 8) == [(2, 3), (5, 5), (7, 7)]
    assert removed_runs([0, 1, 2], 3) == []


def _hidden(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_bridge_lowers_the_error_after_every_run(model_type):
    """On the calibration data, the hidden state after each removed run is closer to the unpruned model's
    with the bridges than with plain removal (measured independently with output_hidden_states), and the
    recorded errors are those measurements."""
    teacher = tiny_model(model_type)
    removed = [1, 2, 4]  # no bridge in the last block: output_hidden_states normalises the last entry
    plain = copy.deepcopy(teacher)
    kept = remove_blocks(plain, removed)
    bridged = copy.deepcopy(plain)
    ids = tiny_inputs(12, 16, seed=3)
    fits = fit_linear_bridges(bridged, teacher, kept, ids, batch_size=5, progress=False)
    assert [(f.start, f.end, f.block) for f in fits] == [(1, 2, 0), (4, 4, 1)]
    h_teacher, h_plain, h_bridged = _hidden(teacher, ids), _hidden(plain, ids), _hidden(bridged, ids)
    for f in fits:
        # hidden_states[i + 1] is the output of block i
        target = h_teacher[f.end + 1]
        err_plain = float(relative_errors(h_plain[f.block + 1], target).mean())
        err_bridged = float(relative_errors(h_bridged[f.block + 1], target).mean())
        assert err_bridged < err_plain, (model_type, f)
        assert f.error_bridged == pytest.approx(err_bridged, rel=1e-4, abs=1e-7)
    # The first run sees the same input with and without bridges: its plain error is plain removal's.
    assert fits[0].error_removed == pytest.approx(float(relative_errors(h_plain[1], h_teacher[3]).mean()), rel=1e-4)
    # Only the output projections of the bridge blocks changed.
    path = get_arch(teacher).mlp_out
    before, after = plain.state_dict(), bridged.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(any(f".{f.block}.{path}." in k for f in fits) for k in changed), changed


def test_bridged_model_saves_and_reloads_bit_identically(tmp_path):
    from transformers import AutoModelForCausalLM

    from shortened.io import pruning_record, save_model
    from test_heal import char_tokenizer

    teacher = tiny_model("llama")
    model = copy.deepcopy(teacher)
    kept = remove_blocks(model, [1, 2])
    fit_linear_bridges(model, teacher, kept, tiny_inputs(8, 16), progress=False)
    save_model(model, char_tokenizer(), tmp_path / "m", pruning_record("dense", 6, kept, model_type="llama"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    ids = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_refusals():
    teacher = tiny_model("llama")
    ids = tiny_inputs(4, 16)
    model = copy.deepcopy(teacher)
    kept = remove_blocks(model, [0, 1])
    with pytest.raises(ShortenedError, match="removed from the very start"):
        fit_linear_bridges(model, teacher, kept, ids, progress=False)
    with pytest.raises(ShortenedError, match="nothing to bridge"):
        fit_linear_bridges(copy.deepcopy(teacher), teacher, list(range(6)), ids, progress=False)
    for model_type in UNSUPPORTED:
        t = tiny_model(model_type)
        m = copy.deepcopy(t)
        kept = remove_blocks(m, [2])
        with pytest.raises(ShortenedError, match=f"does not support model_type '{model_type}'.*ArchSpec.mlp_out"):
            fit_linear_bridges(m, t, kept, ids, progress=False)


def test_a_wrong_table_entry_is_caught_by_the_fold_check(monkeypatch):
    """If ArchSpec.mlp_out named a layer whose output is not the block's last residual term, the fold
    would silently compute something else: the check after folding refuses it."""
    import dataclasses
    import importlib

    linear = importlib.import_module("shortened.heal.linear")

    teacher = tiny_model("llama")
    model = copy.deepcopy(teacher)
    kept = remove_blocks(model, [3])
    for path, message in (("self_attn.o_proj", "does not reproduce the fitted map"),  # feeds the MLP
                          ("mlp.up_proj", "does not have the block output's size")):
        wrong = dataclasses.replace(get_arch(teacher), mlp_out=path)
        monkeypatch.setattr(linear, "get_arch", lambda m: wrong)
        with pytest.raises(ShortenedError, match=message):
            fit_linear_bridges(copy.deepcopy(model), teacher, kept, tiny_inputs(4, 16), progress=False)


# --------------------------------------------------------------------------- through heal() and the CLI


def test_heal_linear_then_reconstruct_starts_from_the_bridged_model(tmp_path):
    from test_heal import FAST, pattern_data

    data = pattern_data()
    teacher = tiny_model("llama")
    pruned = copy.deepcopy(teacher)
    kept = remove_blocks(pruned, [2, 3])
    common = dict(teacher=teacher, kept=kept, seq_len=16, steps=2, batch_size=4, grad_accum=1, lr=1e-3,
                  eval_every=1, **FAST)
    alone = heal(copy.deepcopy(pruned), data, "reconstruct", **common)
    chained = heal(copy.deepcopy(pruned), data, "linear,reconstruct", **common)
    h = chained.record["healing"]
    assert h["method"] == "linear,reconstruct" and [s["method"] for s in h["stages"]] == ["linear", "reconstruct"]
    assert h["stages"][0]["steps_done"] == 0 and h["stages"][0]["settings"]["lr"] is None
    assert h["stages"][0]["bridges"][0]["error_bridged"] < h["stages"][0]["bridges"][0]["error_removed"]
    assert h["steps_done"] == 2 and h["train_log"] == h["stages"][1]["train_log"]
    # reconstruct's starting loss is lower on the bridged model than on the plain pruned one
    assert h["stages"][1]["val_loss_before"] < alone.record["healing"]["val_loss_before"]
    # linear alone equals the first stage of the chain
    only = heal(copy.deepcopy(pruned), data, "linear", teacher=teacher, kept=kept, seq_len=16, progress=False)
    assert only.record["healing"]["bridges"] == h["stages"][0]["bridges"]


def test_cli_linear_from_pruned_folder(tmp_path, capsys):
    """The teacher and the removed blocks come from pruning.json; only the bridge's output projection
    changes; a folder with nothing to say which blocks were removed is refused in one line."""
    from safetensors.torch import load_file

    from test_heal import _cli, pruned_folder

    src, pruned, text = pruned_folder(tmp_path, [3, 4])
    assert _cli(["heal", str(pruned), "--method", "linear", "--data", str(text), "--seq-len", "16",
                 "--linear-tokens", "512", "--out", str(tmp_path / "lin")]) == 0
    assert "bridges fitted" in capsys.readouterr().out
    record = json.loads((tmp_path / "lin" / "pruning.json").read_text())
    h = record["healing"]
    assert h["method"] == "linear" and h["teacher"] == str(src) and h["calibration_tokens"] == 512
    assert [(b["start"], b["end"], b["block"]) for b in h["bridges"]] == [(3, 4, 2)]
    before, after = load_file(pruned / "model.safetensors"), load_file(tmp_path / "lin" / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.layers.2.mlp.down_proj.weight"]
    assert not (tmp_path / "lin" / "loss.png").exists()  # nothing was trained
    # bad input: no kept-block record, a bad ridge, an unknown method in a chain
    code, message = _cli(["heal", str(src), "--method", "linear", "--data", str(text), "--out", str(tmp_path / "x")])
    assert code == 2 and "kept_blocks" in message and "\n" not in message
    code, message = _cli(["heal", str(pruned), "--method", "linear", "--data", str(text), "--linear-ridge", "-1",
                          "--out", str(tmp_path / "x")])
    assert code == 2 and "--linear-ridge" in message
    code, message = _cli(["heal", str(pruned), "--method", "linear,bogus", "--data", str(text),
                          "--out", str(tmp_path / "x")])
    assert code == 2 and "unknown healing method 'bogus'" in message
    assert not (tmp_path / "x").exists()


def test_no_teacher_is_a_one_line_error(tmp_path):
    from shortened.io import pruning_record, save_model
    from test_heal import _cli, char_tokenizer

    model = tiny_model("llama")
    kept = remove_blocks(model, [2])
    record = pruning_record("dense", 6, kept, model_type="llama")
    record.pop("source")
    save_model(model, char_tokenizer(), tmp_path / "p", record)
    text = tmp_path / "t.txt"
    text.write_text("some text to fit on. " * 50)
    code, message = _cli(["heal", str(tmp_path / "p"), "--method", "linear", "--data", str(text),
                          "--out", str(tmp_path / "x")])
    assert code == 2 and "--teacher" in message and "\n" not in message


# --- the cosine-distance variant (--linear-objective cosine) ---------------------------------------------


def test_cosine_refinement_lowers_the_cosine_distance_of_the_least_squares_map():
    """Started from the weighted least-squares map, Adam on the cosine distance ends lower on the same
    rows, and the distances it reports are those of the returned map."""
    from shortened.heal.linear import cosine_distance, refine_cosine

    g = torch.Generator().manual_seed(0)
    dim, n = 8, 600
    m = torch.randn(n, dim, generator=g)
    y = torch.randn(n, dim, generator=g)
    true = torch.eye(dim) + 0.5 * torch.randn(dim, dim, generator=g)
    scale = torch.rand(n, 1, generator=g) * 5 + 0.1  # per-token sizes: least squares favours the big ones
    h = (y + m @ true + 0.8 * torch.randn(n, dim, generator=g)) * scale
    sums = BridgeSums(dim)
    sums.add(m, h - y)
    t_ls = sums.solve(0.0)
    t, before, after = refine_cosine(t_ls, m, y, h, steps=300, lr=1e-2, batch_tokens=256)
    assert before == pytest.approx(float(cosine_distance(y + m @ t_ls.float(), h)), rel=1e-5)
    assert after == pytest.approx(float(cosine_distance(y + m @ t.float(), h)), rel=1e-5)
    assert after < 0.9 * before


def test_cosine_refinement_keeps_the_start_when_it_cannot_improve():
    from shortened.heal.linear import refine_cosine

    g = torch.Generator().manual_seed(1)
    m, y = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)
    t0 = torch.eye(4, dtype=torch.float64) * 0.7
    h = y + m @ t0.float()  # t0 is exact: distance 0, nothing to gain
    t, before, after = refine_cosine(t0, m, y, h, steps=5, lr=1e-2)
    assert torch.equal(t, t0) and after == before


def test_cosine_objective_on_a_tiny_model_lowers_the_measured_cosine_distance():
    """fit_linear_bridges(objective='cosine') folds the refined map: the bridged block's output, measured
    independently, is closer in direction to the unpruned hidden state than with least squares alone."""
    from shortened.heal.linear import cosine_distance

    teacher = tiny_model("llama")
    ids = tiny_inputs(12, 16, seed=3)
    kept = remove_blocks(plain := copy.deepcopy(teacher), [1, 2])
    ls, cos = copy.deepcopy(plain), copy.deepcopy(plain)
    fit_linear_bridges(ls, teacher, kept, ids, progress=False)
    fits = fit_linear_bridges(cos, teacher, kept, ids, objective="cosine", cosine_steps=200, cosine_lr=1e-2,
                              progress=False)
    target = _hidden(teacher, ids)[3]
    dim = target.shape[-1]
    measured = {name: float(cosine_distance(_hidden(m, ids)[1].reshape(-1, dim), target.reshape(-1, dim)))
                for name, m in (("ls", ls), ("cosine", cos))}
    assert fits[0].objective == "cosine"
    assert measured["cosine"] < measured["ls"]
    assert fits[0].cosine_refined == pytest.approx(measured["cosine"], rel=1e-3)
    assert fits[0].cosine_ls == pytest.approx(measured["ls"], rel=1e-3)


def test_unknown_objective_is_refused():
    teacher = tiny_model("llama")
    kept = remove_blocks(model := copy.deepcopy(teacher), [1])
    with pytest.raises(ShortenedError, match="linear-objective"):
        fit_linear_bridges(model, teacher, kept, tiny_inputs(4, 8), objective="l1", progress=False)
