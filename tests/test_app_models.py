"""The app on every bundled model (as ``python app.py`` runs it): a menu switches the Sample, Reconstruct, Swap
scales and Explore scales tabs between the models, each loaded once at start; requests that name no model get the
default one, as before the menu existed. Two stand-in bundled models are made here (tests/test_app.py's
``fake_bundled_models``): 'mnist', the tiny 16x16 grayscale Bernoulli model with 2 scales, and 'color', an 8x8 RGB
logistic-mixture model with 1 scale. Hostile model names over raw HTTP: tests/test_app_security.py.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from test_analysis_app import write_analyses
from test_app import (
    COLOR,
    COLOR_TILE,
    TILE,
    app,
    build_bundled_app,
    digit,
    grid_size,
    png,
    shared_cache,
    start_bundled_app,
    write_png,
)

from nvae_hub.app_input import InputError


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    demo, url = start_bundled_app(shared_cache(tmp_path_factory))
    try:
        files = tmp_path_factory.mktemp("files")
        client = Client(url, verbose=False)
        a = handle_file(write_png(files / "a.png", digit()))
        b = handle_file(write_png(files / "b.png", digit().rotate(90)))
        yield SimpleNamespace(demo=demo, client=client, a=a, b=b)
    finally:
        demo.close()


def pixels(path: str) -> np.ndarray:
    return np.asarray(png(path))


# ---------------------------------------------------------------------- the page and the API
def test_the_menu_lists_every_bundled_model_with_the_default_first(served):
    config = served.demo.get_config_file()
    menu = next(c["props"] for c in config["components"] if c["props"].get("elem_id") == "model-choice")
    assert [choice[1] for choice in menu["choices"]] == ["mnist", "color"] and menu["value"] == "mnist"
    assert menu["visible"] is True
    parameters = served.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for endpoint in ("/sample", "/reconstruct", "/reconstruct_drawing", "/swap", "/interpolate", "/explore"):
        model = parameters[endpoint]["parameters"][-1]
        assert (model["parameter_name"], model["parameter_has_default"], model["parameter_default"]) == (
            "model", True, "mnist"), endpoint
    sample = [p["parameter_name"] for p in parameters["/sample"]["parameters"]]
    assert sample[:4] == ["temperature", "count", "seed", "override"]  # the names from before the menu


def test_every_model_is_loaded_and_its_export_sought_once_at_start(tmp_path_factory, monkeypatch):
    loaded, sought = [], []

    def load_pretrained(name, **kwargs):
        loaded.append(name)
        return real_load(name, **kwargs)

    def find_onnx_export(model, name, *args):
        sought.append(name)
        raise RuntimeError("no export in this test")  # runtime 'auto' then falls back to PyTorch

    real_load = app.load_pretrained
    monkeypatch.setattr(app, "load_pretrained", load_pretrained)
    monkeypatch.setattr(app, "find_onnx_export", find_onnx_export)
    demo, url = start_bundled_app(shared_cache(tmp_path_factory), runtime="auto")
    try:
        assert loaded == sought == ["mnist", "color"]
        client = Client(url, verbose=False)
        for model in ("mnist", "color", "mnist"):
            _, info = client.predict(0.7, 2, 0, False, 0.7, 0.7, model, api_name="/sample")
            assert "PyTorch" in info
        assert loaded == sought == ["mnist", "color"], "a request loaded a model again"
    finally:
        demo.close()


# ---------------------------------------------------------------------- each tab follows the model
def test_sample_follows_the_model(served):
    client = served.client
    default, _ = client.predict(0.7, 5, 3, False, 0.7, 0.7, api_name="/sample")  # as called before the menu
    mnist, _ = client.predict(0.7, 5, 3, False, 0.7, 0.7, "mnist", api_name="/sample")
    color, info = client.predict(0.7, 5, 3, False, 0.7, 0.7, model="color", api_name="/sample")
    assert np.array_equal(pixels(default), pixels(mnist)), "the default model is not mnist"
    assert png(mnist).mode == "L" and png(mnist).size == grid_size(5, TILE)
    assert png(color).mode == "RGB" and png(color).size == grid_size(5, COLOR_TILE)
    assert "5 samples, temperature 0.7, seed 3" in info


def test_per_scale_temperatures_past_a_models_scales_are_checked_but_unused(served):
    client = served.client
    zero, info = client.predict(1.0, 4, 1, True, 0.0, 0.0, "color", api_name="/sample")
    other, _ = client.predict(1.0, 4, 2, True, 0.0, 1.0, "color", api_name="/sample")
    assert np.array_equal(pixels(zero), pixels(other)), "the second slider changed a one-scale model"
    assert "per-scale temperatures 0 (coarsest first)" in info
    mnist_zero, _ = client.predict(1.0, 4, 1, True, 0.0, 0.0, "mnist", api_name="/sample")
    mnist_other, _ = client.predict(1.0, 4, 1, True, 0.0, 1.0, "mnist", api_name="/sample")
    assert not np.array_equal(pixels(mnist_zero), pixels(mnist_other)), "mnist ignored its second scale"
    with pytest.raises(AppError, match=r"The temperature of scale 1 must be a number from 0 to 1\.2, got 5\.0"):
        client.predict(1.0, 4, 1, True, 0.0, 5.0, "color", api_name="/sample")


def test_reconstruct_follows_the_model(served):
    client = served.client
    converted, reconstruction, info = client.predict(served.a, False, "color", api_name="/reconstruct")
    assert png(converted).mode == png(reconstruction).mode == "RGB"
    assert png(converted).size == png(reconstruction).size == (COLOR_TILE, COLOR_TILE)
    assert "RGB → shorter side resized to 8 px" in info and "256 levels kept" in info and "binarised" not in info
    converted, _, mnist_info = client.predict(served.a, False, api_name="/reconstruct")
    assert png(converted).size == (TILE, TILE) and set(np.unique(pixels(converted))) <= {0, 255}
    assert "grayscale" in mnist_info and "binarised at 0.5" in mnist_info
    bits = [float(text.split("**")[1].split()[0]) for text in (info, mnist_info)]
    assert bits[0] != bits[1]


def test_reconstruct_drawing_follows_the_model(served, tmp_path):
    drawing = Image.new("RGB", (280, 280), "white")
    drawing.paste("black", (130, 30, 150, 250))
    sketch = {"background": None, "layers": [], "composite": handle_file(write_png(tmp_path / "d.png", drawing))}
    converted, _, info = served.client.predict(sketch, True, "color", api_name="/reconstruct_drawing")
    assert png(converted).mode == "RGB" and png(converted).size == (COLOR_TILE, COLOR_TILE) and "inverted" in info


def test_swap_and_interpolate_follow_the_model(served):
    client, a, b = served.client, served.a, served.b
    result, table, info = client.predict(a, b, "B", "A", "color", api_name="/swap")
    assert "all 2 combinations" in info and png(result).size == (COLOR_TILE, COLOR_TILE)
    _, reconstruction_b, _ = client.predict(b, False, "color", api_name="/reconstruct")
    assert np.array_equal(pixels(result), pixels(reconstruction_b)), "scale 0 from B is not B for one scale"
    ignored, _, _ = client.predict(a, b, "B", "B", "color", api_name="/swap")  # the second choice is unused
    assert np.array_equal(pixels(ignored), pixels(result))
    with pytest.raises(AppError, match=r"Choose A or B for each of the 1 scales \(and for the 1 unused inputs"):
        client.predict(a, b, "B", "C", "color", api_name="/swap")
    _, mnist_table, mnist_info = client.predict(a, b, "B", "A", api_name="/swap")
    assert "all 4 combinations" in mnist_info and png(mnist_table).height > png(table).height
    strip, _ = client.predict(a, b, 4, "color", api_name="/interpolate")
    assert png(strip).mode == "RGB" and COLOR_TILE < png(strip).height < 2 * COLOR_TILE


def test_explore_follows_the_model(served):
    grid, _ = served.client.predict(0.7, 0, 3, "color", api_name="/explore")
    assert png(grid).mode == "RGB" and COLOR_TILE < png(grid).height < 2 * COLOR_TILE  # one row: one scale
    mnist, _ = served.client.predict(0.7, 0, 3, api_name="/explore")
    assert 2 * TILE < png(mnist).height < 3 * TILE  # two rows


def test_a_model_that_is_not_on_the_menu_is_refused(served):
    for model in ("MNIST", "../mnist", "mnist/../color", "color ", ""):
        with pytest.raises(AppError, match=re.escape(f"The model must be one of mnist, color, got '{model}'.")):
            served.client.predict(0.7, 2, 0, False, 0.7, 0.7, model, api_name="/sample")


# ---------------------------------------------------------------------- switching the page
def page_switch(demo):
    """The page's handler of the model menu (an event of its own, not part of the API)."""
    return next(fn for fn in demo.fns.values() if fn.name == "switch")


def test_switching_shows_the_models_controls_examples_and_description(tmp_path_factory, tmp_path):
    for name in ("mnist", "color"):
        write_analyses(tmp_path / name)
    demo = build_bundled_app(shared_cache(tmp_path_factory), analyses_dir=tmp_path)
    switch = page_switch(demo)
    assert switch.api_visibility == "private" and not switch.preprocess
    examples = {name: app_examples(demo, f"reconstruct-examples-{name}") for name in ("mnist", "color")}
    upload = {"path": "/tmp/gradio/an-upload.png", "meta": {"_type": "gradio.FileData"}}

    page = switch.fn("color", {"path": examples["mnist"][3]}, upload, None)
    assert set(page) <= set(switch.outputs), "the handler returned a block that is no output of its event"
    shown = {block.elem_id: value for block, value in page.items() if block.elem_id}
    assert "8x8 RGB images" in shown["model-description"] and "1 latent scales" in shown["model-description"]
    assert shown["reconstruct-input"] == examples["color"][3]  # mnist's 4th example became color's 4th
    assert "swap-a" not in shown and "swap-b" not in shown  # an upload and an empty box stay as they are
    assert shown["scale-temperature-0"] == {"label": "scale 0 (4x4), 2 groups", "visible": True, "__type__": "update"}
    assert shown["scale-temperature-1"]["visible"] is False and shown["swap-scale-1"]["visible"] is False
    for tab in ("reconstruct-examples", "swap-a-examples", "swap-b-examples"):
        assert shown[f"{tab}-color"]["visible"] is True and shown[f"{tab}-mnist"]["visible"] is False
    for elem_id in ("sample-output", "reconstruction", "swap-result", "interpolation", "explore-output"):
        assert shown[elem_id] is None, f"{elem_id}: the other model's result stays"
    analysed = next(block for block in switch.outputs if getattr(block, "label", None) == "Bundled model")
    assert page[analysed] == "color"

    back = {block.elem_id: value for block, value in switch.fn("mnist", {"path": examples["color"][3]}, None,
                                                                 None).items() if block.elem_id}
    assert back["reconstruct-input"] == examples["mnist"][3] and back["scale-temperature-1"]["visible"] is True
    with pytest.raises(InputError, match=r"The model must be one of mnist, color, got '/etc'\."):
        switch.fn("/etc", None, None, None)


def app_examples(demo, elem_id: str) -> list[str]:
    """The paths of the examples in the page's column ``elem_id`` (Gradio's cached copies, as the page has them)."""
    column = next(block for block in demo.blocks.values() if block.elem_id == elem_id)
    dataset = next(child for child in column.children if child.__class__.__name__ == "Dataset")
    return [sample[0]["path"] for sample in dataset.get_config()["samples"]]


def test_one_model_given_on_the_command_line_hides_the_menu(tmp_path_factory):
    from test_app import tiny_model_dir

    cache = shared_cache(tmp_path_factory)
    demo = app.build_app(str(tiny_model_dir(cache)), runtime="torch", cache_dir=cache)
    config = demo.get_config_file()
    menu = next(c["props"] for c in config["components"] if c["props"].get("elem_id") == "model-choice")
    assert menu["visible"] is False and menu["value"] == str(tiny_model_dir(cache))
    assert sum(c["props"].get("elem_id", "").startswith("reconstruct-examples-") for c in config["components"]
               if c["props"].get("elem_id")) == 1
    with pytest.raises(ValueError, match="onnx_dir is the export of one model"):
        build_bundled_app(cache, onnx_dir=cache / "onnx")
    assert COLOR.num_scales == 1  # the stand-in this module relies on
