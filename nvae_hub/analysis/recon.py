"""Reconstructions and likelihoods on the test split: 10 test images above their reconstructions, and the mean
squared error per pixel, the negative ELBO and the importance-weighted NLL (nats and bits per dimension) with
their standard errors (``nvae_hub.evaluation``).

The full analysis scores MSE and negative ELBO on the whole split and the NLL (K = 100 importance samples) on
its first 1,000 images (the model card has the full-split figure); ``--num-images`` sets both counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nvae_hub.evaluation import evaluate_nll, reconstruction_metrics, scored_batches, seeded_eval
from nvae_hub.visual import labelled_grid

from .common import Inputs, Result, picture_figure

NEEDS = ("model", "data")
SHOWN = 10
NLL_SAMPLES = {"full": 100, "quick": 10}
NLL_IMAGES = {"full": 1000, "quick": 200}
METRIC_IMAGES = {"full": 10**9, "quick": 500}  # 10**9: the whole split


def run(inputs: Inputs) -> Result:
    """Reconstruction grid and test-set metrics of ``inputs.model`` on ``inputs.dataset``."""
    model, dataset = inputs.model, inputs.images()
    assert model is not None
    mode = "quick" if inputs.quick else "full"
    metric_images = inputs.count(METRIC_IMAGES["full"], METRIC_IMAGES["quick"])
    nll_images = inputs.count(NLL_IMAGES["full"], NLL_IMAGES["quick"])
    metrics = reconstruction_metrics(model, dataset, limit=metric_images, seed=inputs.seed, progress=inputs.progress)
    nll = evaluate_nll(model, dataset, num_samples=NLL_SAMPLES[mode], limit=nll_images, seed=inputs.seed,
                       progress=inputs.progress)

    with seeded_eval(model, inputs.seed), torch.no_grad():
        x = next(scored_batches(model, dataset, batch_size=SHOWN, seed=inputs.seed, progress=False))
        shown = torch.stack([x, model.reconstruct(x)]).cpu().numpy()
    binary = model.config.output == "bernoulli"
    numbers: dict[str, Any] = {
        "sizes": {"metric_images": metrics["num_images"], "nll_images": nll["num_images"],
                  "nll_importance_samples": nll["num_samples"], "shown_images": len(x)},
        "inputs": "dynamically binarised test images (seeded)" if binary else "test images",
        "mse_per_pixel": metrics["mse"], "mse_per_pixel_stderr": metrics["mse_stderr"],
        "neg_elbo_nats": metrics["neg_elbo_nats"], "neg_elbo_nats_stderr": metrics["neg_elbo_nats_stderr"],
        "neg_elbo_bits_per_dim": metrics["neg_elbo_bits_per_dim"],
        "neg_elbo_bits_per_dim_stderr": metrics["neg_elbo_bits_per_dim_stderr"],
        "nll_nats": nll["nll_nats"], "nll_nats_stderr": nll["nll_nats_stderr"],
        "nll_bits_per_dim": nll["bits_per_dim"], "nll_bits_per_dim_stderr": nll["bits_per_dim_stderr"],
        "shown_mse_per_pixel": [float(v) for v in np.mean((shown[0] - shown[1]) ** 2, axis=(1, 2, 3))],
    }

    grid = labelled_grid(list(shown), row_labels=["test image", "reconstruction"], zoom=3)
    title = (f"Test images and reconstructions (posterior means decoded)\n"
             f"test MSE per pixel {metrics['mse']:.4f} ± {metrics['mse_stderr']:.4f} ({metrics['num_images']} "
             f"images); NLL {nll['nll_nats']:.2f} ± {nll['nll_nats_stderr']:.2f} nats (K={nll['num_samples']}, "
             f"{nll['num_images']} images)")
    fig = picture_figure(grid, title)
    return Result(numbers, fig)


def section(numbers: dict[str, Any]) -> str:
    """A table of the test metrics."""
    sizes = numbers["sizes"]

    def pm(key: str, digits: int) -> str:
        return f"{numbers[key]:.{digits}f} ± {numbers[key + '_stderr']:.{digits}f}"

    return (
        f"Inputs: {numbers['inputs']}. ± is the standard error over images.\n\n"
        "| metric | value | images |\n|---|---|---|\n"
        f"| MSE per pixel (reconstruction) | {pm('mse_per_pixel', 4)} | {sizes['metric_images']} |\n"
        f"| negative ELBO, nats | {pm('neg_elbo_nats', 2)} | {sizes['metric_images']} |\n"
        f"| negative ELBO, bits/dim | {pm('neg_elbo_bits_per_dim', 4)} | {sizes['metric_images']} |\n"
        f"| NLL (K={sizes['nll_importance_samples']}), nats | {pm('nll_nats', 2)} | {sizes['nll_images']} |\n"
        f"| NLL (K={sizes['nll_importance_samples']}), bits/dim | {pm('nll_bits_per_dim', 4)} | "
        f"{sizes['nll_images']} |\n"
    )
