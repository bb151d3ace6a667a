"""The app's Analyses tab: the bundled models' analyses, read once at start, switched by model, hostile input
refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.hub import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # app.py is a script at the repository root
import app  # noqa: E402

RESULTS = {
    "recon": {"mse_per_pixel": 0.0123, "neg_elbo_nats": 90.0, "nll_nats": 85.5, "nll_nats_stderr": 0.2,
              "nll_bits_per_dim": 0.157, "sizes": {"nll_importance_samples": 100, "nll_images": 2000}},
    "kl": {"kl_per_group": [4.0, 2.5], "kl_total": 6.5, "active_channels_kl": [1, 2], "channels_per_group": [4, 4],
           "active_units_variance": [3, 9], "units_per_group": [64, 256]},
    "latent-map": {"knn_accuracy": {"all groups": 0.91, "pixels": 0.8}, "protocol": {"k": 5}},
    "control": {"properties": ["class", "slant"], "scales": [0, 1], "transfer_matrix": [[0.75, 0.5], [0.25, None]]},
    "sample-quality": {"sizes": {"samples": 400}, "temperature": 0.7, "model_bn": {"mean_top_probability": 0.9},
                       "readjusted_bn": {"mean_top_probability": 0.925},
                       "real_test_images": {"mean_top_probability": 0.96}},
}


def write_analyses(folder: Path) -> None:
    folder.mkdir(parents=True)
    for item, numbers in RESULTS.items():
        (folder / f"{item}.json").write_text(json.dumps(numbers))
        Image.new("RGB", (30, 20), (10, 200, 30)).save(folder / f"{item}.png")


def test_the_gallery_shows_each_bundled_models_numbers_and_figures(tmp_path):
    write_analyses(tmp_path / "mnist")
    write_analyses(tmp_path / "not-a-bundled-model")
    gallery = app.AnalysisGallery(tmp_path)
    assert list(gallery.models) == ["mnist"]
    text, *figures = gallery.show("mnist")
    for expected in ("MSE per pixel 0.0123", "NLL 85.50 ± 0.20", "4.0, 2.5", "1/4, 2/4", "3/64, 9/256",
                     "all groups 0.910", "scale 0: class 0.75, slant 0.50; scale 1: class 0.25, slant n/a",
                     "(400 at T = 0.7): mean top-class probability 0.900 as drawn, 0.925 with BatchNorm re-estimated; "
                     "real test images 0.960",
                     "docs/analysis/mnist/report.md"):
        assert expected in text, expected
    assert len(figures) == len(app.ANALYSIS_FIGURES)
    assert all(f.size == (30, 20) for f in figures)


@pytest.mark.parametrize("name", ["../mnist", "not-a-bundled-model", None, 3])
def test_the_gallery_refuses_models_it_does_not_hold(tmp_path, name):
    write_analyses(tmp_path / "mnist")
    write_analyses(tmp_path / "not-a-bundled-model")
    with pytest.raises(gr.Error, match="choose one of: mnist"):
        app.AnalysisGallery(tmp_path).show(name)


def test_the_page_has_an_analyses_tab(tmp_path):
    write_analyses(tmp_path / "analyses" / "mnist")
    torch.manual_seed(0)
    model = save_pretrained(NVAE(NVAEConfig.preset("tiny")).eval(), tmp_path / "model")
    demo = app.build_app(str(model), runtime="torch", cache_dir=tmp_path / "cache", analyses_dir=tmp_path / "analyses")
    config = demo.get_config_file()
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    assert "Analyses" in labels and "Bundled model" in labels
    assert "analyses" in [d.get("api_name") for d in config["dependencies"]]
    empty = app.build_app(str(model), runtime="torch", cache_dir=tmp_path / "cache", analyses_dir=tmp_path / "none")
    texts = [c.get("props", {}).get("value") for c in empty.get_config_file()["components"]]
    assert any(isinstance(t, str) and "make analysis" in t for t in texts)
