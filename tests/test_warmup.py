"""The learning-rate warm-up cannot be too short, and a short run with the default recipe trains cleanly."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

from nvae_hub.schedules import LR_WARMUP_STEPS, learning_rate, warmup_length

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import run


def test_the_warmup_has_a_floor_in_steps_whatever_the_run_length():
    assert warmup_length(150, 0.0125, 500) == 500  # the run of issue 12: 2 steps of warm-up before, then 1e-2
    assert warmup_length(200_000, 0.0125, 500) == 2500  # a long run keeps its fraction
    assert warmup_length(10, 0.0, 0) == 1
    rates = [learning_rate(s, 150, lr=1e-2, lr_min=1e-4, warmup_steps=500) for s in range(150)]
    assert max(rates) == pytest.approx(1e-2 * 150 / 500)  # a run shorter than the floor warms up all along
    assert all(b > a for a, b in itertools.pairwise(rates))


def test_the_trainer_warms_up_for_at_least_the_floor(tmp_path):
    run.main(["--preset", "tiny", "--dataset", "synthetic", "--batch-size", "8", "--max-steps", "4",
              "--output-dir", str(tmp_path)])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([1e-2 * k / LR_WARMUP_STEPS for k in range(1, 5)])
    args = run.parse_args(["--dataset", "synthetic", "--max-steps", "1", "--output-dir", "x"])
    assert args.lr_warmup_steps == LR_WARMUP_STEPS
    with pytest.raises(SystemExit):
        run.parse_args(["--dataset", "synthetic", "--max-steps", "1", "--output-dir", "x", "--lr-warmup-steps", "-1"])


def test_a_short_run_with_the_default_recipe_trains_without_skipped_updates(tmp_path):
    """A few hundred steps with every default of the recipe (learning rate, warm-up, clipping, skipping)."""
    summary = run.main(["--preset", "tiny", "--dataset", "synthetic", "--batch-size", "16", "--max-steps", "200",
                        "--log-every", "50", "--sample-every", "1000", "--output-dir", str(tmp_path)])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert summary["skipped_updates"] == 0 and not any(r["skipped"] for r in log)
    assert all(r["grad_norm"] is not None for r in log)
    first, last = (sum(r["recon"] + r["kl"] for r in part) / len(part) for part in (log[:20], log[-20:]))
    assert last < 0.6 * first
