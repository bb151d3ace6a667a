"""The app in a real browser: Debian's chromium (/usr/bin/chromium) driven by Playwright, offline.

The app runs as by default, on every bundled model (two stand-ins: tests/test_app.py's ``fake_bundled_models``).
Samples, reconstructs an uploaded image, draws and reconstructs the drawing, swaps scales and explores scales,
checking each time that the output image appears; a failed call clears the earlier result, and a file that is no
image is refused as it arrives; switching the model clears the results, shows its examples and samples from it;
screenshots go to the test's tmp_path. `make test` installs
chromium first (`make browser`); without it these tests fail rather than skip.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import sync_playwright
from test_app import COLOR_TILE, TILE, grid_size, shared_cache, start_bundled_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000  # per step; the shared 2-core machine is sometimes slow

@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory):
    assert CHROMIUM.is_file(), "the browser test needs Debian's chromium at /usr/bin/chromium (run `make browser`)"
    demo, url = start_bundled_app(shared_cache(tmp_path_factory))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            yield page
            browser.close()
    finally:
        demo.close()


def wait_for_image(page, elem_id: str) -> Image.Image:
    """Wait until the output component ``elem_id`` shows an image served by the app; that image."""
    image = page.locator(f"#{elem_id} img")
    image.wait_for(state="visible")
    source = image.get_attribute("src") or ""
    assert "/gradio_api/file=" in source
    return Image.open(io.BytesIO(page.request.get(source).body()))


def test_sample(page, tmp_path):
    assert "NVAE explorer" in page.content() and "PyTorch" in page.content()
    page.get_by_role("button", name="Sample", exact=True).click()
    assert wait_for_image(page, "sample-output").size == grid_size(16, TILE)
    page.get_by_text("16 samples, temperature 0.7").wait_for()
    page.screenshot(path=tmp_path / "sample.png", full_page=True)


def test_reconstruct_an_upload(page, tmp_path):
    upload = tmp_path / "upload.png"
    image = Image.new("RGB", (60, 40), "black")
    ImageDraw.Draw(image).ellipse((15, 5, 45, 35), outline="white", width=5)
    image.save(upload)
    page.get_by_role("tab", name="Reconstruct").click()
    page.locator("#reconstruct-input button[aria-label='Remove Image']").click()  # the example shown at start
    page.locator("#reconstruct-input input[type=file]").set_input_files(upload)
    page.locator("#reconstruct-input img").wait_for()
    page.get_by_role("button", name="Reconstruct", exact=True).click()
    wait_for_image(page, "reconstruction")
    wait_for_image(page, "converted")
    page.get_by_text("RGB 60x40").wait_for()
    page.screenshot(path=tmp_path / "reconstruct.png", full_page=True)


def test_reconstruct_a_drawing(page, tmp_path):
    page.get_by_role("tab", name="Reconstruct").click()
    page.get_by_role("tab", name="Draw").click()
    page.locator("#sketch-input button[aria-label='Brush']").click()
    box = page.locator("#sketch-input canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y - 100)
    page.mouse.down()
    page.mouse.move(x, y + 100, steps=10)
    page.mouse.up()
    page.get_by_role("button", name="Reconstruct drawing").click()
    page.get_by_text("RGBA 280x280").wait_for()  # the drawing's conversion is described
    wait_for_image(page, "reconstruction")
    page.screenshot(path=tmp_path / "drawing.png", full_page=True)


def test_a_failed_call_clears_the_earlier_result(page, tmp_path):
    page.get_by_role("tab", name="Reconstruct").click()
    page.get_by_role("tab", name="Upload").click()
    remove = page.locator("#reconstruct-input button[aria-label='Remove Image']")
    if remove.count():
        remove.click()
    page.locator("#reconstruct-examples-mnist .gallery-item").nth(3).click()  # an example, as the page shows it
    page.locator("#reconstruct-input img").wait_for()
    page.get_by_role("button", name="Reconstruct", exact=True).click()
    wait_for_image(page, "reconstruction")
    page.locator("#reconstruct-info").get_by_text("bits/dim").wait_for()
    page.locator("#reconstruct-input button[aria-label='Remove Image']").click()
    page.get_by_role("button", name="Reconstruct", exact=True).click()  # with no image: an error
    page.get_by_text("No image given").wait_for()
    page.locator("#reconstruction img").wait_for(state="detached")
    page.locator("#converted img").wait_for(state="detached")
    page.locator("#reconstruct-info").get_by_text("bits/dim").wait_for(state="detached")
    page.screenshot(path=tmp_path / "cleared.png", full_page=True)


def test_a_file_that_is_no_image_is_refused_when_it_arrives(page, tmp_path):
    page.get_by_role("tab", name="Reconstruct").click()
    page.get_by_role("tab", name="Upload").click()
    fake = tmp_path / "fake.png"  # the browser itself refuses files not named as images
    fake.write_text("not an image")
    remove = page.locator("#reconstruct-input button[aria-label='Remove Image']")
    if remove.count():
        remove.click()
    page.locator("#reconstruct-input input[type=file]").set_input_files(fake)
    page.get_by_text("fake.png is not an image that can be read").wait_for()
    page.locator("#reconstruct-input img").wait_for(state="detached")  # no broken picture stays
    page.screenshot(path=tmp_path / "refused.png", full_page=True)


def test_swap_and_interpolate(page, tmp_path):
    page.get_by_role("tab", name="Swap scales").click()
    page.get_by_role("button", name="Swap", exact=True).click()  # A and B start as two examples
    wait_for_image(page, "swap-result")
    wait_for_image(page, "swap-table")
    page.get_by_role("button", name="Interpolate A → B").click()
    wait_for_image(page, "interpolation")
    page.screenshot(path=tmp_path / "swap.png", full_page=True)


def test_explore_scales(page, tmp_path):
    page.get_by_role("tab", name="Explore scales").click()
    page.get_by_role("button", name="Explore", exact=True).click()
    wait_for_image(page, "explore-output")
    page.screenshot(path=tmp_path / "explore.png", full_page=True)


def choose_model(page, name: str) -> None:
    page.locator("#model-choice input").click()
    page.get_by_role("option", name=name, exact=True).click()


def test_switch_the_model_and_sample(page, tmp_path):
    page.get_by_role("tab", name="Sample").click()
    page.get_by_role("button", name="Sample", exact=True).click()
    assert wait_for_image(page, "sample-output").mode == "L"
    choose_model(page, "color")
    page.locator("#model-description").get_by_text("8x8 RGB images").wait_for()
    page.locator("#sample-output img").wait_for(state="detached")  # the other model's samples are gone
    page.get_by_role("button", name="Sample", exact=True).click()
    samples = wait_for_image(page, "sample-output")
    assert samples.mode == "RGB" and samples.size == grid_size(16, COLOR_TILE)
    page.screenshot(path=tmp_path / "color.png", full_page=True)
    page.get_by_role("tab", name="Reconstruct").click()
    page.get_by_role("tab", name="Upload").click()
    page.locator("#reconstruct-examples-color .gallery-item").nth(2).click()
    assert page.locator("#reconstruct-examples-mnist").is_hidden()
    page.locator("#reconstruct-input img").wait_for()
    page.get_by_role("button", name="Reconstruct", exact=True).click()
    page.locator("#reconstruct-info").get_by_text("256 levels kept").wait_for()
    choose_model(page, "mnist")
    page.locator("#model-description").get_by_text("16x16 grayscale images").wait_for()
    page.locator("#reconstruct-examples-mnist .gallery-item").first.wait_for()
    assert page.locator("#reconstruct-examples-color").is_hidden()
