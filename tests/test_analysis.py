"""The analysis suite (``python -m nvae_hub.analysis``): every item in quick mode on a tiny model, the command line,
and bad input (clear error, nothing written).

The metrics themselves, on cases whose answer is known, are tested in test_analysis_metrics.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvae_hub import NVAE, NVAEConfig
from nvae_hub import data as nvae_data
from nvae_hub.analysis import ITEMS
from nvae_hub.analysis.__main__ import build_parser, main
from nvae_hub.hub import save_pretrained

# A tiny model at MNIST's size, so that it reads the (fake, labelled) MNIST below.
TINY_28 = dict(image_size=28, padding=2)
COMMON_KEYS = {"item", "model", "dataset", "split", "seed", "quick", "run", "nvae_hub_version", "sizes"}
ITEM_KEYS = {
    "curves": {"recon", "kl", "loss", "kl_groups", "final"},
    "recon": {"mse_per_pixel", "mse_per_pixel_stderr", "neg_elbo_nats", "neg_elbo_nats_stderr", "nll_nats",
              "nll_nats_stderr", "nll_bits_per_dim", "nll_bits_per_dim_stderr", "neg_elbo_bits_per_dim"},
    "samples": {"temperatures", "model_bn", "readjusted_bn"},
    "sample-quality": {"temperature", "classifier_test_accuracy", "real_test_images", "model_bn", "readjusted_bn"},
    "latent-map": {"knn_accuracy", "protocol", "tsne"},
    "kl": {"kl_per_group", "kl_per_channel", "active_channels_kl", "active_units_variance", "scale_of_group"},
    "control": {"transfer_matrix", "properties", "scales", "carrier", "classifier_test_accuracy"},
    "temperature": {"temperatures", "change_per_scale"},
}


def tiny_model(**overrides) -> NVAE:
    torch.manual_seed(0)
    return NVAE(dataclasses.replace(NVAEConfig.preset("tiny"), **overrides)).eval()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two saved tiny models (random weights): 16x16 ("tiny") and 28x28 ("tiny28")."""
    root = tmp_path_factory.mktemp("models")
    return {"tiny": save_pretrained(tiny_model(), root / "tiny"),
            "tiny28": save_pretrained(tiny_model(**TINY_28), root / "tiny28")}


def fake_mnist(folder: Path, per_split: int = 40) -> Path:
    """A labelled MNIST stand-in, as nvae_hub.data caches the real one: strokes whose slant follows the label."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in nvae_data.MNIST_SPLITS:
        labels = np.arange(per_split) % 10
        images = np.zeros((per_split, 1, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            shift = int(label) - 5 + int(rng.integers(-1, 2))
            for row in range(5, 23):
                col = 14 + shift * (row - 14) // 9
                images[i, 0, row, col - 1:col + 2] = 255
        arrays[f"{split}_x"], arrays[f"{split}_y"] = images, labels.astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / nvae_data.MNIST_CACHE_FILE, **arrays)
    return folder


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    return fake_mnist(tmp_path_factory.mktemp("mnist"))


def fake_run(folder: Path, steps: int = 30, groups: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "log.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "loss": 100.0 / step, "recon": 80.0 / step, "kl": 20.0 / step,
                                "kl_groups": [g + 1.0 / step for g in range(groups)]}) + "\n")
    return folder


def analyse(*args: str) -> int:
    return main([*map(str, args), "--no-progress"])


def read(folder: Path, item: str) -> dict:
    return json.loads((folder / f"{item}.json").read_text())


# ---------------------------------------------------------------------------------------------- every item


def test_every_item_runs_in_quick_mode_and_writes_png_json_and_report(model_dirs, mnist_dir, tmp_path):
    out = tmp_path / "out"
    run_dir = fake_run(tmp_path / "run")
    assert analyse("all", "--model", model_dirs["tiny28"], "--dataset", "mnist", "--data-dir", mnist_dir,
                   "--run", run_dir, "--output-dir", out, "--quick", "--num-images", "12") == 0
    report = (out / "report.md").read_text()
    # (disentangle needs images with known factors, beta and convergence training runs: see test_sweeps.py)
    for name in [name for name, item in ITEMS.items() if not {"factors", "models"} & set(item.module.NEEDS)]:
        with Image.open(out / f"{name}.png") as image:
            image.verify()
            assert image.format == "PNG"
        numbers = read(out, name)
        assert COMMON_KEYS | ITEM_KEYS[name] <= set(numbers), (name, ITEM_KEYS[name] - set(numbers))
        assert numbers["item"] == name and numbers["seed"] == 0 and numbers["quick"] is True
        assert f"![{name}]({name}.png)" in report
    assert report.index("## curves") < report.index("## recon") < report.index("## temperature")


def test_json_is_deterministic_and_reruns_replace_their_section(model_dirs, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        assert analyse("kl", "recon", "--model", model_dirs["tiny"], "--dataset", "synthetic", "--output-dir", out,
                       "--quick", "--num-images", "8") == 0
    for name in ("kl", "recon"):
        assert (first / f"{name}.json").read_text() == (second / f"{name}.json").read_text()
        for suffix in (".json", ".png"):
            assert (first / f"{name}{suffix}").stat().st_mode & 0o777 == 0o644  # readable like any other file
    assert not [p.name for p in first.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert analyse("kl", "--model", model_dirs["tiny"], "--dataset", "synthetic", "--output-dir", first,
                   "--quick", "--num-images", "8", "--seed", "3") == 0
    report = (first / "report.md").read_text()
    assert report.count("## kl") == 1 and report.count("## recon") == 1 and "seed 3" in report
    numbers = read(first, "recon")
    assert numbers["sizes"]["metric_images"] == 8 and math.isfinite(numbers["nll_nats"])


# ---------------------------------------------------------------------------------------------- command line


def test_help_lists_every_item_with_one_line(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name, item in ITEMS.items():
        assert any(line.split() and line.split()[0] == name and item.summary[:30] in line
                   for line in text.splitlines()), name


def test_unknown_item_is_refused_before_anything_is_loaded(tmp_path, capsys):
    out = tmp_path / "out"
    assert analyse("kl", "nonsense", "--model", tmp_path / "no-such-model", "--output-dir", out) == 2
    assert "unknown analysis item(s) 'nonsense'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("contents", [None, "", "\n"])
def test_curves_needs_a_run_folder_with_a_log(tmp_path, capsys, contents):
    run_dir = tmp_path / "run"
    if contents is not None:
        run_dir.mkdir()
        (run_dir / "log.jsonl").write_text(contents)
    out = tmp_path / "out"
    assert analyse("curves", "--run", run_dir, "--output-dir", out) == 2
    err = capsys.readouterr().err
    assert ("does not exist" in err) if contents is None else ("missing or empty" in err)
    assert not out.exists()


def test_curves_without_run_says_how_to_give_one(tmp_path, capsys):
    assert analyse("curves", "--output-dir", tmp_path / "out") == 2
    assert "pass --run DIR" in capsys.readouterr().err


def test_model_and_data_of_different_sizes_are_refused(model_dirs, mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert analyse("recon", "--model", model_dirs["tiny"], "--dataset", "mnist", "--data-dir", mnist_dir,
                   "--output-dir", out) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "1x28x28" in err and "image_size=16" in err
    assert not out.exists()


def test_three_channel_model_on_one_channel_data_is_refused(mnist_dir, tmp_path, capsys):
    folder = save_pretrained(tiny_model(channels=3, output="logistic_mixture", **TINY_28), tmp_path / "rgb")
    out = tmp_path / "out"
    assert analyse("kl", "--model", folder, "--dataset", "mnist", "--data-dir", mnist_dir, "--output-dir", out) == 2
    assert "channels=3" in capsys.readouterr().err
    assert not out.exists()


def test_latent_map_needs_labels(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert analyse("latent-map", "--model", model_dirs["tiny"], "--dataset", "synthetic", "--output-dir", out,
                   "--quick") == 2
    assert "needs class labels" in capsys.readouterr().err
    assert not out.exists()


def test_all_skips_what_the_inputs_do_not_allow_and_says_so(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert analyse("all", "--model", model_dirs["tiny"], "--dataset", "synthetic", "--output-dir", out,
                   "--quick", "--num-images", "6") == 0
    err = capsys.readouterr().err
    assert "skipping curves" in err and "skipping latent-map" in err
    assert not (out / "curves.json").exists() and not (out / "latent-map.json").exists()
    assert (out / "kl.json").exists() and (out / "control.json").exists()


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert analyse("samples", "--model", tmp_path, "--output-dir", tmp_path / "out") == 2
    assert "config.json" in capsys.readouterr().err
