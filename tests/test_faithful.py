"""Faithful to the paper and its reference implementation: exact checks that a plausible wrong model would fail.

Each test here was checked against a deliberately broken copy of the code (see the comments): the importance-
weighted NLL without its log K, a logistic mixture with its channel coefficients swapped, the temperature applied
before the sigma floor, BatchNorm re-estimation that also resets the encoder, and so on.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.distributions import DiscretizedLogisticMixture, Normal, pixel_levels, reduce_bits
from nvae_hub.layers import BN_EPS, BN_MOMENTUM, Conv2d
from nvae_hub.schedules import kl_balance, kl_balance_coefficients


def make(preset: str = "tiny", seed: int = 0, **changes) -> NVAE:
    torch.manual_seed(seed)
    return NVAE(NVAEConfig.preset(preset).replace(**changes))


def binary_images(config: NVAEConfig, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, config.channels, config.image_size, config.image_size), generator=g).bernoulli(generator=g)


@functools.cache
@torch.enable_grad()  # also when the first caller runs under no_grad
def _trained_state() -> dict[str, torch.Tensor]:
    model = make("tiny").train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2)
    x = binary_images(model.config, 16)
    for _ in range(20):
        optimizer.zero_grad()
        model.loss(x, kl_weight=1.0).total.backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_a_little() -> NVAE:
    """A tiny model after a few training steps, so that its BatchNorm statistics and posteriors are not trivial."""
    model = make("tiny")
    model.load_state_dict(_trained_state())
    return model.eval()


def fixed_noise(noise: list[torch.Tensor]):
    """A replacement for ``Normal.rsample`` whose posterior samples use the given noise, one tensor per call."""
    queue = list(noise)

    def rsample(normal: Normal, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = queue.pop(0)
        assert eps.shape == normal.mu.shape
        return normal.sample_from(eps)

    return rsample


# ---------------------------------------------------------------- importance-weighted NLL
def test_nll_is_the_log_mean_exp_of_single_sample_weights_on_the_same_noise(monkeypatch):
    # Mutation checked: dropping `log K` from the estimator (nll = -logsumexp(log w)) fails here.
    model = trained_a_little()
    x = binary_images(model.config, 3, seed=1)
    k = 5
    shapes = model.latent_shapes()
    noise = [torch.randn(3 * k, *shape) for shape in shapes]  # image-major: image i's samples are consecutive
    monkeypatch.setattr(Normal, "rsample", fixed_noise(noise))
    estimate = model.nll(x, num_samples=k)

    single = torch.empty(3, k)  # -log w for each image and sample, one sample at a time
    for j in range(k):
        monkeypatch.setattr(Normal, "rsample", fixed_noise([eps[j::k] for eps in noise]))
        single[:, j] = model.nll(x, num_samples=1)
    direct = -(torch.logsumexp(-single, dim=1) - math.log(k))
    torch.testing.assert_close(estimate, direct, atol=1e-4, rtol=1e-5)


def test_single_sample_nll_averages_to_the_negative_elbo_with_the_analytic_kl(monkeypatch):
    # -log w = -log p(x|z) + log q(z|x) - log p(z); on the same z its reconstruction term is the loss's, and the
    # rest averages to the analytic KL. Mutations checked: log q and log p swapped; a group left out.
    model = trained_a_little()
    n = 2000
    x = binary_images(model.config, 1, seed=2).expand(n, -1, -1, -1).contiguous()
    noise = [torch.randn(n, *shape, generator=torch.Generator().manual_seed(g)) for g, shape in
             enumerate(model.latent_shapes())]
    monkeypatch.setattr(Normal, "rsample", fixed_noise(noise))
    single = model.nll(x, num_samples=1, chunk_size=n)
    monkeypatch.setattr(Normal, "rsample", fixed_noise(noise))
    with torch.no_grad():
        out = model.loss(x, kl_weight=1.0, reg_weight=0.0)
    latent_terms = single - out.recon
    standard_error = latent_terms.std() / math.sqrt(n)
    assert abs(latent_terms.mean() - out.kl.mean()) < 4 * standard_error + 1e-3


def test_nll_does_not_rise_with_more_importance_samples():
    model = trained_a_little()
    x = binary_images(model.config, 24, seed=3)
    torch.manual_seed(0)
    means = [model.nll(x, num_samples=k).mean().item() for k in (1, 8, 64)]
    assert means[0] > means[1] > means[2]


# ---------------------------------------------------------------- the discretised logistic mixture
def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _sigmoid_difference(a: float, b: float) -> float:
    """sigmoid(a) - sigmoid(b) for a > b, without cancellation far in the upper tail."""
    return _sigmoid(-b) - _sigmoid(-a) if b > 0 else _sigmoid(a) - _sigmoid(b)


def reference_log_prob(params: list[float], pixel: list[float], channels: int, mixtures: int, bits: int) -> float:
    """log p(pixel) of one pixel, written out scalar by scalar from PixelCNN++'s definition.

    ``params`` holds M logits, then the means (channel-major: c * M + m), the log-scales, and the coefficients
    (pair-major: k * M + m for the pairs (1,0), (2,0), (2,1)); ``pixel`` holds values in [0, 1] on the grid."""
    levels = 2**bits - 1
    logits = params[:mixtures]
    means = params[mixtures:mixtures + channels * mixtures]
    log_scales = params[mixtures + channels * mixtures:mixtures + 2 * channels * mixtures]
    coeffs = [math.tanh(v) for v in params[mixtures + 2 * channels * mixtures:]]
    pair = {(1, 0): 0, (2, 0): 1, (2, 1): 2}
    x = [2 * v - 1 for v in pixel]  # [-1, 1]
    total = sum(math.exp(v) for v in logits)
    probability = 0.0
    for m in range(mixtures):
        p = math.exp(logits[m]) / total
        for c in range(channels):
            mean = means[c * mixtures + m] + sum(coeffs[pair[(c, j)] * mixtures + m] * x[j] for j in range(c))
            inv_s = math.exp(-max(log_scales[c * mixtures + m], -7.0))
            upper = math.inf if round(pixel[c] * levels) == levels else inv_s * (x[c] + 1 / levels - mean)
            lower = -math.inf if round(pixel[c] * levels) == 0 else inv_s * (x[c] - 1 / levels - mean)
            p *= _sigmoid_difference(upper, lower)
        probability += p
    return math.log(probability)


@pytest.mark.parametrize(("channels", "mixtures", "bits"), [(1, 3, 8), (1, 2, 5), (3, 2, 8), (3, 3, 5)])
def test_logistic_mixture_matches_a_scalar_reference(channels, mixtures, bits):
    # Mutations checked: the coefficients of (2,0) and (2,1) swapped; the bin half-width 1/(2 levels) instead of
    # 1/levels on the [-1, 1] scale; the top level treated like an inner one.
    g = torch.Generator().manual_seed(channels * 10 + bits)
    size = mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)
    n = 6
    levels = 2**bits - 1
    grid = torch.randint(0, levels + 1, (n, channels, 1, 1), generator=g)
    grid[0], grid[1] = 0, levels  # both edges
    pixels = grid / levels
    # Means within about one scale of the pixel and weak coupling: every bin holds a probability that the exact
    # formula computes (far out, both implementations switch to a density approximation instead).
    params = torch.randn(n, size, 1, 1, generator=g, dtype=torch.float64)
    means = slice(mixtures, mixtures + channels * mixtures)
    params[:, means] = 0.3 * params[:, means] + (2 * pixels - 1).repeat_interleave(mixtures, dim=1)
    params[:, mixtures + channels * mixtures:mixtures + 2 * channels * mixtures] -= 1.5  # scale: a tenth of the range
    params[:, mixtures + 2 * channels * mixtures:] *= 0.3
    got = DiscretizedLogisticMixture(params, channels, mixtures, bits).log_prob(pixels).flatten()
    expected = [reference_log_prob(params[i].flatten().tolist(), pixels[i].flatten().tolist(), channels, mixtures,
                                   bits) for i in range(n)]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=2e-4, rtol=1e-4)


def test_fewer_bits_are_the_reference_reduction_of_8_bit_data():
    # The reference implementation: x = floor(x * 255 / 2**(8 - b)) / (2**b - 1). Mutation checked: rounding
    # x * (2**b - 1) instead (the old convention) fails.
    k = torch.arange(256, dtype=torch.float32)
    x = k / 255
    for bits in (5, 3):
        expected_levels = torch.floor(k / 2 ** (8 - bits))
        assert torch.equal(pixel_levels(x, bits), expected_levels)
        assert torch.equal(reduce_bits(x, bits), expected_levels / (2**bits - 1))
    assert torch.equal(pixel_levels(x, 8), k)


def test_a_5_bit_model_sees_and_scores_the_reduced_image():
    # Mutation checked: leaving the encoder's input at 8 bits fails the first assertion.
    model = make("tiny", channels=3, output="logistic_mixture", num_mixtures=2, num_bits=5).eval()
    x = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0)) / 255
    reduced = reduce_bits(x, 5)
    assert not torch.equal(x, reduced)
    for a, b in zip(model.encode(x).z, model.encode(reduced).z, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.manual_seed(0)
    loss_x = model.loss(x, reg_weight=0.0)
    torch.manual_seed(0)
    loss_reduced = model.loss(reduced, reg_weight=0.0)
    torch.testing.assert_close(loss_x.recon, loss_reduced.recon, atol=0, rtol=0)


# ---------------------------------------------------------------- temperature
def test_temperature_scales_sigma_after_the_soft_clamp_and_the_floor():
    # sigma = (exp(5 tanh(log_sigma / 5)) + 0.01) * T. Mutation checked: (exp(...) * T) + 0.01 fails.
    log_sigma = torch.tensor([-30.0, -3.0, 0.0, 2.0, 30.0])
    for t in (0.0, 0.4, 1.0):
        sigma = Normal(torch.zeros(5), log_sigma, t).sigma
        expected = (torch.exp(5 * torch.tanh(log_sigma / 5)) + 0.01) * t
        torch.testing.assert_close(sigma, expected)


def test_each_group_temperature_reaches_its_group_and_no_other():
    # A temperature of 0 for group g is the same as zero noise for group g. Mutation checked: temps[g - 1].
    model = make("tiny", seed=1).eval()
    noise = model.sample_noise(3, seed=0)
    for g in range(model.num_groups):
        temps = [1.0] * model.num_groups
        temps[g] = 0.0
        zeroed = [torch.zeros_like(eps) if h == g else eps for h, eps in enumerate(noise)]
        with torch.no_grad():
            torch.testing.assert_close(model.decode_noise(noise, temps), model.decode_noise(zeroed, 1.0))
            assert not torch.allclose(model.decode_noise(noise, temps), model.decode_noise(noise, 1.0))


# ---------------------------------------------------------------- KL balancing and the trainer's schedules
def test_kl_balancing_with_three_scales_and_unequal_groups_matches_hand_computed_values():
    groups = [1, 2, 3]  # coarsest first; not the adaptive halving, so every group count differs
    # alpha_s = (2**s)**2 / groups_s, over its minimum: [1/1, 4/2, 4/2, 16/3, 16/3, 16/3] / 1
    alpha = kl_balance_coefficients(groups)
    torch.testing.assert_close(alpha, torch.tensor([1, 2, 2, 16 / 3, 16 / 3, 16 / 3]))

    kl = torch.tensor([[0.99, 3.99, 1.99, 15.99, 31.99, 7.99],
                       [0.99, 3.99, 1.99, 15.99, 31.99, 7.99]])
    # mean |KL| + 0.01 per group: [1, 4, 2, 16, 32, 8], sum 63; gamma = mean / alpha * 63:
    gamma = torch.tensor([1 / 1, 4 / 2, 2 / 2, 16 * 3 / 16, 32 * 3 / 16, 8 * 3 / 16]) * 63
    gamma = gamma / gamma.mean()  # [1, 2, 1, 3, 6, 1.5] * 63 / (14.5 * 63 / 6)
    expected = 0.3 * (kl * gamma).sum(dim=1)
    torch.testing.assert_close(kl_balance(kl, 0.3, alpha), expected)
    torch.testing.assert_close(gamma, torch.tensor([1, 2, 1, 3, 6, 1.5]) * 6 / 14.5)


# ---------------------------------------------------------------- the paper's layer constants
def test_batchnorm_and_weight_norm_use_the_papers_constants():
    model = make("mnist-small")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(bn.momentum == 0.05 and bn.eps == 1e-5 for bn in norms)
    assert BN_MOMENTUM == 0.05 and BN_EPS == 1e-5
    convs = [m for m in model.modules() if isinstance(m, Conv2d) and m.log_gain is not None]
    assert len(convs) > 20
    for conv in convs:  # initial gain log(||v|| + 0.01): the effective weight is (||v|| + 0.01) v / (||v|| + 1e-5)
        norm = conv.weight.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        expected = (norm + 1e-2) * conv.weight.detach() / (norm + 1e-5)
        torch.testing.assert_close(conv.effective_weight().detach(), expected)


# ---------------------------------------------------------------- readjust_bn and eval mode
def _running_stats(norms: list[nn.BatchNorm2d]) -> list[torch.Tensor]:
    return [t.clone() for bn in norms for t in (bn.running_mean, bn.running_var)]


def test_readjust_bn_reestimates_exactly_the_layers_that_sampling_runs_and_keeps_the_learned_statistics():
    # Mutations checked: resetting every BatchNorm layer (the old behaviour), and overwriting the learned
    # statistics of the decoder, each fail here.
    model = trained_a_little()
    ran: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda module, *_: ran.add(module)) for m in model.modules()
             if isinstance(m, nn.BatchNorm2d)]
    model.sample(2, seed=0)
    for hook in hooks:
        hook.remove()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert ran and len(ran) < len(norms)
    learned = _running_stats(norms)
    assert not model.has_readjusted_bn
    model.readjust_bn(temperature=0.6, num_batches=2, batch_size=8)
    assert model.has_readjusted_bn
    assert all(torch.equal(a, b) for a, b in zip(learned, _running_stats(norms), strict=True))
    assert {bn for bn in norms if hasattr(bn, "readjusted_mean")} == ran
    assert all(not torch.equal(bn.readjusted_mean, bn.running_mean) for bn in ran)
    assert not model.training and all(bn.momentum == BN_MOMENTUM for bn in norms)
    assert not any("readjusted" in key for key in model.state_dict())  # never saved with the weights


def test_readjust_bn_changes_sampling_only():
    model = trained_a_little()
    x = binary_images(model.config, 4, seed=5)
    z_before = model.encode(x).z
    recon_before = model.reconstruct(x)
    torch.manual_seed(0)
    nll_before = model.nll(x, num_samples=4)
    samples_before = model.sample(4, temperature=0.6, seed=0)

    model.readjust_bn(temperature=0.6, num_batches=2, batch_size=8)
    for a, b in zip(z_before, model.encode(x).z, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(model.reconstruct(x), recon_before, atol=0, rtol=0)
    torch.manual_seed(0)
    torch.testing.assert_close(model.nll(x, num_samples=4), nll_before, atol=0, rtol=0)
    readjusted = model.sample(4, temperature=0.6, seed=0)
    assert not torch.allclose(readjusted, samples_before)  # sampling did change ...
    torch.testing.assert_close(model.sample(4, temperature=0.6, seed=0), readjusted)  # ... and stays changed
    model.forget_readjusted_bn()
    torch.testing.assert_close(model.sample(4, temperature=0.6, seed=0), samples_before)


def test_the_export_readjusts_a_copy_and_leaves_the_model_alone():
    # tests/test_onnx.py checks the exported graphs after a re-estimation against the model.
    from nvae_hub.export import prepare_for_export

    model = trained_a_little()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_for_export(model, 0.6, 2, 8)
    assert prepared.has_readjusted_bn and not model.has_readjusted_bn
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_inference_methods_run_in_eval_mode_and_restore_the_callers_mode():
    # Mutation checked: without the eval-mode wrapper, the running statistics change and the results differ.
    model = trained_a_little()
    x = binary_images(model.config, 4, seed=6)
    z_eval = model.encode(x).z
    recon_eval = model.reconstruct(x)
    torch.manual_seed(0)
    nll_eval = model.nll(x, num_samples=2)
    sample_eval = model.sample(3, seed=0)

    model.train()
    model.head.eval()  # a mixed state set by the caller must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = _running_stats(norms)
    for a, b in zip(z_eval, model.encode(x).z, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.reconstruct(x), recon_eval)
    torch.manual_seed(0)
    torch.testing.assert_close(model.nll(x, num_samples=2), nll_eval)
    torch.testing.assert_close(model.sample(3, seed=0), sample_eval)
    torch.testing.assert_close(model.swap(x, x.flip(0), [0]), model.eval().swap(x, x.flip(0), [0]))
    model.train()
    model.head.eval()
    model.swap(x, x.flip(0), [0])
    assert all(torch.equal(a, b) for a, b in zip(stats, _running_stats(norms), strict=True))
    assert {name: m.training for name, m in model.named_modules()} == modes


# ---------------------------------------------------------------- the schedules as the trainer wires them
def test_the_trainer_wires_the_kl_warmup_and_the_regulariser_annealing_as_the_paper(tmp_path):
    # The official code: kl_coeff = max(min((step - constant) / warmup, 1), 1e-4) with warmup = 30% of the steps
    # and constant = 0.01% of them; lambda = exp((1 - kl_coeff) log(lambda_init) + kl_coeff log(lambda)).
    # Mutations checked: the trainer passing kl_weight=1 to the loss, and lambda annealed the wrong way round.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    import run
    from trainer import read_log

    config = NVAEConfig.preset("tiny").replace(reg_weight=0.01, reg_weight_init=1.0)
    config.save(tmp_path / "config.json")
    steps = 20
    run.main(["--config", str(tmp_path / "config.json"), "--dataset", "synthetic", "--batch-size", "8",
              "--max-steps", str(steps), "--kl-warmup", "0.5", "--log-every", "1", "--sample-every", "1000",
              "--checkpoint-every", "1000", "--output-dir", str(tmp_path / "run")])
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    warmup, constant = round(0.5 * steps), round(1e-4 * steps)
    for record in log:
        step = record["step"] - 1  # the schedules count completed steps from 0
        kl_coeff = max(min((step - constant) / warmup, 1.0), 1e-4)
        assert record["kl_weight"] == pytest.approx(kl_coeff, rel=1e-9)
        expected_lambda = math.exp((1 - kl_coeff) * math.log(1.0) + kl_coeff * math.log(0.01))
        assert record["reg_weight"] == pytest.approx(expected_lambda, rel=1e-9)
        if kl_coeff == 1.0:  # no balancing any more: the objective is the plain ELBO plus the regularisers
            total = record["recon"] + record["kl"] + expected_lambda * (record["spectral"] + record["bn"])
            assert record["loss"] == pytest.approx(total, rel=1e-5)
        else:  # balanced: the KL's weights per group are >= 0 with mean 1, so kl_coeff * KL * groups bounds it
            weighted_kl = record["loss"] - record["recon"] - expected_lambda * (record["spectral"] + record["bn"])
            assert -1e-3 <= weighted_kl <= kl_coeff * config.num_groups * record["kl"] + 1e-3
