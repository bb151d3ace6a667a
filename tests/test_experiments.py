"""bench/experiments.py's report: reusing finished analyses, and experiments left out said to be not run."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiments", REPO / "bench" / "experiments.py")
experiments = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiments)


def finished_runs(root: Path, names: list[str]) -> list[Path]:
    runs = []
    for name in names:
        (root / name / "final").mkdir(parents=True)
        (root / name / "final" / "config.json").write_text("{}")
        runs.append(root / name)
    return runs


def options(**overrides) -> argparse.Namespace:
    return argparse.Namespace(smoke=False, jobs=1, nice=0, analysis_options=[], **overrides)


def test_an_analysis_made_for_the_same_runs_is_reused_and_one_for_others_is_not(tmp_path, monkeypatch):
    runs = finished_runs(tmp_path, ["beta1-seed0", "beta2-seed0"])
    out = tmp_path / "docs" / "beta"
    out.mkdir(parents=True)
    made = {"item": "beta", "models": [str(r) for r in runs], "quick": False}
    calls = []

    def analysis(command, **kwargs):  # stands in for python -m nvae_hub.analysis: writes a fresh JSON
        calls.append(command)
        (out / "beta.json").write_text(json.dumps({"fresh": True}))

    monkeypatch.setattr(experiments.subprocess, "run", analysis)
    for reusable in (made, {**made, "models": [{"run": str(r), "beta": 1.0} for r in runs]}):  # as beta writes
        (out / "beta.json").write_text(json.dumps(reusable))
        assert experiments.analyse("beta", runs, out, options()) == reusable
    assert calls == []

    for stale in ({**made, "models": [str(runs[0])]}, {**made, "quick": True}):  # other runs; --quick sizes
        (out / "beta.json").write_text(json.dumps(stale))
        assert experiments.analyse("beta", runs, out, options()) == {"fresh": True}
    assert len(calls) == 2
    assert calls[0][calls[0].index("--models") + 1:][:2] == [str(r) for r in runs]


def test_unfinished_runs_stop_the_report_with_their_names(tmp_path):
    runs = [*finished_runs(tmp_path, ["done"]), tmp_path / "not-done"]
    with pytest.raises(SystemExit, match="not-done"):
        experiments.analyse("beta", runs, tmp_path / "out", options())


def test_an_experiment_left_out_of_the_report_is_said_not_run(tmp_path):
    text = experiments.readme_section(None, None, argparse.Namespace(docs=experiments.REPO / "docs" / "analysis"))
    assert "**Beta sweep**: not run yet" in text
    assert "**Single- vs multi-scale**: not run yet" in text
