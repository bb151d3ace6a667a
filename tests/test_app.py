"""The Gradio app (app.py) serving one model (``--model PATH``): every endpoint through gradio_client on a tiny model
served by onnxruntime, bad inputs and their messages, the PyTorch fallback, the ONNX export cache, the examples,
the command line, and the picture helpers of ``nvae_hub.visual``.

``start_app`` serves the tiny model from a cache folder that the app's test modules share within a session, so the
model is exported to ONNX once; ``start_bundled_app`` serves the app as it runs by default, on every bundled model,
with two stand-ins made here (tests/test_app_models.py, tests/test_app_security.py, tests/test_browser.py).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

from nvae_hub import NVAE, NVAEConfig, hub
from nvae_hub.app_input import MAX_PIXELS, MAX_SIDE
from nvae_hub.card import TrainingInfo
from nvae_hub.hub import load_pretrained, save_pretrained
from nvae_hub.visual import display_zoom, image_grid, labelled_grid, to_pil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # app.py is a script at the repository root
import app  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TINY = NVAEConfig.preset("tiny")  # 16x16 grayscale, Bernoulli, 2 scales (4x4 and 8x8 latents)
TILE = TINY.image_size * display_zoom(TINY.image_size)  # side of one image in the app's pictures
# A second bundled model unlike the tiny one in all that the page shows: size, colour, output, number of scales.
COLOR = TINY.replace(image_size=8, channels=3, num_scales=1, output="logistic_mixture", num_mixtures=2)
COLOR_TILE = COLOR.image_size * display_zoom(COLOR.image_size)


def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder per test session, holding the tiny model and its ONNX export."""
    return tmp_path_factory.getbasetemp() / "app-cache"


def tiny_model_dir(cache: Path) -> Path:
    """A tiny NVAE (the same weights every time) saved with save_pretrained into ``cache/model``."""
    folder = cache / "model"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        save_pretrained(NVAE(TINY).eval(), folder)
    return folder


def fake_bundled_models(cache: Path) -> dict[str, Path]:
    """Stand-ins for ``nvae_hub.hub.BUNDLED_MODELS``, in its order (by name): 'color' (``COLOR``) and 'mnist' (the
    tiny model), saved into ``cache`` (once)."""
    color = cache / "color-model"
    if not (color / "model.safetensors").is_file():
        torch.manual_seed(1)
        save_pretrained(NVAE(COLOR).eval(), color)
    return {"color": color, "mnist": tiny_model_dir(cache)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(cache: Path, **options: Any) -> tuple[gr.Blocks, str]:
    """Build the app on the tiny model (onnxruntime, exported into ``cache`` if not there yet; more ``build_app``
    options may be given) and serve it on a free local port. Returns the app (close it when done) and its URL."""
    demo = app.build_app(str(tiny_model_dir(cache)), runtime="onnx", cache_dir=cache, **options)
    port = free_port()
    app.launch(demo, host="127.0.0.1", port=port, block=False)
    return demo, f"http://127.0.0.1:{port}/"


def build_bundled_app(cache: Path, **options: Any) -> gr.Blocks:
    """``app.build_app()`` as ``python app.py`` runs it, on every bundled model, with ``fake_bundled_models(cache)`` in
    their place, on PyTorch (no ONNX export to wait for; more ``build_app`` options may be given)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub, "BUNDLED_MODELS", fake_bundled_models(cache))
        return app.build_app(**{"runtime": "torch", "cache_dir": cache, **options})


def start_bundled_app(cache: Path, **options: Any) -> tuple[gr.Blocks, str]:
    """``build_bundled_app`` served on a free local port. Returns the app (close it when done) and its URL."""
    demo = build_bundled_app(cache, **options)
    port = free_port()
    app.launch(demo, host="127.0.0.1", port=port, block=False)
    return demo, f"http://127.0.0.1:{port}/"


def write_png(path: Path, image: Image.Image) -> str:
    image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    cache = shared_cache(tmp_path_factory)
    demo, url = start_app(cache)
    try:
        yield SimpleNamespace(client=Client(url, verbose=False), cache=cache, files=tmp_path_factory.mktemp("files"))
    finally:
        demo.close()


def grid_size(count: int, tile: int) -> tuple[int, int]:
    """The size of the app's grid of ``count`` samples of side ``tile`` (``app.Explorer.sample``)."""
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    return columns * (tile + 2) + 2, rows * (tile + 2) + 2


def png(path: str) -> Image.Image:
    """The image at ``path``, checked to be a PNG."""
    image = Image.open(path)
    assert image.format == "PNG", f"{path} is {image.format}, not PNG"
    image.load()
    return image


def digit(size: int = 40, mode: str = "L") -> Image.Image:
    """A light vertical bar on a dark background, like a '1'."""
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).rectangle((size * 0.4, size * 0.15, size * 0.6, size * 0.85), fill=255)
    return image.convert(mode)


# ---------------------------------------------------------------------- Sample
def test_sample_returns_a_png_grid(served):
    path, info = served.client.predict(0.7, 5, 3, False, 0.7, 0.7, api_name="/sample")
    grid = png(path)
    columns, rows = math.ceil(math.sqrt(5)), 2
    assert grid.size == (columns * (TILE + 2) + 2, rows * (TILE + 2) + 2)
    assert "5 samples" in info and "temperature 0.7" in info and "onnxruntime" in info and " ms " in info
    again, _ = served.client.predict(0.7, 5, 3, False, 0.7, 0.7, api_name="/sample")
    other, _ = served.client.predict(0.7, 5, 4, False, 0.7, 0.7, api_name="/sample")
    assert np.array_equal(np.asarray(png(again)), np.asarray(grid)), "the same seed gave different samples"
    assert not np.array_equal(np.asarray(png(other)), np.asarray(grid)), "another seed gave the same samples"


def test_per_scale_temperatures_override_the_temperature(served):
    # At temperature 0 every z is its prior mean, so the seed no longer matters.
    first, info = served.client.predict(1.0, 4, 1, True, 0.0, 0.0, api_name="/sample")
    second, _ = served.client.predict(1.0, 4, 2, True, 0.0, 0.0, api_name="/sample")
    assert np.array_equal(np.asarray(png(first)), np.asarray(png(second)))
    assert "per-scale temperatures 0, 0" in info
    unchanged, _ = served.client.predict(1.0, 4, 2, False, 0.0, 0.0, api_name="/sample")
    assert not np.array_equal(np.asarray(png(unchanged)), np.asarray(png(second))), "override ignored when off"


@pytest.mark.parametrize(("args", "message"), [
    ((0.7, 0, 0, False, 0.7, 0.7), "The number of images must be a whole number from 1 to 64, got 0."),
    ((5.0, 4, 0, False, 0.7, 0.7), "The temperature must be a number from 0 to 1.2, got 5.0."),
    ((0.7, 4, 0, True, 0.7, -1.0), "The temperature of scale 1 must be a number from 0 to 1.2, got -1.0."),
    ((0.7, 4, 1.5, False, 0.7, 0.7), "The seed must be a whole number from 0 to 4.29497e"),
])
def test_sample_refuses_bad_numbers(served, args, message):
    with pytest.raises(AppError, match=message):
        served.client.predict(*args, api_name="/sample")


# ---------------------------------------------------------------------- Reconstruct
def test_reconstruct_converts_any_image_and_reports_bits_per_dim(served):
    rgba = digit(50, "RGBA").crop((0, 10, 50, 40))  # 50x30, RGBA, not the model's size or mode
    converted, reconstruction, info = served.client.predict(
        handle_file(write_png(served.files / "rgba.png", rgba)), False, api_name="/reconstruct")
    converted, reconstruction = png(converted), png(reconstruction)
    assert converted.size == reconstruction.size == (TILE, TILE)
    assert converted.mode == "L" and set(np.unique(np.asarray(converted))) <= {0, 255}, "not binarised"
    assert "bits/dim" in info and "K=16" in info
    assert "RGBA 50x30" in info and "binarised at 0.5" in info and "inverted" not in info
    bpd = float(info.split("**")[1].split()[0])
    assert 0 < bpd < 10
    _, _, inverted = served.client.predict(handle_file(str(served.files / "rgba.png")), True, api_name="/reconstruct")
    assert "inverted" in inverted


def test_reconstruct_drawing(served):
    drawing = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(drawing).line((140, 30, 140, 250), fill="black", width=22)
    sketch = {"background": None, "layers": [], "composite": handle_file(write_png(served.files / "d.png", drawing))}
    converted, reconstruction, info = served.client.predict(sketch, True, api_name="/reconstruct_drawing")
    pixels = np.asarray(png(converted))
    assert pixels.shape == (TILE, TILE) and png(reconstruction).size == (TILE, TILE)
    assert 0 < pixels.mean() < 128, "the inverted drawing should be a light stroke on a dark background"
    assert "inverted" in info and "bits/dim" in info
    blank = {"background": None, "layers": [],
             "composite": handle_file(write_png(served.files / "blank.png", Image.new("RGB", (280, 280), "white")))}
    with pytest.raises(AppError, match="The drawing is empty"):
        served.client.predict(blank, True, api_name="/reconstruct_drawing")


def bad_input(kind: str, folder: Path) -> str | None:
    """A file that is not a usable image, of the given kind (None: no file at all)."""
    path = folder / f"{kind}.png"
    if kind == "none":
        return None
    if kind == "text":
        path = folder / "notes.txt"
        path.write_text("this is not an image")
    elif kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "corrupt":
        buffer = io.BytesIO()
        digit(64).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue()[:-40])  # the header is intact, the pixel data cut short
    elif kind == "too-wide":
        Image.new("L", (MAX_SIDE + 1, 8)).save(path)
    elif kind == "too-many-pixels":
        Image.new("L", (4000, MAX_PIXELS // 4000 + 1)).save(path)
    return str(path)


BAD_INPUTS = {
    "none": "No image given",
    "text": "notes.txt is not an image that can be read",
    "zero-bytes": "zero-bytes.png is an empty file",
    "corrupt": "corrupt or truncated",
    "too-wide": f"is {MAX_SIDE + 1}x8 pixels, too large: the limit is {MAX_SIDE} pixels per side",
    "too-many-pixels": "too large: the limit is 4096 pixels per side and 16 megapixels",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_uploads_get_a_clear_message(served, kind):
    path = bad_input(kind, served.files)
    upload = handle_file(path) if path else None
    with pytest.raises(AppError, match=BAD_INPUTS[kind]):
        served.client.predict(upload, False, api_name="/reconstruct")


def test_bad_uploads_in_swap_and_interpolate(served):
    good = handle_file(write_png(served.files / "good.png", digit()))
    text = handle_file(bad_input("text", served.files))
    with pytest.raises(AppError, match="not an image"):
        served.client.predict(good, text, "A", "B", api_name="/swap")
    with pytest.raises(AppError, match="No image given"):
        served.client.predict(None, good, 8, api_name="/interpolate")


def test_uploads_have_a_size_limit(served):
    big = served.files / "big.png"
    big.write_bytes(os.urandom(10 * 2**20 + 1))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        served.client.predict(handle_file(str(big)), False, api_name="/reconstruct")


# ---------------------------------------------------------------------- Swap, interpolate, explore
def test_swap_result_and_table(served):
    a = handle_file(write_png(served.files / "a.png", digit()))
    b = handle_file(write_png(served.files / "b.png", digit().rotate(90)))
    result, table, info = served.client.predict(a, b, "B", "A", api_name="/swap")
    assert png(result).size == (TILE, TILE)
    table = png(table)
    # 2 scales: rows say where scale 0 comes from, columns scale 1, with labels left and on top.
    assert table.width > 2 * TILE and table.height > 2 * TILE
    assert "scale 0 from B" in info and "all 4 combinations" in info
    # All from A (or all from B) is the reconstruction of A (of B).
    _, reconstruction_a, _ = served.client.predict(a, False, api_name="/reconstruct")
    all_a, _, _ = served.client.predict(a, b, "A", "A", api_name="/swap")
    assert np.array_equal(np.asarray(png(all_a)), np.asarray(png(reconstruction_a)))
    with pytest.raises(AppError, match="Choose A or B for each of the 2 scales"):
        served.client.predict(a, b, "A", "C", api_name="/swap")


def test_interpolate(served):
    a = handle_file(write_png(served.files / "a.png", digit()))
    b = handle_file(write_png(served.files / "b.png", digit().rotate(90)))
    strip, info = served.client.predict(a, b, 5, api_name="/interpolate")
    strip = png(strip)
    assert strip.width >= 5 * TILE and TILE < strip.height < 2 * TILE
    assert "5 steps" in info


def test_explore_scales(served):
    grid, info = served.client.predict(0.7, 0, 3, api_name="/explore")
    grid = png(grid)
    assert grid.width > (1 + 3) * TILE and 2 * TILE < grid.height < 3 * TILE  # one row per scale
    assert "drawn 3 times" in info


# ---------------------------------------------------------------------- runtimes and the export cache
def test_pytorch_fallback_gives_the_same_images(served, tmp_path):
    model_dir = tiny_model_dir(served.cache)
    fallback = app.Explorer(str(model_dir), onnx_dir=tmp_path / "missing", cache_dir=served.cache)
    assert fallback.runtime.startswith("PyTorch") and "not used" in fallback.runtime_note
    assert "onnxruntime is not used" in fallback.describe()
    onnx = app.Explorer(str(model_dir), runtime="onnx", cache_dir=served.cache)  # reuses the served export
    assert onnx.runtime.startswith("onnxruntime")
    noise = onnx.noise(3, seed=5)
    temperatures = [0.8] * len(onnx.scale_of_group)
    np.testing.assert_allclose(fallback.engine.decode_noise(noise, temperatures),
                               onnx.engine.decode_noise(noise, temperatures), atol=1e-4)
    x = np.stack([onnx.to_model_space(digit())[0]] * 2)
    np.testing.assert_allclose(fallback.engine.decode(fallback.engine.encode(x)),
                               onnx.engine.decode(onnx.engine.encode(x)), atol=1e-4)


def test_export_is_reused_from_the_cache_and_the_model_folder(served, tmp_path, monkeypatch):
    import nvae_hub.export

    def no_export(*args, **kwargs):
        raise AssertionError("exported again instead of reusing the export")

    monkeypatch.setattr(nvae_hub.export, "export_onnx", no_export)
    model_dir = tiny_model_dir(served.cache)
    reused = app.Explorer(str(model_dir), runtime="onnx", cache_dir=served.cache)
    assert reused.runtime.startswith("onnxruntime")
    # An export in <model folder>/onnx is used before the cache (here an empty one).
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    shutil.copytree(served.cache / "onnx" / reused.digest, folder / "onnx")
    assert app.Explorer(str(folder), runtime="onnx", cache_dir=tmp_path / "empty").runtime.startswith("onnxruntime")


def test_samples_use_batchnorm_statistics_re_estimated_at_the_temperature_and_data_the_learned_ones(served):
    model_dir = tiny_model_dir(served.cache)
    readjusted = app.Explorer(str(model_dir), runtime="torch", cache_dir=served.cache)
    learned = app.Explorer(str(model_dir), runtime="torch", cache_dir=served.cache, sampling_bn_temperature=None)
    reference = load_pretrained(str(model_dir))
    reference.fold_weight_norm()
    reference.readjust_bn(app.SAMPLING_BN_TEMPERATURE)
    noise = readjusted.noise(4, seed=2)
    temperatures = [0.7] * len(readjusted.scale_of_group)
    with torch.no_grad():
        want = reference.decode_noise([torch.from_numpy(z) for z in noise], temperatures).numpy()
    got = readjusted.engine.decode_noise(noise, temperatures)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - learned.engine.decode_noise(noise, temperatures)).max() > 1e-3
    x = np.stack([readjusted.to_model_space(digit())[0]] * 2)  # encoding and decoding latents: learned statistics
    np.testing.assert_allclose(readjusted.engine.decode(readjusted.engine.encode(x)),
                               learned.engine.decode(learned.engine.encode(x)), atol=1e-6)
    assert "re-estimated at temperature 0.7" in readjusted.describe()
    assert "learned in training" in learned.describe()
    assert readjusted.digest != learned.digest  # separate ONNX exports in the cache


def test_the_automatic_onnx_export_samples_with_re_estimated_statistics(served):
    explorer = app.Explorer(str(tiny_model_dir(served.cache)), runtime="onnx", cache_dir=served.cache)
    assert explorer.engine.meta["bn_readjust"]["temperature"] == app.SAMPLING_BN_TEMPERATURE
    assert "re-estimated at temperature 0.7" in explorer.describe()


def test_an_export_of_another_model_is_refused(served, tmp_path):
    model_dir = tiny_model_dir(served.cache)
    explorer = app.Explorer(str(model_dir), runtime="torch", cache_dir=served.cache)
    other = tmp_path / "other-export"
    shutil.copytree(served.cache / "onnx" / explorer.digest, other)
    meta = (other / app.ONNX_META_FILE).read_text().replace('"latent_channels": 4', '"latent_channels": 5')
    (other / app.ONNX_META_FILE).write_text(meta)
    fallback = app.Explorer(str(model_dir), onnx_dir=other, cache_dir=served.cache)
    assert fallback.runtime.startswith("PyTorch") and "different model config" in fallback.runtime_note
    with pytest.raises(ValueError, match="different model config"):
        app.Explorer(str(model_dir), onnx_dir=other, runtime="onnx", cache_dir=served.cache)


def test_mnist_models_get_one_test_digit_of_each_class(tmp_path, monkeypatch):
    config = TINY.replace(image_size=28, padding=2)  # a 28x28 grayscale Bernoulli model, like MNIST
    torch.manual_seed(0)
    save_pretrained(NVAE(config).eval(), tmp_path / "model")
    labels = np.arange(30) % 10
    images = np.random.default_rng(0).random((30, 1, 28, 28)).astype(np.float32)
    monkeypatch.setattr(app, "mnist_arrays", lambda data_dir: {"test": (images, labels)})
    explorer = app.Explorer(str(tmp_path / "model"), runtime="torch", cache_dir=tmp_path / "cache")
    assert explorer.examples_source == "MNIST test set" and len(explorer.examples) == 10
    first_seven = np.asarray(Image.open(explorer.examples[7]), dtype=np.float32) / 255
    np.testing.assert_allclose(first_seven, images[7, 0], atol=1 / 255)


@pytest.mark.parametrize(("output", "dataset", "source"), [
    ("logistic_mixture", "fashion-mnist", "Fashion-MNIST test set"),
    ("logistic_mixture", "mnist", "MNIST test set"),  # the card says which test set, not the output
    ("bernoulli", "fashion-mnist", "Fashion-MNIST test set"),
    ("logistic_mixture", None, "samples of the model"),  # no data set on the card, not Bernoulli: samples
])
def test_examples_come_from_the_test_set_the_model_card_names(tmp_path, monkeypatch, output, dataset, source):
    config = TINY.replace(image_size=28, padding=2, output=output)
    training = TrainingInfo(command="python train/run.py", dataset=dataset, steps=1, wall_time_seconds=1.0,
                            hardware="CPU") if dataset else None
    torch.manual_seed(0)
    save_pretrained(NVAE(config).eval(), tmp_path / "model", training)
    labels = np.arange(30) * 3 % 10  # the first image of class c is not image c
    rng = np.random.default_rng(0)
    test_sets = {name: rng.random((30, 1, 28, 28)).astype(np.float32) for name in ("mnist", "fashion-mnist")}
    monkeypatch.setattr(app, "mnist_arrays", lambda data_dir: {"test": (test_sets["mnist"], labels)})
    monkeypatch.setattr(app, "fashion_mnist_arrays", lambda data_dir: {"test": (test_sets["fashion-mnist"], labels)})
    explorer = app.Explorer(str(tmp_path / "model"), runtime="torch", cache_dir=tmp_path / "cache")
    assert explorer.examples_source.startswith(source) and len(explorer.examples) == 10
    if dataset is not None:
        first_six = np.asarray(Image.open(explorer.examples[6]), dtype=np.float32) / 255
        np.testing.assert_allclose(first_six, test_sets[dataset][2, 0], atol=1 / 255)  # labels[2] == 6


# ---------------------------------------------------------------------- command line and helpers
def test_command_line(monkeypatch):
    monkeypatch.delenv("NVAE_MODEL", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app.build_parser().parse_args([])
    assert (args.model, args.host, args.port, args.share, args.onnx_dir, args.runtime) == (
        None, "127.0.0.1", 7860, False, None, "auto")  # no model: every bundled model
    monkeypatch.setenv("NVAE_MODEL", "user/repo")
    assert app.build_parser().parse_args([]).model == "user/repo"
    args = app.build_parser().parse_args(["--model", "folder", "--onnx-dir", "out", "--host", "0.0.0.0",
                                          "--port", "9000", "--share", "--runtime", "torch"])
    assert (args.model, args.onnx_dir, args.host, args.port, args.share, args.runtime) == (
        "folder", "out", "0.0.0.0", 9000, True, "torch")
    assert app.build_parser().parse_args([]).sampling_bn_temperature == app.SAMPLING_BN_TEMPERATURE
    assert app.build_parser().parse_args(["--sampling-bn-temperature", "none"]).sampling_bn_temperature is None
    assert app.build_parser().parse_args(["--sampling-bn-temperature", "0.5"]).sampling_bn_temperature == 0.5
    for bad in ("-1", "nan", "warm"):
        with pytest.raises(SystemExit):
            app.build_parser().parse_args(["--sampling-bn-temperature", bad])


def test_scale_labels():
    assert app.scale_label(0, 2, 4) == "scale 0 (coarsest, 4x4)"
    assert app.scale_label(1, 3, 8) == "scale 1 (8x8)"
    assert app.scale_label(2, 3, 16) == "scale 2 (finest, 16x16)"
    assert app.scale_label(0, 1, 4) == "scale 0 (4x4)"


def test_to_pil():
    gray = to_pil(np.array([[[0.0, 1.0], [0.5, 2.0]]]), zoom=3)
    assert gray.mode == "L" and gray.size == (6, 6)
    assert np.asarray(gray)[0, :3].tolist() == [0, 0, 0] and np.asarray(gray)[5, 5] == 255  # clipped
    rgb = to_pil(np.zeros((3, 4, 5)))
    assert rgb.mode == "RGB" and rgb.size == (5, 4)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_pil(np.zeros((2, 4, 4)))


def test_image_grid_and_labelled_grid():
    images = np.random.default_rng(0).random((5, 1, 8, 8))
    grid = image_grid(images, columns=2, zoom=2, gap=2)
    assert grid.size == (2 * (16 + 2) + 2, 3 * (16 + 2) + 2) and grid.mode == "L"
    plain = labelled_grid([list(images[:2]), list(images[2:4])], zoom=2)
    labelled = labelled_grid([list(images[:2]), list(images[2:4])], ["row one", "row two"],
                             ["a long column label", "b"], zoom=2)
    assert labelled.width > plain.width and labelled.height > plain.height
    label_area = np.asarray(labelled)[: labelled.height - plain.height]
    assert label_area.min() < 128, "the column labels were not drawn"
    assert labelled_grid([[np.zeros((3, 8, 8))], [np.zeros((1, 8, 8))]]).mode == "RGB"
    with pytest.raises(ValueError, match="row labels"):
        labelled_grid([list(images[:2])], ["one", "two"])
