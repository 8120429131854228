"""The evolutionary block-set search: its fitness against a pruned copy, brute force, seeds, bad input."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from shortened.criteria import score_blocks
from shortened.engine import Engine
from shortened.errors import ShortenedError
from shortened.search import SetFitness, evolutionary_search, parse_stages
from shortened.surgery import remove_blocks
from tiny_models import N_LAYERS, TINY_CONFIGS, tiny_inputs, tiny_model

# the linear-head path (llama, opt, gpt2: tied embeddings) and the soft-capped one that keeps log-probs (gemma2)
ARCHS = ["gemma2", "gpt2", "llama", "opt"]


def reference_fitness(model: torch.nn.Module, ids: torch.Tensor, removed: list[int], fitness: str) -> float:
    """Delete the blocks from a float64 copy of the model, run it, and compare with torch by hand."""
    dense = copy.deepcopy(model).double()
    pruned = copy.deepcopy(dense)
    remove_blocks(pruned, removed)
    with torch.no_grad():
        logp = dense(ids, use_cache=False).logits[:, :-1].log_softmax(-1)
        logq = pruned(ids, use_cache=False).logits[:, :-1].log_softmax(-1)
    if fitness == "kl":
        return float((logp.exp() * (logp - logq)).sum(-1).mean())
    nll = -logq.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return math.exp(float(nll.mean()))


@pytest.mark.parametrize("arch", ARCHS)
def test_fitness_equals_a_pruned_copy(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(batch=3, length=20)
    sets = [(0,), (2, 3), (1, 4, 5), (0, 2, 4)]
    for fitness in ("kl", "ppl"):
        engine = Engine(model, ids, batch_size=1, progress=False)
        got = SetFitness(engine, fitness).measure(sets, 3)
        for s, value in zip(sets, got):
            expected = reference_fitness(model, ids, list(s), fitness)
            assert value == pytest.approx(expected, rel=1e-4, abs=1e-7), (arch, fitness, s)


def reference_linear_kl(model: torch.nn.Module, ids: torch.Tensor, removed: list[int], batch: int = 1) -> float:
    """The ``linear-kl`` fitness by hand, micro-batches of ``batch`` samples: in a float64 copy, each removed
    run ``a..b`` gets the weighted ridge least-squares map from block ``a - 1``'s MLP output to the dense
    state after ``b``, fitted on the samples of the other folds (micro-batch ``m`` is in fold ``m % 5``),
    folded into the output projection of a pruned copy; KL(dense || bridged) averaged over tokens."""
    from shortened.archs import get_arch, get_blocks, get_submodule

    dense = copy.deepcopy(model).double()
    blocks = get_blocks(dense)
    path = get_arch(dense).mlp_out
    outs, mlps = {}, {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(blocks)]
    hooks += [get_submodule(b, path).register_forward_hook(lambda m, a, o, i=i: mlps.__setitem__(i, o))
              for i, b in enumerate(blocks)]
    with torch.no_grad():
        logp = dense(ids, use_cache=False).logits[:, :-1].log_softmax(-1)
    for h in hooks:
        h.remove()
    runs = []
    for i in sorted(removed):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    n = ids.shape[0]
    folds = min(5, -(-n // batch))
    fold = [(s // batch) % folds for s in range(n)]
    kept = [i for i in range(len(blocks)) if i not in removed]
    total = 0.0
    for f in range(folds):
        fit = [s for s in range(n) if fold[s] != f] or list(range(n))
        pruned = copy.deepcopy(dense)
        remove_blocks(pruned, removed)
        for a, b in runs:
            if a == 0:
                continue
            mlp = mlps[a - 1].reshape(outs[a - 1].shape)  # OPT runs its MLP on flattened tokens
            x = mlp[fit].reshape(-1, mlp.shape[-1])
            target = outs[b][fit].reshape(x.shape)
            z = target - (outs[a - 1][fit].reshape(x.shape) - x)
            w = 1 / target.pow(2).sum(-1)
            xtx = (x * w[:, None]).T @ x
            lam = 0.1 * xtx.diagonal().mean()
            eye = torch.eye(x.shape[1], dtype=x.dtype)
            t = torch.linalg.solve(xtx + lam * eye, (x * w[:, None]).T @ z + lam * eye)
            layer = get_submodule(get_blocks(pruned)[kept.index(a - 1)], path)
            with torch.no_grad():  # y @ t: nn.Linear keeps W as [out, in], GPT-2's Conv1D as [in, out]
                layer.weight.copy_(t.T @ layer.weight if isinstance(layer, torch.nn.Linear) else layer.weight @ t)
                if layer.bias is not None:
                    layer.bias.copy_(layer.bias @ t)
        rows = [s for s in range(n) if fold[s] == f]
        with torch.no_grad():
            logq = pruned(ids[rows], use_cache=False).logits[:, :-1].log_softmax(-1)
        total += float((logp[rows].exp() * (logp[rows] - logq)).sum())
    return total / (n * (ids.shape[1] - 1))


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])  # no bias; a bias; GPT-2's Conv1D
def test_linear_kl_equals_bridged_pruned_copies(arch):
    sets = [(2,), (2, 3), (1, 4, 5), (0, 2, 4), (3, 4, 5)]
    model = tiny_model(arch, seed=2)
    ids = tiny_inputs(batch=4, length=20, seed=2)
    fit = SetFitness(Engine(model, ids, batch_size=1, progress=False), "linear-kl")
    assert fit.variants.folds == 4  # one sample per micro-batch: leave one out
    got = fit.measure(sets, 4)
    plain = SetFitness(Engine(model, ids, batch_size=1, progress=False), "kl").measure(sets, 4)
    for s, value, before in zip(sets, got, plain):
        assert value == pytest.approx(reference_linear_kl(model, ids, list(s)), rel=1e-4, abs=1e-7), s
        assert value != pytest.approx(before, rel=1e-3), s  # the bridges change the model
    # micro-batches of two samples: two folds
    assert SetFitness(Engine(model, ids, batch_size=2, progress=False), "linear-kl").measure(sets[:2], 2) == \
        pytest.approx([reference_linear_kl(model, ids, list(s), batch=2) for s in sets[:2]], rel=1e-4, abs=1e-7)
    # a single micro-batch has nothing to hold out: fitted and measured on the same samples
    assert SetFitness(Engine(model, ids, batch_size=4, progress=False), "linear-kl").measure(sets[:1], 1) == \
        pytest.approx([reference_linear_kl(model, ids, list(sets[0]), batch=4)], rel=1e-4, abs=1e-7)


def test_a_variant_copies_only_the_bridged_layer():
    from shortened.archs import get_blocks
    from shortened.heal.linear import fold_into_linear
    from shortened.search_bridges import copy_along

    block = get_blocks(tiny_model("llama"))[1]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    variant, layer = copy_along(block, "mlp.down_proj")
    assert layer is variant.mlp.down_proj and layer is not block.mlp.down_proj
    fold_into_linear(layer, 2 * torch.eye(layer.weight.shape[0]))
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in before.items())  # the original is unchanged
    assert torch.equal(layer.weight, 2 * block.mlp.down_proj.weight)
    shared = [k for k, v in variant.state_dict().items() if v.data_ptr() == block.state_dict()[k].data_ptr()]
    assert sorted(set(variant.state_dict()) - set(shared)) == ["mlp.down_proj.weight"]


def test_linear_kl_refuses_blocks_without_an_output_projection(monkeypatch):
    model = tiny_model("gemma2")  # its MLP output is normalised before it joins the residual
    with pytest.raises(ShortenedError, match="--fitness linear-kl does not support model_type 'gemma2'"):
        SetFitness(Engine(model, tiny_inputs(batch=2), batch_size=1, progress=False), "linear-kl")
    import shortened.criteria.search as crit

    def no_starts(*args, **kwargs):
        raise AssertionError("the starting criteria ran before the architecture was checked")

    monkeypatch.setattr(crit, "starting_selections", no_starts)
    with pytest.raises(ShortenedError, match="--fitness linear-kl does not support model_type 'gemma2'"):
        score_blocks(model, tiny_inputs(batch=2), "search", num_blocks=2, fitness="linear-kl", progress=False)


def test_the_command_line_offers_every_fitness():
    from shortened.cli import build_parser
    from shortened.search import FITNESSES

    parser = build_parser()
    for fitness in FITNESSES:
        assert parser.parse_args(["score", "m", "--out", "s.json", "--criterion", "search", "--fitness", fitness]).fitness == fitness
    with pytest.raises(SystemExit):
        parser.parse_args(["score", "m", "--out", "s.json", "--criterion", "search", "--fitness", "nll"])


def deeper_llama(layers: int, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "num_hidden_layers": layers})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


def search(model, ids, **kw):
    kw = {"num_blocks": 3, "generations": 12, "offspring": 6, "stages": "1:3,all:1", "progress": False, **kw}
    return score_blocks(model, ids, "search", **kw)


def test_search_is_never_worse_than_its_start_and_records_its_history():
    model = deeper_llama(10)
    ids = tiny_inputs(batch=4, length=24)
    got = search(model, ids, start="bi,magnitude")
    s = got.extra["search"]
    starts = {name: v["fitness"] for name, v in s["starts"].items()}
    assert set(starts) == {"bi", "magnitude"} and s["start"] == min(starts, key=starts.get)
    assert s["fitness"] <= min(starts.values())
    fitness = [h["fitness"] for h in s["history"]]
    assert fitness == sorted(fitness, reverse=True) and len(fitness) == 13
    assert s["fitness"] == pytest.approx(reference_fitness(model, ids, s["removed"], "kl"), rel=1e-4)
    assert got.scores == [0.0 if i in s["removed"] else 1.0 for i in range(10)] and len(s["removed"]) == 3
    assert got.settings["generations"] == 12 and got.settings["batch_size"] == 1  # one sample per micro-batch


@pytest.mark.parametrize("fitness,protect", [("kl", (0, 0)), ("ppl", (1, 1)), ("linear-kl", (1, 0))])
def test_search_finds_the_exhaustive_optimum(fitness, protect):
    model = deeper_llama(7, seed=1)
    ids = tiny_inputs(batch=3, length=20, seed=1)
    first, last = protect
    pool = range(first, 7 - last)
    reference = reference_linear_kl if fitness == "linear-kl" else lambda *a: reference_fitness(*a, fitness)
    brute = {s: reference(model, ids, list(s)) for s in itertools.combinations(pool, 3)}
    best = min(brute, key=brute.get)
    got = search(model, ids, fitness=fitness, protect_first=first, protect_last=last, generations=25,
                 start="magnitude")
    s = got.extra["search"]
    assert tuple(s["removed"]) == best and s["fitness"] == pytest.approx(brute[best], rel=1e-4)
    assert all(first <= i < 7 - last for h in s["history"] for i in h["removed"])


def test_longest_run_and_the_greedy_start():
    from shortened.search import check_max_run, longest_run, lowest_with_max_run

    assert [longest_run(s) for s in ([], [3], [1, 3, 5], [4, 2, 3, 7, 8], [0, 1, 2, 3])] == [0, 1, 1, 3, 4]
    scores = [5, 0, 1, 2, 3, 9, 4, 8]  # lowest first: 1, 2, 3, 4, 6, ...
    assert lowest_with_max_run(scores, 4, range(8), 4) == [1, 2, 3, 4]
    assert lowest_with_max_run(scores, 4, range(8), 2) == [1, 2, 4, 6]  # 3 would join 1-2, then 4 may
    assert lowest_with_max_run(scores, 3, range(8), 1) == [1, 3, 6]
    # Blocks 0, 2, 4 are a set of 3 in runs of 1, but taking 1 and 3 first leaves none: the greedy is stuck.
    assert lowest_with_max_run([1, 0, 2, 0, 3], 3, range(5), 1) is None
    assert lowest_with_max_run([0.0] * 5, 3, range(5), 1) == [0, 2, 4]  # equal scores: packed from the start
    check_max_run(1, 3, range(5))  # 3 of 5 fit in runs of 1; 4 do not
    with pytest.raises(ShortenedError, match="cannot remove 4 of blocks 0-4 in runs of at most 1"):
        check_max_run(1, 4, range(5))
    check_max_run(2, 7, range(10))  # 10 blocks in runs of at most 2: 10 - 10 // 3 = 7 fit (0-1, 3-4, 6-7, 9)
    with pytest.raises(ShortenedError, match="cannot remove 8 of blocks 0-9 in runs of at most 2"):
        check_max_run(2, 8, range(10))


@pytest.mark.parametrize("max_run", [1, 2])
def test_search_with_max_run_finds_the_constrained_optimum(max_run):
    """Brute force over the sets whose runs are at most max_run long; no history entry breaks the bound."""
    from shortened.search import longest_run

    model = deeper_llama(8, seed=1)
    ids = tiny_inputs(batch=3, length=20, seed=1)
    sets = [s for s in itertools.combinations(range(8), 3) if longest_run(s) <= max_run]
    brute = {s: reference_fitness(model, ids, list(s), "kl") for s in sets}
    best = min(brute, key=brute.get)
    unbounded = min(itertools.combinations(range(8), 3), key=lambda s: reference_fitness(model, ids, list(s), "kl"))
    got = search(model, ids, generations=30, start="bi,magnitude", max_run=max_run)
    s = got.extra["search"]
    assert tuple(s["removed"]) == best and s["fitness"] == pytest.approx(brute[best], rel=1e-4)
    assert all(longest_run(h["removed"]) <= max_run for h in s["history"])
    assert all(longest_run(v["removed"]) <= max_run for v in s["starts"].values())
    assert s["settings"]["max_run"] == max_run
    if longest_run(unbounded) > max_run:  # the bound changed the answer: it was used
        assert tuple(s["removed"]) != unbounded


def test_same_seed_same_search():
    model = deeper_llama(9)
    ids = tiny_inputs(batch=3, length=16)
    a, b = (search(model, ids, seed=5, start="bi").extra["search"] for _ in range(2))

    def untimed(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert a["removed"] == b["removed"] and a["fitness"] == b["fitness"]
    assert untimed(a["history"]) == untimed(b["history"])
    c = search(model, ids, seed=6, start="bi").extra["search"]
    assert [h["candidate"] for h in c["history"]] != [h["candidate"] for h in a["history"]]  # the seed is used


@pytest.mark.parametrize("offload,workers,fitness", [(True, 1, "kl"), (False, 1, "kl"), (True, 2, "kl"),
                                                     (True, 2, "linear-kl")])
def test_offloaded_and_serial_searches_equal_the_default(offload, workers, fitness):
    model = deeper_llama(8)
    ids = tiny_inputs(batch=4, length=16)
    base = search(model, ids, start="bi", fitness=fitness).extra["search"]
    got = search(model, ids, start="bi", fitness=fitness, offload=offload, device="cpu",
                 workers=workers).extra["search"]
    assert got["removed"] == base["removed"]
    assert [h["candidate"] for h in got["history"]] == pytest.approx([h["candidate"] for h in base["history"]],
                                                                      rel=1e-5)


@pytest.mark.parametrize("options,message", [
    ({"num_blocks": 4, "protect_first": 2, "protect_last": 1}, "cannot remove 4 blocks: only 3 of 6 are unprotected"),
    ({}, "give exactly one of --num-blocks and --ratio"),
    ({"num_blocks": 2, "fitness": "nll"}, "unknown search fitness 'nll'"),
    ({"num_blocks": 2, "stages": "1:3,2:1"}, "the last search stage must use all 3 samples"),
    ({"num_blocks": 2, "stages": "2:2,1:1,all:1"}, "more samples and keep fewer"),
    ({"num_blocks": 2, "stages": "1:9,all:1"}, "at most the 4 children"),
    ({"num_blocks": 2, "stages": "x"}, "samples:kept"),
    ({"num_blocks": 2, "start": "search"}, "other criteria's selections"),
    ({"num_blocks": 2, "start": "bi,nope"}, "unknown criterion 'nope'"),
    ({"num_blocks": 2, "max_run": 0}, "--search-max-run must be at least 1"),
    ({"num_blocks": 4, "max_run": 1}, "cannot remove 4 of blocks 0-5 in runs of at most 1"),
])
def test_bad_search_requests(options, message):
    with pytest.raises(ShortenedError, match=message):
        score_blocks(tiny_model("llama"), tiny_inputs(batch=3), "search", offspring=4, progress=False, **options)


def test_stages_parse():
    assert parse_stages("1:4,3:1,all:1", 10, 16) == [(1, 4), (3, 1), (10, 1)]
    assert parse_stages("2:2,all:1", 1, 4) == [(1, 2), (1, 1)]  # more samples than there are: all of them


def test_only_the_searched_request_selects_the_searched_set():
    from shortened.selection import iterative_select, select_blocks

    model = tiny_model("llama")
    ids = tiny_inputs(batch=2)
    got = search(model, ids, num_blocks=2, generations=2, offspring=2, stages="1:2,all:1", start="bi")
    plan = select_blocks(got, num_blocks=2)
    assert plan.remove == got.extra["search"]["removed"] and plan.method == "search"
    # a protection that excludes a searched block (and leaves room for 2 others)
    protect = ({"protect_first": plan.remove[0] + 1} if plan.remove[0] <= 3
               else {"protect_last": N_LAYERS - plan.remove[-1]})
    for kw in ({"num_blocks": 3}, {"num_blocks": 2, "contiguous": True}, {"num_blocks": 2, **protect}):
        with pytest.raises(ShortenedError, match="these scores are a search for 2 blocks"):
            select_blocks(got, **kw)
    with pytest.raises(ShortenedError, match="cannot be made iterative"):
        iterative_select(model, ids, "search", num_blocks=2)


# ----------------------------------------------------------------------------- command line
from test_cli_score import folder, run_cli, text  # noqa: E402,F401  (fixtures: a saved tiny llama, its text)

FAST = ["--generations", "3", "--offspring", "3", "--search-stages", "1:2,all:1", "--search-start", "bi,magnitude",
        "--n-samples", "3", "--seq-len", "16", "--no-progress"]


def test_score_and_prune_with_the_search(folder, text, tmp_path):
    import json

    out = tmp_path / "search.json"
    assert run_cli(["score", str(folder), "--criterion", "search", "--num-blocks", "2", "--calib", str(text),
                    "--out", str(out), *FAST]) == 0
    record = json.loads(out.read_text())
    s = record["extra"]["search"]
    assert len(s["history"]) == 4 and len(s["removed"]) == 2 and set(s["starts"]) == {"bi", "magnitude"}
    assert record["scores"] == [0.0 if i in s["removed"] else 1.0 for i in range(N_LAYERS)]
    assert record["settings"]["generations"] == 3 and record["settings"]["seed"] == 1234
    assert (tmp_path / "search-search.png").read_bytes()[:4] == b"\x89PNG"

    assert run_cli(["prune", str(folder), "--scores", str(out), "--num-blocks", "2", "--out", str(tmp_path / "a")]) == 0
    pruned = json.loads((tmp_path / "a" / "pruning.json").read_text())
    assert pruned["removed_blocks"] == s["removed"] and pruned["selection"]["method"] == "search"

    assert run_cli(["prune", str(folder), "--criterion", "search", "--num-blocks", "2", "--calib", str(text),
                    "--out", str(tmp_path / "b"), *FAST]) == 0
    direct = json.loads((tmp_path / "b" / "pruning.json").read_text())["selection"]
    again = direct["scores"]["extra"]["search"]
    assert direct["removed"] == s["removed"] and direct["method"] == "search"  # same seed: the same search
    assert [h["fitness"] for h in again["history"]] == [h["fitness"] for h in s["history"]]


def test_score_with_the_linear_kl_fitness(folder, text, tmp_path):
    import json

    out = tmp_path / "search.json"
    assert run_cli(["score", str(folder), "--criterion", "search", "--fitness", "linear-kl", "--num-blocks", "2",
                    "--calib", str(text), "--out", str(out), *FAST]) == 0
    s = json.loads(out.read_text())["extra"]["search"]
    assert s["fitness_kind"] == "linear-kl" and s["settings"]["fitness"] == "linear-kl"
    assert s["fitness"] <= min(v["fitness"] for v in s["starts"].values())


@pytest.mark.parametrize("argv,message", [
    (["score", "--criterion", "search", "--num-blocks", "4", "--protect-first", "2", "--protect-last", "1"],
     "cannot remove 4 blocks: only 3 of 6 are unprotected"),
    (["prune", "--criterion", "search", "--num-blocks", "4", "--protect-first", "2", "--protect-last", "1"],
     "cannot remove 4 blocks: only 3 of 6 are unprotected"),
    (["score", "--criterion", "search"], "say how many blocks"),
    (["score", "--criterion", "ppl", "--num-blocks", "2"], "only with --criterion search"),
    (["score", "--criterion", "ppl", "--generations", "3"], "--generations applies to --criterion search"),
    (["prune", "--criterion", "search", "--num-blocks", "2", "--iterative"], "--iterative cannot be combined"),
    (["score", "--criterion", "search", "--ratio", "0.3", "--search-stages", "1:2,2:1"], "last search stage"),
])
def test_search_bad_input_one_line_nothing_written(folder, text, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    target = ["--out", str(out / "s.json")] if argv[0] == "score" else ["--out", str(out)]
    rc = run_cli([argv[0], str(folder), *argv[1:], "--calib", str(text), *target])
    err = capsys.readouterr().out.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_run_selects_with_the_search(folder, text, tmp_path):
    """``shortened run --criterion search``: the flags reach the search, its set is the selection, the plot
    is kept with the scores."""
    from shortened.cli import build_parser
    from shortened.commands.score import search_options
    from shortened.pipeline import Pipeline, RunConfig

    args = build_parser().parse_args(["run", str(folder), "--criterion", "search", "--num-blocks", "2",
                                      "--generations", "3", "--offspring", "3", "--search-stages", "1:2,all:1",
                                      "--search-start", "bi", "--out", str(tmp_path / "x")])
    search = {k: v for k, v in search_options(args).items() if k != "seed"}
    assert search == {"generations": 3, "offspring": 3, "stages": "1:2,all:1", "start": "bi"}
    config = RunConfig(model=str(folder), out=tmp_path / "run", criterion="search", num_blocks=2, calib=str(text),
                       n_samples=3, seq_len=16, search=search)
    config.check()
    selection = Pipeline(config, log=lambda _: None).selection()
    s = selection["scores"]["extra"]["search"]
    assert selection["method"] == "search" and selection["removed"] == s["removed"] and len(s["history"]) == 4
    assert (tmp_path / "run" / "stages" / "scores" / "scores-search.png").is_file()
    with pytest.raises(ShortenedError, match="chooses the set itself"):
        RunConfig(model=str(folder), out=tmp_path / "r", criterion="search", num_blocks=2, iterative=True).check()
