"""Stroke thickness and slant of digit-like images, as Morpho-MNIST defines them (Castro et al., 2019).

Each image is enlarged ``UPSCALE`` times (``skimage.transform.pyramid_expand``, bicubic) and binarised at half
way between its darkest and brightest pixel. Then

- thickness = 2 x the mean, over the medial axis (``skimage.morphology.medial_axis``), of the distance to the
  background, in original pixels;
- slant = arctan(-mu11 / mu02) from the central image moments of the enlarged grey image (x to the right, y
  down): 0 for an upright stroke, positive when the top leans to the right, in radians.

Blank images have no strokes: their thickness and slant are NaN.
"""

from __future__ import annotations

import numpy as np
from skimage.morphology import medial_axis
from skimage.transform import pyramid_expand

UPSCALE = 4
THRESHOLD = 0.5


def _single_channel(images: np.ndarray) -> np.ndarray:
    """(N, H, W) from (N, H, W) or (N, 1, H, W) images; colour images are refused."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 4:
        if images.shape[1] != 1:
            raise ValueError(f"thickness and slant are defined for one-channel images, got shape {images.shape}")
        images = images[:, 0]
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W) or (N, 1, H, W), got {images.shape}")
    return images


def _enlarged(image: np.ndarray, upscale: int) -> np.ndarray:
    return pyramid_expand(image, upscale=upscale, order=3) if upscale > 1 else image


def thickness(images: np.ndarray, upscale: int = UPSCALE, threshold: float = THRESHOLD) -> np.ndarray:
    """Mean stroke thickness of every image, in pixels, shape (N,)."""
    out = np.full(len(images), np.nan)
    for i, image in enumerate(_single_channel(images)):
        big = _enlarged(image, upscale)
        low, high = big.min(), big.max()
        if high - low < 1e-6:
            continue
        skeleton, distance = medial_axis(big >= low + (high - low) * threshold, return_distance=True)
        if skeleton.any():
            out[i] = 2.0 * distance[skeleton].mean() / upscale
    return out


def slant(images: np.ndarray, upscale: int = UPSCALE) -> np.ndarray:
    """Slant of every image in radians, shape (N,): arctan(-mu11 / mu02) of its (enlarged) grey values."""
    out = np.full(len(images), np.nan)
    for i, image in enumerate(_single_channel(images)):
        big = np.clip(_enlarged(image, upscale), 0.0, None)
        mass = big.sum()
        if mass <= 1e-6:
            continue
        y, x = np.indices(big.shape, dtype=np.float64)
        mean_x, mean_y = (x * big).sum() / mass, (y * big).sum() / mass
        mu11 = ((x - mean_x) * (y - mean_y) * big).sum() / mass
        mu02 = ((y - mean_y) ** 2 * big).sum() / mass
        if mu02 > 1e-12:
            out[i] = np.arctan(-mu11 / mu02)
    return out
