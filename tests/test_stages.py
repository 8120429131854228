"""Resumable stages: skipped when finished with the same settings, re-run otherwise, never half-written."""

from __future__ import annotations

import pytest

from shortened.stages import StageRunner


def test_stage_runs_once_then_skips_then_reruns_on_change(tmp_path):
    calls = []
    runner = StageRunner(tmp_path, log=lambda _: None)

    def work(folder):
        calls.append(folder)
        (folder / "out.txt").write_text(str(len(calls)))

    first = runner.run("a", {"x": 1}, work)
    token = runner.token("a")
    assert (first / "out.txt").read_text() == "1" and len(calls) == 1

    again = StageRunner(tmp_path, log=lambda _: None)
    assert again.run("a", {"x": 1}, work) == first and len(calls) == 1
    assert again.skipped == ["a"] and again.token("a") == token

    changed = StageRunner(tmp_path, log=lambda _: None)
    changed.run("a", {"x": 2}, work)
    assert len(calls) == 2 and (first / "out.txt").read_text() == "2"
    assert changed.token("a") != token  # downstream stages that record the token re-run too

    forced = StageRunner(tmp_path, force=True, log=lambda _: None)
    forced.run("a", {"x": 2}, work)
    assert len(calls) == 3


def test_failed_stage_leaves_nothing_and_keeps_the_previous_output(tmp_path):
    runner = StageRunner(tmp_path, log=lambda _: None)
    runner.run("a", {"x": 1}, lambda f: (f / "out.txt").write_text("good"))

    def broken(folder):
        (folder / "out.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        StageRunner(tmp_path, log=lambda _: None).run("a", {"x": 2}, broken)
    assert (tmp_path / "a" / "out.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_stage_used_twice_in_one_run_runs_once_even_when_forced(tmp_path):
    calls, logs = [], []
    runner = StageRunner(tmp_path, force=True, log=logs.append)
    for _ in range(2):
        runner.run("a", {"x": 1}, lambda f: calls.append(f))
    assert len(calls) == 1 and runner.ran == ["a"]
    assert not any("skipped" in line for line in logs)
