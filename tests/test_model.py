"""The NVAE core: shapes, losses, distributions, sampling, encode/decode/swap, NLL, state dicts."""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch
from safetensors.torch import load, save

from nvae_hub import NVAE, NVAEConfig
from nvae_hub import model as nvae_model
from nvae_hub.distributions import DiscretizedLogisticMixture, Normal
from nvae_hub.layers import Conv2d, normalised_weights, weight_norm
from nvae_hub.schedules import kl_balance, kl_balance_coefficients, kl_warmup, reg_weight


def make(preset: str = "tiny", seed: int = 0, **changes) -> NVAE:
    torch.manual_seed(seed)
    return NVAE(NVAEConfig.preset(preset).replace(**changes))


def images(config: NVAEConfig, n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, config.channels, config.image_size, config.image_size), generator=g)
    return x.bernoulli(generator=g) if config.output == "bernoulli" else x


def tiny_rgb(**changes) -> NVAE:
    return make("tiny", channels=3, output="logistic_mixture", num_mixtures=3, **changes)


# ---------------------------------------------------------------- presets and shapes
@pytest.mark.parametrize("preset", ["tiny", "mnist-small", "mnist"])
def test_small_presets_give_finite_losses_of_the_right_shapes(preset):
    model = make(preset)
    x = images(model.config, n=2)
    out = model.loss(x, kl_weight=0.3)
    g = model.num_groups
    assert out.recon.shape == (2,) and out.kl.shape == (2,) and out.kl_per_group.shape == (2, g)
    assert out.total.dim() == 0
    for value in (out.total, out.recon, out.kl, out.kl_per_group, out.spectral, out.bn):
        assert torch.isfinite(value).all()
    assert (out.kl_per_group >= 0).all()
    torch.testing.assert_close(out.kl, out.kl_per_group.sum(1))
    assert out.spectral > 0 and out.bn > 0


@pytest.mark.parametrize("preset", [name for name in NVAEConfig.presets() if not NVAEConfig.preset(name).num_flows])
def test_every_preset_builds_with_the_parameter_count_its_config_estimates(preset):
    """The presets with flows, large and slow to build, are built and checked once, in test_flows.py."""
    model = make(preset)
    count = sum(p.numel() for p in model.parameters())
    estimate = model.config.estimated_num_parameters()  # what the config checks against its limit before building
    assert abs(estimate - count) <= 0.01 * count, f"estimated {estimate:,} parameters, built {count:,}"
    assert model.num_groups == sum(model.groups_per_scale)


def test_mnist_preset_matches_the_paper_architecture():
    model = make("mnist")
    # The reference implementation counts 33.4M parameters for this configuration.
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 33.4) < 0.1
    assert model.num_scales == 2 and model.groups_per_scale == [5, 10]
    assert model.latent_shapes()[0] == (20, 4, 4) and model.latent_shapes()[-1] == (20, 8, 8)


def test_rgb_logistic_mixture_model_runs():
    model = tiny_rgb()
    out = model.loss(images(model.config))
    assert torch.isfinite(out.total)
    model.eval()
    sample = model.sample(2, seed=0)
    assert sample.shape == (2, 3, 16, 16) and sample.min() >= 0 and sample.max() <= 1


def test_padding_keeps_outputs_at_the_real_size_and_counts_real_pixels_only():
    model = make("tiny", image_size=12, padding=2).eval()
    x = images(model.config)
    assert model.reconstruct(x).shape == x.shape
    params = model._top_down(4, lambda g, s, prior: prior.mu)
    assert params.shape[-2:] == (12, 12)
    bpd = model.bits_per_dim(x, num_samples=2)
    nats = model.nll(x, num_samples=2)
    torch.testing.assert_close(bpd, nats / (12 * 12 * math.log(2)), rtol=0.2, atol=0)


# ---------------------------------------------------------------- distributions
def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    q = Normal(torch.randn(5), torch.randn(5) * 0.5)
    p = Normal(torch.randn(5), torch.randn(5) * 0.5)
    z = q.mu + q.sigma * torch.randn(200_000, 5)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(monte_carlo, q.kl(p), atol=0.03, rtol=0.03)


def test_residual_normal_adds_means_and_multiplies_sigmas():
    prior = Normal(torch.tensor([0.5]), torch.tensor([-1.0]))
    q = prior.residual(torch.tensor([0.25]), torch.tensor([0.5]))
    torch.testing.assert_close(q.raw_mu, torch.tensor([0.75]))
    torch.testing.assert_close(q.raw_log_sigma, torch.tensor([-0.5]))
    big = Normal(torch.tensor([100.0]), torch.tensor([100.0]))
    assert big.mu.item() <= 5 and big.sigma.item() <= math.exp(5) + 0.02  # soft-clamped


@pytest.mark.parametrize("num_bits", [8, 5])
def test_logistic_mixture_probabilities_of_one_grayscale_pixel_sum_to_one(num_bits):
    torch.manual_seed(0)
    levels = 2**num_bits
    params = torch.randn(1, 3 * 4, 1, 1).repeat(levels, 1, 1, 1)
    dist = DiscretizedLogisticMixture(params, channels=1, num_mixtures=4, num_bits=num_bits)
    x = (torch.arange(levels) / (levels - 1)).view(levels, 1, 1, 1)
    total = dist.log_prob(x).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0), atol=1e-4, rtol=0)


def test_logistic_mixture_probabilities_of_one_rgb_pixel_sum_to_one():
    torch.manual_seed(0)
    num_bits, m = 3, 2
    values = torch.arange(8) / 7
    x = torch.cartesian_prod(values, values, values).view(-1, 3, 1, 1)  # all 512 colours
    params = (torch.randn(1, 10 * m, 1, 1) * 0.5).repeat(x.shape[0], 1, 1, 1)
    dist = DiscretizedLogisticMixture(params, channels=3, num_mixtures=m, num_bits=num_bits)
    torch.testing.assert_close(dist.log_prob(x).exp().sum(), torch.tensor(1.0), atol=1e-4, rtol=0)
    mean = dist.mean()
    assert mean.shape == (512, 3, 1, 1) and mean.min() >= 0 and mean.max() <= 1


def test_bernoulli_likelihood_matches_the_formula():
    model = make("tiny")
    logits = torch.randn(2, 1, 16, 16)
    x = torch.rand(2, 1, 16, 16).bernoulli()
    p = torch.sigmoid(logits)
    expected = (x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    torch.testing.assert_close(model._log_likelihood(logits, x), expected, atol=1e-4, rtol=1e-5)


def test_a_seed_draws_the_same_posterior_noise_whatever_the_memory_layout():
    mu, log_sigma = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    contiguous = Normal(mu, log_sigma).rsample(torch.Generator().manual_seed(0))
    channels_last = Normal(*(t.contiguous(memory_format=torch.channels_last) for t in (mu, log_sigma)))
    torch.testing.assert_close(channels_last.rsample(torch.Generator().manual_seed(0)), contiguous)


# ---------------------------------------------------------------- schedules
def test_schedules():
    assert kl_warmup(0, 100, min_weight=1e-4) == 1e-4
    assert kl_warmup(50, 100) == 0.5 and kl_warmup(500, 100) == 1.0
    alpha = kl_balance_coefficients([1, 2])
    torch.testing.assert_close(alpha, torch.tensor([1.0, 2.0, 2.0]))  # 4**s / n, min-normalised
    kl = torch.tensor([[1.0, 10.0, 0.0], [3.0, 10.0, 0.0]])
    balanced = kl_balance(kl, 0.5, alpha)
    assert balanced.shape == (2,)
    assert reg_weight(0.0, 1e-2, 1.0) == pytest.approx(1.0) and reg_weight(1.0, 1e-2, 1.0) == pytest.approx(1e-2)
    assert reg_weight(0.3, 1e-2) == 1e-2


def test_kl_balancing_is_used_only_during_warmup():
    model = make("tiny")
    x = images(model.config)
    torch.manual_seed(1)
    warm = model.loss(x, kl_weight=0.5, reg_weight=0.0)
    torch.manual_seed(1)
    full = model.loss(x, kl_weight=1.0, reg_weight=0.0)
    torch.testing.assert_close(full.total, (full.recon + full.kl).mean())
    expected = (warm.recon + kl_balance(warm.kl_per_group, 0.5, model.kl_alpha)).mean()
    torch.testing.assert_close(warm.total, expected)


# ---------------------------------------------------------------- NLL
def test_importance_weighted_nll_is_not_above_the_negative_elbo():
    model = make("tiny").eval()
    x = images(model.config, n=8)
    torch.manual_seed(0)
    neg_elbo = torch.stack([(lambda o: o.recon + o.kl)(model.loss(x)) for _ in range(8)]).mean()
    torch.manual_seed(0)
    iw = model.nll(x, num_samples=64).mean()
    assert iw <= neg_elbo
    torch.testing.assert_close(model.bits_per_dim(x, 4).shape, torch.Size([8]))


# ---------------------------------------------------------------- sampling
def test_seeded_sampling_is_repeatable_and_temperature_matters():
    model = make("tiny").eval()
    a = model.sample(3, temperature=0.7, seed=123)
    b = model.sample(3, temperature=0.7, seed=123)
    c = model.sample(3, temperature=0.7, seed=124)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert a.shape == (3, 1, 16, 16) and a.min() >= 0 and a.max() <= 1
    per_group = model.sample(3, temperature=[0.7] * model.num_groups, seed=123)
    torch.testing.assert_close(a, per_group)
    assert not torch.equal(model.sample(3, temperature=0.0, seed=123), a)


def test_bad_sampling_arguments_are_rejected():
    model = make("tiny").eval()
    with pytest.raises(ValueError, match="one per group"):
        model.sample(2, temperature=[1.0, 1.0])
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=-1.0)
    with pytest.raises(ValueError, match="positive integer"):
        model.sample(0)


def test_readjust_bn_gives_sampling_new_statistics_and_returns_to_eval():
    model = make("tiny").eval()
    model.readjust_bn(temperature=0.6, num_batches=2, batch_size=8)
    readjusted = [m for m in model.modules() if hasattr(m, "readjusted_mean")]
    assert not model.training and readjusted
    assert any(not torch.equal(m.readjusted_mean, m.running_mean) for m in readjusted)


# ---------------------------------------------------------------- encode / decode / swap
def test_encode_gives_one_latent_per_group_with_its_scale():
    model = make("tiny").eval()
    latents = model.encode(images(model.config))
    assert len(latents) == model.num_groups
    assert latents.scales == [0, 1, 1]
    assert [tuple(z.shape[1:]) for z in latents.z] == model.latent_shapes()
    torch.testing.assert_close(model.decode(latents), model.reconstruct(images(model.config)))


def test_swap_identities():
    model = make("tiny").eval()
    a, b = images(model.config, seed=1), images(model.config, seed=2)
    torch.testing.assert_close(model.swap(a, b, []), model.reconstruct(a))
    torch.testing.assert_close(model.swap(a, b, list(range(model.num_scales))), model.reconstruct(b))
    partial = model.swap(a, b, [0])
    assert not torch.allclose(partial, model.reconstruct(a)) and not torch.allclose(partial, model.reconstruct(b))
    with pytest.raises(ValueError, match="unknown scale"):
        model.swap(a, b, [5])


def test_decode_rejects_wrong_latents():
    model = make("tiny").eval()
    latents = model.encode(images(model.config))
    with pytest.raises(ValueError, match="latent groups"):
        model.decode(latents.z[:-1])
    with pytest.raises(ValueError, match="latent group 0"):
        model.decode([torch.zeros(4, 3, 4, 4), *latents.z[1:]])


def test_bad_images_are_rejected_with_clear_messages():
    model = make("tiny")
    with pytest.raises(ValueError, match=r"shape \(N, 1, 16, 16\)"):
        model.loss(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.loss(torch.rand(2, 1, 16, 16) * 255)
    with pytest.raises(ValueError, match="float"):
        model.loss(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        model.loss(torch.zeros(0, 1, 16, 16))


# ---------------------------------------------------------------- training mechanics
@pytest.mark.parametrize("channels", [1, 3])
def test_every_convolution_of_a_training_step_sees_the_models_layout(channels):
    """Convolutions in NCHW run several times slower on CPUs (the weight gradient of the depthwise 5x5 ones most:
    measured 3-4x); one NCHW tensor in a concatenation, or a one-channel input, used to turn the whole decoder
    back to NCHW. ``memory_format`` switches every activation to NCHW, for the devices where that is faster, and
    gives the same loss and gradients."""
    model = make(channels=channels, output="bernoulli" if channels == 1 else "logistic_mixture").train()
    nchw = copy.deepcopy(model)
    nchw.memory_format = torch.contiguous_format
    layouts = []

    def record(module, inputs, output):
        x = inputs[0]
        if x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:  # a one-channel or 1x1 tensor is in both layouts
            layouts.append(x.stride(1) == 1)  # channels innermost (also in the shifted views)

    for conv in (m for m in [*model.modules(), *nchw.modules()] if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_hook(record)
    x = images(model.config)
    losses = []
    for m in (model, nchw):
        torch.manual_seed(0)
        losses.append(m.loss(x).total)
        losses[-1].backward()
    half = len(layouts) // 2
    assert half > 20 and all(layouts[:half]) and not any(layouts[half:])
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(model.parameters(), nchw.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)


def test_the_weight_normalisations_backward_is_the_derivative_of_its_forward():
    """weight_norm's backward is written by hand (fewer passes over the weights than autograd's); a stack of
    weights (leading dimensions) and single weights both."""
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 4, 3, 3), (5, 2, 1, 1)]:
        v = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
        log_gain = torch.randn(shape[:-3], dtype=torch.float64, generator=g).requires_grad_()
        assert torch.autograd.gradcheck(weight_norm, (v, log_gain))
        norm = v.detach().flatten(-3).norm(dim=-1)[..., None, None, None]
        expected = torch.exp(log_gain.detach())[..., None, None, None] * v.detach() / (norm + 1e-5)  # the paper's
        torch.testing.assert_close(weight_norm(v, log_gain).detach(), expected)
        with torch.no_grad():  # the direct path, without the autograd function
            torch.testing.assert_close(weight_norm(v, log_gain), expected)
    # An all-zero weight (where the norm has no derivative): finite gradients, those autograd gives the formula.
    v, log_gain = torch.zeros(2, 3, 3, 3, requires_grad=True), torch.zeros(2, requires_grad=True)
    weight_norm(v, log_gain).sum().backward()
    v_ref, log_gain_ref = torch.zeros(2, 3, 3, 3, requires_grad=True), torch.zeros(2, requires_grad=True)
    norm = v_ref.flatten(1).norm(dim=1)[:, None, None, None]
    (torch.exp(log_gain_ref)[:, None, None, None] * v_ref / (norm + 1e-5)).sum().backward()
    assert torch.isfinite(v.grad).all() and torch.equal(log_gain.grad, torch.zeros(2))
    torch.testing.assert_close(v.grad, v_ref.grad)


def test_weights_normalised_together_are_each_convolutions_own():
    """On a GPU the weight normalisation runs on stacks of the weights of one shape (fewer kernel launches); a gain
    or a norm taken from the wrong convolution or over the wrong dimension would show here."""
    model = make("tiny", num_flows=1)  # the flows' masked convolutions too
    convs = model._convs()
    with torch.no_grad():  # distinct gains: at initialisation they are all close to the norms
        for conv in convs:
            if conv.log_gain is not None:
                conv.log_gain.normal_(0.0, 0.5)
    convs[0].fold_weight_norm()  # and one without weight normalisation
    normalised = [conv for conv in convs if conv.log_gain is not None]
    assert len({tuple(conv.weight.shape) for conv in normalised}) < len(normalised)  # stacks of several
    assert any(conv.mask is not None for conv in normalised)
    for conv, weight in zip(convs, normalised_weights(convs, stack=True), strict=True):
        torch.testing.assert_close(weight, conv.effective_weight(), rtol=1e-6, atol=1e-7)


def test_the_loss_with_stacked_weights_has_the_gradients_of_per_convolution_weights(monkeypatch):
    model = make("tiny", num_flows=1).train()
    reference = copy.deepcopy(model)
    x = images(model.config)
    for m, stack in ((model, True), (reference, False)):
        monkeypatch.setattr(nvae_model, "normalised_weights", functools.partial(normalised_weights, stack=stack))
        torch.manual_seed(0)
        m.loss(x, kl_weight=0.5).total.backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(model.buffers(), reference.buffers(), strict=True):  # the power iteration saw the same weights
        torch.testing.assert_close(a, b)


def test_the_loss_computes_each_convolutions_weight_once(monkeypatch):
    """The forward pass and the spectral regulariser share the weights; a convolution normalising its weight again
    in the forward pass would cost about 15 more kernel launches each (a GPU step is bound by launches)."""
    model = make("tiny", num_flows=1).train()
    model.warm_up_spectral_vectors()  # once, before the first step (as the training step does)
    calls = []
    effective_weight = Conv2d.effective_weight

    def counted(self):
        calls.append(self)
        return effective_weight(self)

    monkeypatch.setattr(Conv2d, "effective_weight", counted)
    model.loss(images(model.config)).total.backward()
    assert len(calls) == len(model._convs()) and len(set(calls)) == len(calls)


def test_convolutions_compute_their_own_weights_again_after_the_loss_even_when_it_fails(monkeypatch):
    """A weight handed to a convolution for one pass must not outlive it: after an optimizer step it is stale."""
    model = make("tiny").train()
    model.loss(images(model.config)).total.backward()
    assert all(conv.given_weight is None for conv in model._convs())

    def fail(*args, **kwargs):
        raise RuntimeError("failed in the decoder")

    monkeypatch.setattr(model, "_top_down", fail)
    with pytest.raises(RuntimeError, match="decoder"):
        model.loss(images(model.config))
    assert all(conv.given_weight is None for conv in model._convs())


def test_gradients_reach_every_trainable_parameter():
    model = make("tiny").train()
    out = model.loss(images(model.config), kl_weight=0.5)
    out.total.backward()
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert [name for name, p in params if p.grad is None or not torch.isfinite(p.grad).all()] == []
    # A squeeze-excitation gate can be legitimately dead at init (all of its ReLUs off); nothing else may be.
    zero = [name for name, p in params if p.grad.abs().sum() == 0 and ".se." not in name]
    assert zero == []


def test_spectral_regulariser_estimates_the_largest_singular_value():
    model = make("tiny").train()
    for _ in range(30):
        model.regularizers()
    conv = model.stem
    expected = torch.linalg.matrix_norm(conv.effective_weight().flatten(1).detach(), ord=2)
    estimate = conv.sr_u @ conv.effective_weight().flatten(1).detach() @ conv.sr_v
    torch.testing.assert_close(estimate, expected, rtol=1e-3, atol=1e-4)


def test_power_iteration_advances_only_in_training_mode():
    model = make("tiny").eval()
    u = model.stem.sr_u.clone()
    model.loss(images(model.config))
    assert torch.equal(u, model.stem.sr_u)
    model.train().loss(images(model.config))
    assert not torch.equal(u, model.stem.sr_u)


def train_on_patterns(model: NVAE, steps: int, batch_size: int = 16) -> list[float]:
    """Train a 16x16 grayscale ``model`` on three patterns (black, white, half white); the loss of every step."""
    model.train()
    x = torch.zeros(batch_size, 1, 16, 16)
    x[::2] = 1
    x[1::4, :, :8] = 1
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = model.loss(x, kl_weight=1.0, reg_weight=0.0)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        losses.append(loss.total.item())
    return losses


def test_a_few_steps_of_training_lower_the_loss():
    losses = train_on_patterns(make("tiny"), steps=30)
    assert sum(losses[-5:]) < 0.3 * sum(losses[:5])


def test_bf16_autocast_runs_and_keeps_losses_in_float32():
    model = make("tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(images(model.config))
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)


def test_state_dict_round_trip_gives_identical_outputs():
    model = make("tiny").train()
    model.loss(images(model.config))  # move BN statistics and the spectral vectors away from their init
    model.eval()
    blob = save(model.state_dict())
    clone = make("tiny", seed=99)
    clone.load_state_dict(load(blob), strict=True)
    clone.eval()
    torch.testing.assert_close(clone.stem.sr_u, model.stem.sr_u)
    torch.testing.assert_close(clone.sample(2, seed=5), model.sample(2, seed=5), rtol=0, atol=0)
    x = images(model.config)
    torch.testing.assert_close(clone.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())


def test_fold_weight_norm_keeps_outputs():
    model = make("tiny").eval()
    x = images(model.config)
    before = model.reconstruct(x)
    model.fold_weight_norm()
    torch.testing.assert_close(model.reconstruct(x), before, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- config
def test_config_json_round_trip(tmp_path):
    for name in NVAEConfig.presets():
        config = NVAEConfig.preset(name)
        config.save(tmp_path / "config.json")
        assert NVAEConfig.load(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    ("changes", "field", "rule"),
    [
        ({"image_size": 30}, "image_size", "divisible"),
        ({"output": "gaussian"}, "output", "one of"),
        ({"channels": 2}, "channels", "1 .grayscale. or 3"),
        ({"latent_channels": 0}, "latent_channels", ">= 1"),
        ({"groups_per_scale": 2.5}, "groups_per_scale", "integer"),
        ({"reg_weight": -1.0}, "reg_weight", ">= 0"),
        ({"num_postprocess_blocks": 3}, "num_postprocess_blocks", "num_preprocess_blocks"),
        ({"padding": -1}, "padding", ">= 0"),
    ],
)
def test_bad_configs_raise_clear_errors(changes, field, rule):
    with pytest.raises(ValueError, match=rf"NVAEConfig\.{field}=.*{rule}"):
        NVAEConfig.preset("tiny").replace(**changes)


def test_unknown_presets_and_fields_are_rejected():
    with pytest.raises(ValueError, match="unknown preset 'big'; choose one of tiny"):
        NVAEConfig.preset("big")
    with pytest.raises(ValueError, match=r"unknown NVAEConfig field.*colour"):
        NVAEConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="not valid JSON"):
        NVAEConfig.from_json("{")


def test_every_scale_combination_is_a_valid_swap():
    model = make("tiny").eval()
    a, b = images(model.config, seed=1), images(model.config, seed=2)
    for k in range(model.num_scales + 1):
        for scales in itertools.combinations(range(model.num_scales), k):
            assert model.swap(a, b, scales).shape == a.shape
