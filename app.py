"""The nvae_hub Gradio app: sample a pretrained NVAE, reconstruct your images, swap latent scales between two
images and see what each scale of the latent hierarchy controls.

    python app.py                                # the bundled models (MNIST first) at http://127.0.0.1:7860
    python app.py --model user/repo --port 8080  # one model from the Hugging Face Hub (or a local folder)
    NVAE_MODEL=path/to/folder python app.py

Reading guide. ``Explorer`` loads a model and picks the runtime that generates images: onnxruntime on an ONNX
export when one can be found or made (``find_onnx_export``), else PyTorch (``TorchEngine``). It has one method
per button of the page; each checks its raw inputs (raising ``InputError``, a ``gr.Error`` shown in the page),
runs the model and returns PNG-ready pictures and a line of Markdown. ``ModelMenu`` holds one ``Explorer`` per
model the page serves (every bundled model, or the one given) and sends each request to the model it names. The
app runs in public, so every request is treated as hostile: images are opened only from files Gradio received as
uploads or the app ships, and ``PublicBlocks`` checks each request before Gradio touches the files it names
(``nvae_hub.app_input`` holds these checks: ``AppFiles``, ``open_image``, ``check_request``). ``build_app`` lays
out the page and wires the buttons to those methods; ``launch`` serves it with the app's limits; ``main`` parses
the command line and checks the port before the models load.
Importing this file does no heavy work, so it also serves as a Hugging Face Space's ``app.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import logging
import math
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import gradio as gr
import numpy as np
import torch
from gradio.exceptions import InvalidPathError
from huggingface_hub import metadata_load
from PIL import Image
from pydantic import ValidationError

from nvae_hub import NVAE, hub, load_pretrained, validation
from nvae_hub.app_input import NOT_AN_UPLOAD, AppFiles, InputError, check_request, flag, number, open_image, shown
from nvae_hub.card import CARD_NAME
from nvae_hub.data import cache_root, fashion_mnist_arrays, image_to_tensor, mnist_arrays
from nvae_hub.visual import display_zoom, image_grid, labelled_grid, to_pil

logger = logging.getLogger("nvae_hub.app")

DEFAULT_MODEL = "mnist"
MAX_FILE_SIZE = "10mb"  # per upload
MAX_SAMPLES = 64
MAX_TEMPERATURE = 1.2
DEFAULT_TEMPERATURE = 0.7
BPD_SAMPLES = 16  # importance samples K of the bits/dim estimate
SAMPLING_BN_TEMPERATURE = 0.7
"""Samples decode with BatchNorm statistics re-estimated at this temperature, as the paper's samples do
(``NVAE.readjust_bn``; the ONNX export's sampling graph likewise); encoding and decoding latents keep the learned
ones. With the learned statistics the bundled MNIST model's samples at 0.7 drift towards thick eights (30% of them,
against 13% re-estimated). None keeps the learned statistics for sampling too."""
NUM_EXAMPLES = 10  # one per class of the test sets below
TEST_SETS = {"mnist": "MNIST test set", "fashion-mnist": "Fashion-MNIST test set"}  # where examples come from
ONNX_META_FILE = "nvae_onnx.json"  # what marks a folder as an ONNX export (nvae_hub.onnx.META_FILE)
RUNTIMES = ("auto", "onnx", "torch")
# Small images (a 28x28 digit) fill their box with sharp pixels instead of sitting tiny in its middle.
ANALYSES_DIR = Path(__file__).resolve().parent / "docs" / "analysis"  # `make analysis` writes docs/analysis/NAME/
ANALYSIS_FIGURES = {"kl": "KL per group and active units", "latent-map": "t-SNE of the latents and k-NN accuracy",
                    "control": "Variable control: transfer matrix T[scale, property]",
                    "sample-quality": "Samples at temperature 0.7 read by a classifier"}
CSS = ".pixelated img { image-rendering: pixelated; height: 160px !important; max-width: 100%; object-fit: contain; }"


# ====================================================================== runtimes
class Engine(Protocol):
    """What the app needs from a runtime, on float32 NumPy arrays (``nvae_hub.onnx.OnnxNVAE`` has it)."""

    def decode_noise(self, noise: Sequence[np.ndarray], temperature: Sequence[float]) -> np.ndarray:
        """Images (N, C, H, W) from prior noise, one array per group, and one temperature per group."""
        ...

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        """Posterior means of images x, one array per group."""
        ...

    def decode(self, latents: Sequence[np.ndarray]) -> np.ndarray:
        """Images decoded from one latent array per group."""
        ...


class TorchEngine:
    """An ``NVAE`` behind the same NumPy interface as ``OnnxNVAE``: the fallback runtime."""

    def __init__(self, model: NVAE) -> None:
        self.model = model

    def _tensors(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.model.device) for a in arrays]

    @torch.inference_mode()
    def decode_noise(self, noise: Sequence[np.ndarray], temperature: Sequence[float]) -> np.ndarray:
        """``NVAE.decode_noise`` on NumPy arrays."""
        return self.model.decode_noise(self._tensors(noise), list(temperature)).float().cpu().numpy()

    @torch.inference_mode()
    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        """``NVAE.encode`` (posterior means) on NumPy arrays."""
        return [z.float().cpu().numpy() for z in self.model.encode(self._tensors([x])[0]).z]

    @torch.inference_mode()
    def decode(self, latents: Sequence[np.ndarray]) -> np.ndarray:
        """``NVAE.decode`` on NumPy arrays."""
        return self.model.decode(self._tensors(latents)).float().cpu().numpy()


def model_folder(model_name_or_path: str) -> Path | None:
    """The folder of a local or bundled model (as ``load_pretrained`` finds it); None for a Hub repo."""
    return Path(model_name_or_path) if Path(model_name_or_path).is_dir() else hub.bundled_model(model_name_or_path)


def card_dataset(model_name_or_path: str) -> str | None:
    """The data set a local or bundled model was trained on, as its model card's metadata names it (the first of
    ``datasets``), else None."""
    folder = model_folder(model_name_or_path)
    card = folder / CARD_NAME if folder is not None else None
    if card is None or not card.is_file():
        return None
    try:
        datasets = (metadata_load(card) or {}).get("datasets")
    except Exception as error:  # a card is text anyone may have edited: never a reason not to start
        logger.warning("cannot read the metadata of %s (%s: %s)", card, type(error).__name__, error)
        return None
    if isinstance(datasets, str):
        return datasets
    return datasets[0] if isinstance(datasets, list) and datasets and isinstance(datasets[0], str) else None


def weights_digest(model: NVAE, sampling_bn_temperature: float | None = None) -> str:
    """A short hash of the model's config and weights (and of the temperature its sampling BatchNorm statistics
    are re-estimated at, if any): the key of its ONNX export in the cache."""
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if sampling_bn_temperature is not None:
        digest.update(f"sampling BatchNorm re-estimated at {sampling_bn_temperature!r}".encode())
    return digest.hexdigest()[:16]


def find_onnx_export(model: NVAE, model_name_or_path: str, onnx_dir: str | os.PathLike | None,
                     cache: Path, digest: str, sampling_bn_temperature: float | None = None) -> Path:
    """The folder of an ONNX export of ``model``: ``onnx_dir`` if given, else ``<model folder>/onnx`` if it
    holds one, else ``<cache>/onnx/<digest>``, exported there (once; later starts reuse it) if missing, with the
    sampling graph's BatchNorm statistics re-estimated at ``sampling_bn_temperature`` (if given). A given or
    bundled export is used as it was made (``describe`` says which statistics its samples use)."""
    if onnx_dir is not None:
        return Path(onnx_dir)
    folder = model_folder(model_name_or_path)
    if folder is not None and (folder / "onnx" / ONNX_META_FILE).is_file():
        return folder / "onnx"
    target = cache / "onnx" / digest
    if not (target / ONNX_META_FILE).is_file():
        from nvae_hub.export import export_onnx  # imports onnx and the exporter, so only when needed

        logger.info("exporting %s to ONNX in %s (once; later starts reuse it)", model_name_or_path, target)
        # The exporter warns about every torchvision op it cannot register; the NVAE needs none of them.
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{digest}-{secrets.token_hex(8)}"
        staging.mkdir()  # not mkdtemp, whose folders are private (0700): the umask decides, as for any folder
        try:
            export_onnx(model, staging, source=str(model_name_or_path),
                        readjust_bn_temperature=sampling_bn_temperature)
            os.replace(staging, target)  # atomic: a concurrent start sees all of it or none
        except OSError:
            if not (target / ONNX_META_FILE).is_file():
                raise
            logger.info("another start exported %s first; using its export", model_name_or_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # left only if the export failed or another start won
    return target


def load_onnx_engine(export_dir: Path, model: NVAE) -> tuple[Engine, str]:
    """``OnnxNVAE`` on ``export_dir`` and a description of it; refuses an export of a different model."""
    import onnxruntime as ort

    from nvae_hub.onnx import OnnxNVAE

    engine = OnnxNVAE(export_dir)
    ours = {k: v for k, v in model.config.to_dict().items() if k != "name"}
    theirs = {k: v for k, v in engine.meta.get("config", {}).items() if k != "name"}
    if ours != theirs:
        raise ValueError(f"the ONNX export in {export_dir} is of a different model config")
    return engine, f"onnxruntime {ort.__version__} ({engine.provider})"


# ====================================================================== small helpers
def scale_label(scale: int, num_scales: int, side: int) -> str:
    """E.g. 'scale 0 (coarsest, 4x4)': a scale and the height x width of its latents."""
    if num_scales > 1 and scale == 0:
        return f"scale {scale} (coarsest, {side}x{side})"
    if num_scales > 1 and scale == num_scales - 1:
        return f"scale {scale} (finest, {side}x{side})"
    return f"scale {scale} ({side}x{side})"


def elapsed_ms(start: float) -> str:
    """Milliseconds since ``start`` (a ``time.perf_counter()``), for the page."""
    return f"{(time.perf_counter() - start) * 1000:.0f} ms"


# ====================================================================== the model and the buttons' actions
class Explorer:
    """A pretrained NVAE, the runtime that generates its images, and one method per button of the page.

    ``runtime`` is 'auto' (onnxruntime if an export can be found or made, else PyTorch), 'onnx' (fail if it
    cannot be used) or 'torch'. Samples decode with BatchNorm statistics re-estimated at
    ``sampling_bn_temperature`` (``SAMPLING_BN_TEMPERATURE``; None: the learned ones). Bits per dimension are
    always computed with PyTorch, with ``bpd_samples`` importance samples. The methods take images as Gradio file
    payloads and open only those in ``files``. A page that serves several models has per-scale inputs
    (temperatures, A/B choices) for the model with the most scales: ``scale_inputs`` says how many; those past this
    model's scales are checked but unused.
    """

    def __init__(self, model_name_or_path: str, onnx_dir: str | os.PathLike | None = None, *,
                 runtime: str = "auto", cache_dir: str | os.PathLike | None = None,
                 bpd_samples: int = BPD_SAMPLES, files: AppFiles | None = None,
                 sampling_bn_temperature: float | None = SAMPLING_BN_TEMPERATURE) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if sampling_bn_temperature is not None:
            sampling_bn_temperature = validation.temperature(sampling_bn_temperature, "sampling_bn_temperature")
        self.sampling_bn_temperature = sampling_bn_temperature
        self.name = str(model_name_or_path)
        self.bpd_samples = bpd_samples
        self.cache = cache_root(cache_dir)
        model = load_pretrained(model_name_or_path, device="cuda" if torch.cuda.is_available() else "cpu")
        self.digest = weights_digest(model, sampling_bn_temperature)
        self.num_parameters = sum(p.numel() for p in model.parameters())  # as trained, before folding
        model.fold_weight_norm()  # the app never trains: plain weights are faster
        self.model = model
        self.config = cfg = model.config
        self.scale_of_group = list(model.scale_of_group)
        self.groups_per_scale = list(model.groups_per_scale)
        self.num_scales = model.num_scales
        self.latent_shapes = model.latent_shapes()
        self.scale_labels = [scale_label(s, self.num_scales, cfg.latent_shape(s)[1]) for s in range(self.num_scales)]
        self.scale_inputs = self.num_scales
        self.dataset = card_dataset(self.name)
        self.zoom = display_zoom(cfg.image_size)

        self.engine: Engine = TorchEngine(model)
        self.runtime = f"PyTorch {torch.__version__} ({model.device})"
        self.runtime_note = ""
        if runtime != "torch":
            try:
                export_dir = find_onnx_export(model, self.name, onnx_dir, self.cache, self.digest,
                                              sampling_bn_temperature)
                self.engine, self.runtime = load_onnx_engine(export_dir, model)
                logger.info("runtime: %s on %s", self.runtime, export_dir)
            except Exception as error:
                if runtime == "onnx":
                    raise
                self.runtime_note = f"onnxruntime is not used: {type(error).__name__}: {error}"
                logger.warning("falling back to PyTorch; %s", self.runtime_note)
        if isinstance(self.engine, TorchEngine) and sampling_bn_temperature is not None:
            # Only PyTorch samples need it (an ONNX export holds its own); encode and decode keep the learned ones.
            model.readjust_bn(sampling_bn_temperature)
        self.examples, self.examples_source = self._write_examples()
        self.files = files if files is not None else AppFiles()

    # ------------------------------------------------------------------ model-space images and latents
    def noise(self, n: int, seed: int) -> list[np.ndarray]:
        """Standard-normal prior noise for ``n`` images, one array per group, drawn with NumPy from ``seed`` (the
        same draw as ``OnnxNVAE.sample_noise``, so a seed gives the same images in both runtimes)."""
        rng = np.random.default_rng(seed)
        return [rng.standard_normal((n, *shape), dtype=np.float32) for shape in self.latent_shapes]

    def to_model_space(self, image: Image.Image, invert: bool = False) -> tuple[np.ndarray, str]:
        """An image of any size and mode as the model's data, (C, S, S) float32, and how it was converted:
        transparency flattened onto white, converted to grayscale or RGB, optionally inverted, the shorter
        side resized to S and the centre cropped, then binarised (Bernoulli models) or quantised to the
        model's bits (8 bits: kept as they are)."""
        cfg = self.config
        steps = [f"{image.mode} {image.width}x{image.height}"]
        if "A" in image.getbands() or "transparency" in image.info:
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            steps.append("transparent areas made white")
        x = image_to_tensor(image, cfg.image_size, cfg.channels).numpy()
        steps.append("grayscale" if cfg.channels == 1 else "RGB")
        if invert:
            x = 1.0 - x
            steps.append("inverted")
        steps.append(f"shorter side resized to {cfg.image_size} px, centre {cfg.image_size}x{cfg.image_size} crop")
        if cfg.output == "bernoulli":
            x = (x >= 0.5).astype(np.float32)
            steps.append("binarised at 0.5 (the model is Bernoulli)")
        elif cfg.num_bits != 8:
            levels = 2**cfg.num_bits - 1
            x = np.rint(x * levels).astype(np.float32) / levels
            steps.append(f"quantised to {cfg.num_bits} bits")
        else:
            steps.append("256 levels kept (the model is an 8-bit logistic mixture)")
        return x, " → ".join(steps)

    def read(self, payload: Any, invert: bool = False, what: str | None = None) -> tuple[np.ndarray, str]:
        """``to_model_space(open_image(payload))``."""
        return self.to_model_space(open_image(payload, self.files, what), invert)

    def check_upload(self, payload: Any) -> None:
        """Raise ``InputError`` if an upload cannot be used (when it arrives, before any button is pressed)."""
        if payload is not None:
            self.read(payload)

    def temperatures(self, temperature: Any, override: bool, scale_temperatures: Sequence[Any]) -> list[float]:
        """One temperature per group: ``temperature`` everywhere, or with ``override`` the one of its scale (all
        are checked, used or not)."""
        temperature = number(temperature, "The temperature", 0, MAX_TEMPERATURE)
        per_scale = [number(t, f"The temperature of scale {s}", 0, MAX_TEMPERATURE)
                     for s, t in enumerate(scale_temperatures)]
        if not flag(override, "Use per-scale temperatures"):
            return [temperature] * len(self.scale_of_group)
        if len(per_scale) != self.scale_inputs:
            raise InputError(f"Expected {self.scale_inputs} per-scale temperatures, got {len(per_scale)}.")
        return [per_scale[s] for s in self.scale_of_group]

    def _write_examples(self) -> tuple[list[str], str]:
        """Example inputs as PNG files (in the cache): for a 28x28 grayscale model trained on MNIST or
        Fashion-MNIST (as its card says; a Bernoulli one without a card is taken for MNIST), the first test image
        of each class; else samples of the model (binarised or quantised like an input)."""
        cfg = self.config
        folder = self.cache / "app-examples" / self.digest
        pictures: list[np.ndarray] = []
        source = ""
        dataset = self.dataset or ("mnist" if cfg.output == "bernoulli" else None)
        if (cfg.image_size, cfg.channels) == (28, 1) and dataset in TEST_SETS:
            try:
                x, y = (mnist_arrays if dataset == "mnist" else fashion_mnist_arrays)(self.cache)["test"]
                pictures = [x[int(np.flatnonzero(y == label)[0])] for label in range(NUM_EXAMPLES)]
                source = TEST_SETS[dataset]
            except Exception as error:  # no cached copy and no network: samples will do
                logger.warning("%s images unavailable (%s: %s); using samples as examples", TEST_SETS[dataset],
                               type(error).__name__, error)
        if not pictures:
            temperatures = [DEFAULT_TEMPERATURE] * len(self.scale_of_group)
            images = self.engine.decode_noise(self.noise(NUM_EXAMPLES, 0), temperatures)
            pictures = [self.to_model_space(to_pil(image))[0] for image in images]
            source = f"samples of the model at temperature {DEFAULT_TEMPERATURE}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, picture in enumerate(pictures):
            path = folder / f"example-{i}.png"
            to_pil(picture).save(path)
            paths.append(str(path))
        return paths, source

    # ------------------------------------------------------------------ Sample
    def sample(self, temperature: float, count: int, seed: int, override: bool,
               *scale_temperatures: float) -> tuple[Image.Image, str]:
        """A grid of ``count`` samples from the prior at the chosen temperature(s)."""
        count = number(count, "The number of images", 1, MAX_SAMPLES, integer=True)
        seed = number(seed, "The seed", 0, 2**32 - 1, integer=True)
        temps = self.temperatures(temperature, override, scale_temperatures)
        start = time.perf_counter()
        images = self.engine.decode_noise(self.noise(count, seed), temps)
        took = elapsed_ms(start)
        if override:
            per_scale = ", ".join(f"{temps[self.scale_of_group.index(s)]:g}" for s in range(self.num_scales))
            how = f"per-scale temperatures {per_scale} (coarsest first)"
        else:
            how = f"temperature {temps[0]:g}"
        grid = image_grid(images, columns=math.ceil(math.sqrt(count)), zoom=self.zoom)
        return grid, f"{count} samples, {how}, seed {seed}: {took} with {self.runtime}."

    # ------------------------------------------------------------------ Reconstruct
    def reconstruct(self, image: Any, invert: bool = False) -> tuple[Image.Image, Image.Image, str]:
        """The uploaded image as the model sees it, its reconstruction and its bits per dimension."""
        x, conversion = self.read(image, flag(invert, "Invert colours"))
        return self._reconstruct(x, conversion)

    def reconstruct_drawing(self, sketch: Any, invert: bool = True) -> tuple[Image.Image, Image.Image, str]:
        """``reconstruct`` for a drawing: Gradio's sketchpad value, a dict whose 'composite' is the picture."""
        invert = flag(invert, "Invert colours")
        if sketch is not None and not isinstance(sketch, dict):
            raise InputError(f"The drawing must be a sketchpad value (a dict with a 'composite' image), got "
                             f"{shown(sketch)}.")
        composite = (sketch or {}).get("composite")
        if composite is None:
            raise InputError("The drawing is empty: draw something first.")
        picture = open_image(composite, self.files, what="The drawing")
        low, high = picture.convert("L").getextrema()
        if low == high:
            raise InputError("The drawing is empty: draw something first.")
        return self._reconstruct(*self.to_model_space(picture, invert))

    def _reconstruct(self, x: np.ndarray, conversion: str) -> tuple[Image.Image, Image.Image, str]:
        start = time.perf_counter()
        reconstruction = self.engine.decode(self.engine.encode(x[None]))[0]
        took = elapsed_ms(start)
        start = time.perf_counter()
        # A generator of this request's own: the same image gets the same estimate, whatever else runs meanwhile.
        generator = torch.Generator(self.model.device).manual_seed(0)
        bpd = self.model.bits_per_dim(torch.from_numpy(x[None]).to(self.model.device), self.bpd_samples, generator)
        bpd_took = elapsed_ms(start)
        message = (f"**{float(bpd[0]):.4f} bits/dim** (importance-weighted estimate of -log2 p(x) per pixel and "
                   f"channel with K={self.bpd_samples} posterior samples, PyTorch, {bpd_took}). "
                   f"Reconstruction (decoded posterior means): {took} with {self.runtime}.\n\n"
                   f"Conversion: {conversion}.")
        return to_pil(x, self.zoom), to_pil(reconstruction, self.zoom), message

    # ------------------------------------------------------------------ Swap and interpolate
    def _encode_pair(self, image_a: Any, image_b: Any) -> list[np.ndarray]:
        """The posterior means of A and B, one array (2, C, H, W) per group."""
        x_a, _ = self.read(image_a, what="Image A")
        x_b, _ = self.read(image_b, what="Image B")
        return self.engine.encode(np.stack([x_a, x_b]))

    def swap(self, image_a: Any, image_b: Any, *choices: str) -> tuple[Image.Image, Image.Image, str]:
        """A's latents with the scales chosen 'B' taken from B, and the table of all 2^S such combinations."""
        if len(choices) != self.scale_inputs or any(c not in ("A", "B") for c in choices):
            unused = self.scale_inputs - self.num_scales
            more = f" (and for the {unused} unused inputs of other models' scales)" if unused else ""
            raise InputError(f"Choose A or B for each of the {self.num_scales} scales{more}, got "
                             f"{shown(list(choices))}.")
        choices = choices[:self.num_scales]
        start = time.perf_counter()
        latents = self._encode_pair(image_a, image_b)
        combinations = list(itertools.product("AB", repeat=self.num_scales))
        source = np.array([[combo[s] == "B" for s in self.scale_of_group] for combo in combinations], dtype=int)
        mixed = [z[source[:, g]] for g, z in enumerate(latents)]  # group g of combination k from A (0) or B (1)
        images = self.engine.decode(mixed)
        took = elapsed_ms(start)

        # The table: rows vary the coarser half of the scales, columns the finer half.
        n_row_scales = self.num_scales // 2
        n_columns = 2 ** (self.num_scales - n_row_scales)
        rows = [list(images[r * n_columns:(r + 1) * n_columns]) for r in range(2**n_row_scales)]

        def label(combo: Sequence[str], scales: range) -> str:
            return "\n".join(f"scale {s}: {combo[i]}" for i, s in enumerate(scales))

        row_scales, column_scales = range(n_row_scales), range(n_row_scales, self.num_scales)
        row_labels = [label(c, row_scales) for c in itertools.product("AB", repeat=n_row_scales)]
        column_labels = [label(c, column_scales) for c in itertools.product("AB", repeat=len(column_scales))]
        table = labelled_grid(rows, row_labels if n_row_scales else None, column_labels, zoom=self.zoom)
        chosen = images[combinations.index(tuple(choices))]
        from_b = [s for s, c in enumerate(choices) if c == "B"]
        what = f"scale{'s' if len(from_b) > 1 else ''} {', '.join(map(str, from_b))} from B" if from_b else "all from A"
        message = (f"Result: A's latents with {what}. Table: all {len(combinations)} combinations (scale 0 is the "
                   f"coarsest); 'A' everywhere reconstructs A, 'B' everywhere reconstructs B. {took} with "
                   f"{self.runtime}.")
        return to_pil(chosen, self.zoom), table, message

    def interpolate(self, image_a: Any, image_b: Any, steps: int) -> tuple[Image.Image, str]:
        """Decoded linear interpolations between the latents (posterior means) of A and B."""
        steps = number(steps, "The number of steps", 3, 12, integer=True)
        start = time.perf_counter()
        latents = self._encode_pair(image_a, image_b)
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None, None, None]
        images = self.engine.decode([(1 - t) * z[0] + t * z[1] for z in latents])
        took = elapsed_ms(start)
        labels = [f"t={float(v):.2f}" for v in t.ravel()]
        labels[0], labels[-1] = "A", "B"
        strip = labelled_grid([list(images)], column_labels=labels, zoom=self.zoom)
        return strip, f"{steps} steps from A to B, every group interpolated linearly: {took} with {self.runtime}."

    # ------------------------------------------------------------------ Explore scales
    def explore(self, temperature: float, seed: int, variations: int) -> tuple[Image.Image, str]:
        """One sample, then per scale a row where only that scale's noise is drawn afresh."""
        temps = self.temperatures(temperature, False, ())
        seed = number(seed, "The seed", 0, 2**32 - 1, integer=True)
        variations = number(variations, "The number of variations", 1, 12, integer=True)
        start = time.perf_counter()
        base = self.noise(1, seed)
        fresh = self.noise(variations, seed + 1)
        noise = []
        for g, scale in enumerate(self.scale_of_group):
            kept = np.repeat(base[g], variations, axis=0)
            rows = [fresh[g] if s == scale else kept for s in range(self.num_scales)]
            noise.append(np.concatenate([base[g], *rows]))  # the sample, then one block of rows per scale
        images = self.engine.decode_noise(noise, temps)
        took = elapsed_ms(start)
        rows = [[images[0], *images[1 + s * variations:1 + (s + 1) * variations]] for s in range(self.num_scales)]
        labels = [f"{label}\nresampled" for label in self.scale_labels]
        columns = ["sample", *(f"new {i + 1}" for i in range(variations))]
        grid = labelled_grid(rows, labels, columns, zoom=self.zoom)
        return grid, (f"Each row keeps the sample's noise except at one scale, where it is drawn {variations} times "
                      f"afresh: what changes is what that scale controls. Temperature {temps[0]:g}, seed {seed}: "
                      f"{took} with {self.runtime}.")

    # ------------------------------------------------------------------ the page
    def scale_control(self, scale: int, groups: bool = True) -> dict[str, Any]:
        """The label and visibility of the page's per-scale input ``scale`` (a temperature slider, or with
        ``groups=False`` an A/B choice) for this model: hidden past its scales."""
        if scale >= self.num_scales:
            return {"label": f"scale {scale} (not in this model)", "visible": False}
        n = self.groups_per_scale[scale]
        label = self.scale_labels[scale] + (f", {n} group{'s' if n > 1 else ''}" if groups else "")
        return {"label": label, "visible": True}

    def describe(self) -> str:
        """Markdown about the model and the runtime."""
        cfg = self.config
        kind = "grayscale" if cfg.channels == 1 else "RGB"
        output = "Bernoulli" if cfg.output == "bernoulli" else f"{cfg.num_bits}-bit logistic-mixture"
        groups = ", ".join(f"{n} group{'s' if n > 1 else ''} at {cfg.latent_shape(s)[1]}x{cfg.latent_shape(s)[2]}"
                           for s, n in enumerate(self.groups_per_scale))
        note = f" ({self.runtime_note})" if self.runtime_note else ""
        preset = "custom config" if cfg.name == "custom" else f"preset {cfg.name}"
        return (f"**Model** `{self.name}` ({preset}, {self.num_parameters / 1e6:.2f}M parameters): "
                f"{cfg.image_size}x{cfg.image_size} {kind} images, {output} output, {self.num_scales} latent "
                f"scales with {groups} (coarsest first).  \n"
                f"**Runtime**: {self.runtime}{note}; bits/dim with PyTorch.  \n"
                f"**Samples** decode with {self.sampling_statistics()}.")

    def sampling_statistics(self) -> str:
        """Which BatchNorm statistics the runtime's sampling graph uses: re-estimated (at what temperature) or
        learned. An ONNX export says it in its metadata."""
        meta = getattr(self.engine, "meta", None)
        temperature = (self.sampling_bn_temperature if meta is None
                       else (meta.get("bn_readjust") or {}).get("temperature"))
        if temperature is None:
            return "the BatchNorm statistics learned in training"
        return f"BatchNorm statistics re-estimated at temperature {temperature:g} (as the paper's samples)"


# ====================================================================== several models on one page
def bundled_models() -> list[str]:
    """The names of the bundled models (``nvae_hub.hub.BUNDLED_MODELS``), ``DEFAULT_MODEL`` first."""
    return sorted(hub.BUNDLED_MODELS, key=lambda name: (name != DEFAULT_MODEL, name))


def css_name(name: str) -> str:
    """``name`` as a part of an HTML element id: letters, digits, '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


class ModelMenu:
    """The models a page serves, by the names its model menu lists (the first is the default): one ``Explorer``
    each, made (loaded, and exported to ONNX as ``Explorer`` does) once when the app starts, so that switching is
    instant. A request names its model by the keyword ``model``: only these names are accepted, compared as
    strings (a name a request sends is never opened as a path)."""

    def __init__(self, models: Sequence[str], files: AppFiles, **options: Any) -> None:
        if len(models) > 1 and options.get("onnx_dir") is not None:
            raise ValueError("onnx_dir is the export of one model, not of several")
        self.explorers = {str(name): Explorer(name, files=files, **options) for name in models}
        self.names = list(self.explorers)
        self.default = self.names[0]
        # The page has per-scale inputs for the model with the most scales.
        self.scale_inputs = max(explorer.num_scales for explorer in self.explorers.values())
        for explorer in self.explorers.values():
            explorer.scale_inputs = self.scale_inputs

    def __getitem__(self, name: Any) -> Explorer:
        """The ``Explorer`` of model ``name``; ``InputError`` for anything that is not one of ``names``."""
        if not isinstance(name, str) or name not in self.explorers:
            raise InputError(f"The model must be one of {', '.join(self.names)}, got {shown(name)}.")
        return self.explorers[name]

    def handler(self, action: str) -> Callable[..., Any]:
        """``Explorer.<action>`` of the model a request names: a function with the method's parameters (so that
        the API keeps their names) and the keyword ``model``, which defaults to the default model."""
        method = getattr(Explorer, action)

        def handler(*inputs: Any, model: Any = self.default) -> Any:
            return getattr(self[model], action)(*inputs)

        handler.__name__, handler.__doc__ = action, method.__doc__
        model = inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, default=self.default)
        parameters = list(inspect.signature(method).parameters.values())[1:]  # without self
        handler.__signature__ = inspect.Signature([*parameters, model])  # what Gradio reads
        return handler


# ====================================================================== analyses of the bundled models
class AnalysisGallery:
    """The bundled models' analyses (``python -m nvae_hub.analysis``, written by ``make analysis`` into
    ``folder/NAME/``): key numbers and figures, read once when the app starts, never per request."""

    def __init__(self, folder: Path) -> None:
        from nvae_hub.analysis.report import key_numbers, load_results

        self.models: dict[str, tuple[str, list[Image.Image | None]]] = {}
        for name in hub.BUNDLED_MODELS:
            results = load_results(folder / name)
            if not results:
                continue
            figures: list[Image.Image | None] = []
            for item in ANALYSIS_FIGURES:
                path = folder / name / f"{item}.png"
                if item in results and path.is_file():
                    with Image.open(path) as figure:
                        figures.append(figure.convert("RGB"))
                else:
                    figures.append(None)
            source = (f"Computed by `python -m nvae_hub.analysis all --model {name} --dataset {name}` "
                      f"(report: `docs/analysis/{name}/report.md`).")
            self.models[name] = (f"{key_numbers(results)}\n\n{source}", figures)

    def show(self, name: Any) -> tuple[Any, ...]:
        """The key numbers and figures of bundled model ``name``."""
        if not isinstance(name, str) or name not in self.models:
            raise InputError(f"No analyses for {shown(name)}; choose one of: {', '.join(self.models)}.")
        text, figures = self.models[name]
        return (text, *figures)


# ====================================================================== the page
class PublicBlocks(gr.Blocks):
    """``gr.Blocks`` for a server open to anyone. The handlers get their inputs raw (``preprocess=False``) and
    check them; but Gradio reads a request's inputs before any handler runs: it may copy or download the files
    they name, and it answers what it refuses with a bare "error". So ``check_request`` runs first (the plain
    ``NOT_AN_UPLOAD`` for any file not in ``files``, before anything is opened, copied or downloaded), and
    whatever Gradio still cannot read is answered with a message naming the endpoint."""

    def __init__(self, files: AppFiles, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.files = files
        files.uploads = self.upload_file_set  # the paths of the files that Gradio's upload route received
        self.model_choice: gr.Dropdown | None = None  # the model menu, the last input of the endpoints that use it

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False
                              ) -> list[Any]:
        """Gradio's ``Blocks.preprocess_data`` after ``check_request``, with readable errors. A request without
        its last input, the model (as made before the app had a model menu), gets the default model."""
        endpoint = f"/{block_fn.api_name or block_fn.name}"
        if (self.model_choice is not None and block_fn.inputs and block_fn.inputs[-1] is self.model_choice
                and len(inputs) == len(block_fn.inputs) - 1):
            inputs = [*inputs, self.model_choice.value]
        check_request(endpoint, block_fn.inputs, inputs, self.files)
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except InvalidPathError as error:  # a path Gradio will not take either
            raise InputError(NOT_AN_UPLOAD) from error
        except Exception as error:  # e.g. a field of a file payload with the wrong type
            reason = error.errors()[0] if isinstance(error, ValidationError) else None
            detail = f"{'.'.join(map(str, reason['loc']))}: {reason['msg']}" if reason else type(error).__name__
            raise InputError(f"{endpoint} cannot read its inputs ({shown(detail)}). Each input must have the form "
                             f"that /gradio_api/info describes.") from error


def build_app(model_name_or_path: str | None = None, onnx_dir: str | os.PathLike | None = None, *,
              runtime: str = "auto", cache_dir: str | os.PathLike | None = None, bpd_samples: int = BPD_SAMPLES,
              analyses_dir: Path = ANALYSES_DIR,
              sampling_bn_temperature: float | None = SAMPLING_BN_TEMPERATURE) -> gr.Blocks:
    """Load the models (see ``ModelMenu``) and lay out the page: a model menu, then tabs Sample, Reconstruct, Swap
    scales, Explore scales and Analyses (of the bundled models, from ``analyses_dir``). ``model_name_or_path``
    None serves every bundled model (``bundled_models``; the menu switches between them), else that one model (the
    menu is hidden). Every button has an ``api_name`` so that ``gradio_client`` can call it too; those that run a
    model take it as their last input, ``model`` (default: the menu's first model)."""
    models = bundled_models() if model_name_or_path is None else [str(model_name_or_path)]
    if not models:
        raise ValueError(f"no bundled models in {hub.BUNDLED_DIR}: give a model folder, bundled name or Hub repo id")
    files = AppFiles()
    menu = ModelMenu(models, files, onnx_dir=onnx_dir, runtime=runtime, cache_dir=cache_dir,
                     bpd_samples=bpd_samples, sampling_bn_temperature=sampling_bn_temperature)
    default = menu[menu.default]
    gallery = AnalysisGallery(analyses_dir)
    png = {"format": "png", "type": "pil", "interactive": False, "buttons": ["download", "fullscreen"]}
    single = {**png, "elem_classes": "pixelated", "height": 220}  # one image, not a grid
    example_columns: dict[str, list[gr.Column]] = {name: [] for name in menu.names}  # per model, per tab

    def upload(label: str, elem_id: str, value: str | None = None) -> gr.Image:
        # The handlers get the raw file payload (preprocess=False below) and decode it themselves, to explain
        # problems. A file that is no usable image is refused when it arrives, so no broken picture stays.
        box = gr.Image(value=value, label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"],
                       elem_id=elem_id, elem_classes="pixelated", height=220)
        box.upload(default.check_upload, box, None, preprocess=False, api_visibility="private").failure(
            lambda: None, None, box, queue=False, api_visibility="private")
        return box

    def examples(box: gr.Image, label: str, elem_id: str) -> None:
        # One set of examples per model; only the chosen model's is shown.
        for name, ex in menu.explorers.items():
            with gr.Column(visible=name == menu.default, elem_id=f"{elem_id}-{css_name(name)}") as column:
                gr.Examples([[p] for p in ex.examples], inputs=[box], label=f"{label}: {ex.examples_source}")
            example_columns[name].append(column)

    def listen(event: Callable[..., Any], fn: Callable[..., Any], inputs: list[gr.Component],
               outputs: list[gr.Component], api_name: str, **inputs_kwargs: gr.Component) -> None:
        # An event (e.g. a button's click) runs fn on the raw inputs (fn checks them); when a call fails, its
        # outputs are cleared, so that no earlier result stays on the page under the error.
        event(fn, inputs, outputs, api_name=api_name, preprocess=False, inputs_kwargs=inputs_kwargs or None).failure(
            lambda: [None] * len(outputs), None, outputs, queue=False, api_visibility="private")

    with PublicBlocks(files, title="NVAE explorer" + ("" if len(models) > 1 else f": {menu.default}"),
                      analytics_enabled=False) as demo:
        gr.Markdown("# NVAE explorer\nA deep hierarchical VAE ([Vahdat & Kautz, NeurIPS 2020]"
                    "(https://arxiv.org/abs/2007.03898)): its latents form groups at several spatial scales, "
                    "from coarse (global structure) to fine (details).")
        model_choice = gr.Dropdown(menu.names, value=menu.default, label="Model", elem_id="model-choice",
                                   info="every tab uses the model chosen here", visible=len(models) > 1)
        demo.model_choice = model_choice
        description = gr.Markdown(default.describe(), elem_id="model-description")
        with gr.Tabs():
            with gr.Tab("Sample", id="sample"), gr.Row():
                with gr.Column(scale=1):
                    temperature = gr.Slider(0, MAX_TEMPERATURE, value=DEFAULT_TEMPERATURE, step=0.05,
                                            label="Temperature", info="scales the prior's standard deviation")
                    count = gr.Slider(1, MAX_SAMPLES, value=16, step=1, label="Number of images")
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    with gr.Accordion("Per-scale temperatures", open=False):
                        override = gr.Checkbox(label="Use these instead of the temperature above")
                        scale_temperatures = [gr.Slider(0, MAX_TEMPERATURE, value=DEFAULT_TEMPERATURE, step=0.05,
                                                        elem_id=f"scale-temperature-{s}", **default.scale_control(s))
                                              for s in range(menu.scale_inputs)]
                    sample_button = gr.Button("Sample", variant="primary")
                with gr.Column(scale=2):
                    samples = gr.Image(label="Samples", elem_id="sample-output", **png)
                    sample_info = gr.Markdown()

            with gr.Tab("Reconstruct", id="reconstruct"), gr.Row():
                with gr.Column(scale=1):
                    with gr.Tab("Upload"):
                        image = upload("Image (any size or mode)", "reconstruct-input", default.examples[0])
                        invert = gr.Checkbox(label="Invert colours first (for dark strokes on a light background)")
                        reconstruct_button = gr.Button("Reconstruct", variant="primary")
                        examples(image, "Examples", "reconstruct-examples")
                    with gr.Tab("Draw"):
                        gr.Markdown("Pick the brush left of the canvas, draw, then reconstruct.")
                        sketch = gr.Sketchpad(type="pil", image_mode="L", canvas_size=(280, 280), fixed_canvas=True,
                                              brush=gr.Brush(default_size=22, colors=["#000000"],
                                                             default_color="#000000"),
                                              label="Draw", elem_id="sketch-input")
                        invert_sketch = gr.Checkbox(value=default.config.channels == 1,
                                                    label="Invert colours first (light strokes on dark, like MNIST)")
                        sketch_button = gr.Button("Reconstruct drawing", variant="primary")
                with gr.Column(scale=1):
                    with gr.Row():
                        converted = gr.Image(label="Converted input (what the model sees)", elem_id="converted",
                                             **single)
                        reconstruction = gr.Image(label="Reconstruction", elem_id="reconstruction", **single)
                    reconstruct_info = gr.Markdown(elem_id="reconstruct-info")

            with gr.Tab("Swap scales", id="swap"):
                gr.Markdown("Encode A and B, then decode A's latents with some scales taken from B: the coarse "
                            "scales carry global structure, the fine ones details (the paper's variable control).")
                with gr.Row():
                    with gr.Column(scale=1):
                        image_a = upload("Image A", "swap-a", default.examples[0])
                        examples(image_a, "Examples for A", "swap-a-examples")
                    with gr.Column(scale=1):
                        image_b = upload("Image B", "swap-b", default.examples[1 % len(default.examples)])
                        examples(image_b, "Examples for B", "swap-b-examples")
                    with gr.Column(scale=1):
                        choices = [gr.Radio(["A", "B"], value="B" if s == 0 else "A", elem_id=f"swap-scale-{s}",
                                            **default.scale_control(s, groups=False))
                                   for s in range(menu.scale_inputs)]
                        swap_button = gr.Button("Swap", variant="primary")
                        swapped = gr.Image(label="Result", elem_id="swap-result", **single)
                with gr.Row():
                    swap_table = gr.Image(label="All combinations (which image each scale comes from)",
                                          elem_id="swap-table", **png)
                swap_info = gr.Markdown()
                with gr.Row():
                    steps = gr.Slider(3, 12, value=8, step=1, label="Interpolation steps", scale=1)
                    interpolate_button = gr.Button("Interpolate A → B", scale=1)
                interpolation = gr.Image(label="Interpolation of the latents", elem_id="interpolation", **png)
                interpolate_info = gr.Markdown()

            with gr.Tab("Explore scales", id="explore"), gr.Row():
                with gr.Column(scale=1):
                    gr.Markdown("Draw one sample, then redraw the noise of one scale at a time, keeping the "
                                "others: each row shows what that scale controls.")
                    explore_temperature = gr.Slider(0, MAX_TEMPERATURE, value=DEFAULT_TEMPERATURE, step=0.05,
                                                    label="Temperature")
                    explore_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    variations = gr.Slider(1, 12, value=6, step=1, label="Variations per scale")
                    explore_button = gr.Button("Explore", variant="primary")
                with gr.Column(scale=3):
                    explored = gr.Image(label="Rows: one scale resampled", elem_id="explore-output", **png)
                    explore_info = gr.Markdown()

            with gr.Tab("Analyses", id="analyses"):
                analysed = None
                if gallery.models:
                    first = menu.default if menu.default in gallery.models else next(iter(gallery.models))
                    text, figures = gallery.models[first]
                    analysed = gr.Dropdown(list(gallery.models), value=first, label="Bundled model")
                    analysis_numbers = gr.Markdown(text)
                    analysis_figures = [gr.Image(value=figure, label=title, **png)
                                        for figure, title in zip(figures, ANALYSIS_FIGURES.values(), strict=True)]
                    listen(analysed.change, gallery.show, [analysed], [analysis_numbers, *analysis_figures],
                           "analyses")
                else:
                    gr.Markdown("No analyses of the bundled models were found: `make analysis` computes them.")

        listen(sample_button.click, menu.handler("sample"), [temperature, count, seed, override, *scale_temperatures],
               [samples, sample_info], "sample", model=model_choice)
        listen(reconstruct_button.click, menu.handler("reconstruct"), [image, invert],
               [converted, reconstruction, reconstruct_info], "reconstruct", model=model_choice)
        listen(sketch_button.click, menu.handler("reconstruct_drawing"), [sketch, invert_sketch],
               [converted, reconstruction, reconstruct_info], "reconstruct_drawing", model=model_choice)
        listen(swap_button.click, menu.handler("swap"), [image_a, image_b, *choices], [swapped, swap_table, swap_info],
               "swap", model=model_choice)
        listen(interpolate_button.click, menu.handler("interpolate"), [image_a, image_b, steps],
               [interpolation, interpolate_info], "interpolate", model=model_choice)
        listen(explore_button.click, menu.handler("explore"), [explore_temperature, explore_seed, variations],
               [explored, explore_info], "explore", model=model_choice)

        # The page shows the examples from Gradio's cached copies: those are the app's own files too.
        shown_examples = {name: [demo.move_resource_to_block_cache(path) for path in ex.examples]
                          for name, ex in menu.explorers.items()}
        files.ship(*itertools.chain(*shown_examples.values()))
        boxes = [image, image_a, image_b]
        results = [samples, sample_info, converted, reconstruction, reconstruct_info, swapped, swap_table, swap_info,
                   interpolation, interpolate_info, explored, explore_info]

        def switch(name: Any, *payloads: Any) -> dict[gr.components.Component | gr.Column, Any]:
            # The page for model `name`: its description, per-scale controls, examples and analyses; an upload box
            # that holds an example of another model gets the same example of this one. The earlier model's
            # results are cleared.
            ex = menu[name]
            page: dict[Any, Any] = {description: ex.describe(), invert_sketch: ex.config.channels == 1}
            for s, (slider, radio) in enumerate(zip(scale_temperatures, choices, strict=True)):
                page[slider] = gr.update(**ex.scale_control(s))
                page[radio] = gr.update(**ex.scale_control(s, groups=False))
            for other, columns in example_columns.items():
                page.update(dict.fromkeys(columns, gr.update(visible=other == name)))
            for box, payload in zip(boxes, payloads, strict=True):
                path = payload.get("path") if isinstance(payload, dict) else None
                for other in shown_examples.values():
                    if path in other:
                        page[box] = shown_examples[name][other.index(path) % len(shown_examples[name])]
            if analysed is not None and name in gallery.models:
                page[analysed] = name
            return {**page, **dict.fromkeys(results)}

        outputs = [description, invert_sketch, *scale_temperatures, *choices, *boxes, *results,
                   *itertools.chain(*example_columns.values()), *([analysed] if analysed is not None else [])]
        model_choice.change(switch, [model_choice, *boxes], outputs, preprocess=False, api_visibility="private")
    # A burst of visitors waits in line: two requests run at a time, 32 more may queue.
    demo.queue(default_concurrency_limit=2, max_size=32)
    return demo


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False,
           block: bool = True) -> None:
    """Serve ``demo`` with the app's upload limit and CSS; ``block=False`` returns once the server runs (for
    tests)."""
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE, css=CSS,
                prevent_thread_lock=not block)


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults come from NVAE_MODEL, GRADIO_SERVER_NAME and GRADIO_SERVER_PORT when set (as
    on a Hugging Face Space)."""
    parser = argparse.ArgumentParser(description="Explore a pretrained NVAE in the browser.")
    parser.add_argument("--model", default=os.environ.get("NVAE_MODEL") or None,
                        help=f"serve just this model: a model folder, bundled model name or Hub repo id (default: "
                             f"$NVAE_MODEL, else every bundled model, {DEFAULT_MODEL} first, with a menu that "
                             f"switches between them)")
    parser.add_argument("--onnx-dir", default=None,
                        help="an existing ONNX export of the --model (default: <model folder>/onnx, else export "
                             "once into the cache)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="auto: onnxruntime when possible, else PyTorch (default)")
    parser.add_argument("--cache-dir", default=None, help="for the ONNX export (default: $NVAE_HUB_CACHE or "
                                                          "~/.cache/nvae_hub)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="the address to serve on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
                        help="the port to serve on (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--sampling-bn-temperature", type=sampling_bn_option, default=SAMPLING_BN_TEMPERATURE,
                        metavar="T", help=f"samples decode with BatchNorm statistics re-estimated at this temperature, "
                                          f"as the paper's do; 'none' keeps the learned ones (default: "
                                          f"{SAMPLING_BN_TEMPERATURE})")
    return parser


def sampling_bn_option(text: str) -> float | None:
    """``--sampling-bn-temperature``: a temperature, or 'none'."""
    if text.strip().lower() == "none":
        return None
    try:
        return validation.temperature(float(text), "--sampling-bn-temperature")
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"a finite number >= 0 or 'none', got {text!r}") from error


def can_serve(host: str, port: int) -> str | None:
    """None if a server can listen on ``host``:``port`` now, else why not (as Gradio checks it, by binding)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except (OSError, OverflowError) as error:
        return str(getattr(error, "strerror", None) or error)
    return None


def setup_logging() -> None:
    """Show nvae_hub's own messages (INFO and up) on stderr. Other libraries' loggers are left alone (Python
    shows only their warnings and errors), so the ONNX exporter's INFO lines stay out of the log."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    package = logging.getLogger("nvae_hub")
    package.setLevel(logging.INFO)
    package.addHandler(handler)
    package.propagate = False  # shown once, by this handler, whatever the root logger has


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, check that the port is free (before the slow model load), load the models and serve
    the app until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.onnx_dir is not None and args.model is None:
        parser.error("--onnx-dir is the export of one model: name it with --model")
    problem = can_serve(args.host, args.port)
    if problem is not None:
        free = next((p for p in range(args.port + 1, min(args.port + 100, 65536)) if can_serve(args.host, p) is None),
                    None)
        suggestion = f", e.g. --port {free}" if free else ""
        parser.error(f"cannot serve on {args.host}:{args.port} ({problem}); is the app already running there? "
                     f"Choose another port with --port{suggestion}.")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    setup_logging()
    demo = build_app(args.model, args.onnx_dir, runtime=args.runtime, cache_dir=args.cache_dir,
                     sampling_bn_temperature=args.sampling_bn_temperature)
    launch(demo, args.host, args.port, args.share)


if __name__ == "__main__":
    main()
