"""Learning curves of a training run: reconstruction loss, KL and total loss against step, and the KL of each
latent group, from the run's ``log.jsonl`` (one record per step, written by ``train/run.py``).

Long runs are shown in at most ``MAX_POINTS`` bins: each point is the mean of the finite values of its steps,
so the figure and the JSON hold the same numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .common import AnalysisError, Inputs, Result

NEEDS = ("run",)
MAX_POINTS = 500
SERIES = ("recon", "kl", "loss")


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-step records of ``run_dir/log.jsonl``; a line that is not a JSON record raises ``AnalysisError``."""
    path = Path(run_dir) / "log.jsonl"
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise AnalysisError(f"{path}, line {number}: not JSON ({error})") from error
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise AnalysisError(f"{path}, line {number}: not a training-log record (no integer 'step')")
        records.append(record)
    if not records:
        raise AnalysisError(f"{path} holds no records")
    return records


def binned(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """(step, value) means over at most ``max_points`` consecutive bins of equal size; NaNs are ignored and bins
    without a finite value dropped."""
    bins = np.array_split(np.arange(len(steps)), min(max_points, len(steps)))
    xs, ys = [], []
    for index in bins:
        finite = index[np.isfinite(values[index])]
        if len(finite):
            xs.append(float(steps[finite].mean()))
            ys.append(float(values[finite].mean()))
    return xs, ys


def curves(records: list[dict[str, Any]], max_points: int = MAX_POINTS) -> dict[str, Any]:
    """The binned series of ``records``: ``recon``, ``kl``, ``loss`` and ``kl_groups`` (one series per group),
    each ``{"step": [...], "value": [...]}`` in nats per image."""
    steps = np.array([r["step"] for r in records], dtype=np.float64)

    def column(values: list[Any]) -> np.ndarray:
        return np.array([math.nan if v is None else v for v in values], dtype=np.float64)

    def series(values: np.ndarray) -> dict[str, list[float]]:
        x, y = binned(steps, values, max_points)
        return {"step": x, "value": y}

    out: dict[str, Any] = {key: series(column([r.get(key) for r in records])) for key in SERIES}
    num_groups = max(len(r.get("kl_groups") or []) for r in records)
    out["kl_groups"] = [
        series(column([(r.get("kl_groups") or [None] * num_groups)[g] for r in records])) for g in range(num_groups)
    ]
    return out


def run(inputs: Inputs) -> Result:
    """The learning curves of ``inputs.run_dir``."""
    assert inputs.run_dir is not None
    records = read_log(inputs.run_dir)
    numbers = curves(records)
    numbers["sizes"] = {"steps_logged": len(records), "last_step": records[-1]["step"], "max_points": MAX_POINTS}
    final = {key: numbers[key]["value"][-1] if numbers[key]["value"] else None for key in SERIES}
    numbers["final"] = final

    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    for key, label in zip(SERIES, ("reconstruction -log p(x|z)", "KL(q || p)", "training loss"), strict=True):
        axes[0 if key != "kl" else 1].plot(numbers[key]["step"], numbers[key]["value"], label=label, linewidth=1)
    colour = matplotlib.colormaps["viridis"]
    groups = numbers["kl_groups"]
    for g, s in enumerate(groups):
        axes[2].plot(s["step"], s["value"], color=colour(g / max(1, len(groups) - 1)), linewidth=1, label=f"group {g}")
    titles = ("reconstruction and total loss", "KL, all groups", "KL of each group (0 = coarsest)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel("nats per image")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if ax is axes[2] and len(groups) > 8 else 1)
    if numbers["recon"]["value"] and min(numbers["recon"]["value"]) > 0:
        axes[0].set_yscale("log")
    fig.suptitle(f"Learning curves of {inputs.run_dir} ({len(records)} steps logged, binned means)")
    fig.tight_layout()
    return Result(numbers, fig)


def section(numbers: dict[str, Any]) -> str:
    """The report's text: the values at the end of training."""
    final = numbers["final"]
    fmt = {k: "n/a" if v is None else f"{v:.2f}" for k, v in final.items()}
    return (f"At the end of the run (step {numbers['sizes']['last_step']}, the last bin's mean): reconstruction "
            f"{fmt['recon']} nats, KL {fmt['kl']} nats, training loss {fmt['loss']} (with the KL weight and "
            f"regularisers of that step).")
