"""The analyses that compare or score models on known factors: ``disentangle``, ``beta`` (a beta sweep) and
``convergence`` (single- vs multi-scale), in quick mode on tiny models; the test loss the trainer records for
them (``--eval-every``); the ``*-single`` / ``*-multi`` presets; and bad input (a clear error, nothing written).

Run folders are built as train/run.py leaves them (args.json, final/, eval.jsonl) around tiny untrained models,
so the items' arithmetic can be checked against hand-worked curves; one short real run checks eval.jsonl.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nvae_hub import NVAE, NVAEConfig, sprites
from nvae_hub.analysis.__main__ import main
from nvae_hub.analysis.convergence import epochs_to_reach
from nvae_hub.data import build_dataset
from nvae_hub.evaluation import evaluate_nll, reconstruction_metrics
from nvae_hub.hub import load_pretrained, save_pretrained

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))  # the scripts of train/ import each other as siblings

import run  # noqa: E402
import trainer  # noqa: E402

TINY = NVAEConfig.preset("tiny")
TINY32 = TINY.replace(image_size=32)  # sprites32's size
TINY_SINGLE = TINY.replace(num_scales=1, groups_per_scale=3, num_channels=12)  # 80,282 vs tiny's 87,262 parameters
RECIPE = {"lr": 0.01, "batch_size": 64, "kl_warmup": 0.3, "epochs": 4, "max_steps": None}


def analyse(*args) -> int:
    return main([*map(str, args), "--no-progress"])


def fake_run(folder: Path, config: NVAEConfig, curve: list[tuple[float, float]] | None = None, seed: int = 0,
             **args) -> Path:
    """A run folder as train/run.py writes it, around an untrained model (initialised from ``seed``)."""
    torch.manual_seed(seed)
    save_pretrained(NVAE(config).eval(), folder / "final")
    (folder / "args.json").write_text(json.dumps({**RECIPE, "dataset": "synthetic", "seed": seed, **args}))
    if curve is not None:
        (folder / "eval.jsonl").write_text("".join(
            json.dumps({"step": 10 * (i + 1), "epoch": epoch, "test_neg_elbo_nats": loss}) + "\n"
            for i, (epoch, loss) in enumerate(curve)))
    return folder


def valid_png(path: Path) -> bool:
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


# ---------------------------------------------------------------------------------------------- disentangle


def test_disentangle_scores_the_model_each_scale_and_the_pixel_baselines(tmp_path):
    model_dir = save_pretrained(NVAE(TINY32).eval(), tmp_path / "model")
    out = tmp_path / "out"
    assert analyse("disentangle", "--model", model_dir, "--dataset", "sprites32", "--output-dir", out, "--quick",
                   "--pca-components", 3) == 0
    assert valid_png(out / "disentangle.png")
    numbers = json.loads((out / "disentangle.json").read_text())
    # tiny's groups: 1 at scale 0, 2 at scale 1; 3 components each; 5 factors for the pixel PCA; 32 x 32 pixels
    assert numbers["dimensions"] == {"all groups": 9, "scale 0": 3, "scale 1": 6, "pixel PCA": 5, "pixels": 1024}
    assert numbers["sizes"]["pool_images"] == 600 and numbers["sizes"]["pca_components_per_group"] == 3
    assert numbers["sizes"]["protocol"]["dci"]["n_estimators"] == 2  # quick
    for name, scores in numbers["scores"].items():
        for metric in ("beta_vae", "factor_vae", "mig"):
            assert 0 <= scores[metric] <= 1, (name, metric)
        computed = scores["dci"] is not None and scores["sap"] is not None
        assert computed == (name != "pixels"), name
    assert numbers["details"]["pixels"]["dci"]["skipped"].startswith("not computed on raw pixels")
    assert len(numbers["details"]["all groups"]["dci"]["importance"]) == 9
    report = (out / "report.md").read_text()
    assert "| all groups | 9 |" in report
    assert f"- **Disentanglement of all groups**: BetaVAE {numbers['scores']['all groups']['beta_vae']:.3f}" in report


@pytest.mark.parametrize("dataset", ["synthetic", "mnist"])
def test_disentangle_refuses_a_data_set_without_factors(tmp_path, capsys, dataset):
    config = TINY if dataset == "synthetic" else TINY.replace(image_size=28, padding=2)
    model_dir = save_pretrained(NVAE(config).eval(), tmp_path / "model")
    out = tmp_path / "out"
    mnist_cache = tmp_path / "cache"
    if dataset == "mnist":  # a one-image stand-in of the MNIST cache, so that no download is needed
        import numpy as np

        from nvae_hub import data

        arrays = {f"{s}_{k}": np.zeros((1, 1, 28, 28) if k == "x" else 1, np.uint8 if k == "x" else np.int64)
                  for s in data.MNIST_SPLITS for k in "xy"}
        mnist_cache.mkdir()
        np.savez(mnist_cache / data.MNIST_CACHE_FILE, **arrays)
    assert analyse("disentangle", "--model", model_dir, "--dataset", dataset, "--data-dir", mnist_cache,
                   "--output-dir", out, "--quick") == 2
    assert f"known generative factors, and the '{dataset}' data set has none; use sprites" in capsys.readouterr().err
    assert not out.exists()


def test_disentangle_refuses_a_pool_smaller_than_the_protocol_draws(tmp_path, capsys):
    model_dir = save_pretrained(NVAE(TINY32).eval(), tmp_path / "model")
    out = tmp_path / "out"
    assert analyse("disentangle", "--model", model_dir, "--dataset", "sprites32", "--output-dir", out, "--quick",
                   "--num-images", 599) == 2
    assert "--num-images 599 is too small: the quick protocol draws 600 distinct images" in capsys.readouterr().err
    assert analyse("disentangle", "--model", model_dir, "--dataset", "sprites32", "--output-dir", out,
                   "--num-images", 5000) == 2
    assert "the protocol draws 15000 distinct images" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- beta


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sweep")
    return [fake_run(root / "beta1", TINY32, dataset="sprites32", beta=1.0, seed=0),
            fake_run(root / "beta4-seed0", TINY32, dataset="sprites32", beta=4.0, seed=0),
            fake_run(root / "beta4-seed1", TINY32, dataset="sprites32", beta=4.0, seed=1)]


def test_beta_plots_elbo_terms_and_scores_against_beta_and_normalised_beta(sweep, tmp_path):
    out = tmp_path / "out"
    assert analyse("beta", "--models", *sweep, "--output-dir", out, "--quick") == 0
    assert valid_png(out / "beta.png")
    numbers = json.loads((out / "beta.json").read_text())
    assert numbers["training_dataset"] == "sprites32"
    latent = 4 * 8 * 8 + 2 * 4 * 16 * 16  # tiny at 32x32: one 4x8x8 group at scale 0, two 4x16x16 at scale 1
    assert [(m["beta"], m["seed"], m["latent_size"]) for m in numbers["models"]] == [(1, 0, latent), (4, 0, latent),
                                                                                     (4, 1, latent)]
    assert [m["normalised_beta"] for m in numbers["models"]] == pytest.approx([b * latent / 1024 for b in (1, 4, 4)])
    first = numbers["models"][0]["test"]
    assert first["elbo"] == pytest.approx(-(first["recon"] + first["kl"]), rel=1e-5)
    # the ELBO terms are those of the model on the first 64 test images (quick) with one seeded posterior sample
    assert numbers["sizes"]["test_images"] == 64 and numbers["sizes"]["pool_images"] == 600
    model = load_pretrained(sweep[0] / "final")
    test_set = build_dataset("sprites32", "test", data_dir=None, image_size=32, channels=1)
    direct = reconstruction_metrics(model, test_set, limit=64, seed=0, progress=False)
    assert -first["elbo"] == pytest.approx(direct["neg_elbo_nats"], rel=1e-5)
    by_beta = numbers["by_beta"]
    assert list(by_beta) == ["1", "4"] and by_beta["4"]["seeds"] == 2
    pair = [m["scores"]["mig"] for m in numbers["models"][1:]]
    assert by_beta["4"]["mig"]["mean"] == pytest.approx(sum(pair) / 2, rel=1e-4)
    assert by_beta["4"]["mig"]["std"] == pytest.approx(abs(pair[0] - pair[1]) / 2, rel=1e-3, abs=1e-6)
    assert set(numbers["baseline_scores"]) >= {"beta_vae", "factor_vae", "mig", "dci", "sap"}
    report = (out / "report.md").read_text()
    assert "| 4 | 9 | 2 |" in report and "_3 training runs, seed 0, quick mode_" in report
    assert [m["run"] for m in numbers["models"]] == [str(folder) for folder in sweep]


def test_a_sweep_needs_two_models_one_data_set_and_two_betas(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert analyse("beta", "--models", sweep[0], "--output-dir", out) == 2
    assert "pass at least 2 training runs with --models, got 1" in capsys.readouterr().err
    other = fake_run(tmp_path / "mnist-run", TINY.replace(image_size=28, padding=2), dataset="mnist", beta=2.0)
    assert analyse("beta", "--models", sweep[0], other, "--output-dir", out) == 2
    err = capsys.readouterr().err
    assert "trained on one data set; these were trained on mnist, sprites32" in err and "mnist-run (mnist)" in err
    assert analyse("beta", "--models", sweep[1], sweep[2], "--output-dir", out) == 2
    assert "at least two betas; all 2 have beta = 4" in capsys.readouterr().err
    assert analyse("beta", "--models", sweep[0], tmp_path, "--output-dir", out) == 2
    assert "is not a finished training run" in capsys.readouterr().err
    assert analyse("beta", "--output-dir", out) == 2
    assert "pass --models DIR" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- convergence

SINGLE_CURVE = [(1, 100.0), (2, 90.0), (3, 80.0), (4, 70.0)]
MULTI_CURVE = [(1, 100.0), (2, 85.0), (3, 72.0), (4, 65.0)]


def test_epochs_to_reach_interpolates_the_first_crossing():
    epochs, losses = torch.tensor([1.0, 2.0, 3.0, 4.0]).numpy(), torch.tensor([100.0, 85.0, 90.0, 65.0]).numpy()
    assert epochs_to_reach(epochs, losses, 85.0) == 2.0
    assert epochs_to_reach(epochs, losses, 88.0) == pytest.approx(1 + 12 / 15)  # first crossing, not the later one
    assert epochs_to_reach(epochs, losses, 70.0) == pytest.approx(3 + 20 / 25)
    assert epochs_to_reach(epochs, losses, 120.0) == 1.0 and epochs_to_reach(epochs, losses, 60.0) is None


def test_convergence_gives_epochs_to_common_loss_levels_and_their_ratio(tmp_path):
    """Hand-worked: the multi-scale curve crosses the single-scale final loss 70 at 3 + (72 - 70) / (72 - 65) epochs,
    and its loss at half the epochs (90) at 1 + 10/15; the seeds of the multi-scale model are averaged."""
    runs = [fake_run(tmp_path / "single", TINY_SINGLE, SINGLE_CURVE),
            fake_run(tmp_path / "multi-a", TINY, [(e, loss - 1) for e, loss in MULTI_CURVE], seed=1),
            fake_run(tmp_path / "multi-b", TINY, [(e, loss + 1) for e, loss in MULTI_CURVE], seed=2)]
    out = tmp_path / "out"
    assert analyse("convergence", "--models", *runs, "--output-dir", out) == 0
    assert valid_png(out / "convergence.png")
    numbers = json.loads((out / "convergence.json").read_text())
    data = numbers["datasets"]["synthetic"]
    assert data["parameters"] == {"single": 80282, "multi": 87262}
    assert data["curves"]["multi"]["test_neg_elbo_nats"] == [loss for _, loss in MULTI_CURVE]
    levels = {lv["level"]: lv for lv in data["levels"]}
    final = levels["single-scale loss at 100% of its epochs"]
    assert (final["loss"], final["epochs_single"]) == (70.0, 4.0)
    assert final["epochs_multi"] == pytest.approx(3 + 2 / 7, rel=1e-5)
    assert data["ratio_at_single_final_loss"] == pytest.approx((3 + 2 / 7) / 4, rel=1e-5)
    assert data["epochs_to_single_final_loss"] == {"single": 4.0, "multi": pytest.approx(3 + 2 / 7, rel=1e-5)}
    half = levels["single-scale loss at 50% of its epochs"]
    assert (half["loss"], half["epochs_single"]) == (90.0, 2.0)
    assert half["epochs_multi"] == pytest.approx(1 + 10 / 15, rel=1e-5)
    assert levels["multi-scale final loss"]["epochs_single"] is None  # never reached: no ratio
    assert levels["multi-scale final loss"]["ratio_multi_over_single"] is None
    assert numbers["reference_ratio"] == 0.85
    report = (out / "report.md").read_text()
    assert "| single-scale loss at 100% of its epochs | 70.00 | 4 | 3.29 | 0.821 |" in report
    assert "- **Epochs multi / single to the single-scale model's final test loss**: synthetic 0.82" in report


def test_convergence_refuses_unfair_or_incomplete_comparisons(tmp_path, capsys):
    out = tmp_path / "out"
    multi = fake_run(tmp_path / "multi", TINY, MULTI_CURVE)
    narrow = fake_run(tmp_path / "narrow", TINY.replace(num_scales=1, groups_per_scale=3), SINGLE_CURVE)
    assert analyse("convergence", "--models", narrow, multi, "--output-dir", out) == 2
    assert "40,374 parameters and the multi-scale one 87,262 (+116.1%)" in capsys.readouterr().err
    faster = fake_run(tmp_path / "faster", TINY_SINGLE, SINGLE_CURVE, lr=0.02)
    assert analyse("convergence", "--models", faster, multi, "--output-dir", out) == 2
    assert "different recipes (options lr)" in capsys.readouterr().err
    unlogged = fake_run(tmp_path / "unlogged", TINY_SINGLE)
    assert analyse("convergence", "--models", unlogged, multi, "--output-dir", out) == 2
    assert "eval.jsonl is missing or empty: train the run with --eval-every" in capsys.readouterr().err
    other = fake_run(tmp_path / "other", TINY_SINGLE, SINGLE_CURVE, seed=3)
    assert analyse("convergence", "--models", other, fake_run(tmp_path / "s2", TINY_SINGLE, SINGLE_CURVE),
                   "--output-dir", out) == 2
    assert "synthetic: no multi-scale run among --models" in capsys.readouterr().err
    assert not out.exists()


def test_eval_every_records_the_test_loss_of_the_ema_model(tmp_path):
    out = tmp_path / "run"
    run.main(["--preset", "tiny", "--dataset", "synthetic", "--batch-size", "16", "--max-steps", "7",
              "--eval-every", "3", "--eval-limit", "24", "--sample-every", "1000", "--checkpoint-every", "1000",
              "--output-dir", str(out)])
    records = trainer.read_log(out / "eval.jsonl")
    assert [r["step"] for r in records] == [3, 6, 7]  # every 3 steps and at the end
    assert [r["epoch"] for r in records] == pytest.approx([s / 32 for s in (3, 6, 7)])  # 512 images, batch 16
    assert all(r["images"] == 24 and math.isfinite(r["test_neg_elbo_nats"]) for r in records)
    test_set = build_dataset("synthetic", "test", data_dir=None, image_size=16, channels=1)
    final = evaluate_nll(load_pretrained(out / "final"), test_set, num_samples=1, limit=24, batch_size=16,
                         progress=False)
    assert records[-1]["test_neg_elbo_nats"] == pytest.approx(final["nll_nats"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("data", ["mnist", "fashion-mnist", "sprites32"])
def test_single_and_multi_presets_differ_in_scales_only_and_match_in_size(data):
    single, multi = NVAEConfig.preset(f"{data}-single"), NVAEConfig.preset(f"{data}-multi")
    assert (single.num_scales, multi.num_scales) == (1, 2) and single.num_groups == multi.num_groups
    same = ["image_size", "channels", "padding", "output", "latent_channels", "num_preprocess_blocks",
            "cells_per_group_enc", "cells_per_group_dec", "reg_weight"]
    assert {k: getattr(single, k) for k in same} == {k: getattr(multi, k) for k in same}
    counts = [sum(p.numel() for p in NVAE(c).parameters()) for c in (single, multi)]
    assert abs(counts[1] / counts[0] - 1) <= 0.10, counts
    if data == "sprites32":
        assert (multi.image_size, multi.channels) == (sprites.IMAGE_SIZES["sprites32"], 1)
