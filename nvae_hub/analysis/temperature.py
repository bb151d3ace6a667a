"""What the temperature of each scale does: samples from the same noise where one scale's temperature runs over
``TEMPERATURES`` while every other group stays at ``BASE``.

The number per scale is the mean absolute pixel change from the base image (all groups at ``BASE``), averaged
over the other temperatures and the samples: how much that scale's temperature alone moves the picture.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nvae_hub.model import NVAE
from nvae_hub.visual import labelled_grid

from .common import Inputs, Result, picture_figure

NEEDS = ("model",)
TEMPERATURES = (0.0, 0.4, 0.7, 1.0, 1.3)
BASE = 0.7
NUM_SAMPLES = {"full": 6, "quick": 2}


@torch.no_grad()
def scale_temperature_grid(model: NVAE, n: int, seed: int, temperatures: tuple[float, ...] = TEMPERATURES,
                           base: float = BASE) -> np.ndarray:
    """Images (scale, temperature, sample, C, H, W): from the same ``n`` noises, the groups of one scale at each
    temperature and every other group at ``base``."""
    model.eval()
    noise = model.sample_noise(n, seed=seed)
    rows = []
    for scale in range(model.num_scales):
        row = []
        for t in temperatures:
            per_group = [t if s == scale else base for s in model.scale_of_group]
            row.append(model.decode_noise(noise, per_group).cpu().numpy())
        rows.append(np.stack(row))
    return np.stack(rows)


def run(inputs: Inputs) -> Result:
    """The per-scale temperature grid of ``inputs.model``."""
    model = inputs.model
    assert model is not None
    n = inputs.size(NUM_SAMPLES["full"], NUM_SAMPLES["quick"])
    images = scale_temperature_grid(model, n, inputs.seed)
    base_index = TEMPERATURES.index(BASE)
    base_images = images[:, base_index]
    others = [i for i in range(len(TEMPERATURES)) if i != base_index]
    change = [float(np.abs(images[s, others] - base_images[s][None]).mean()) for s in range(model.num_scales)]
    numbers: dict[str, Any] = {
        "sizes": {"samples": n}, "temperatures": list(TEMPERATURES), "base_temperature": BASE,
        "noise_seed": inputs.seed, "change_per_scale": change,
        "change_per_scale_and_temperature": [
            [float(np.abs(images[s, i] - base_images[s]).mean()) for i in range(len(TEMPERATURES))]
            for s in range(model.num_scales)],
    }
    rows, labels = [], []
    for i in range(n):
        for s in range(model.num_scales):
            rows.append(list(images[s, :, i]))
            labels.append(f"sample {i}\nscale {s}" + (" (coarsest)" if s == 0 else ""))
    grid = labelled_grid(rows, row_labels=labels, column_labels=[f"T = {t}" for t in TEMPERATURES], zoom=2)
    title = (f"One scale's temperature changed at a time (other groups at T = {BASE})\nmean pixel change: "
             + ", ".join(f"scale {s} {c:.3f}" for s, c in enumerate(change)))
    return Result(numbers, picture_figure(grid, title))


def section(numbers: dict[str, Any]) -> str:
    """The change per scale."""
    rows = "".join(f"| {s} | {c:.4f} |\n" for s, c in enumerate(numbers["change_per_scale"]))
    return (f"Mean absolute pixel change from the all-at-{numbers['base_temperature']} image when only one scale's "
            f"temperature moves ({numbers['sizes']['samples']} samples).\n\n| scale | mean pixel change |\n"
            "|---|---|\n" + rows)
