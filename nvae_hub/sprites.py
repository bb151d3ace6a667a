"""Sprites: a procedural data set with known generative factors, in the spirit of dSprites.

Every image shows one white shape on a black background. Five factors, each on a grid, make
3 x 6 x 40 x 32 x 32 = 737,280 images, one for every combination:

| factor | values |
|---|---|
| shape | square, ellipse (2:1), heart |
| scale | 6 values from 0.5 to 1 (linear in side length; all three shapes have the same area at each scale) |
| orientation | 40 angles k * 9 degrees, k = 0..39, counter-clockwise on screen |
| pos_x, pos_y | 32 positions each, 1 pixel apart at 64x64 (0.5 at 32x32), over the middle half of the image |

Images are binary (0 or 1), rendered at 64x64 (``sprites``, as dSprites) or 32x32 (``sprites32``). A pixel is
white when at least half of it lies inside the shape, measured with 8x8 sub-samples per pixel. The shape's
area centroid is at the position, and it turns about that centroid.

Nothing is stored: a few thousand small templates (one per shape, scale, orientation and sub-pixel phase of
the position) are rendered once, and an image is its template pasted at its position. That takes a few
megabytes, where the whole grid would take 3 GB at 64x64 as bytes (377 MB even packed into bits), and renders
the grid in seconds (``bench/sprites.py``).

How it differs from dSprites (Matthey et al., 2017), whose files cannot be downloaded here: the pixels are not
the same (own shapes and sizes; the heart is the curve (x^2 + y^2 - 1)^3 = x^2 y^3), the shapes have equal
areas, positions are in pixel steps over the middle half of the image, and the orientation grid is
k * 360/40 degrees, so that no two values coincide (dSprites' 40 values run from 0 to 2 pi inclusive, so its
first and last orientations are the same). Published scores on dSprites therefore compare only roughly.

Ambiguities, as in dSprites: the square looks the same after a quarter turn and the ellipse after a half turn,
so their orientation is only determined modulo 90 and 180 degrees (10 and 20 distinct looks, not 40); only the
heart has 40. At 32x32 the smallest shapes (about 5 pixels across) show little of their orientation at all.
No representation can recover what the image does not show, so no model scores 1 on the orientation factor.

The split is fixed (it does not depend on any seed): 10,000 images drawn once with ``SPLIT_SEED`` form
"test", the other 727,280 "train". The disentanglement metrics draw from the whole grid, as their protocols do.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
NUM_IMAGES = math.prod(FACTOR_SIZES)
SCALES = np.linspace(0.5, 1.0, FACTOR_SIZES[1])
ORIENTATIONS = np.arange(FACTOR_SIZES[2]) * (2 * math.pi / FACTOR_SIZES[2])
IMAGE_SIZES = {"sprites": 64, "sprites32": 32}

SUPERSAMPLING = 8
"""Sub-samples per pixel side when rendering templates."""
SHAPE_SIDE = 0.30
"""Square root of every shape's area at scale 1, in image widths (the square's side)."""
ELLIPSE_ASPECT = 2.0
POSITION_SPAN = 0.5
"""The 32 positions are spread over this fraction of the image, centred, one step of span/32 apart."""
TEST_SIZE = 10_000
SPLIT_SEED = 20240610


def positions(image_size: int) -> np.ndarray:
    """Centre coordinate (in pixels, 0 = the image's left/top edge) of each of the 32 position values."""
    n = FACTOR_SIZES[3]
    step = POSITION_SPAN * image_size / n
    return (1 - POSITION_SPAN) / 2 * image_size + (np.arange(n) + 0.5) * step


def factor_values(factors: np.ndarray, image_size: int = 64) -> dict[str, np.ndarray]:
    """The physical values of factor indices ``factors`` (N, 5): shape name index, scale, orientation in
    radians, and the centroid's x and y in image widths (y downwards)."""
    factors = np.asarray(factors)
    centre = positions(image_size) / image_size
    return {"shape": factors[:, 0], "scale": SCALES[factors[:, 1]], "orientation": ORIENTATIONS[factors[:, 2]],
            "pos_x": centre[factors[:, 3]], "pos_y": centre[factors[:, 4]]}


# ---------------------------------------------------------------------------------------------- shapes


@functools.cache
def _heart_geometry() -> tuple[float, float]:
    """(area, centroid height) of the heart (x^2 + y^2 - 1)^3 <= x^2 y^3, measured on a fine grid."""
    grid = np.linspace(-1.5, 1.5, 2001)
    x, y = np.meshgrid(grid, grid)
    inside = _heart_inside(x, y)
    cell = (grid[1] - grid[0]) ** 2
    area = inside.sum() * cell
    return float(area), float((y * inside).sum() * cell / area)


def _heart_inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = x * x + y * y - 1
    return r * r * r <= x * x * y * y * y  # products, not powers: np.power is many times slower


def inside_shape(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether the point (u, v) lies inside shape number ``shape`` of unit area, upright, centroid at the origin
    (v points up)."""
    if SHAPES[shape] == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.5
    if SHAPES[shape] == "ellipse":
        b = 1 / math.sqrt(math.pi * ELLIPSE_ASPECT)  # pi * (aspect * b) * b = 1
        return (u / (ELLIPSE_ASPECT * b)) ** 2 + (v / b) ** 2 <= 1
    area, centroid = _heart_geometry()
    k = math.sqrt(area)
    return _heart_inside(u * k, v * k + centroid)


# ---------------------------------------------------------------------------------------------- renderer


class SpritesRenderer:
    """Renders sprites of one image size from factor indices; holds the templates.

    ``render(factors)`` takes an (N, 5) integer array of factor indices (shape, scale, orientation, pos_x,
    pos_y) and returns uint8 images (N, size, size) of 0s and 1s.
    """

    def __init__(self, image_size: int) -> None:
        if image_size < 16:
            raise ValueError(f"sprites need images of at least 16x16, got {image_size}")
        self.image_size = image_size
        centres = positions(image_size)
        self.cells = np.floor(centres).astype(np.int64)  # the pixel holding each position
        self.phases, self.phase_of = np.unique(centres - self.cells, return_inverse=True)
        radius = SHAPE_SIDE * image_size * max(math.sqrt(0.5), ELLIPSE_ASPECT / math.sqrt(math.pi * ELLIPSE_ASPECT))
        self.reach = math.ceil(radius) + 1  # template pixels on each side of the centre's pixel
        # canvas margin so that every template fits (the shapes themselves always lie inside the image)
        self.margin = max(0, self.reach - int(self.cells.min()), int(self.cells.max()) + self.reach + 1 - image_size)
        self.templates = self._render_templates()

    def _render_templates(self) -> np.ndarray:
        """uint8 (shapes, scales, orientations, phases, phases, W, W): the template of every combination, W = 2 *
        reach + 1 pixels centred on the pixel that holds the position."""
        s, width = SUPERSAMPLING, 2 * self.reach + 1
        # sub-sample offsets from the corner of the pixel that holds the centre
        sub = ((np.arange(width * s) + 0.5) / s - self.reach).astype(np.float32)
        templates = np.zeros((*FACTOR_SIZES[:3], len(self.phases), len(self.phases), width, width), np.uint8)
        unit = SHAPE_SIDE * self.image_size
        for py, phase_y in enumerate(self.phases):
            for px, phase_x in enumerate(self.phases):
                dx = sub[None, :] - phase_x  # (1, W*s): right of the centre
                dy = phase_y - sub[:, None]  # (W*s, 1): above the centre
                for o, angle in enumerate(ORIENTATIONS):
                    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
                    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotate the plane back by the angle
                    for j, scale in enumerate(SCALES):
                        size = np.float32(scale * unit)
                        for shape in range(len(SHAPES)):
                            inside = inside_shape(shape, u / size, v / size)
                            covered = inside.reshape(width, s, width, s).sum(axis=(1, 3), dtype=np.int16)
                            templates[shape, j, o, py, px] = 2 * covered >= s * s  # at least half covered
        return templates

    def render(self, factors: np.ndarray) -> np.ndarray:
        """uint8 images (N, size, size), 0 or 1, of the factor indices ``factors`` (N, 5)."""
        f = check_factors(factors)
        width, size, margin = 2 * self.reach + 1, self.image_size, self.margin
        tiles = self.templates[f[:, 0], f[:, 1], f[:, 2], self.phase_of[f[:, 4]], self.phase_of[f[:, 3]]]
        canvas = np.zeros((len(f), size + 2 * margin, size + 2 * margin), np.uint8)
        # windows[n, i, j] is the (width, width) block of canvas n whose top-left corner is pixel (i, j); the tile of
        # a sprite centred in image pixel (y, x) goes to the block at (y + margin - reach, x + margin - reach).
        windows = np.lib.stride_tricks.sliding_window_view(canvas, (width, width), axis=(1, 2), writeable=True)
        shift = margin - self.reach
        windows[np.arange(len(f)), self.cells[f[:, 4]] + shift, self.cells[f[:, 3]] + shift] = tiles
        return canvas[:, margin:margin + size, margin:margin + size]


@functools.cache
def renderer(image_size: int) -> SpritesRenderer:
    """The (cached) renderer of ``image_size`` images."""
    return SpritesRenderer(image_size)


def check_factors(factors: np.ndarray) -> np.ndarray:
    """``factors`` as an int64 (N, 5) array; ValueError unless every index is within its factor's range."""
    f = np.asarray(factors)
    if f.ndim != 2 or f.shape[1] != len(FACTOR_SIZES) or not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"expected integer factor indices of shape (N, {len(FACTOR_SIZES)}), got {f.dtype} "
                         f"{f.shape}")
    bad = (f < 0) | (f >= np.array(FACTOR_SIZES))
    if bad.any():
        column = int(np.argwhere(bad)[0, 1])
        raise ValueError(f"factor {FACTOR_NAMES[column]} has {FACTOR_SIZES[column]} values (0..."
                         f"{FACTOR_SIZES[column] - 1}), got index {int(f[bad][0])}")
    return f.astype(np.int64)


def factors_of(indices: np.ndarray) -> np.ndarray:
    """The factor indices (N, 5) of flat grid indices (row-major over shape, scale, orientation, pos_x, pos_y)."""
    return np.stack(np.unravel_index(np.asarray(indices, dtype=np.int64), FACTOR_SIZES), axis=1)


def sample_factors(count: int, seed: int | np.random.Generator) -> np.ndarray:
    """``count`` factor combinations (N, 5) drawn uniformly from the grid, with replacement."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, n, count) for n in FACTOR_SIZES], axis=1)


def split_indices(split: str) -> np.ndarray:
    """Sorted flat grid indices of "train" (727,280 images) or "test" (10,000), fixed by ``SPLIT_SEED``."""
    test = np.sort(np.random.default_rng(SPLIT_SEED).choice(NUM_IMAGES, TEST_SIZE, replace=False))
    if split == "test":
        return test
    if split == "train":
        return np.setdiff1d(np.arange(NUM_IMAGES), test, assume_unique=True)
    raise ValueError(f"unknown split {split!r} for sprites; choose one of: train, test")


# ---------------------------------------------------------------------------------------------- data set


class SpritesDataset(Dataset[torch.Tensor]):
    """The images of a set of grid indices, rendered when read: items are float32 (1, size, size) in {0, 1}.

    ``factors`` holds every item's factor indices (N, 5), in ``FACTOR_NAMES`` order.
    """

    factor_names = FACTOR_NAMES
    factor_sizes = FACTOR_SIZES

    def __init__(self, image_size: int, indices: np.ndarray) -> None:
        self.renderer = renderer(image_size)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.factors = factors_of(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def images(self, items: np.ndarray) -> torch.Tensor:
        """float32 (N, 1, size, size) images of items ``items`` (positions in this data set)."""
        return torch.from_numpy(self.renderer.render(self.factors[items])).unsqueeze(1).float()

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images(np.array([index]))[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        """A batch rendered at once (the DataLoader calls this instead of ``__getitem__`` per item)."""
        return list(self.images(np.asarray(indices)))


def sprites_dataset(name: str, split: str) -> SpritesDataset:
    """Split "train" or "test" of "sprites" (64x64) or "sprites32" (32x32)."""
    if name not in IMAGE_SIZES:
        raise ValueError(f"unknown sprites data set {name!r}; choose one of: {', '.join(IMAGE_SIZES)}")
    return SpritesDataset(IMAGE_SIZES[name], split_indices(split))
