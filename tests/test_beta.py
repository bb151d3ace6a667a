"""The KL weight beta (beta-VAE): NVAE.loss(beta=...), train/run.py --beta, and the model card."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.card import TrainingInfo, model_card

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))  # the scripts of train/ import each other as siblings

import run  # noqa: E402
import trainer  # noqa: E402

TINY = ["--preset", "tiny", "--dataset", "synthetic", "--batch-size", "16", "--lr-warmup", "0.1", "--log-every", "5",
        "--sample-every", "1000", "--checkpoint-every", "1000"]


def losses(model: NVAE, x: torch.Tensor, **kwargs) -> tuple[float, float, float]:
    """(total, mean recon, mean KL) of one seeded loss evaluation without regularisers."""
    torch.manual_seed(0)
    out = model.loss(x, reg_weight=0.0, **kwargs)
    return out.total.item(), out.recon.mean().item(), out.kl.mean().item()


def test_beta_multiplies_the_kl_term_and_nothing_else() -> None:
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny")).eval()
    x = torch.rand(6, 1, 16, 16).round()
    total_1, recon_1, kl_1 = losses(model, x)
    total_4, recon_4, kl_4 = losses(model, x, beta=4.0)
    assert (recon_4, kl_4) == (recon_1, kl_1)  # the same draws: only the objective changes
    assert total_1 == pytest.approx(recon_1 + kl_1, rel=1e-6)
    assert total_4 == pytest.approx(recon_1 + 4 * kl_1, rel=1e-6)
    # during warm-up (balanced KL) beta scales the whole warmed-up KL term
    warm_1, _, _ = losses(model, x, kl_weight=0.3)
    warm_4, _, _ = losses(model, x, kl_weight=0.3, beta=4.0)
    assert warm_4 - recon_1 == pytest.approx(4 * (warm_1 - recon_1), rel=1e-5)
    assert warm_1 - recon_1 < 0.9 * kl_1  # (and the warm-up itself still weighs the KL down)


def test_a_run_with_beta_optimises_recon_plus_beta_kl_and_says_so_on_its_card(tmp_path) -> None:
    out, beta = tmp_path / "run", 4.0
    run.main([*TINY, "--max-steps", "8", "--kl-warmup", "0.25", "--output-dir", str(out), "--beta", "4"])
    log = trainer.read_log(out / "log.jsonl")
    after_warmup = [r for r in log if r["kl_weight"] == 1.0]
    assert len(after_warmup) >= 5
    for r in after_warmup:  # the logged loss is the objective: recon + beta * KL + regularisers
        expected = r["recon"] + beta * r["kl"] + r["reg_weight"] * (r["spectral"] + r["bn"])
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
    assert json.loads((out / "args.json").read_text())["beta"] == beta
    card = (out / "final" / "README.md").read_text()
    assert "KL weight after warm-up: β = 4 (a β-VAE objective" in card


def test_the_card_of_an_ordinary_run_says_beta_is_1() -> None:
    info = TrainingInfo(command="python train/run.py", dataset="mnist", steps=1, wall_time_seconds=1, hardware="cpu")
    assert "KL weight after warm-up: β = 1 (the ordinary ELBO)" in model_card(NVAEConfig.preset("tiny"), info)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_beta_must_be_a_positive_number(value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        run.parse_args([*TINY, "--max-steps", "2", "--output-dir", "x", "--beta", value])
    assert "--beta must be a positive number" in capsys.readouterr().err
    assert not math.isnan(run.parse_args([*TINY, "--max-steps", "2", "--output-dir", "x"]).beta)
