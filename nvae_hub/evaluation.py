"""Test-set measurements shared by the trainer (``train/``) and the analyses (``nvae_hub.analysis``).

``scored_batches`` is the one test-set pass: it yields the images a model is scored on, dynamically binarised for
Bernoulli models (from the seed, so every measurement sees the same images). On top of it:

- ``evaluate_nll``: the importance-weighted negative log-likelihood, in nats and bits per dimension;
- ``reconstruction_metrics``: the mean squared error per pixel of the reconstructions (posterior means decoded)
  and the negative ELBO.

Every result is a mean over images with its standard error. The model's mode and PyTorch's random state are
left as they were.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .data import binarize
from .model import NVAE


def scored_batches(model: NVAE, dataset: Dataset[torch.Tensor], *, batch_size: int = 64, seed: int = 0,
                 limit: int | None = None, progress: bool = True, desc: str = "evaluate") -> Iterator[Tensor]:
    """The first ``limit`` images (all if None) of ``dataset`` in batches on the model's device, as the model
    scores them: binarised (a draw from ``seed``) for a Bernoulli model, unchanged otherwise."""
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    generator = torch.Generator().manual_seed(seed)
    binary = model.config.output == "bernoulli"
    for x in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, disable=not progress, file=sys.stderr):
        yield (binarize(x, generator) if binary else x).to(model.device)


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (NaN for fewer than two values)."""
    values = values.double().flatten()
    n = len(values)
    stderr = values.std().item() / math.sqrt(n) if n > 1 else math.nan
    return values.mean().item(), stderr


def bits_per_dim_factor(model: NVAE) -> float:
    """Nats per image times this is bits per dimension (real pixels x channels)."""
    cfg = model.config
    return 1.0 / (cfg.channels * cfg.image_size**2 * math.log(2))


@contextmanager
def seeded_eval(model: NVAE, seed: int) -> Iterator[None]:
    """Run the body with the model in eval mode and PyTorch's random state forked and seeded with ``seed``."""
    was_training = model.training
    model.eval()
    device = model.device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_nll(model: NVAE, dataset: Dataset[torch.Tensor], *, num_samples: int, batch_size: int = 64,
                 seed: int = 0, limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The importance-weighted NLL of ``model`` on the first ``limit`` images (all if None) of ``dataset``.

    With ``num_samples`` K = 1 it is the negative ELBO (one sample); it tightens towards -log p(x) as K grows.
    Returns ``num_images``, ``num_samples``, ``seed``, ``nll_nats`` (mean per image), ``nll_nats_stderr``,
    ``bits_per_dim`` and ``bits_per_dim_stderr``.
    """
    nll = []
    with seeded_eval(model, seed):  # the seed also draws the importance samples
        for x in scored_batches(model, dataset, batch_size=batch_size, seed=seed, limit=limit, progress=progress,
                              desc=f"NLL (K={num_samples})"):
            nll.append(model.nll(x, num_samples=num_samples).cpu())
    mean, stderr = mean_and_stderr(torch.cat(nll))
    to_bits = bits_per_dim_factor(model)
    return {
        "num_images": sum(len(v) for v in nll), "num_samples": num_samples, "seed": seed,
        "nll_nats": mean, "nll_nats_stderr": stderr, "bits_per_dim": mean * to_bits,
        "bits_per_dim_stderr": stderr * to_bits,
    }


@torch.no_grad()
def reconstruction_metrics(model: NVAE, dataset: Dataset[torch.Tensor], *, batch_size: int = 64, seed: int = 0,
                           limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Reconstruction error and negative ELBO of ``model`` on the first ``limit`` images (all if None).

    ``mse`` is the mean squared error per pixel between an image (binarised for Bernoulli models) and its
    reconstruction ``model.reconstruct(x)`` (the posterior means decoded, pixels the output distribution's mean);
    ``neg_elbo_nats`` is recon + KL per image with one posterior sample and no KL warm-up. Returns those with
    their standard errors (over images), ``neg_elbo_bits_per_dim``, ``num_images`` and ``seed``.
    """
    mse, neg_elbo = [], []
    with seeded_eval(model, seed):
        for x in scored_batches(model, dataset, batch_size=batch_size, seed=seed, limit=limit, progress=progress,
                              desc="reconstruct"):
            mse.append((model.reconstruct(x) - x).square().flatten(1).mean(dim=1).cpu())
            out = model.loss(x, kl_weight=1.0, reg_weight=0.0)
            neg_elbo.append((out.recon + out.kl).cpu())
    mse_mean, mse_stderr = mean_and_stderr(torch.cat(mse))
    elbo_mean, elbo_stderr = mean_and_stderr(torch.cat(neg_elbo))
    to_bits = bits_per_dim_factor(model)
    return {
        "num_images": sum(len(v) for v in mse), "seed": seed, "mse": mse_mean, "mse_stderr": mse_stderr,
        "neg_elbo_nats": elbo_mean, "neg_elbo_nats_stderr": elbo_stderr,
        "neg_elbo_bits_per_dim": elbo_mean * to_bits, "neg_elbo_bits_per_dim_stderr": elbo_stderr * to_bits,
    }
