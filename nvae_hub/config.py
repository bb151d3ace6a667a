"""NVAEConfig: every architectural and loss choice of an NVAE, validated, with presets and a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUTS = ("bernoulli", "logistic_mixture")
CHANNEL_MULT = 2  # every down-sampling doubles the channels, every up-sampling halves them
MAX_FLOWS = 8  # pairs of flow cells per group (the paper uses at most 2)
MAX_PARAMETERS = 1_000_000_000
"""The largest model a config may describe (4 GB of float32 weights; the paper's largest has about a third)."""
MAX_GROUP_CELLS = 2048
"""The most residual cells in the latent groups, encoder and decoder together (the paper's largest model has 144):
each is a module to build, and thousands take minutes even when small."""
LIMITS: dict[str, int] = {
    "image_size": 1024, "padding": 64, "num_mixtures": 100, "num_bits": 16, "num_channels": 4096,
    "num_preprocess_blocks": 8, "num_preprocess_cells": 32, "num_postprocess_blocks": 8,
    "num_postprocess_cells": 32, "num_scales": 8, "groups_per_scale": 256, "min_groups_per_scale": 256,
    "latent_channels": 1024, "cells_per_group_enc": 32, "cells_per_group_dec": 32, "power_iterations": 1000,
}
"""The largest value of every size field: far above any published NVAE, low enough that a typo (10**7 groups)
is refused at once instead of building for minutes or asking for terabytes."""


@dataclass(frozen=True)
class NVAEConfig:
    """The shape of an NVAE.

    The names follow the paper (Vahdat & Kautz, 2020, Table 6 and the official code's flags).
    Latent groups live in ``num_scales`` spatial scales; the coarsest scale is scale 0.
    """

    image_size: int = 32
    """Height and width of the images (square)."""
    channels: int = 3
    """Image channels: 1 (grayscale) or 3 (RGB)."""
    padding: int = 0
    """Pixels of zero padding added on each side inside the model (MNIST: 28 + 2*2 = 32).
    The likelihood counts only the real pixels."""
    output: str = "logistic_mixture"
    """Output distribution: 'bernoulli' for binary data, 'logistic_mixture' for n-bit data."""
    num_mixtures: int = 10
    """Components of the discretised logistic mixture."""
    num_bits: int = 8
    """Bits per pixel of the data modelled by the logistic mixture (5 for CelebA-HQ 256 in the paper)."""

    num_channels: int = 32
    """Channels after the stem; each down-sampling doubles them."""
    num_preprocess_blocks: int = 1
    """Pre-processing blocks; each ends with a down-sampling cell."""
    num_preprocess_cells: int = 2
    """Cells per pre-processing block (the last one down-samples)."""
    num_postprocess_blocks: int = 1
    """Post-processing blocks; each starts with an up-sampling cell."""
    num_postprocess_cells: int = 2
    """Cells per post-processing block (the first one up-samples)."""

    num_scales: int = 2
    """Spatial scales of the latent hierarchy."""
    groups_per_scale: int = 10
    """Latent groups in the finest scale (and in every scale when ``adaptive_groups`` is off)."""
    adaptive_groups: bool = True
    """Halve the number of groups at each coarser scale (the paper's 'adaptive group counts')."""
    min_groups_per_scale: int = 1
    """Lower bound of the adaptive group count."""
    latent_channels: int = 20
    """Channels of each latent group."""
    cells_per_group_enc: int = 2
    """Encoder residual cells per latent group."""
    cells_per_group_dec: int = 2
    """Decoder cells per latent group."""
    use_se: bool = True
    """Squeeze-and-excitation in every cell."""
    num_flows: int = 0
    """Pairs of normalising-flow cells applied to each group's posterior sample (``nvae_hub.flows``); 0 = none.
    The paper uses 1 for CIFAR-10 and CelebA 64, 2 for CelebA-HQ 256. Sampling from the prior is unaffected."""

    reg_weight: float = 1e-2
    """Weight of the spectral and batch-norm regularisers (the paper's lambda)."""
    reg_weight_init: float | None = None
    """If set, the regulariser weight is annealed (log-linearly) from this value to ``reg_weight``
    during KL warm-up, as for CelebA-HQ 256 in the paper."""
    power_iterations: int = 4
    """Power iterations per training step for the spectral regulariser."""
    kl_balance: bool = True
    """Balance the KL across groups during KL warm-up."""

    name: str = field(default="custom", compare=False)
    """A label (the preset name); not part of the architecture."""

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def padded_size(self) -> int:
        """Image size seen by the network, padding included."""
        return self.image_size + 2 * self.padding

    @property
    def total_downsampling(self) -> int:
        """Factor between the padded image and the coarsest latent scale."""
        return 2 ** (self.num_preprocess_blocks + self.num_scales - 1)

    @property
    def groups_per_scale_list(self) -> list[int]:
        """Groups in each scale, coarsest scale first."""
        counts, n = [], self.groups_per_scale
        for _ in range(self.num_scales):  # finest first, as the encoder meets them
            counts.append(n)
            if self.adaptive_groups:
                n = max(self.min_groups_per_scale, n // 2)
        return counts[::-1]

    @property
    def num_groups(self) -> int:
        """Total number of latent groups."""
        return sum(self.groups_per_scale_list)

    def latent_shape(self, scale: int) -> tuple[int, int, int]:
        """(channels, height, width) of one latent group at ``scale`` (0 = coarsest)."""
        side = self.padded_size // self.total_downsampling * 2**scale
        return (self.latent_channels, side, side)

    @property
    def output_channels(self) -> int:
        """Channels of the decoder's output-distribution parameters."""
        if self.output == "bernoulli":
            return self.channels
        c = self.channels
        return self.num_mixtures * (1 + 2 * c + c * (c - 1) // 2)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"NVAEConfig.{name}={getattr(self, name)!r} is invalid: {rule}")

        for name, most in LIMITS.items():
            value, least = getattr(self, name), 0 if name == "padding" else 1
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
                fail(name, f"it must be an integer >= {least} and <= {most}")
        for name in ["adaptive_groups", "use_se", "kl_balance"]:
            if not isinstance(getattr(self, name), bool):
                fail(name, "it must be true or false")
        if isinstance(self.num_flows, bool) or not isinstance(self.num_flows, int) or not (
            0 <= self.num_flows <= MAX_FLOWS
        ):
            fail("num_flows", f"it must be an integer from 0 (no flows) to {MAX_FLOWS}")
        if self.output not in OUTPUTS:
            fail("output", f"it must be one of {', '.join(OUTPUTS)}")
        if self.channels not in (1, 3):
            fail("channels", "it must be 1 (grayscale) or 3 (RGB)")
        if self.num_preprocess_blocks != self.num_postprocess_blocks:
            fail("num_postprocess_blocks", "it must equal num_preprocess_blocks so the decoder returns to the "
                 "image resolution")
        for name in ["reg_weight", "reg_weight_init"]:
            value = getattr(self, name)
            if value is None and name == "reg_weight_init":
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or (
                value < 0
            ):
                fail(name, "it must be a finite number >= 0")
        if self.reg_weight_init is not None and (self.reg_weight_init <= 0 or self.reg_weight <= 0):
            fail("reg_weight_init", "annealing is log-linear, so reg_weight_init and reg_weight must be > 0")
        if self.padded_size % self.total_downsampling:
            fail(
                "image_size",
                f"image_size + 2*padding = {self.padded_size} must be divisible by the total down-sampling "
                f"2**(num_preprocess_blocks + num_scales - 1) = {self.total_downsampling}; change padding, "
                f"image_size or the number of blocks/scales",
            )
        cells = self.num_groups * (self.cells_per_group_enc + self.cells_per_group_dec)
        if cells > MAX_GROUP_CELLS:
            raise ValueError(
                f"this NVAEConfig has {self.num_groups} latent groups of {self.cells_per_group_enc} encoder and "
                f"{self.cells_per_group_dec} decoder cells: {cells:,} cells, more than the limit of "
                f"{MAX_GROUP_CELLS:,}; reduce groups_per_scale, num_scales or the cells per group"
            )
        count = self.estimated_num_parameters()
        if count > MAX_PARAMETERS:
            raise ValueError(
                f"this NVAEConfig describes a model of about {count:,} parameters ({4 * count / 2**30:,.1f} GiB of "
                f"float32 weights), more than the limit of {MAX_PARAMETERS:,}; reduce num_channels (doubled at "
                f"each of the {self.num_preprocess_blocks + self.num_scales - 1} down-samplings), the numbers of "
                f"groups and cells, or latent_channels"
            )

    def estimated_num_parameters(self) -> int:
        """How many parameters ``NVAE(config)`` has, counted from the config without building the model (so that
        absurd sizes are refused at once). A test holds it to the built model's count for every preset."""

        def conv(c_in: int, c_out: int, k: int) -> int:  # weight-normalised, with a bias
            return c_in * c_out * k * k + 2 * c_out

        def se(c: int) -> int:  # squeeze-and-excitation: two linear layers through max(c // 16, 4) units
            hidden = max(c // 16, 4)
            return 2 * c * hidden + hidden + c if self.use_se else 0

        def residual(c: int, c_out: int) -> int:  # BN-Swish-conv 3x3 twice, the skip of a down-sampling cell
            skip = conv(c, c_out, 1) if c_out != c else 0
            return 2 * c + conv(c, c_out, 3) + 2 * c_out + conv(c_out, c_out, 3) + skip + se(c_out)

        def mbconv(c: int, e: int, c_out: int) -> int:  # 1x1 expand, 5x5 depthwise, 1x1 project, BNs; up-sampling
            skip = conv(c, c_out, 1) if c_out != c else 0
            return 2 * c + e * c * c + 4 * e * c + 25 * e * c + e * c * c_out + 2 * c_out + skip + se(c_out)

        ch, zc, groups = self.num_channels, self.latent_channels, self.groups_per_scale_list
        total = conv(self.channels, ch, 3)  # the stem
        for _ in range(self.num_preprocess_blocks):
            total += (self.num_preprocess_cells - 1) * residual(ch, ch) + residual(ch, CHANNEL_MULT * ch)
            ch *= CHANNEL_MULT
        for s in reversed(range(self.num_scales)):  # the encoder, finest scale first
            total += groups[s] * self.cells_per_group_enc * residual(ch, ch)
            if s > 0:
                total += residual(ch, CHANNEL_MULT * ch)
                ch *= CHANNEL_MULT
        side = self.padded_size // self.total_downsampling
        total += ch * side * side + conv(ch, ch, 1)  # h0 and the 1x1 convolution of the top encoder feature
        for s in range(self.num_scales):  # the decoder, coarsest scale first
            total += groups[s] * (conv(ch, 2 * zc, 3) + conv(ch + zc, ch, 1))  # posterior heads, combiners with z
            later = groups[s] - 1 if s == 0 else groups[s]  # every group but the very first: cells, prior, combiner
            total += later * (self.cells_per_group_dec * mbconv(ch, 6, ch) + conv(ch, 2 * zc, 1) + conv(ch, ch, 1))
            if s + 1 < self.num_scales:
                total += mbconv(ch, 6, ch // CHANNEL_MULT)
                ch //= CHANNEL_MULT
        for _ in range(self.num_postprocess_blocks):
            total += mbconv(ch, 3, ch // CHANNEL_MULT) + (self.num_postprocess_cells - 1) * mbconv(
                ch // CHANNEL_MULT, 3, ch // CHANNEL_MULT)
            ch //= CHANNEL_MULT
        # the posterior flows: num_flows pairs of cells per group: masked convolutions 3x3 zc -> 6zc and 5x5
        # depthwise without biases, then 1x1 6zc -> zc
        flow_cell = (9 * zc * 6 * zc + 6 * zc) + (25 * 6 * zc + 6 * zc) + conv(6 * zc, zc, 1)
        total += self.num_groups * 2 * self.num_flows * flow_cell
        return total + conv(ch, self.output_channels, 3)  # the output head

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A plain dict of every field (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NVAEConfig:
        """Build a config from a dict; unknown keys are an error (they usually mean a typo)."""
        if not isinstance(data, dict):
            raise ValueError(f"an NVAE config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise ValueError(f"unknown NVAEConfig field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps({"model_type": "nvae", **self.to_dict()}, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> NVAEConfig:
        """Parse a config from a JSON string."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config is not valid JSON: {err}") from err
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON to ``path``."""
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> NVAEConfig:
        """Read a config from a JSON file."""
        return cls.from_json(Path(path).read_text())

    def replace(self, **changes: Any) -> NVAEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> NVAEConfig:
        """A named configuration: one of ``NVAEConfig.presets()``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    @staticmethod
    def presets() -> list[str]:
        """Names of the built-in presets."""
        return list(PRESETS)


_MNIST = dict(image_size=28, channels=1, padding=2, output="bernoulli")

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a forward and backward pass at batch 4 takes a fraction of a second on a CPU.
    "tiny": dict(
        image_size=16, channels=1, output="bernoulli", num_channels=8, num_preprocess_blocks=1,
        num_preprocess_cells=1, num_postprocess_blocks=1, num_postprocess_cells=1, num_scales=2,
        groups_per_scale=2, latent_channels=4, cells_per_group_enc=1, cells_per_group_dec=1,
    ),
    # Trainable on a 2-core CPU to recognisable digits in about an hour.
    "mnist-small": dict(
        **_MNIST, num_channels=12, num_preprocess_blocks=2, num_preprocess_cells=1,
        num_postprocess_blocks=2, num_postprocess_cells=1, num_scales=2, groups_per_scale=4,
        latent_channels=10, cells_per_group_enc=1, cells_per_group_dec=1,
    ),
    # mnist-small's network with an 8-bit discretised logistic mixture, for grey-level images (Fashion-MNIST).
    "fashion-mnist-small": dict(
        image_size=28, channels=1, padding=2, output="logistic_mixture", num_mixtures=10, num_channels=12,
        num_preprocess_blocks=2, num_preprocess_cells=1, num_postprocess_blocks=2, num_postprocess_cells=1,
        num_scales=2, groups_per_scale=4, latent_channels=10, cells_per_group_enc=1, cells_per_group_dec=1,
    ),
    # The paper's configurations (the official code's training commands, --num_nf included).
    "mnist": dict(
        **_MNIST, num_channels=32, num_preprocess_blocks=2, num_preprocess_cells=3, num_postprocess_blocks=2,
        num_postprocess_cells=3, num_scales=2, groups_per_scale=10, latent_channels=20,
        cells_per_group_enc=2, cells_per_group_dec=2, reg_weight=1e-2,
    ),
    "cifar10": dict(
        image_size=32, channels=3, num_channels=128, num_preprocess_blocks=1, num_preprocess_cells=2,
        num_postprocess_blocks=1, num_postprocess_cells=2, num_scales=1, groups_per_scale=30,
        latent_channels=20, cells_per_group_enc=2, cells_per_group_dec=2, reg_weight=1e-2, num_flows=1,
    ),
    "celeba64": dict(
        image_size=64, channels=3, num_channels=64, num_preprocess_blocks=1, num_preprocess_cells=2,
        num_postprocess_blocks=1, num_postprocess_cells=2, num_scales=3, groups_per_scale=20,
        latent_channels=20, cells_per_group_enc=2, cells_per_group_dec=2, reg_weight=1e-1, num_flows=1,
    ),
    "celeba256": dict(
        image_size=256, channels=3, num_bits=5, num_channels=30, num_preprocess_blocks=1,
        num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2, num_scales=5,
        groups_per_scale=16, min_groups_per_scale=4, latent_channels=20, cells_per_group_enc=2,
        cells_per_group_dec=2, reg_weight=1e-2, reg_weight_init=1.0, num_flows=2,
    ),
}

# Pairs for the single- vs multi-scale comparison (``python -m nvae_hub.analysis convergence``): the same network
# with one latent scale instead of two, as many latent groups, and wider so that the parameter counts agree within
# 10% (mnist 1.24M vs 1.22M, sprites32 0.29M vs 0.31M). The multi-scale ones double as small presets: the mnist
# pairs are mnist-small / fashion-mnist-small, sprites32-multi trains the beta sweep on sprites32 in minutes.
_SPRITES32_MULTI = dict(
    image_size=32, channels=1, output="bernoulli", num_channels=8, num_preprocess_blocks=2, num_preprocess_cells=1,
    num_postprocess_blocks=2, num_postprocess_cells=1, num_scales=2, groups_per_scale=2, latent_channels=4,
    cells_per_group_enc=1, cells_per_group_dec=1,
)
PRESETS |= {
    "mnist-single": {**PRESETS["mnist-small"], "num_scales": 1, "groups_per_scale": 6, "num_channels": 18},
    "mnist-multi": PRESETS["mnist-small"],
    "fashion-mnist-single": {**PRESETS["fashion-mnist-small"], "num_scales": 1, "groups_per_scale": 6,
                             "num_channels": 18},
    "fashion-mnist-multi": PRESETS["fashion-mnist-small"],
    "sprites32-single": {**_SPRITES32_MULTI, "num_scales": 1, "groups_per_scale": 3, "num_channels": 12},
    "sprites32-multi": _SPRITES32_MULTI,
}
