"""The sprites data set (nvae_hub.sprites): every factor combination renders, the pictures show the factors
(area, centroid and orientation measured from the pixels), the renderer is deterministic, and build_dataset
serves it like any other data set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nvae_hub import sprites
from nvae_hub.data import build_dataset


def measure(image: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """(area in pixels, centroid x, centroid y, offsets of the white pixels from the centroid as complex numbers
    u + iv with v pointing up) of a binary image; pixel (row, col) covers [col, col + 1] x [row, row + 1]."""
    rows, cols = np.nonzero(image)
    cx, cy = cols.mean() + 0.5, rows.mean() + 0.5
    return len(rows), cx, cy, (cols + 0.5 - cx) - 1j * (rows + 0.5 - cy)


def measured_orientation(shape: str, z: np.ndarray) -> tuple[float, float]:
    """(orientation in radians, the period it is defined modulo) from the pixel offsets ``z``: the ellipse's
    long axis (second moment), the square's corners (fourth moment: at orientation 0 they sit at 45 degrees, so
    the moment points at 180 degrees) and the heart's lobes (the r^2-weighted mean offset points up at 0)."""
    if shape == "ellipse":
        return np.angle(np.sum(z**2)) / 2, math.pi
    if shape == "square":
        return np.angle(-np.sum(z**4)) / 4, math.pi / 2
    return np.angle(np.sum(z * np.abs(z) ** 2)) - math.pi / 2, 2 * math.pi


@pytest.mark.parametrize("size", [64, 32])
def test_pictures_show_their_factors(size: int) -> None:
    """Area = (side * scale)^2, the centroid at the position, the orientation as drawn, on 1500 random sprites."""
    factors = sprites.sample_factors(1500, seed=size)
    images = sprites.renderer(size).render(factors)
    centres = sprites.positions(size)
    assert images.dtype == np.uint8 and images.shape == (1500, size, size) and set(np.unique(images)) == {0, 1}
    for f, image in zip(factors, images, strict=True):
        area, cx, cy, z = measure(image)
        shape = sprites.SHAPES[f[0]]
        expected_area = (sprites.SHAPE_SIDE * size * sprites.SCALES[f[1]]) ** 2
        assert abs(area / expected_area - 1) < 0.15, (f, area, expected_area)
        assert abs(cx - centres[f[3]]) < 0.35 and abs(cy - centres[f[4]]) < 0.35, (f, cx, cy)
        if shape == "heart" and size == 32:
            continue  # its lobes are a weak dipole, which a few hundred pixels measure too roughly
        angle, period = measured_orientation(shape, z)
        error = (angle - sprites.ORIENTATIONS[f[2]] + period / 2) % period - period / 2
        assert abs(math.degrees(error)) < (30 if shape == "heart" else 6), (f, math.degrees(angle))


def test_factor_values_are_the_physical_quantities() -> None:
    values = sprites.factor_values(np.array([[2, 5, 10, 0, 31]]), image_size=64)
    assert values["shape"][0] == 2 and values["scale"][0] == 1.0
    assert values["orientation"][0] == pytest.approx(math.pi / 2)
    assert values["pos_x"][0] == pytest.approx(16.5 / 64) and values["pos_y"][0] == pytest.approx(47.5 / 64)


def test_every_factor_combination_renders_whole_at_32x32() -> None:
    """All 737,280 images: none empty, none clipped (each has all the pixels of its template)."""
    r = sprites.renderer(32)
    template_area = r.templates.sum(axis=(-1, -2), dtype=np.int64)  # (shape, scale, orientation, phase y, x)
    assert template_area.min() > 0
    for start in range(0, sprites.NUM_IMAGES, 1 << 16):
        f = sprites.factors_of(np.arange(start, min(start + (1 << 16), sprites.NUM_IMAGES)))
        area = r.render(f).sum(axis=(1, 2), dtype=np.int64)
        expected = template_area[f[:, 0], f[:, 1], f[:, 2], r.phase_of[f[:, 4]], r.phase_of[f[:, 3]]]
        np.testing.assert_array_equal(area, expected)


def test_every_shape_scale_and_orientation_fits_at_the_corners_at_64x64() -> None:
    r = sprites.renderer(64)
    combos = sprites.factors_of(np.arange(3 * 6 * 40) * 32 * 32)[:, :3]  # every (shape, scale, orientation)
    template_area = r.templates.sum(axis=(-1, -2), dtype=np.int64)[combos[:, 0], combos[:, 1], combos[:, 2], 0, 0]
    assert template_area.min() > 0
    for x, y in [(0, 0), (0, 31), (31, 0), (31, 31)]:
        f = np.concatenate([combos, np.tile([x, y], (len(combos), 1))], axis=1)
        np.testing.assert_array_equal(r.render(f).sum(axis=(1, 2), dtype=np.int64), template_area)


def test_rendering_is_deterministic() -> None:
    """A fresh renderer draws the same templates, and the same seed draws the same factors and images."""
    np.testing.assert_array_equal(sprites.SpritesRenderer(32).templates, sprites.renderer(32).templates)
    a, b, c = (sprites.sample_factors(200, seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(sprites.renderer(64).render(a), sprites.renderer(64).render(b))


def test_ambiguous_orientations_look_alike_and_the_heart_does_not() -> None:
    """Documented: the square repeats after 90 degrees (10 steps), the ellipse after 180 (20 steps). At 64x64 the
    centres lie on pixel centres, so the repeats are exact."""
    r = sprites.renderer(64)

    def image(shape: int, orientation: int) -> np.ndarray:
        return r.render(np.array([[shape, 5, orientation, 10, 20]]))[0]

    assert np.array_equal(image(0, 3), image(0, 13)) and not np.array_equal(image(0, 3), image(0, 8))
    assert np.array_equal(image(1, 3), image(1, 23)) and not np.array_equal(image(1, 3), image(1, 13))
    assert not any(np.array_equal(image(2, 3), image(2, 3 + k)) for k in (10, 20, 30))


def test_bad_factor_indices_and_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="orientation has 40 values"):
        sprites.renderer(32).render(np.array([[0, 0, 40, 0, 0]]))
    with pytest.raises(ValueError, match=r"shape \(N, 5\)"):
        sprites.renderer(32).render(np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match="at least 16x16"):
        sprites.SpritesRenderer(8)


def test_build_dataset_serves_fixed_disjoint_splits_with_their_factors() -> None:
    train = build_dataset("sprites32", "train", data_dir=None, image_size=32, channels=1, seed=3)
    test = build_dataset("sprites32", "test", data_dir=None, image_size=32, channels=1, seed=4)
    assert (len(train), len(test)) == (sprites.NUM_IMAGES - sprites.TEST_SIZE, sprites.TEST_SIZE)
    assert np.intersect1d(train.indices, test.indices).size == 0
    np.testing.assert_array_equal(test.indices, sprites.split_indices("test"))  # the seed does not change it
    item = test[5]
    assert item.dtype == torch.float32 and item.shape == (1, 32, 32) and set(item.unique().tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(item[0].numpy(), sprites.renderer(32).render(test.factors[5:6])[0])
    # The DataLoader renders whole batches (__getitems__): the same images as item by item.
    batch = next(iter(DataLoader(test, batch_size=16, shuffle=False)))
    assert torch.equal(batch, torch.stack([test[i] for i in range(16)]))
    assert build_dataset("sprites", "test", data_dir=None, image_size=64, channels=1)[0].shape == (1, 64, 64)


def test_build_dataset_says_what_shape_sprites_have() -> None:
    with pytest.raises(ValueError, match="sprites32 images are 1x32x32"):
        build_dataset("sprites32", "train", data_dir=None, image_size=64, channels=1)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        build_dataset("sprites", "valid", data_dir=None, image_size=64, channels=1)
