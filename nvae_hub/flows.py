"""Normalising flows in NVAE's approximate posterior: volume-preserving inverse autoregressive flows (IAF).

Each latent group g draws z0 ~ q0 = N(mu, sigma) from the encoder and passes it through ``num_flows`` pairs of
flow cells; the decoder and the KL see the flowed z. The prior, and so sampling, never runs a flow.

One cell maps z to z' = z - shift(z), where shift is an inverted-residual block of masked convolutions:

    3x3 masked conv (latent channels C -> 6C, strict) - ELU - masked depthwise 5x5 - ELU - masked 1x1 (6C -> C)

**The autoregressive order.** A latent tensor (C, H, W) is ordered like a raster scan with the channels
innermost: variable (c, i, j) comes before (c', i', j') when (i, j, c) < (i', j', c') lexicographically
(row first, then column, then channel). ``shift`` of a variable depends only on variables strictly before it
in this order:

* a kernel tap at offset (di, dj) from the centre reads a position that is earlier in the raster scan when
  di < 0, or di = 0 and dj < 0; those taps see every channel;
* the centre tap reads the same position; there channel c' may feed channel c only when c' comes before c
  (MADE degrees: hidden channel k of 6C stands for latent channel k // 6; the first convolution needs
  degree_in < degree_out, the later ones degree_in <= degree_out);
* taps below or to the right (later positions) are masked out.

So the Jacobian dz'/dz is lower triangular with ones on its diagonal in this order: log|det| = 0 (volume
preserving) and the density of the flowed sample is log q(z') = log q0(z0). The second cell of each pair
uses the **reversed** order (every coordinate flipped: rows, columns and channels; its masks are the first
cell's flipped in all four dimensions), so that together the pair lets every variable depend on every
neighbour. (The official code mirrors only the spatial kernel and keeps the channel order in its second
cell.) The masks are ordinary non-persistent buffers, built on the CPU and moved with the module (the official
code builds them on CUDA), so flows work on every device and are not part of the saved weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Conv2d

EXPANSION = 6  # hidden channels per latent channel in a flow cell, as in the paper's inverted residuals
SHIFT_INIT_GAIN = 0.1  # the shift starts small, so the flows start close to the identity


def degrees(channels: int, latent_channels: int) -> Tensor:
    """The latent channel that each of ``channels`` channels stands for: k // (channels / latent_channels)."""
    if channels % latent_channels:
        raise ValueError(f"{channels} channels do not split evenly over {latent_channels} latent channels")
    return torch.arange(channels) // (channels // latent_channels)


def autoregressive_mask(c_in: int, c_out: int, latent_channels: int, kernel_size: int, *, depthwise: bool = False,
                        strict: bool = False, reverse: bool = False) -> Tensor:
    """The 0/1 mask (c_out, c_in or 1 if ``depthwise``, k, k) of a convolution that respects the raster-scan,
    channel-innermost order of the module docstring. ``strict``: an output may not see its own latent channel
    at its own position (the first convolution of a cell). ``reverse``: the same for the reversed order."""
    if kernel_size % 2 != 1:
        raise ValueError(f"masked convolutions need an odd kernel size, got {kernel_size}")
    offset = torch.arange(kernel_size) - kernel_size // 2
    di, dj = offset.view(-1, 1), offset.view(1, -1)
    earlier_position = (di < 0) | ((di == 0) & (dj < 0))  # (k, k)
    centre = (di == 0) & (dj == 0)
    deg_out = degrees(c_out, latent_channels).view(-1, 1)
    deg_in = deg_out if depthwise else degrees(c_in, latent_channels).view(1, -1)  # a depthwise tap reads its own
    channel_allowed = deg_in < deg_out if strict else deg_in <= deg_out  # (c_out, c_in or 1)
    mask = earlier_position | (centre & channel_allowed[:, :, None, None])
    if reverse:
        mask = mask.flip(0, 1, 2, 3)
    return mask.float()


class FlowCell(nn.Module):
    """One volume-preserving IAF cell: z' = z - shift(z), shift autoregressive in the documented order
    (or in the reversed order with ``reverse``)."""

    def __init__(self, latent_channels: int, reverse: bool = False) -> None:
        super().__init__()
        c, hidden = latent_channels, EXPANSION * latent_channels
        self.reverse = reverse

        def masked(c_in: int, c_out: int, k: int, depthwise: bool = False, strict: bool = False,
                   bias: bool = False) -> Conv2d:
            mask = autoregressive_mask(c_in, c_out, c, k, depthwise=depthwise, strict=strict, reverse=reverse)
            return Conv2d(c_in, c_out, k, padding=k // 2, groups=c_in if depthwise else 1, bias=bias, mask=mask)

        self.expand = masked(c, hidden, 3, strict=True)
        self.depthwise = masked(hidden, hidden, 5, depthwise=True)
        self.shift = masked(hidden, c, 1, bias=True)
        with torch.no_grad():
            self.shift.log_gain += math.log(SHIFT_INIT_GAIN)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(z', log|dz'_i/dz_i| per element). The Jacobian is triangular with unit diagonal, so the second is 0."""
        h = F.elu(self.expand(z))
        h = F.elu(self.depthwise(h))
        shift = self.shift(h)
        return z - shift, torch.zeros_like(z)


class PosteriorFlow(nn.Module):
    """``num_pairs`` pairs of ``FlowCell``s for one latent group; the second of each pair in reversed order."""

    def __init__(self, latent_channels: int, num_pairs: int) -> None:
        super().__init__()
        self.cells = nn.ModuleList(
            FlowCell(latent_channels, reverse=reverse) for _ in range(num_pairs) for reverse in (False, True)
        )

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(flowed z, log|det dz/dz0| per element): the sum of the cells' log-diagonals (0 for shift cells)."""
        log_det = torch.zeros_like(z)
        for cell in self.cells:
            z, cell_log_det = cell(z)
            log_det = log_det + cell_log_det
        return z, log_det
