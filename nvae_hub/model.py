"""NVAE: a bottom-up encoder and a top-down decoder sharing a hierarchy of latent groups.

Reading guide. Groups are numbered in decoder order, g = 0 .. G-1, coarsest scale first. The decoder starts
from a learned tensor ``h0``; at each group it computes the prior p(z_g | z_<g) from its state, takes a z
(from the posterior, from the prior, or from the caller) and merges it into its state with a 1x1 conv.
The encoder runs once, fine to coarse, and leaves one feature map per group; the posterior of group g is
the residual Normal q = N(mu_p + dmu, sigma_p * dsigma), where (dmu, dsigma) come from that feature plus
the decoder state. With ``config.num_flows > 0`` its sample is then pushed through the group's normalising
flows (``nvae_hub.flows``); the prior never is. ``_top_down`` is the one loop that every public method drives.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from torch import Tensor, nn

from . import validation
from .card import CARD_NAME, LIBRARY_NAME, LICENSE, PAPER_URL, PIPELINE_TAG, TAGS, TrainingInfo, model_card
from .config import CHANNEL_MULT, NVAEConfig
from .distributions import Bernoulli, DiscretizedLogisticMixture, Normal, reduce_bits
from .flows import PosteriorFlow
from .layers import Cell, Conv2d, batchnorm_loss, given_weights, normalised_weights, spectral_loss
from .schedules import kl_balance, kl_balance_coefficients
from .weights import CONFIG_NAME, WEIGHTS_NAME, PretrainedLoadError, load_weights, parse_config, save_weights

# choose_z(g, decoder_state, prior) -> z: how each group's latent is picked in the top-down pass
ChooseZ = Callable[[int, Tensor, Normal], Tensor]

# Names of the (unsaved) buffers in which a decoder BatchNorm layer keeps the statistics of ``NVAE.readjust_bn``.
READJUSTED_MEAN, READJUSTED_VAR = "readjusted_mean", "readjusted_var"


def in_eval_mode(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run an inference method with every layer in eval mode (BatchNorm uses, and leaves alone, its running
    statistics), then give each layer back the mode the caller had set."""

    @functools.wraps(method)
    def run_in_eval_mode(self: NVAE, *args: Any, **kwargs: Any) -> Any:
        modes = [(module, module.training) for module in self.modules() if module.training]
        if not modes:  # already in eval mode (also the case while exporting): nothing to switch
            return method(self, *args, **kwargs)
        self.eval()
        try:
            return method(self, *args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training

    return run_in_eval_mode


@dataclass
class Latents:
    """One latent tensor per group (decoder order), each tagged with its scale (0 = coarsest)."""

    z: list[Tensor]
    scales: list[int]

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, group: int) -> Tensor:
        return self.z[group]

    def with_scales_from(self, other: Latents, scales: Sequence[int]) -> Latents:
        """These latents, with every group of the listed scales taken from ``other``."""
        if other.scales != self.scales:
            raise ValueError("the two Latents come from models with different hierarchies")
        wanted = set(scales)
        unknown = wanted - set(self.scales)
        if unknown:
            raise ValueError(f"unknown scale(s) {sorted(unknown)}; this model has scales 0..{max(self.scales)}")
        z = [b if s in wanted else a for a, b, s in zip(self.z, other.z, self.scales, strict=True)]
        return Latents(z, list(self.scales))


@dataclass
class GroupPosterior:
    """The approximate posterior q(z_g | x, z_<g) of one group, at the latent drawn from it."""

    normal: Normal
    """q0, the Normal from the encoder."""
    z0: Tensor
    """The sample (or the mean) drawn from ``normal``."""
    z: Tensor
    """The latent handed to the decoder: ``z0`` pushed through the group's flows (``z0`` itself without flows)."""
    log_det: Tensor | None = None
    """log |dz_i/dz0_i| per element, whose sum is log |det dz/dz0| (the flows' Jacobian is triangular); None
    without flows. Volume-preserving flows give 0."""

    def log_prob(self) -> Tensor:
        """log q(z|x) per element at the latent ``z``: log q0(z0) - log|det dz/dz0| (change of variables)."""
        log_q0 = self.normal.log_prob(self.z0)
        return log_q0 if self.log_det is None else log_q0 - self.log_det

    def kl(self, prior: Normal) -> Tensor:
        """KL(q || prior) per element: analytic without flows; with flows (no closed form) the one-sample
        estimate log q(z|x) - log p(z) at the flowed sample."""
        if self.log_det is None:
            return self.normal.kl(prior)
        return self.log_prob() - prior.log_prob(self.z)


@dataclass
class LossOutput:
    """The terms of the training objective. All per-image values are in nats."""

    total: Tensor
    """Scalar to backpropagate: mean(recon + beta * weighted KL) + reg_weight * (spectral + bn)."""
    recon: Tensor
    """-log p(x|z), shape (N,)."""
    kl: Tensor
    """KL(q(z|x) || p(z)) summed over groups, shape (N,) (with flows a one-sample estimate, which can be
    negative for one image)."""
    kl_per_group: Tensor
    """KL of each group, shape (N, G)."""
    spectral: Tensor
    """Spectral regulariser (sum of the largest singular values), scalar; 0 if not computed."""
    bn: Tensor
    """BatchNorm regulariser (sum of max |scale|), scalar; 0 if not computed."""

    @property
    def elbo(self) -> Tensor:
        """The evidence lower bound per image, shape (N,)."""
        return -(self.recon + self.kl)


class NVAE(
    nn.Module,
    PyTorchModelHubMixin,
    library_name=LIBRARY_NAME,
    license=LICENSE,
    pipeline_tag=PIPELINE_TAG,
    tags=list(TAGS),
    paper_url=PAPER_URL,
):
    """The NVAE model. ``x`` is always a float tensor (N, C, H, W) with values in [0, 1].

    ``save_pretrained``, ``push_to_hub`` and ``from_pretrained`` come from ``huggingface_hub``'s mixin and write
    and read the same files as ``nvae_hub.hub`` (config.json, model.safetensors, README.md), loading strictly.

    ``memory_format`` is the layout of the activations (set it on an instance to change it): channels-last by
    default, since oneDNN's convolutions on CPUs are several times slower in NCHW (the depthwise ones' weight
    gradient: 3-4x). On CUDA the better layout is not settled yet (see the README's H100 section);
    ``torch.contiguous_format`` gives NCHW. The layout changes speed only, not results beyond rounding.
    """

    memory_format: torch.memory_format = torch.channels_last

    def __init__(self, config: NVAEConfig) -> None:
        super().__init__()
        if not isinstance(config, NVAEConfig):
            raise TypeError(f"NVAE expects an NVAEConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.groups_per_scale: list[int] = cfg.groups_per_scale_list
        self.num_scales: int = cfg.num_scales
        self.scale_of_group: list[int] = [s for s, n in enumerate(self.groups_per_scale) for _ in range(n)]
        num_groups = len(self.scale_of_group)
        zc, se = cfg.latent_channels, cfg.use_se

        # ---- encoder: stem, pre-processing, then the tower (finest scale first)
        ch = cfg.num_channels
        self.stem = Conv2d(cfg.channels, ch, 3, padding=1)
        pre: list[nn.Module] = []
        for _ in range(cfg.num_preprocess_blocks):
            pre += [Cell(ch, "residual", use_se=se) for _ in range(cfg.num_preprocess_cells - 1)]
            pre.append(Cell(ch, "residual", stride=2, use_se=se))
            ch *= CHANNEL_MULT
        self.preprocess = nn.Sequential(*pre)
        self.enc_groups = nn.ModuleList()  # encoder order: finest scale first
        self.enc_down = nn.ModuleList()
        for s in reversed(range(self.num_scales)):
            for _ in range(self.groups_per_scale[s]):
                self.enc_groups.append(
                    nn.Sequential(*[Cell(ch, "residual", use_se=se) for _ in range(cfg.cells_per_group_enc)])
                )
            if s > 0:
                self.enc_down.append(Cell(ch, "residual", stride=2, use_se=se))
                ch *= CHANNEL_MULT
        top_channels = ch

        # ---- decoder: learned input h0, then per group (coarsest first) cells, prior, combiner
        side = cfg.padded_size // cfg.total_downsampling
        self.h0 = nn.Parameter(torch.rand(top_channels, side, side))
        self.enc0 = nn.Sequential(nn.ELU(), Conv2d(top_channels, top_channels, 1), nn.ELU())
        self.dec_groups = nn.ModuleList()  # decoder order; group 0 has no cells
        self.prior_heads = nn.ModuleList()  # for groups 1..G-1 (group 0's prior is N(0, 1))
        self.posterior_heads = nn.ModuleList()
        self.enc_combiners = nn.ModuleList()  # for groups 1..G-1: decoder state -> encoder channels
        self.dec_combiners = nn.ModuleList()
        self.dec_up = nn.ModuleList()
        for g in range(num_groups):
            n_cells = 0 if g == 0 else cfg.cells_per_group_dec
            self.dec_groups.append(nn.Sequential(*[Cell(ch, "mbconv6", use_se=se) for _ in range(n_cells)]))
            if g > 0:
                self.prior_heads.append(nn.Sequential(nn.ELU(), Conv2d(ch, 2 * zc, 1)))
                self.enc_combiners.append(Conv2d(ch, ch, 1))
            self.posterior_heads.append(Conv2d(ch, 2 * zc, 3, padding=1))
            self.dec_combiners.append(Conv2d(ch + zc, ch, 1))
            is_last_of_scale = g + 1 < num_groups and self.scale_of_group[g + 1] != self.scale_of_group[g]
            if is_last_of_scale:
                self.dec_up.append(Cell(ch, "mbconv6", stride=-1, use_se=se))
                ch //= CHANNEL_MULT

        # ---- post-processing and the output head
        post: list[nn.Module] = []
        for _ in range(cfg.num_postprocess_blocks):
            post.append(Cell(ch, "mbconv3", stride=-1, use_se=se))
            ch //= CHANNEL_MULT
            post += [Cell(ch, "mbconv3", use_se=se) for _ in range(cfg.num_postprocess_cells - 1)]
        self.postprocess = nn.Sequential(*post)
        self.head = nn.Sequential(nn.ELU(), Conv2d(ch, cfg.output_channels, 3, padding=1))

        # ---- normalising flows of the posteriors (built last: the other layers start as without flows)
        self.flows = nn.ModuleList(PosteriorFlow(zc, cfg.num_flows) for _ in range(num_groups) if cfg.num_flows)

        self.register_buffer("kl_alpha", kl_balance_coefficients(self.groups_per_scale), persistent=False)
        # Number of spectral-regulariser updates so far.
        self.register_buffer("sr_steps", torch.zeros((), dtype=torch.long))
        self._spectral_vectors_warm = False  # see warm_up_spectral_vectors
        self._compiled_decode: Callable[[list[Tensor], Tensor], Tensor] | None = None

    # ================================================================== basic facts
    @property
    def num_groups(self) -> int:
        """Total number of latent groups."""
        return len(self.scale_of_group)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.h0.device

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each group's latent, decoder order."""
        return [self.config.latent_shape(s) for s in self.scale_of_group]

    # ================================================================== the two passes
    def _check_images(self, x: Tensor, name: str = "x") -> Tensor:
        """``x`` checked by the rules of ``nvae_hub.validation`` (as in the ONNX runtime), in the model's dtype."""
        if not isinstance(x, Tensor):
            raise TypeError(f"expected {name} to be a torch.Tensor of images, got {type(x).__name__}")
        cfg = self.config
        validation.image_batch(x.shape, str(x.dtype), (cfg.channels, cfg.image_size, cfg.image_size), name)
        lo, hi = torch.aminmax(x.detach())
        validation.pixel_range(lo.item(), hi.item(), name)
        return x.to(self.h0.dtype)

    def _check_latents(self, latents: Sequence[Tensor], what: str) -> list[Tensor]:
        """One float tensor per group, of the group's shape, with one batch size (``what`` names them)."""
        if isinstance(latents, Tensor) or not isinstance(latents, Sequence):
            raise TypeError(f"expected a list of {what} tensors, one per group, got {type(latents).__name__}")
        zs = list(latents)
        for g, z in enumerate(zs):
            if not isinstance(z, Tensor):
                raise TypeError(f"{what} group {g} must be a torch.Tensor, got {type(z).__name__}")
        validation.latent_batch([z.shape for z in zs], [str(z.dtype) for z in zs], self.latent_shapes(), what)
        return zs

    def _bottom_up(self, x: Tensor) -> list[Tensor]:
        """Encoder features, one per group in decoder order (group g pairs with the feature that the
        encoder has after its group G-1-g). ``x`` is not validated here; the public methods do that."""
        cfg = self.config
        if cfg.output == "logistic_mixture":
            x = reduce_bits(x, cfg.num_bits)  # the encoder sees the data at the bit depth that is modelled
        p = cfg.padding
        x = F.pad(x, (p, p, p, p)) if p else x
        # Activations are kept in self.memory_format. The stem's output is converted too: a one-channel image is
        # NCHW and channels-last at once, and the stem answers it in NCHW.
        s = self.stem((2 * x - 1).contiguous(memory_format=self.memory_format))
        s = self.preprocess(s.contiguous(memory_format=self.memory_format))
        features, down = [], iter(self.enc_down)
        scales_enc_order = self.scale_of_group[::-1]
        for k, cells in enumerate(self.enc_groups):
            s = cells(s)
            features.append(s)
            if k + 1 < len(scales_enc_order) and scales_enc_order[k + 1] != scales_enc_order[k]:
                s = next(down)(s)
        return features[::-1]

    def _posterior(self, g: int, feature: Tensor, s: Tensor, prior: Normal) -> Normal:
        """The residual posterior of group g: N(mu_p + dmu, sigma_p * dsigma)."""
        ftr = self.enc0(feature) if g == 0 else feature + self.enc_combiners[g - 1](s)
        d_mu, d_log_sigma = self.posterior_heads[g](ftr).chunk(2, dim=1)
        return prior.residual(d_mu, d_log_sigma)

    def _top_down(self, n: int, choose_z: ChooseZ) -> Tensor:
        """Run the decoder for a batch of ``n``; ``choose_z`` picks each group's z. Returns the output
        distribution's parameters, cropped to the real image."""
        s = self.h0.unsqueeze(0).expand(n, -1, -1, -1).contiguous(memory_format=self.memory_format)
        up = iter(self.dec_up)
        for g in range(self.num_groups):
            s = self.dec_groups[g](s)
            if g == 0:  # a fixed standard Normal (raw parameters 0, as in the official code)
                zeros = s.new_zeros((n, *self.latent_shapes()[0]), dtype=torch.float32)
                prior = Normal(zeros, zeros)
            else:
                prior = Normal(*self.prior_heads[g - 1](s).chunk(2, dim=1))
            z = choose_z(g, s, prior)
            # z in the same layout: concatenated with an NCHW tensor, s would lose its layout for the rest of the way.
            z = z.to(s.dtype, memory_format=self.memory_format)
            s = self.dec_combiners[g](torch.cat([s, z], dim=1))
            if g + 1 < self.num_groups and self.scale_of_group[g + 1] != self.scale_of_group[g]:
                s = next(up)(s)
        params = self.head(self.postprocess(s))
        p = self.config.padding
        return params[:, :, p:-p, p:-p] if p else params

    def likelihood(self, params: Tensor) -> Bernoulli | DiscretizedLogisticMixture:
        """The output distribution p(x|z) for decoder parameters ``params``."""
        cfg = self.config
        if cfg.output == "bernoulli":
            return Bernoulli(params)
        return DiscretizedLogisticMixture(params, cfg.channels, cfg.num_mixtures, cfg.num_bits)

    def _log_likelihood(self, params: Tensor, x: Tensor) -> Tensor:
        """log p(x|z) per image, shape (N,)."""
        return self.likelihood(params).log_prob(x).flatten(1).sum(dim=1)

    def _posterior_pass(
        self, x: Tensor, use_mean: bool = False, repeats: int = 1, generator: torch.Generator | None = None
    ) -> tuple[Tensor, list[Tensor], list[GroupPosterior], list[Normal]]:
        """Encode ``x`` and decode its posterior samples (or means), ``repeats`` samples per image (consecutive
        in the batch; the bottom-up pass runs once per image; ``generator`` draws the samples). With flows, each
        sample (or mean) is pushed through its group's flows. Returns the output parameters, the zs and the
        posterior and prior of every group."""
        features = self._bottom_up(x)
        if repeats > 1:
            features = [f.repeat_interleave(repeats, dim=0).contiguous(memory_format=self.memory_format)
                        for f in features]
        zs: list[Tensor] = []
        posteriors: list[GroupPosterior] = []
        priors: list[Normal] = []

        def choose_z(g: int, s: Tensor, prior: Normal) -> Tensor:
            q = self._posterior(g, features[g], s, prior)
            z0 = q.mu if use_mean else q.rsample(generator)
            z, log_det = self.flows[g](z0) if self.flows else (z0, None)
            zs.append(z)
            posteriors.append(GroupPosterior(q, z0, z, log_det))
            priors.append(prior)
            return z

        params = self._top_down(x.shape[0] * repeats, choose_z)
        return params, zs, posteriors, priors

    # ================================================================== training objective
    def loss(self, x: Tensor, kl_weight: float | Tensor = 1.0, reg_weight: float | Tensor | None = None,
             beta: float = 1.0, *, check_inputs: bool = True) -> LossOutput:
        """The negative ELBO with KL warm-up/balancing, plus the regularisers, for a batch ``x``.

        ``kl_weight`` is the KL warm-up coefficient (1 = the true ELBO); while it is below 1 and the config
        asks for it, the KL is balanced across groups. ``beta`` multiplies the (warmed-up) KL term, as in the
        beta-VAE (Higgins et al., 2017); 1 is the ELBO. ``reg_weight`` overrides ``config.reg_weight`` (the
        trainer anneals it). The regularisers' power iteration advances only in training mode.

        Both weights may be 0-d tensors on the model's device, as the trainer passes them: then nothing here
        waits for the device, and a compiled loss is not recompiled when they change. ``check_inputs=False``
        skips the validation of ``x`` (which reads its minimum and maximum back to the host); the trainer checks
        its batches on the host before they reach the device.
        """
        if check_inputs:
            x = self._check_images(x)
        reg_weight = self.config.reg_weight if reg_weight is None else reg_weight
        # Every convolution's weight is computed once, the weight normalisations of one shape together; the
        # spectral regulariser reuses them. A compiled graph lets each convolution compute its own (inductor fuses
        # those operations; weights handed over as module state would make torch.compile guard on them).
        convs = self._convs()
        weights = normalised_weights(convs)
        with contextlib.nullcontext() if torch.compiler.is_compiling() else given_weights(convs, weights):
            params, _, posteriors, priors = self._posterior_pass(x)
        recon = -self._log_likelihood(params, x)
        kl_per_group = torch.stack([q.kl(p).flatten(1).sum(dim=1) for q, p in zip(posteriors, priors, strict=True)],
                                   dim=1)
        kl = kl_per_group.sum(dim=1)
        weighted_kl = kl_weight * kl
        if self.config.kl_balance:
            if isinstance(kl_weight, Tensor):
                weighted_kl = torch.where(kl_weight < 1.0, kl_balance(kl_per_group, kl_weight, self.kl_alpha),
                                          weighted_kl)
            elif kl_weight < 1.0:
                weighted_kl = kl_balance(kl_per_group, kl_weight, self.kl_alpha)
        objective = (recon + beta * weighted_kl).mean()

        zero = objective.new_zeros(())
        spectral, bn = zero, zero
        if isinstance(reg_weight, Tensor) or reg_weight > 0:
            spectral, bn = self._regularizers(convs, weights)
            objective = objective + reg_weight * (spectral + bn)
        return LossOutput(objective, recon, kl, kl_per_group, spectral, bn)

    def regularizers(self) -> tuple[Tensor, Tensor]:
        """(spectral, batch-norm) regularisers. In training mode this advances the power iteration."""
        convs = self._convs()
        return self._regularizers(convs, normalised_weights(convs))

    @torch.no_grad()
    def warm_up_spectral_vectors(self) -> None:
        """Converge the spectral regulariser's singular-vector estimates with 10x the power iterations, as the
        official code does at its first training step, unless they have been updated before (``sr_steps`` > 0:
        trained or loaded vectors are kept). The first training-mode regulariser call does this by itself; the
        training step (``nvae_hub.training.TrainStep``) calls it when it is made, so that no step has to ask
        whether it is the first (a read of a device counter, which would stall a GPU)."""
        if int(self.sr_steps) == 0:
            convs = self._convs()
            spectral_loss(convs, normalised_weights(convs), 10 * self.config.power_iterations, update=True)
        self._spectral_vectors_warm = True

    def _regularizers(self, convs: list[Conv2d], weights: list[Tensor]) -> tuple[Tensor, Tensor]:
        if self.training:
            if not self._spectral_vectors_warm:
                if torch.compiler.is_compiling():  # 10x the power iterations would be traced into the graph
                    raise RuntimeError("call warm_up_spectral_vectors() before compiling the training loss (the "
                                       "training step, nvae_hub.training.TrainStep, does)")
                self.warm_up_spectral_vectors()
            self.sr_steps += 1
        return (spectral_loss(convs, weights, self.config.power_iterations, update=self.training),
                batchnorm_loss(self._batch_norms()))

    def _convs(self) -> list[Conv2d]:
        return [m for m in self.modules() if isinstance(m, Conv2d)]

    def _batch_norms(self) -> list[nn.BatchNorm2d | nn.SyncBatchNorm]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm)]

    def fold_weight_norm(self) -> None:
        """Replace every weight-normalised convolution's (v, gain) by its plain weight: same outputs, faster
        inference and export. The folded state dict has no gains, so it no longer matches an unfolded model's."""
        for conv in self._convs():
            conv.fold_weight_norm()

    # ================================================================== sampling
    def sample_noise(self, n: int, seed: int | None = None) -> list[Tensor]:
        """Standard-normal noise for every group, shapes (n, C, H, W). Drawn on the CPU, so a seed gives the
        same noise (and images) on every device."""
        n, seed = validation.integer(n, "the number of samples"), validation.seed(seed)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return [torch.randn((n, *shape), generator=generator).to(self.device) for shape in self.latent_shapes()]

    @in_eval_mode
    def decode_noise(self, noise: Sequence[Tensor], temperature: float | Sequence[float] | Tensor = 1.0) -> Tensor:
        """Images from given prior noise: group g's z = mu_p + temperature_g * sigma_p * noise_g. Uses the
        BatchNorm statistics that ``readjust_bn`` re-estimated, if any."""
        noise = self._check_latents(noise, "noise")
        temps = validation.temperatures(temperature, self.num_groups)
        with self._readjusted_bn_statistics():
            return self._decode_noise(noise, temps)

    def _decode_noise(self, noise: Sequence[Tensor], temps: Sequence[float | Tensor]) -> Tensor:
        """``decode_noise`` without the checks, with the BatchNorm statistics as they are (the ONNX export traces
        it with one tensor per temperature)."""

        def choose_z(g: int, s: Tensor, prior: Normal) -> Tensor:
            return prior.with_temperature(temps[g]).sample_from(noise[g])

        return self.likelihood(self._top_down(noise[0].shape[0], choose_z)).mean()

    @torch.no_grad()
    @in_eval_mode
    def sample(self, n: int, temperature: float | Sequence[float] = 1.0, seed: int | None = None, *,
               compile: bool = False) -> Tensor:
        """``n`` images (n, C, H, W) in [0, 1] from the prior, with sigma scaled by ``temperature`` (one value,
        or one per group). The same seed gives the same images. The pixels are the output distribution's
        mean (Bernoulli probabilities / logistic-mixture means).

        With ``compile=True`` the decoder runs through ``torch.compile`` (see ``compiled_decoder``): the first
        call at each batch size compiles (seconds to minutes), later ones are faster, most of all on a GPU."""
        temperatures = validation.temperatures(temperature, self.num_groups)  # checked before drawing any noise
        noise = self.sample_noise(n, seed)
        if not compile:
            return self.decode_noise(noise, temperatures)
        temps = torch.tensor([float(t) for t in temperatures], device=self.device)
        with self._readjusted_bn_statistics():
            # .clone(): with CUDA graphs the output lives in a buffer that the next call overwrites.
            return self.compiled_decoder()(noise, temps).clone()

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy, pickle) must not share the compiled decoder: it runs the original model.
        return {**super().__getstate__(), "_compiled_decode": None}

    def compiled_decoder(self) -> Callable[[list[Tensor], Tensor], Tensor]:
        """The top-down pass of ``decode_noise`` compiled with ``torch.compile`` in one graph, as a function
        ``(noise, temperatures) -> images`` whose ``temperatures`` is a tensor with one value per group (so that a
        new temperature does not recompile). On CUDA it replays CUDA graphs (mode "reduce-overhead"): one graph
        per batch size. Made on first use and kept. It runs the model as it is: ``sample(compile=True)`` puts it
        in eval mode under ``torch.no_grad()`` with the statistics of ``readjust_bn``, as ``decode_noise`` does."""
        if self._compiled_decode is None:
            def decode(noise: list[Tensor], temperatures: Tensor) -> Tensor:
                return self._decode_noise(noise, list(temperatures.unbind()))

            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._compiled_decode = torch.compile(decode, fullgraph=True, dynamic=False, mode=mode)
        return self._compiled_decode

    def _decoder_batch_norms(self) -> list[nn.BatchNorm2d | nn.SyncBatchNorm]:
        """The BatchNorm layers that sampling runs: those of the top-down pass, not the encoder's."""
        decoder = [self.dec_groups, self.dec_up, self.prior_heads, self.dec_combiners, self.postprocess, self.head]
        return [m for part in decoder for m in part.modules() if isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm)]

    @torch.no_grad()
    def readjust_bn(self, temperature: float = 1.0, num_batches: int = 20, batch_size: int = 64,
                    seed: int | None = 0) -> None:
        """Re-estimate, for sampling, the statistics of the BatchNorm layers that sampling runs (the decoder's), on
        ``num_batches`` batches of samples at ``temperature``: the paper's trick for sharper samples at low
        temperature. Leaves the model in eval mode.

        The re-estimated statistics are kept beside the learned ones and used by ``sample`` and ``decode_noise``
        only. Everything that starts from data (``encode``, ``decode``, ``reconstruct``, ``swap``, ``nll``,
        ``loss``) keeps the statistics learned in training, so it gives exactly the results it gave before. The
        re-estimated statistics are not part of the saved weights; ``forget_readjusted_bn`` drops them.
        """
        temps = validation.temperatures(temperature, self.num_groups)
        num_batches = validation.integer(num_batches, "num_batches")
        batch_size, seed = validation.integer(batch_size, "batch_size"), validation.seed(seed)
        norms = self._decoder_batch_norms()
        learned = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(), bn.momentum)
                   for bn in norms]
        self.eval()
        try:
            for bn in norms:
                bn.reset_running_stats()
                bn.momentum = None  # a cumulative average over the batches below
                bn.train()
            for i in range(num_batches):
                batch_seed = None if seed is None else (seed + i) % (validation.MAX_SEED + 1)
                self._decode_noise(self.sample_noise(batch_size, batch_seed), temps)
            for bn in norms:
                bn.register_buffer(READJUSTED_MEAN, bn.running_mean.clone(), persistent=False)
                bn.register_buffer(READJUSTED_VAR, bn.running_var.clone(), persistent=False)
        finally:
            for bn, (mean, var, count, momentum) in zip(norms, learned, strict=True):
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
                bn.momentum = momentum
            self.eval()

    @property
    def has_readjusted_bn(self) -> bool:
        """Whether ``readjust_bn`` has given sampling its own BatchNorm statistics."""
        return any(hasattr(bn, READJUSTED_MEAN) for bn in self._decoder_batch_norms())

    def forget_readjusted_bn(self) -> None:
        """Drop the statistics of ``readjust_bn``: sampling uses the learned ones again."""
        for bn in self._decoder_batch_norms():
            for name in (READJUSTED_MEAN, READJUSTED_VAR):
                if hasattr(bn, name):
                    delattr(bn, name)

    @torch.no_grad()
    def bake_readjusted_bn(self) -> None:
        """Make the statistics of ``readjust_bn`` the decoder's statistics for every method, and forget the learned
        ones: for a copy that will only sample, such as the exported sampling graph."""
        for bn in self._decoder_batch_norms():
            if hasattr(bn, READJUSTED_MEAN):
                bn.running_mean.copy_(getattr(bn, READJUSTED_MEAN))
                bn.running_var.copy_(getattr(bn, READJUSTED_VAR))
        self.forget_readjusted_bn()

    @contextlib.contextmanager
    def _readjusted_bn_statistics(self) -> Iterator[None]:
        """Within the block, the decoder's BatchNorm layers use the statistics of ``readjust_bn`` (if any)."""
        swapped = [bn for bn in self._decoder_batch_norms() if hasattr(bn, READJUSTED_MEAN)]
        if not swapped:
            yield
            return
        learned = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in swapped]
        with torch.no_grad():
            for bn in swapped:
                bn.running_mean.copy_(getattr(bn, READJUSTED_MEAN))
                bn.running_var.copy_(getattr(bn, READJUSTED_VAR))
        try:
            yield
        finally:
            with torch.no_grad():
                for bn, (mean, var) in zip(swapped, learned, strict=True):
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)

    # ================================================================== encode / decode
    @in_eval_mode
    def encode(self, x: Tensor, sample: bool = False) -> Latents:
        """The latents of ``x``: posterior means (or samples), one tensor per group, coarsest scale first.
        With flows, the means (or samples) of the encoder's Normals pushed through the flows."""
        x = self._check_images(x)
        _, zs, _, _ = self._posterior_pass(x, use_mean=not validation.flag(sample, "sample"))
        return Latents(zs, list(self.scale_of_group))

    @in_eval_mode
    def decode(self, latents: Latents | Sequence[Tensor]) -> Tensor:
        """Images in [0, 1] decoded from one latent tensor per group."""
        zs = self._check_latents(latents.z if isinstance(latents, Latents) else latents, "latent")
        return self.likelihood(self._top_down(zs[0].shape[0], lambda g, s, prior: zs[g])).mean()

    def reconstruct(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def swap(self, x_a: Tensor, x_b: Tensor, scales: Sequence[int]) -> Tensor:
        """Decode x_a's latents with every group of the listed scales taken from x_b's latents."""
        x_a, x_b = self._check_images(x_a, "x_a"), self._check_images(x_b, "x_b")
        if x_a.shape != x_b.shape:
            raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
        wanted = validation.scales(scales, self.num_scales)
        return self.decode(self.encode(x_a).with_scales_from(self.encode(x_b), wanted))

    # ================================================================== evaluation
    @torch.no_grad()
    @in_eval_mode
    def nll(self, x: Tensor, num_samples: int = 100, chunk_size: int = 256,
            generator: torch.Generator | None = None) -> Tensor:
        """Importance-weighted estimate of -log p(x) in nats, shape (N,), with ``num_samples`` posterior samples
        (K=1 gives the negative ELBO estimate). Work is done ``chunk_size`` images at a time. The samples are
        drawn with ``generator`` (default: torch's global one); a generator of one's own gives the same estimate
        every time, whatever else runs."""
        num_samples = validation.integer(num_samples, "num_samples")
        chunk_size = validation.integer(chunk_size, "chunk_size")
        x = self._check_images(x)
        per_chunk = max(1, chunk_size // num_samples)
        out = []
        for xb in x.split(per_chunk):
            xk = xb.repeat_interleave(num_samples, dim=0)
            params, _, posteriors, priors = self._posterior_pass(xb, repeats=num_samples, generator=generator)
            log_w = self._log_likelihood(params, xk)
            for q, p in zip(posteriors, priors, strict=True):  # log p(z) - log q(z|x), at the flowed z
                log_w = log_w + (p.log_prob(q.z) - q.log_prob()).flatten(1).sum(dim=1)
            log_w = log_w.view(xb.shape[0], num_samples)
            out.append(math.log(num_samples) - torch.logsumexp(log_w, dim=1))
        return torch.cat(out)

    def bits_per_dim(self, x: Tensor, num_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """``nll`` in bits per dimension (real pixels x channels only), shape (N,)."""
        dims = self.config.channels * self.config.image_size**2
        return self.nll(x, num_samples, generator=generator) / (dims * math.log(2))

    # ================================================================== Hub mixin hooks
    def _save_pretrained(self, save_directory: Path, training: TrainingInfo | None = None) -> None:
        """Write config.json, model.safetensors and the model card README.md into ``save_directory`` (behind
        ``save_pretrained``/``push_to_hub``, the mixin's and ``nvae_hub.hub``'s)."""
        self.config.save(save_directory / CONFIG_NAME)
        save_weights(self, save_directory / WEIGHTS_NAME)
        num_parameters = sum(p.numel() for p in self.parameters())
        card = model_card(self.config, training, num_parameters)
        (save_directory / CARD_NAME).write_text(card, encoding="utf-8")

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> NVAE:
        """Behind ``NVAE.from_pretrained``: build the model from ``config`` (config.json, already read by the
        mixin) and load model.safetensors strictly. Returns the model in eval mode on ``map_location``."""
        if config is None:
            raise PretrainedLoadError(f"no {CONFIG_NAME} found for {model_id!r}")
        model = cls(parse_config(config, f"{CONFIG_NAME} of {model_id!r}"))
        if Path(model_id).is_dir():
            weights_file = Path(model_id) / WEIGHTS_NAME
        else:
            weights_file = hf_hub_download(
                model_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir, force_download=force_download,
                token=token, local_files_only=local_files_only,
            )
        load_weights(model, weights_file)
        return model.to(map_location).eval()
