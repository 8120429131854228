"""``shortened.choose``: the one selection of prune and run, against the selection functions it calls, the
same record from both commands, and the library importing nothing from the command layer."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import shortened
from shortened.choose import SELECTION_KEYS, calibration_for, check_choice, choose, scoring_options
from shortened.criteria import score_blocks
from shortened.scores import BlockScores
from shortened.errors import ShortenedError
from shortened.loading import LoadOptions, load_for_scoring
from shortened.selection import iterative_select, select_blocks
from tiny_models import N_LAYERS, tiny_inputs, tiny_model

from test_cli_score import folder, run_cli, text  # noqa: E402,F401  (fixtures: a saved tiny llama, its text)

PACKAGE = Path(shortened.__file__).parent


def imported_modules(source: str, package: str) -> list[str]:
    """The absolute names of the modules ``source`` imports, relative imports resolved from ``package``
    (the dotted name of the package the file is in)."""
    parts = package.split(".")
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + 1] if node.level else []
            if node.module:
                names.append(".".join([*base, node.module]))
            else:  # ``from .. import commands``: the modules are the names
                names += [".".join([*base, alias.name]) for alias in node.names]
    return names


def package_of(path: Path) -> str:
    return ".".join(["shortened", *path.parent.relative_to(PACKAGE).parts])


def _is_command_module(name: str) -> bool:
    return name == "shortened.commands" or name.startswith("shortened.commands.")


def test_the_library_imports_nothing_from_the_commands():
    library = sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("commands", "cli.py"))
    assert PACKAGE / "pipeline.py" in library and PACKAGE / "choose.py" in library and len(library) > 20
    offenders = {str(p.relative_to(PACKAGE)): [m for m in imported_modules(p.read_text(), package_of(p))
                                               if _is_command_module(m)] for p in library}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_import_check_sees_relative_and_absolute_imports():
    """The check above would fail on the imports it is meant to catch."""
    prune = PACKAGE / "commands" / "prune.py"  # the commands import each other relatively
    assert "shortened.commands.score" in imported_modules(prune.read_text(), package_of(prune))
    source = ("from ..commands.score import x\nfrom .. import commands\nimport shortened.commands.run\n"
              "from shortened.commands import prune\nfrom .commands import run\nfrom .choose import choose\n")
    found = imported_modules(source, "shortened.criteria")
    assert [m for m in found if _is_command_module(m)] == [
        "shortened.commands.score", "shortened.commands", "shortened.commands.run", "shortened.commands"]
    assert "shortened.criteria.commands" in found and "shortened.criteria.choose" in found
    assert imported_modules("from .commands.score import x\n", "shortened") == ["shortened.commands.score"]


@pytest.mark.parametrize("criterion, request_, contiguous", [
    ("bi", dict(num_blocks=2), False),
    ("ppl", dict(ratio=0.5, protect_last=1), False),
    ("magnitude", dict(num_blocks=1, protect_first=1, protect_last=1), False),  # its default 4 + 2 leave none
    ("angular", dict(num_blocks=3), True),
])
def test_choose_selects_what_select_blocks_selects(criterion, request_, contiguous, one_thread):
    model, ids = tiny_model("llama"), tiny_inputs(batch=2, length=12)
    expected = select_blocks(score_blocks(model, ids, criterion, progress=False), contiguous=contiguous, **request_)
    record = choose(model, ids, criterion, contiguous=contiguous, calibration_info={"source": "t"}, progress=False,
                    **request_)
    assert tuple(record) == SELECTION_KEYS
    assert record["removed"] == expected.remove and record["method"] == expected.method
    assert record["plan"] == {k: v for k, v in expected.to_dict().items() if k != "steps"}
    assert record["scores"] == score_blocks(model, ids, criterion, progress=False).to_dict()
    assert record["calibration"] == {"source": "t"} and record["scores_file"] is None
    assert record["iterative_steps"] == []


@pytest.mark.parametrize("criterion", ["ppl", "bi"])
def test_choose_iterative_is_iterative_select(criterion, one_thread):
    model, ids = tiny_model("gemma3_text"), tiny_inputs(batch=2, length=16)
    plan, history = iterative_select(model, ids, criterion, num_blocks=3, protect_last=1, progress=False)
    record = choose(model, ids, criterion, num_blocks=3, protect_last=1, iterative=True, progress=False)
    assert record["removed"] == plan.remove and record["method"] == "iterative"
    assert record["iterative_steps"] == plan.steps and record["scores"] == history[0].to_dict()
    assert "steps" not in record["plan"]


def test_choose_with_the_search_takes_the_request_as_options(one_thread):
    model, ids = tiny_model("llama"), tiny_inputs(batch=3, length=12)
    search = dict(generations=3, offspring=3, stages="1:2,all:1", start="bi", seed=5)
    direct = score_blocks(model, ids, "search", progress=False, num_blocks=2, ratio=None, protect_first=None,
                          protect_last=None, **search)
    record = choose(model, ids, "search", num_blocks=2, options=search, progress=False)
    assert record["method"] == "search" and record["removed"] == sorted(direct.extra["search"]["removed"])
    assert record["scores"]["scores"] == direct.scores
    assert scoring_options("search", {"seed": 1}, ratio=0.3) == dict(seed=1, num_blocks=None, ratio=0.3,
                                                                      protect_first=None, protect_last=None)
    assert scoring_options("bi", {"x": 1}, num_blocks=2) == {"x": 1}  # other criteria score every block
    with pytest.raises(ShortenedError, match="say how many blocks"):
        scoring_options("search")
    for flag in ("iterative", "contiguous"):
        with pytest.raises(ShortenedError, match=f"--{flag} cannot be combined with --criterion search"):
            choose(model, ids, "search", num_blocks=2, options=search, progress=False, **{flag: True})


def test_choose_from_given_scores(one_thread):
    model = tiny_model("llama")
    given = BlockScores("custom", [5.0, 1.0, 4.0, 0.5, 3.0, 6.0])
    record = choose(model, None, None, num_blocks=2, scores=given, calibration_info={"source": "f"},
                    scores_file="s.json")
    assert record["removed"] == [1, 3] and record["scores"] == given.to_dict()
    assert record["scores_file"] == "s.json" and record["calibration"] == {"source": "f"}
    assert choose(model, None, None, num_blocks=2, scores=given, contiguous=True)["removed"] == [3, 4]  # 0.5 + 3.0
    with pytest.raises(ShortenedError, match="s.json scores 3 blocks but the model has 6"):
        choose(model, None, None, num_blocks=1, scores=BlockScores("ppl", [1.0, 2.0, 3.0]), scores_file="s.json")
    with pytest.raises(ShortenedError, match="lacks the score of some blocks"):
        choose(model, None, None, num_blocks=1, scores=BlockScores("ppl", [1.0, None, 3.0, 4.0, 5.0, 6.0]))
    with pytest.raises(ShortenedError, match="cannot start from given scores"):
        choose(model, None, None, num_blocks=1, scores=given, iterative=True)


def test_checks_before_any_work():
    check_choice("bi", iterative=True)
    with pytest.raises(ShortenedError, match="unknown criterion 'nope'"):
        check_choice("nope")
    with pytest.raises(ShortenedError, match="--iterative and --contiguous cannot be combined"):
        check_choice("ppl", iterative=True, contiguous=True)
    with pytest.raises(ShortenedError, match="the search chooses the set itself"):
        check_choice("search", contiguous=True)


def test_calibration_for_and_load_for_scoring(folder, text):
    plain, tok = load_for_scoring(str(folder), LoadOptions(device="cpu"))
    assert calibration_for("magnitude", None, tok, plain) is None  # needs no data: not even a source
    with pytest.raises(ShortenedError, match="criterion ppl needs calibration data"):
        calibration_for("ppl", None, tok, plain)
    cal = calibration_for("ppl", str(text), tok, plain, n_samples=2, seq_len=8, seed=3)
    assert tuple(cal.ids.shape) == (2, 8) and cal.info["seed"] == 3 and cal.info["source"] == str(text)

    on_disk, _ = load_for_scoring(str(folder), LoadOptions(device="cpu"), offload="disk")
    with pytest.raises(ShortenedError, match="needs its blocks in memory"):
        calibration_for("ppl", "self", tok, on_disk)
    assert calibration_for("ppl", str(text), tok, on_disk, n_samples=2, seq_len=8, seed=3).info == cal.info
    in_memory, _ = load_for_scoring(str(folder), LoadOptions(device="cuda"), offload="cpu")
    assert {p.device.type for p in in_memory.parameters()} == {"cpu"}  # the device is where blocks run, later
    with pytest.raises(ShortenedError, match="--offload and --device-map cannot be combined"):
        load_for_scoring(str(folder), LoadOptions(device_map="auto"), offload="cpu")


@pytest.mark.parametrize("criterion, extra, request_", [
    ("bi", [], dict(ratio=0.34)),
    ("ppl", ["--iterative"], dict(num_blocks=2)),
    ("random", [], dict(num_blocks=2)),  # no calibration: both records say None
], ids=["bi", "ppl-iterative", "random"])
def test_prune_and_run_write_the_same_selection(folder, text, tmp_path, criterion, extra, request_):
    from shortened.pipeline import Pipeline, RunConfig

    count = ["--ratio", str(request_["ratio"])] if "ratio" in request_ else ["--num-blocks", str(request_["num_blocks"])]
    assert run_cli(["prune", str(folder), "--criterion", criterion, "--calib", str(text), "--n-samples", "2",
                    "--seq-len", "16", *count, *extra, "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    pruned = json.loads((tmp_path / "p" / "pruning.json").read_text())["selection"]

    config = RunConfig(model=str(folder), out=tmp_path / "run", criterion=criterion, calib=str(text), n_samples=2,
                       seq_len=16, iterative=bool(extra), progress=False, **request_)
    config.check()
    stage = Pipeline(config, log=lambda _: None).pruned()
    ran = json.loads((stage / "pruning.json").read_text())["selection"]

    assert tuple(pruned) == tuple(ran) == SELECTION_KEYS
    assert ran["scores_file"] is None and pruned["scores_file"] is None
    assert (ran["calibration"] is None) == (criterion == "random")
    assert ran == pruned  # the same request on the same model and text: the same record
    assert len(pruned["removed"]) == 2 and N_LAYERS == 6


def test_run_passes_its_seed_to_a_seeded_criterion(folder, text, tmp_path):
    """``run --criterion random --seed S`` chooses what ``prune --criterion random --seed S`` does, and two
    seeds are two stages (not one reused)."""
    from shortened.pipeline import Pipeline, RunConfig

    chosen = {}
    for seed in (7, 8):
        out = tmp_path / f"p{seed}"
        assert run_cli(["prune", str(folder), "--criterion", "random", "--seed", str(seed), "--num-blocks", "2",
                        "--out", str(out), "--no-progress"]) == 0
        pruned = json.loads((out / "pruning.json").read_text())["selection"]
        config = RunConfig(model=str(folder), out=tmp_path / "run", criterion="random", num_blocks=2, seed=seed,
                           progress=False)
        config.check()
        ran = json.loads((Pipeline(config, log=lambda _: None).pruned() / "pruning.json").read_text())["selection"]
        assert ran["removed"] == pruned["removed"]
        assert ran["scores"]["scores"] == pruned["scores"]["scores"]
        chosen[seed] = ran["scores"]["scores"]
    assert chosen[7] != chosen[8]
