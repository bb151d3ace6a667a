"""The distributions of NVAE: the latent Normal and the two image likelihoods.

Everything here computes in float32, also when the network runs under bf16 autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def pixel_levels(x: Tensor, num_bits: int) -> Tensor:
    """The integer level (0 .. 2**num_bits - 1) of each pixel value in [0, 1], as a float tensor.

    Below 8 bits this is the reference implementation's reduction of 8-bit data: the 8-bit value with its low
    bits dropped, floor(round(255 x) / 2**(8 - num_bits)). At 8 bits and more it is round(x * (2**num_bits - 1)).
    """
    if num_bits < 8:
        return torch.floor(torch.round(x * 255.0) / 2 ** (8 - num_bits))
    return torch.round(x * (2**num_bits - 1))


def reduce_bits(x: Tensor, num_bits: int) -> Tensor:
    """Pixels in [0, 1] quantised to ``num_bits``: level / (2**num_bits - 1) (see ``pixel_levels``)."""
    return pixel_levels(x.float(), num_bits) / (2**num_bits - 1)


def soft_clamp(x: Tensor, bound: float = 5.0) -> Tensor:
    """A smooth clamp to (-bound, bound): bound * tanh(x / bound)."""
    return bound * torch.tanh(x / bound)


class Normal:
    """Diagonal Normal with soft-clamped parameters, as in NVAE.

    ``mu`` and ``log_sigma`` are soft-clamped to (-5, 5); sigma = exp(log_sigma) + 0.01, then scaled by the
    temperature. The residual posterior q = N(mu_p + dmu, sigma_p * dsigma) is ``Normal(mu_p + dmu,
    log_sigma_p + dlog_sigma)``.
    """

    def __init__(self, mu: Tensor, log_sigma: Tensor, temperature: float | Tensor = 1.0) -> None:
        self.raw_mu, self.raw_log_sigma = mu.float(), log_sigma.float()
        self.mu = soft_clamp(self.raw_mu)
        self.sigma = (torch.exp(soft_clamp(self.raw_log_sigma)) + 1e-2) * temperature

    def residual(self, d_mu: Tensor, d_log_sigma: Tensor) -> Normal:
        """The residual distribution N(mu + d_mu, sigma * exp(d_log_sigma)) (before clamping)."""
        return Normal(self.raw_mu + d_mu.float(), self.raw_log_sigma + d_log_sigma.float())

    def with_temperature(self, temperature: float | Tensor) -> Normal:
        """The same distribution with sigma scaled by ``temperature``."""
        return Normal(self.raw_mu, self.raw_log_sigma, temperature)

    def sample_from(self, eps: Tensor) -> Tensor:
        """mu + sigma * eps: a reparameterised sample for given standard-normal noise."""
        return self.mu + self.sigma * eps

    def rsample(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised sample, its noise drawn with ``generator`` (default: torch's global one). The noise is
        drawn in the standard (NCHW) order whatever the memory layout of ``mu``, so a seed means the same sample
        whether the activations are channels-last or not."""
        eps = torch.randn(self.mu.shape, generator=generator, dtype=self.mu.dtype, device=self.mu.device)
        return self.sample_from(eps)

    def log_prob(self, z: Tensor) -> Tensor:
        """Elementwise log-density."""
        normalized = (z - self.mu) / self.sigma
        return -0.5 * normalized * normalized - 0.5 * math.log(2 * math.pi) - torch.log(self.sigma)

    def kl(self, other: Normal) -> Tensor:
        """Elementwise analytic KL(self || other)."""
        term1 = (self.mu - other.mu) / other.sigma
        term2 = self.sigma / other.sigma
        return 0.5 * (term1 * term1 + term2 * term2) - 0.5 - torch.log(term2)


class Bernoulli:
    """Independent Bernoulli pixels, parameterised by logits (N, C, H, W)."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits.float()

    def log_prob(self, x: Tensor) -> Tensor:
        """Elementwise log-probability of pixels in {0, 1}, shape (N, C, H, W)."""
        return -F.binary_cross_entropy_with_logits(self.logits, x.float(), reduction="none")

    def mean(self) -> Tensor:
        """Pixel probabilities, in [0, 1]."""
        return torch.sigmoid(self.logits)


class DiscretizedLogisticMixture:
    """A mixture of discretised logistics over ``2**num_bits`` pixel levels (PixelCNN++ / NVAE).

    The parameters (N, M * (1 + 2C + C(C-1)/2), H, W) hold, in order: M mixture logits, C*M means,
    C*M log-scales and C(C-1)/2 * M coefficients. Channel c's mean is shifted by sum_{j<c} coeff_cj * x_j,
    so the channels of a pixel are modelled autoregressively (R, then G given R, then B given R and G).
    Pixel values live in [0, 1] and are quantised to ``num_bits`` with ``pixel_levels`` (for fewer than 8 bits,
    as the reference implementation does: the low bits of the 8-bit value are dropped).
    """

    def __init__(self, params: Tensor, channels: int, num_mixtures: int, num_bits: int = 8) -> None:
        params = params.float()
        n, _, h, w = params.shape
        m, c = num_mixtures, channels
        self.channels, self.num_mixtures = c, m
        self.num_bits = num_bits
        self.levels = 2**num_bits - 1
        self.logit_probs = params[:, :m]  # N, M, H, W
        rest = params[:, m:]
        self.means = rest[:, : c * m].reshape(n, c, m, h, w)
        self.log_scales = torch.clamp(rest[:, c * m : 2 * c * m].reshape(n, c, m, h, w), min=-7.0)
        self.coeffs = torch.tanh(rest[:, 2 * c * m :].reshape(n, c * (c - 1) // 2, m, h, w))

    def _channel_means(self, x: Tensor) -> Tensor:
        """Means of each channel given the previous channels' values ``x`` (N, C, 1, H, W) in [-1, 1]."""
        means, k = [], 0
        for c in range(self.channels):
            mean = self.means[:, c]
            for j in range(c):
                mean = mean + self.coeffs[:, k] * x[:, j]
                k += 1
            means.append(mean)
        return torch.stack(means, dim=1)  # N, C, M, H, W

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-probability of each pixel (all its channels together), shape (N, H, W)."""
        level = pixel_levels(x.float(), self.num_bits)  # integer level 0 .. 2**bits - 1
        x = (level / self.levels * 2 - 1).unsqueeze(2)  # N, C, 1, H, W in [-1, 1]
        centered = x - self._channel_means(x)
        inv_scale = torch.exp(-self.log_scales)
        half_bin = 1.0 / self.levels
        plus = inv_scale * (centered + half_bin)
        minus = inv_scale * (centered - half_bin)
        log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus), for the lowest level
        log_one_minus_cdf_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)), for the highest level
        cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
        mid = inv_scale * centered
        log_pdf_mid = mid - self.log_scales - 2.0 * F.softplus(mid) + math.log(2 * half_bin)
        log_bin = torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)), log_pdf_mid)
        level = level.unsqueeze(2)
        log_probs = torch.where(
            level == 0, log_cdf_plus, torch.where(level == self.levels, log_one_minus_cdf_minus, log_bin)
        )
        log_probs = log_probs.sum(dim=1) + F.log_softmax(self.logit_probs, dim=1)  # N, M, H, W
        return torch.logsumexp(log_probs, dim=1)

    def mean(self) -> Tensor:
        """A deterministic image in [0, 1]: the mixture-weighted means, channel by channel."""
        weights = torch.softmax(self.logit_probs, dim=1).unsqueeze(1)  # N, 1, M, H, W
        means = (self.means * weights).sum(dim=2)
        coeffs = (self.coeffs * weights).sum(dim=2)
        out, k = [], 0
        for c in range(self.channels):
            value = means[:, c]
            for j in range(c):
                value = value + coeffs[:, k] * out[j]
                k += 1
            out.append(torch.clamp(value, -1.0, 1.0))
        return torch.stack(out, dim=1) / 2 + 0.5
