"""Image folders are checked when the data set is built (issue 11, item 14): every file decoded once, in parallel,
remembered by size and modification time; bad files listed with their paths, or left out on request."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nvae_hub import data


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Image-folder checks are cached under $NVAE_HUB_CACHE: keep them out of the user's cache."""
    monkeypatch.setenv("NVAE_HUB_CACHE", str(tmp_path_factory.mktemp("cache")))


def write_png(path: Path, seed: int, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def make_folder(root: Path, good: int) -> tuple[list[Path], Path, Path]:
    """``good`` PNGs in root/train and one in root/test, plus a truncated PNG and a text file in root/train."""
    paths = [root / "train" / f"{i:02d}.png" for i in range(good)]
    for i, path in enumerate(paths):
        write_png(path, i)
    write_png(root / "test" / "t.png", 99)
    truncated, garbage = root / "train" / "truncated.png", root / "train" / "garbage.jpg"
    truncated.write_bytes(write_png(truncated, 100)[:300])
    garbage.write_bytes(b"not an image")
    return paths, truncated, garbage


def test_bad_images_are_found_when_the_data_set_is_built_or_left_out(tmp_path, caplog):
    good, truncated, garbage = make_folder(tmp_path, 5)
    kwargs = {"data_dir": tmp_path, "image_size": 8, "channels": 3}
    with pytest.raises(data.CorruptImageError) as error:
        data.build_dataset("imagefolder", "train", **kwargs)
    message = str(error.value)
    assert f"2 of the 7 train image files under {tmp_path} cannot be decoded" in message
    assert f"  {garbage}: cannot identify image file" in message and f"  {truncated}: " in message
    assert "skip_bad_images=True" in message and not any(str(p) in message for p in good)

    with caplog.at_level("WARNING", logger="nvae_hub.data"):
        dataset = data.build_dataset("imagefolder", "train", **kwargs, skip_bad_images=True)
    assert dataset.paths == good and set(dataset.skipped) == {truncated, garbage}
    assert str(truncated) in caplog.text and "left out" in caplog.text
    assert all(dataset[i].shape == (3, 8, 8) for i in range(len(dataset)))


def test_image_checks_are_cached_by_size_and_time_and_run_in_parallel(tmp_path, monkeypatch):
    good, truncated, garbage = make_folder(tmp_path, 4)
    paths = data.list_images(tmp_path / "train")
    cache = tmp_path / "checks.json"
    checked, lock = [], threading.Lock()
    two_at_once = threading.Barrier(2, timeout=10)
    original = data._image_problem

    def checking(path):
        with lock:
            checked.append(path)
            first_two = len(checked) <= 2
        if first_two:  # the first two files must be decoded at the same time, else the barrier times out
            two_at_once.wait()
        return original(path)

    monkeypatch.setattr(data, "_image_problem", checking)
    assert data.check_images(paths, cache, workers=2).keys() == {truncated, garbage}
    assert sorted(checked) == paths

    checked.clear()
    assert data.check_images(paths, cache, workers=2).keys() == {truncated, garbage}
    assert checked == []  # nothing changed, nothing decoded again

    write_png(truncated, 7)  # repaired: another size
    os.utime(good[0], ns=(0, 12345))  # touched: another time
    assert data.check_images(paths, cache, workers=2).keys() == {garbage}
    assert sorted(checked) == sorted([truncated, good[0]])
