"""The training schedules of NVAE as plain functions: learning-rate warm-up and decay, KL warm-up, KL balancing,
regulariser annealing."""

from __future__ import annotations

import math

import torch
from torch import Tensor

KL_CONSTANT_FRACTION = 1e-4
"""Fraction of training at the start during which the KL weight stays at its minimum (the official code)."""
LR_WARMUP_STEPS = 500
"""Default floor of the learning-rate warm-up, in steps (see ``warmup_length``)."""


def warmup_length(max_steps: int, fraction: float, min_steps: int) -> int:
    """Steps of learning-rate warm-up: ``fraction`` of the run, but never fewer than ``min_steps`` (a run shorter
    than that warms up all along and never reaches the peak rate), and at least 1."""
    return max(1, round(fraction * max_steps), min_steps)


def learning_rate(step: int, max_steps: int, lr: float, lr_min: float, warmup_steps: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to ``lr``, then cosine decay to ``lr_min``, which
    the last step (``max_steps - 1``) reaches."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps + 1) / max(1, max_steps - warmup_steps))
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))


def kl_warmup(step: int, warmup_steps: int, constant_steps: int = 0, min_weight: float = 1e-4) -> float:
    """KL weight at ``step``: ``min_weight`` for ``constant_steps``, then a linear ramp to 1 over
    ``warmup_steps`` (the paper warms up over the first 30% of training)."""
    if warmup_steps <= 0:
        return 1.0
    return max(min((step - constant_steps) / warmup_steps, 1.0), min_weight)


def kl_balance_coefficients(groups_per_scale: list[int]) -> Tensor:
    """Per-group balancing weights alpha (decoder order, coarsest scale first).

    A group at scale s (0 = coarsest, spatial side doubling with s) gets (2**s)**2 / groups_in_scale, i.e.
    proportional to its number of latent variables per group count, normalised so the smallest is 1.
    """
    alpha = torch.cat([torch.full((n,), 4.0**s / n) for s, n in enumerate(groups_per_scale)])
    return alpha / alpha.min()


def kl_balance(kl_per_group: Tensor, kl_weight: float, alpha: Tensor) -> Tensor:
    """The balanced, warm-up-weighted KL per image, shape (N,).

    Groups with a larger average KL (relative to their alpha) get a larger weight, which keeps groups from
    collapsing early in training (the paper's KL balancing). The weights are constants (no gradient) whose
    mean is 1, so the total scale stays ``kl_weight * KL``.
    """
    mean_kl = kl_per_group.detach().abs().mean(dim=0) + 0.01  # (G,)
    gamma = mean_kl / alpha.to(mean_kl) * mean_kl.sum()
    gamma = gamma / gamma.mean()
    return kl_weight * (kl_per_group * gamma).sum(dim=1)


def reg_weight(kl_weight: float, final: float, initial: float | None = None) -> float:
    """Regulariser weight during warm-up: log-linear from ``initial`` to ``final`` as the KL weight goes from
    0 to 1 (constant ``final`` when ``initial`` is None)."""
    if initial is None:
        return final
    return math.exp((1.0 - kl_weight) * math.log(initial) + kl_weight * math.log(final))
