"""Recipes: what `shortened run` does when not told, and which healing text each recipe picks."""

from __future__ import annotations

from pathlib import Path

import pytest

from shortened.cli import main
from shortened.pipeline import Pipeline, RunConfig
from shortened.recipes import RECIPES, get_recipe
from shortened.errors import ShortenedError


@pytest.mark.parametrize("argv, expected", [
    ([], dict(recipe="best", criterion="bi", heal="reconstruct", heal_data_kind="books", protect_first=None)),
    (["--recipe", "paper"], dict(recipe="paper", criterion="ppl", heal="lora", heal_data_kind="alpaca",
                                 protect_first=None)),
    (["--criterion", "taylor", "--heal", "none", "--protect-first", "0"],
     dict(recipe="best", criterion="taylor", heal=None, protect_first=0)),
    (["--recipe", "paper", "--heal", "linear,reconstruct", "--heal-max-time", "30"],
     dict(criterion="ppl", heal="linear,reconstruct", heal_options={"max_time": 30.0, "mixed_precision": "auto"})),
    # the best recipe's passes come with its healing and known steps; the user's --heal or passes win
    (["--heal-steps", "40"], dict(heal="reconstruct", heal_options={"steps": 40, "passes": 4.0, "mixed_precision": "auto"})),
    (["--heal-steps", "40", "--heal", "reconstruct"], dict(heal_options={"steps": 40, "mixed_precision": "auto"})),
    (["--heal-steps", "40", "--heal-passes", "2"], dict(heal_options={"steps": 40, "passes": 2.0, "mixed_precision": "auto"})),
    (["--recipe", "paper", "--heal-steps", "40"], dict(heal="lora", heal_options={"steps": 40, "mixed_precision": "auto"})),
    # training precision: bfloat16 autocast where the hardware has it, unless told otherwise
    (["--heal-mixed-precision", "no"], dict(heal_options={"mixed_precision": "no"})),
])
def test_recipes_fill_what_the_user_left_unset(argv, expected, monkeypatch, tmp_path):
    import shortened.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config: seen.append(config) or tmp_path)
    assert main(["run", "smollm2-135m", "--out", str(tmp_path / "o"), *argv]) == 0
    (config,) = seen
    for key, value in expected.items():
        assert getattr(config, key) == value, key


def test_heal_passes_need_heal_steps(tmp_path, capsys):
    assert main(["run", "smollm2-135m", "--out", str(tmp_path / "o"), "--heal-passes", "2"]) == 2
    assert "--heal-passes needs --heal-steps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_every_recipe_names_a_registered_criterion_and_healing():
    from shortened.criteria import get_criterion
    from shortened.heal import parse_chain

    for recipe in RECIPES.values():
        get_criterion(recipe.criterion)
        parse_chain(recipe.heal)
    with pytest.raises(ShortenedError, match="unknown recipe 'fast': choose best, paper"):
        get_recipe("fast")


def _pipeline(tmp_path: Path, **kw) -> Pipeline:
    return Pipeline(RunConfig(model="m", out=tmp_path / "out", ratio=0.2, heal="lora", **kw), log=lambda s: None)


def test_healing_text_follows_the_recipe(tmp_path):
    data = tmp_path / "data"
    (data / "gutenberg").mkdir(parents=True)
    (data / "alpaca").mkdir()
    (data / "alpaca" / "alpaca_data_2k_subset.json").write_text("[]")
    books = tmp_path / "books"
    books.mkdir()
    # best: plain text, the calibration files first, then the data folder's books
    assert _pipeline(tmp_path, heal_data_kind="books", calib=str(books), data_dir=str(data)).heal_text() == str(books)
    assert _pipeline(tmp_path, heal_data_kind="books", data_dir=str(data)).heal_text() == str(data / "gutenberg")
    # paper: Alpaca from the data folder
    assert (_pipeline(tmp_path, heal_data_kind="alpaca", calib=str(books), data_dir=str(data)).heal_text()
            == str(data / "alpaca" / "alpaca_data_2k_subset.json"))
    # the user's data always wins
    assert _pipeline(tmp_path, heal_data_kind="books", heal_data="mine.txt", calib=str(books)).heal_text() == "mine.txt"
    with pytest.raises(ShortenedError, match="heal_data_kind must be alpaca or books"):
        RunConfig(model="m", out=tmp_path / "o", ratio=0.2, heal_data_kind="poems").check()
    with pytest.raises(ShortenedError, match="unknown healing method 'bogus'"):
        RunConfig(model="m", out=tmp_path / "o", ratio=0.2, heal="linear,bogus").check()
