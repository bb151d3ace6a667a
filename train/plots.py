"""Pictures of a training run: image grids (PIL) and learning-curve plots (matplotlib).

The plots use matplotlib's object-oriented ``Figure`` without pyplot, so they are drawn by the Agg renderer
into files and never touch a display or global backend state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from nvae_hub import NVAE
from nvae_hub.visual import labelled_grid


def save_image_grid(rows: Sequence[torch.Tensor], path: str | Path) -> None:
    """Save images as a PNG grid, one row per tensor; each tensor is (n, C, H, W) with values in [0, 1]."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    labelled_grid([row.detach().float().cpu().numpy() for row in rows], gap=2).save(path)


@torch.no_grad()
def save_samples(model: NVAE, path: str | Path, temperatures: Sequence[float], n: int = 8, seed: int = 0) -> None:
    """A grid of ``n`` samples per temperature (one row each), from the same noise in every row."""
    noise = model.sample_noise(n, seed=seed)
    save_image_grid([model.decode_noise(noise, t) for t in temperatures], path)


@torch.no_grad()
def save_reconstructions(model: NVAE, x: torch.Tensor, path: str | Path) -> None:
    """A grid with the images ``x`` in the top row and their reconstructions (posterior means) below."""
    save_image_grid([x, model.reconstruct(x.to(model.device))], path)


def plot_learning_curves(history: Sequence[dict], path: str | Path) -> None:
    """Reconstruction term and KL (nats per image) against the step, from the per-step log records."""
    records = [r for r in history if r["recon"] is not None]
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(10, 4))
    ax_recon, ax_kl = fig.subplots(1, 2)
    for ax, key, title in [(ax_recon, "recon", "reconstruction -log p(x|z)"), (ax_kl, "kl", "KL(q || p)")]:
        ax.plot(steps, [r[key] for r in records], linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("nats per image")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_kl_per_group(kl_per_group: Sequence[float], scale_of_group: Sequence[int], path: str | Path) -> None:
    """A bar per latent group (decoder order, coarsest first) of its KL, coloured by scale."""
    colour = matplotlib.colormaps["tab10"]
    fig = Figure(figsize=(max(5.0, 0.35 * len(kl_per_group) + 2), 4))
    ax = fig.subplots()
    ax.bar(range(len(kl_per_group)), kl_per_group, color=[colour(s % 10) for s in scale_of_group])
    ax.set_xlabel("latent group (coarsest scale first)")
    ax.set_ylabel("KL, nats per image")
    ax.set_title("KL per group (mean over the last logged steps)")
    ax.legend(handles=[Patch(color=colour(s % 10), label=f"scale {s}") for s in sorted(set(scale_of_group))])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
