"""What a public app accepts from its visitors (``app.py`` runs in public: every request is treated as hostile).

``AppFiles`` is the allow-list of files the app may open (the uploads Gradio received and the app's own files);
``open_image`` decodes such a file within the app's size limits; ``number`` and ``flag`` check the values of
sliders, boxes and checkboxes as JSON sends them; ``check_request`` checks a request's raw inputs before Gradio
acts on them. Each refusal is an ``InputError``: a ``gr.Error`` with a plain message for the page.
"""

from __future__ import annotations

import html
import os
import reprlib
import warnings
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_SIDE = 4096  # pixels per side of an input image
MAX_PIXELS = 16_000_000  # pixels of an input image


class InputError(gr.Error):
    """A problem with what the user gave, shown in the page (and not logged as a crash)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, print_exception=False)


# The one answer for every file the app may not open, whether or not it exists: nothing about it is looked up.
NOT_AN_UPLOAD = ("This app opens only files uploaded to it and its own examples: upload the image (or pick an "
                 "example) and try again.")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # what PIL may decode (no EPS, no PDF, ...)


def shown(value: Any) -> str:
    """A short, HTML-safe repr of a value someone sent, for a message (Gradio shows messages as HTML)."""
    return html.escape(reprlib.repr(value), quote=False)


class AppFiles:
    """The files the app may open: the uploads Gradio received (its own set of uploaded paths, which
    ``PublicBlocks`` attaches as ``uploads``) and the files the app ships (``ship``: its examples and Gradio's
    cached copies of them). A path is compared as given, before anything touches the file system, so a refused
    path gets the same answer whether or not it exists."""

    def __init__(self) -> None:
        self.uploads: Collection[str] = frozenset()
        self.shipped: set[str] = set()

    def ship(self, *paths: str) -> None:
        """Let the app open these files of its own."""
        self.shipped.update(paths)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and (path in self.shipped or path in self.uploads)

    def path_of(self, payload: Any) -> str:
        """The path of a Gradio file payload (``{"path": ..., "meta": {"_type": "gradio.FileData"}}``) that the
        app may open; else ``InputError(NOT_AN_UPLOAD)``."""
        path = payload.get("path") if isinstance(payload, dict) else None
        if path not in self:
            raise InputError(NOT_AN_UPLOAD)
        return path


def open_image(payload: Any, files: AppFiles, what: str | None = None) -> Image.Image:
    """The image of an upload (a Gradio file payload naming a file in ``files``), decoded and upright. Raises
    ``InputError`` with a message for the page when there is none, the file may not be opened, is empty, not an
    image, corrupt or too big. ``what`` names the image in messages (default: the uploaded file's name)."""
    if payload is None:
        raise InputError(f"No image given{f' for {what}' if what else ''}: upload or paste one, or pick an example.")
    path = files.path_of(payload)
    name = what or html.escape(Path(str(payload.get("orig_name") or path)).name[:100], quote=False)
    try:
        if os.path.getsize(path) == 0:
            raise InputError(f"{name} is an empty file (0 bytes), not an image.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit comes next
            image = Image.open(path, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise InputError(f"{name} is far too large: {error}. The limit is {MAX_SIDE} pixels per side and "
                         f"{MAX_PIXELS / 1e6:g} megapixels.") from error
    except UnidentifiedImageError as error:
        raise InputError(f"{name} is not an image that can be read ({', '.join(IMAGE_FORMATS)}).") from error
    except OSError as error:
        raise InputError(f"Cannot read {name}: {error.strerror or error}") from error
    with image:
        width, height = image.size
        if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
            raise InputError(f"{name} is {width}x{height} pixels, too large: the limit is {MAX_SIDE} pixels per "
                             f"side and {MAX_PIXELS / 1e6:g} megapixels. Please make it smaller.")
        if width == 0 or height == 0:
            raise InputError(f"{name} is empty (0 pixels).")
        try:
            image.load()  # decode now, so that a truncated or corrupt file fails here
            return ImageOps.exif_transpose(image)  # a copy, so the file can be closed
        except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as error:
            raise InputError(f"{name} is corrupt or truncated and cannot be decoded ({shown(str(error))})."
                             ) from error


def number(value: Any, name: str, low: float, high: float, integer: bool = False) -> float:
    """``value`` (an int or a float, as JSON has them) as a number in [low, high] (an int if ``integer``), else
    ``InputError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number, got {shown(value)}.")
    if not (low <= value <= high) or (integer and value != int(value)):  # NaN fails every comparison
        kind = "a whole number" if integer else "a number"
        raise InputError(f"{name} must be {kind} from {low:g} to {high:g}, got {shown(value)}.")
    return int(value) if integer else float(value)


def flag(value: Any, name: str) -> bool:
    """``value`` if it is true or false, else ``InputError`` naming it."""
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {shown(value)}.")
    return value


FILE_PAYLOAD = '{"path": ..., "meta": {"_type": "gradio.FileData"}}'


def input_name(component: Any) -> str:
    """How a message names an input component: its label, else its kind."""
    return getattr(component, "label", None) or type(component).__name__


def file_payloads(value: Any) -> Iterator[dict[str, Any]]:
    """Every dict with a 'path' key inside a JSON value: whatever Gradio or a handler could take for a file."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "path" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_request(endpoint: str, components: Sequence[Any], inputs: Sequence[Any], files: AppFiles) -> None:
    """Refuse the raw inputs of an API request to ``endpoint`` before Gradio acts on them: the wrong number of
    inputs, any file payload naming a file that is not in ``files``, or an image input that is no file payload."""
    if len(inputs) != len(components):
        names = ", ".join(input_name(component) for component in components)
        raise InputError(f"{endpoint} takes {len(components)} inputs ({names}), got {len(inputs)}.")
    for component, value in zip(components, inputs, strict=True):
        for payload in file_payloads(value):
            files.path_of(payload)
        if value is None or isinstance(value, dict):
            continue
        if isinstance(component, gr.Image):
            raise InputError(f"{input_name(component)} must be an uploaded image {FILE_PAYLOAD} or null, got "
                             f"{shown(value)}.")
        if isinstance(component, gr.ImageEditor):  # the sketchpad
            raise InputError(f"{input_name(component)} must be a sketchpad value (a dict with a 'composite' image) "
                             f"or null, got {shown(value)}.")

