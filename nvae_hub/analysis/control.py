"""Variable control, measured: which latent scale carries which property of the image.

For pairs of test images (A, B) and every scale s, A's latents are decoded with the groups of scale s taken from B
(``Latents.with_scales_from``, what ``NVAE.swap`` does). For every property k the transfer T[s, k] says how far
the result moved from A's reconstruction towards B's, in [0, 1]; 1 means that scale alone carries the property:

- a continuous property p (stroke thickness, slant): the least-squares slope of p(swap) - p(rec A) on
  p(rec B) - p(rec A) over all pairs, clipped to [0, 1];
- the class (by a small classifier trained here on the training split): among the pairs whose reconstructions
  are classified differently, the fraction whose swap is classified as B's reconstruction.

Properties: the class (when the data set has labels) and, for one-channel images, Morpho-MNIST's thickness and
slant (``nvae_hub.analysis.morphology``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from nvae_hub.evaluation import scored_batches, seeded_eval
from nvae_hub.model import Latents
from nvae_hub.visual import labelled_grid

from . import morphology
from .classifier import fit_classifier, predict
from .common import AnalysisError, Inputs, Result, show_image

NEEDS = ("model", "data")
PAIRS = {"full": 500, "quick": 40}
SHOWN_PAIRS = 4


@dataclass(frozen=True)
class Property:
    """A property of images: ``measure`` maps images (N, C, H, W) to values (N,); ``categorical`` values are
    class labels."""

    name: str
    measure: Callable[[np.ndarray], np.ndarray]
    categorical: bool = False


class Swapper(Protocol):
    """What ``swap_images`` needs of a model (``NVAE`` has it)."""

    num_scales: int

    def encode(self, x: Tensor) -> Latents: ...

    def decode(self, latents: Latents) -> Tensor: ...


def transfer(a: np.ndarray, b: np.ndarray, swapped: np.ndarray, categorical: bool = False) -> float:
    """How far ``swapped`` moved from ``a`` towards ``b`` (property values of A's and B's reconstructions and of
    the swaps, one per pair), in [0, 1]; NaN when no pair differs in the property."""
    a, b, swapped = (np.asarray(v) for v in (a, b, swapped))
    if categorical:
        differ = a != b
        return float(np.mean(swapped[differ] == b[differ])) if differ.any() else float("nan")
    keep = np.isfinite(a) & np.isfinite(b) & np.isfinite(swapped)
    gap = (b - a)[keep]
    moved = (swapped - a)[keep]
    denominator = float(np.sum(gap * gap))
    if denominator <= 1e-12:
        return float("nan")
    return float(np.clip(np.sum(moved * gap) / denominator, 0.0, 1.0))


@torch.no_grad()
def swap_images(model: Swapper, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(reconstructions of A, of B, and for every scale s A's latents decoded with scale s from B)."""
    latents_a, latents_b = model.encode(x_a), model.encode(x_b)
    swapped = [model.decode(latents_a.with_scales_from(latents_b, [s])) for s in range(model.num_scales)]
    return model.decode(latents_a), model.decode(latents_b), swapped


def transfer_matrix(model: Swapper, x_a: Tensor, x_b: Tensor, properties: Sequence[Property],
                    batch_size: int = 64) -> tuple[np.ndarray, dict[str, Any]]:
    """T[scale, property] for the pairs (x_a[i], x_b[i]), and the measured values (``rec_a``, ``rec_b``,
    ``swapped``: {property: values}, swapped per scale)."""
    parts: list[tuple[Tensor, Tensor, list[Tensor]]] = [
        swap_images(model, a, b) for a, b in zip(x_a.split(batch_size), x_b.split(batch_size), strict=True)]
    rec_a = torch.cat([p[0] for p in parts]).cpu().numpy()
    rec_b = torch.cat([p[1] for p in parts]).cpu().numpy()
    swaps = [torch.cat([p[2][s] for p in parts]).cpu().numpy() for s in range(model.num_scales)]
    values: dict[str, Any] = {"rec_a": {}, "rec_b": {}, "swapped": {}}
    matrix = np.zeros((model.num_scales, len(properties)))
    for k, prop in enumerate(properties):
        va, vb = prop.measure(rec_a), prop.measure(rec_b)
        vs = [prop.measure(images) for images in swaps]
        values["rec_a"][prop.name], values["rec_b"][prop.name], values["swapped"][prop.name] = va, vb, vs
        for s in range(model.num_scales):
            matrix[s, k] = transfer(va, vb, vs[s], prop.categorical)
    return matrix, values


def image_properties(inputs: Inputs) -> tuple[list[Property], float | None, dict[str, Any]]:
    """The properties measurable on ``inputs``' data, the classifier's test accuracy (None without labels) and
    the classifier's sizes."""
    model = inputs.model
    assert model is not None
    properties, accuracy, sizes = [], None, {}
    if inputs.dataset is not None and inputs.labels("train") is not None:
        classifier = fit_classifier(inputs)
        accuracy, sizes = classifier.test_accuracy, classifier.sizes
        properties.append(Property("class", lambda images: predict(classifier.net, images), categorical=True))
    if model.config.channels == 1:
        properties += [Property("thickness", morphology.thickness), Property("slant", morphology.slant)]
    if not properties:
        raise AnalysisError(f"control: no property to measure on {inputs.dataset!r} (RGB images without labels); "
                            "use a labelled or one-channel data set")
    return properties, accuracy, sizes


def run(inputs: Inputs) -> Result:
    """The transfer matrix of ``inputs.model`` with a grid of swaps."""
    model = inputs.model
    assert model is not None
    pairs = min(inputs.size(PAIRS["full"], PAIRS["quick"]), len(inputs.images()) // 2)
    if pairs < 2:
        raise AnalysisError(f"control needs at least 4 test images, the split has {len(inputs.images())}")
    properties, accuracy, sizes = image_properties(inputs)
    with seeded_eval(model, inputs.seed):
        x = torch.cat(list(scored_batches(model, inputs.images(), limit=2 * pairs, seed=inputs.seed,
                                          progress=inputs.progress, desc="pairs")))
        matrix, values = transfer_matrix(model, x[:pairs], x[pairs:2 * pairs], properties)
        shown = swap_images(model, x[:SHOWN_PAIRS], x[pairs:pairs + SHOWN_PAIRS])
    names = [p.name for p in properties]
    carrier = {}
    for k, name in enumerate(names):
        column = matrix[:, k]
        carrier[name] = int(np.nanargmax(column)) if np.isfinite(column).any() else None
    numbers: dict[str, Any] = {
        "sizes": {"pairs": pairs, **sizes},
        "properties": names,
        "scales": list(range(model.num_scales)),
        "transfer_matrix": matrix.tolist(),
        "carrier": carrier,
        "classifier_test_accuracy": accuracy,
        "property_means": {name: float(np.nanmean(values["rec_a"][name])) for name in names
                           if not properties[names.index(name)].categorical},
        "definitions": {
            "continuous": "least-squares slope of p(swap) - p(rec A) on p(rec B) - p(rec A), clipped to [0, 1]",
            "class": "fraction of pairs with differently classified reconstructions whose swap gets B's class",
            "thickness": "Morpho-MNIST: 2 x mean medial-axis distance, 4x upscaled, pixels",
            "slant": "Morpho-MNIST: arctan(-mu11/mu02), radians",
        },
    }
    return Result(numbers, _figure(numbers, x, shown, inputs))


def _figure(numbers: dict[str, Any], x: Tensor, shown: tuple[Tensor, Tensor, list[Tensor]], inputs: Inputs) -> Figure:
    matrix = np.array(numbers["transfer_matrix"], dtype=np.float64)
    names, scales = numbers["properties"], numbers["scales"]
    fig = Figure(figsize=(12, 5))
    ax_heat, ax_grid = fig.subplots(1, 2, width_ratios=[1, 1.4])
    image = ax_heat.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax_heat, label="transfer T (1: the scale alone carries the property)")
    for s in range(len(scales)):
        for k in range(len(names)):
            value = matrix[s, k]
            ax_heat.text(k, s, "n/a" if not np.isfinite(value) else f"{value:.2f}", ha="center", va="center",
                         color="white" if not np.isfinite(value) or value < 0.6 else "black")
    ax_heat.set_xticks(range(len(names)), names)
    ax_heat.set_yticks(range(len(scales)), [f"scale {s}" + (" (coarsest)" if s == 0 else "") for s in scales])
    ax_heat.set_xlabel("property")
    ax_heat.set_ylabel("latent scale swapped from B")
    ax_heat.set_title(f"Transfer matrix T[scale, property] ({numbers['sizes']['pairs']} pairs)")
    rec_a, rec_b = (v.cpu().numpy() for v in shown[:2])
    swapped = [v.cpu().numpy() for v in shown[2]]
    shown_pairs, pairs = len(rec_a), numbers["sizes"]["pairs"]
    columns = [x[:shown_pairs].cpu().numpy(), x[pairs:pairs + shown_pairs].cpu().numpy(), rec_a, rec_b, *swapped]
    labels = ["A", "B", "rec A", "rec B", *(f"A with\nscale {s}\nfrom B" for s in scales)]
    rows = [[column[i] for column in columns] for i in range(shown_pairs)]
    show_image(ax_grid, labelled_grid(rows, column_labels=labels, zoom=2), "Swaps: A's latents, one scale from B")
    fig.tight_layout()
    return fig


def section(numbers: dict[str, Any]) -> str:
    """The transfer matrix as a table, and which scale carries each property."""
    names = numbers["properties"]
    header = "| scale | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    rows = "".join(
        f"| {s} | " + " | ".join("n/a" if v is None else f"{v:.2f}" for v in row) + " |\n"
        for s, row in zip(numbers["scales"], numbers["transfer_matrix"], strict=True))
    carriers = ", ".join(f"{name}: scale {s}" for name, s in numbers["carrier"].items())
    accuracy = numbers["classifier_test_accuracy"]
    classifier = f" The class comes from a classifier with test accuracy {accuracy:.3f}." if accuracy else ""
    return (f"T[scale, property] over {numbers['sizes']['pairs']} pairs (1: swapping that scale alone moves the "
            f"property all the way from A to B). Carried most by: {carriers}.{classifier}\n\n" + header + rows)
