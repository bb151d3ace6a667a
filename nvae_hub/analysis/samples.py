"""Random samples at temperatures 1.0, 0.8, 0.6 and 0.4, from the same noise, with the model's BatchNorm statistics
and with BatchNorm statistics re-estimated on samples at that temperature (``NVAE.readjust_bn``, the paper's
trick for sharper samples at low temperature; done on a copy, the model is left untouched).

Two numbers per grid describe what the eye sees: the mean pixel value and the diversity (the standard deviation
of each pixel over the samples, averaged over pixels).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from nvae_hub.model import NVAE
from nvae_hub.visual import image_grid

from .common import Inputs, Result, show_image

NEEDS = ("model",)
TEMPERATURES = (1.0, 0.8, 0.6, 0.4)
NUM_SAMPLES = 32
COLUMNS = 8
BN_BATCHES = {"full": 20, "quick": 2}
BN_BATCH_SIZE = {"full": 64, "quick": 16}
CHUNK = 256  # samples decoded at a time


@torch.no_grad()
def sample_grid(model: NVAE, temperatures: tuple[float, ...], n: int, seed: int, *, readjust: bool,
                bn_batches: int = 20, bn_batch_size: int = 64, progress: bool = False) -> dict[float, np.ndarray]:
    """``n`` samples per temperature from the same noise (``seed``), (n, C, H, W) arrays, from a copy of the model:
    with ``readjust`` its BatchNorm statistics re-estimated at each temperature, else the learned ones. Decoded
    ``CHUNK`` samples at a time."""
    noise = model.sample_noise(n, seed=seed)
    out = {}
    for t in tqdm(temperatures, desc="samples" + (" (BN re-estimated)" if readjust else ""), disable=not progress):
        sampler = copy.deepcopy(model)
        if readjust:
            sampler.readjust_bn(t, num_batches=bn_batches, batch_size=bn_batch_size, seed=seed + 1)
        else:
            sampler.forget_readjusted_bn()
        out[t] = np.concatenate([sampler.decode_noise([z[i:i + CHUNK] for z in noise], t).cpu().numpy()
                                 for i in range(0, n, CHUNK)])
    return out


def run(inputs: Inputs) -> Result:
    """Sample grids of ``inputs.model``."""
    model = inputs.model
    assert model is not None
    mode = "quick" if inputs.quick else "full"
    n = inputs.size(NUM_SAMPLES, NUM_SAMPLES)
    grids = {readjust: sample_grid(model, TEMPERATURES, n, inputs.seed, readjust=readjust,
                                   bn_batches=BN_BATCHES[mode], bn_batch_size=BN_BATCH_SIZE[mode],
                                   progress=inputs.progress)
             for readjust in (False, True)}

    def stats(images: np.ndarray) -> dict[str, float]:
        return {"mean_pixel": float(images.mean()), "diversity": float(images.std(axis=0).mean())}

    numbers: dict[str, Any] = {
        "sizes": {"samples_per_temperature": n, "bn_batches": BN_BATCHES[mode], "bn_batch_size": BN_BATCH_SIZE[mode]},
        "temperatures": list(TEMPERATURES),
        "noise_seed": inputs.seed,
        "model_bn": {str(t): stats(grids[False][t]) for t in TEMPERATURES},
        "readjusted_bn": {str(t): stats(grids[True][t]) for t in TEMPERATURES},
    }

    fig = Figure(figsize=(3.2 * len(TEMPERATURES), 1.5 + 0.85 * math.ceil(n / COLUMNS)))
    axes = fig.subplots(2, len(TEMPERATURES))
    for row, readjust in enumerate((False, True)):
        for col, t in enumerate(TEMPERATURES):
            s = numbers["readjusted_bn" if readjust else "model_bn"][str(t)]
            bn = "BN re-estimated" if readjust else "model's BN"
            show_image(axes[row, col], image_grid(grids[readjust][t], COLUMNS, zoom=2),
                       f"T = {t}, {bn}\nmean {s['mean_pixel']:.3f}, diversity {s['diversity']:.3f}")
    fig.suptitle(f"{n} samples per temperature, same noise (seed {inputs.seed}) in every grid")
    fig.tight_layout()
    return Result(numbers, fig)


def section(numbers: dict[str, Any]) -> str:
    """A table of the grids' statistics."""
    rows = "".join(
        f"| {t} | {numbers['model_bn'][str(t)]['mean_pixel']:.3f} | {numbers['model_bn'][str(t)]['diversity']:.3f} "
        f"| {numbers['readjusted_bn'][str(t)]['mean_pixel']:.3f} | "
        f"{numbers['readjusted_bn'][str(t)]['diversity']:.3f} |\n"
        for t in numbers["temperatures"])
    return ("Mean pixel value and diversity (per-pixel standard deviation over the samples) of each grid.\n\n"
            "| temperature | mean, model's BN | diversity, model's BN | mean, BN re-estimated | "
            "diversity, BN re-estimated |\n|---|---|---|---|---|\n" + rows)
