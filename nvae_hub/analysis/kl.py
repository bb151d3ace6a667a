"""How the KL is spread over the hierarchy (the paper's Figure 5b): the average KL of every latent group and of every
channel on test images, and the active units of every group by the two usual rules:

- the official NVAE code's: a channel is active when its KL (summed over its positions, averaged over images)
  is above 0.1 nats;
- Burda et al.'s (2016): a unit (one latent variable: channel x position) is active when the variance over the
  data of its posterior mean is above 0.01.

The KL is that of the ELBO (latents drawn from the posterior, seeded); the posterior means are those of
``NVAE.encode`` (every group's z at its posterior mean).
"""

from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from .common import Inputs, Result, posterior_stats

NEEDS = ("model", "data")
KL_THRESHOLD = 0.1
VARIANCE_THRESHOLD = 0.01
IMAGES = {"full": 10**9, "quick": 200}  # 10**9: the whole split


def active_channels_by_kl(kl_per_channel: Tensor, threshold: float = KL_THRESHOLD) -> int:
    """The official code's count: channels whose KL, averaged over images (dim 0 of an (N, C) tensor), is above
    ``threshold`` nats."""
    return int((kl_per_channel.double().mean(dim=0) > threshold).sum())


def active_units_by_variance(means: Tensor, threshold: float = VARIANCE_THRESHOLD) -> int:
    """Burda et al.'s count: units (every dimension after the first, e.g. channel x position of (N, C, H, W)
    posterior means) whose variance over the N images is above ``threshold``."""
    return int((means.double().flatten(1).var(dim=0) > threshold).sum())


def run(inputs: Inputs) -> Result:
    """KL per group and channel, and active units, of ``inputs.model`` on the test images."""
    model = inputs.model
    assert model is not None
    n = inputs.count(IMAGES["full"], IMAGES["quick"])
    sampled = posterior_stats(model, inputs.images(), limit=n, seed=inputs.seed, sample=True, progress=inputs.progress)
    at_mean = posterior_stats(model, inputs.images(), limit=n, seed=inputs.seed, sample=False,
                              progress=inputs.progress)
    scales = sampled.scales
    kl_channel = [k.double().mean(dim=0).tolist() for k in sampled.kl]
    kl_group = [float(k.double().sum(dim=1).mean()) for k in sampled.kl]
    units = [int(np.prod(m.shape[1:])) for m in at_mean.means]
    numbers: dict[str, Any] = {
        "sizes": {"images": n},
        "scale_of_group": scales,
        "kl_per_group": kl_group,
        "kl_total": sum(kl_group),
        "kl_per_channel": kl_channel,
        "active_channels_kl": [active_channels_by_kl(k) for k in sampled.kl],
        "channels_per_group": [k.shape[1] for k in sampled.kl],
        "active_units_variance": [active_units_by_variance(m) for m in at_mean.means],
        "units_per_group": units,
        "rules": {"kl": f"channel KL (summed over positions, mean over images) > {KL_THRESHOLD} nats "
                        "(official NVAE code)",
                  "variance": f"Var over images of the posterior mean of a unit (channel x position) > "
                              f"{VARIANCE_THRESHOLD} (Burda et al. 2016)"},
    }

    fig = Figure(figsize=(15, 4.5))
    ax_group, ax_channel, ax_active = fig.subplots(1, 3, width_ratios=[1, 1.3, 1])
    colour = matplotlib.colormaps["tab10"]
    groups = np.arange(len(scales))
    ax_group.bar(groups, kl_group, color=[colour(s % 10) for s in scales])
    ax_group.set_xlabel("latent group (coarsest scale first)")
    ax_group.set_ylabel("KL, nats per image")
    ax_group.set_title(f"KL per group ({n} test images)")
    ax_group.legend(handles=[Patch(color=colour(s % 10), label=f"scale {s}") for s in sorted(set(scales))])
    width = max(len(c) for c in kl_channel)
    heat = np.full((len(kl_channel), width), np.nan)
    for g, c in enumerate(kl_channel):
        heat[g, :len(c)] = c
    image = ax_channel.imshow(heat, aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(image, ax=ax_channel, label="KL, nats per image")
    ax_channel.set_xlabel("channel")
    ax_channel.set_ylabel("latent group")
    ax_channel.set_title("KL per channel")
    fractions_kl = np.array(numbers["active_channels_kl"]) / np.array(numbers["channels_per_group"])
    fractions_var = np.array(numbers["active_units_variance"]) / np.array(units)
    ax_active.bar(groups - 0.2, fractions_kl, width=0.4, label=f"channels with KL > {KL_THRESHOLD}")
    ax_active.bar(groups + 0.2, fractions_var, width=0.4, label=f"units with Var[mean] > {VARIANCE_THRESHOLD}")
    ax_active.set_ylim(0, 1.05)
    ax_active.set_xlabel("latent group")
    ax_active.set_ylabel("fraction active")
    ax_active.set_title("Active units")
    ax_active.legend(fontsize=8)
    ax_group.set_xticks(groups)
    ax_channel.set_yticks(groups)
    ax_active.set_xticks(groups)
    fig.tight_layout()
    return Result(numbers, fig)


def section(numbers: dict[str, Any]) -> str:
    """A table per group: scale, KL, active channels and units."""
    rows = "".join(
        f"| {g} | {s} | {kl:.2f} | {ac}/{c} | {au}/{u} |\n"
        for g, (s, kl, ac, c, au, u) in enumerate(zip(
            numbers["scale_of_group"], numbers["kl_per_group"], numbers["active_channels_kl"],
            numbers["channels_per_group"], numbers["active_units_variance"], numbers["units_per_group"],
            strict=True)))
    return (f"KL over {numbers['sizes']['images']} test images, total {numbers['kl_total']:.2f} nats per image.\n\n"
            "| group | scale | KL (nats) | active channels, KL > 0.1 | active units, Var[mean] > 0.01 |\n"
            "|---|---|---|---|---|\n" + rows)
