"""Pictures of model outputs: NumPy images to PIL, enlarged with crisp pixels, laid out in (labelled) grids.

Images are float arrays with values in [0, 1], one image ``(C, H, W)`` with C = 1 or 3, or a batch
``(N, C, H, W)``, as ``NVAE`` (``.numpy()``) and ``nvae_hub.onnx.OnnxNVAE`` return them. Pure PIL and NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = 255  # white, between the cells of a grid
TEXT_COLOUR = 0  # black
FONT_SIZE = 13


def display_zoom(image_size: int, target: int = 96) -> int:
    """The integer enlargement that brings an ``image_size`` image closest to ``target`` pixels (at least 1)."""
    return max(1, round(target / image_size))


def to_pil(image: np.ndarray, zoom: int = 1) -> Image.Image:
    """One image ``(C, H, W)`` (or ``(H, W)``) in [0, 1] as a PIL image (mode L or RGB), enlarged ``zoom`` times
    with nearest-neighbour sampling so that every pixel stays a sharp square."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        if image.shape[0] not in (1, 3):
            raise ValueError(f"expected 1 or 3 channels, got an image of shape {image.shape}")
        image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    elif image.ndim != 2:
        raise ValueError(f"expected an image of shape (C, H, W) or (H, W), got shape {image.shape}")
    pixels = np.rint(np.clip(np.nan_to_num(image), 0.0, 1.0) * 255.0).astype(np.uint8)
    picture = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
    if zoom != 1:
        picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST)
    return picture


def labelled_grid(
    rows: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    zoom: int = 1,
    gap: int = 4,
) -> Image.Image:
    """Images laid out row by row on a white sheet, with optional labels left of each row and above each
    column (labels may have several lines). Every image must have the same shape; rows may be shorter
    than the longest one. The result is mode RGB if any image has three channels, else L."""
    tiles = [[to_pil(image, zoom) for image in row] for row in rows]
    if not any(tiles):
        raise ValueError("labelled_grid needs at least one image")
    if row_labels is not None and len(row_labels) != len(tiles):
        raise ValueError(f"got {len(row_labels)} row labels for {len(tiles)} rows")
    num_columns = max(len(row) for row in tiles)
    if column_labels is not None and len(column_labels) != num_columns:
        raise ValueError(f"got {len(column_labels)} column labels for {num_columns} columns")
    mode = "RGB" if any(tile.mode == "RGB" for row in tiles for tile in row) else "L"
    tile_width, tile_height = tiles[0][0].size

    font = ImageFont.load_default(size=FONT_SIZE)
    ruler = ImageDraw.Draw(Image.new("L", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        _, _, right, bottom = ruler.multiline_textbbox((0, 0), text, font=font)
        return right, bottom

    label_width = max((text_size(text)[0] for text in row_labels), default=0) + 2 * gap if row_labels else 0
    header_height = max((text_size(text)[1] for text in column_labels), default=0) + gap if column_labels else 0
    column_width = max([tile_width] + [text_size(text)[0] + gap for text in column_labels or []])
    width = label_width + num_columns * (column_width + gap) + gap
    height = header_height + len(tiles) * (tile_height + gap) + gap

    sheet = Image.new(mode, (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    fill = TEXT_COLOUR if mode == "L" else (TEXT_COLOUR,) * 3
    for c, text in enumerate(column_labels or []):
        x = label_width + gap + c * (column_width + gap) + (column_width - text_size(text)[0]) // 2
        draw.multiline_text((x, gap), text, fill=fill, font=font, align="center")
    for r, row in enumerate(tiles):
        y = header_height + gap + r * (tile_height + gap)
        if row_labels:
            draw.multiline_text((gap, y + (tile_height - text_size(row_labels[r])[1]) // 2), row_labels[r],
                                fill=fill, font=font)
        for c, tile in enumerate(row):
            x = label_width + gap + c * (column_width + gap) + (column_width - tile_width) // 2
            sheet.paste(tile.convert(mode), (x, y))
    return sheet


def image_grid(images: np.ndarray, columns: int, zoom: int = 1, gap: int = 2) -> Image.Image:
    """A batch ``(N, C, H, W)`` as a grid of ``columns`` images per row (the last row may be shorter)."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty batch of shape (N, C, H, W), got shape {images.shape}")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    rows = [list(images[i:i + columns]) for i in range(0, len(images), columns)]
    return labelled_grid(rows, zoom=zoom, gap=gap)
