"""Normalising flows in the posterior: the autoregressive masks, the KL with flows, num_flows=0 as before, training,
NLL, sampling untouched, saving and loading, the flow presets. (The ONNX tests export a model with flows.)"""

from __future__ import annotations

import math

import pytest
import torch
from test_model import images, make, train_on_patterns

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.distributions import Normal
from nvae_hub.flows import FlowCell, PosteriorFlow
from nvae_hub.hub import save_pretrained
from nvae_hub.model import GroupPosterior
from nvae_hub.weights import PretrainedLoadError


def strengthen(flow: torch.nn.Module, gain: float = 1.5, bias_std: float = 1.0) -> None:
    """Make every shift large (at init they are 0.1x), so that the flows change the posterior visibly."""
    with torch.no_grad():
        for cell in flow.modules():
            if isinstance(cell, FlowCell):
                cell.shift.log_gain.fill_(math.log(gain))
                cell.shift.bias.normal_(0.0, bias_std)


def with_flows_of(flow_model: NVAE, plain: NVAE) -> NVAE:
    """``flow_model`` after loading every weight of the flow-free ``plain`` (its flows keep their own)."""
    missing, unexpected = flow_model.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(name.startswith("flows.") for name in missing)
    return flow_model


# ---------------------------------------------------------------- the autoregressive order
def raster_rank(c: int, h: int, w: int, reverse: bool) -> torch.Tensor:
    """Position in the documented order of each variable, indexed like z.flatten() (channel, row, column):
    rows, then columns, then channels; all reversed for the second cell of a pair."""
    ch, row, col = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    rank = ((row * w + col) * c + ch).flatten()
    return c * h * w - 1 - rank if reverse else rank


@pytest.mark.parametrize("reverse", [False, True])
def test_each_flow_cell_is_autoregressive_in_the_documented_order_with_unit_diagonal(reverse):
    c, h, w = 3, 4, 5
    torch.manual_seed(0)
    cell = FlowCell(c, reverse=reverse).double()
    strengthen(cell)
    z = torch.randn(1, c, h, w, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: cell(v.view(1, c, h, w))[0].flatten(), z.flatten())
    order = torch.argsort(raster_rank(c, h, w, reverse))
    ordered = jac[order][:, order]  # row: output variable, column: input variable, both in the order
    assert torch.equal(torch.diagonal(ordered), torch.ones(c * h * w, dtype=torch.float64))
    assert torch.count_nonzero(torch.triu(ordered, diagonal=1)) == 0  # no variable sees a later one
    # ... and the cell does use what it may see: the earlier channels at its own position and earlier positions
    below = torch.tril(ordered, diagonal=-1)
    assert (below.abs() > 1e-6).float().mean() > 0.15
    same_position = ordered[1:c, 0]  # channels 1.. of the first position, on channel 0 of that position
    assert (same_position.abs() > 1e-6).all()
    _, log_det = cell(z)
    assert torch.equal(log_det, torch.zeros_like(z))


def test_a_flow_pair_is_volume_preserving_and_not_triangular_in_either_order():
    c, h, w = 2, 3, 3
    torch.manual_seed(1)
    flow = PosteriorFlow(c, num_pairs=1).double()
    strengthen(flow)
    z = torch.randn(1, c, h, w, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, c, h, w))[0].flatten(), z.flatten())
    sign, log_abs_det = torch.linalg.slogdet(jac)
    assert sign == 1 and abs(log_abs_det) < 1e-10
    for reverse in (False, True):  # together the two cells let every variable see every neighbour
        order = torch.argsort(raster_rank(c, h, w, reverse))
        assert torch.count_nonzero(torch.triu(jac[order][:, order], diagonal=1)) > 0
    assert torch.equal(flow(z)[1], torch.zeros_like(z))


def test_masks_are_buffers_that_follow_the_module_and_are_not_saved():
    model = make(num_flows=1)
    masks = {name: b for name, b in model.named_buffers() if name.endswith(".mask")}
    assert len(masks) == model.num_groups * 2 * 3  # groups x cells x masked convolutions
    assert not any(name.endswith(".mask") for name in model.state_dict())
    model.to(torch.float64)
    assert all(b.dtype == torch.float64 and b.device == model.device for name, b in model.named_buffers()
               if name.endswith(".mask"))


# ---------------------------------------------------------------- the KL with flows
def test_one_sample_kl_estimate_agrees_with_a_monte_carlo_estimate_of_the_true_kl():
    c, h, w = 2, 3, 3
    torch.manual_seed(0)
    flow = PosteriorFlow(c, num_pairs=1)
    strengthen(flow)
    g = torch.Generator().manual_seed(1)
    q0 = Normal(0.5 * torch.randn(1, c, h, w, generator=g), 0.3 * torch.randn(1, c, h, w, generator=g) - 0.5)
    prior = Normal(0.5 * torch.randn(1, c, h, w, generator=g), 0.3 * torch.randn(1, c, h, w, generator=g))

    # What the model computes: the one-sample estimate at each flowed sample, averaged.
    n = 20000
    with torch.no_grad():
        z0 = q0.sample_from(torch.randn((n, c, h, w), generator=g))
        z, log_det = flow(z0)
        estimate = GroupPosterior(q0, z0, z, log_det).kl(prior).flatten(1).sum(1)

    # The true KL of the flowed posterior, E_z[log q(z) - log p(z)], by Monte Carlo on fresh samples, with
    # log q(z) from the change of variables: the flow inverted by fixed-point iteration (exact for an
    # autoregressive cell after as many steps as variables) and its log|det| from the full Jacobian.
    m, dims = 1000, c * h * w
    with torch.no_grad():
        z_true, _ = flow(q0.sample_from(torch.randn((m, c, h, w), generator=g)))
        pre = z_true
        for cell in reversed(flow.cells):
            x = pre.clone()
            for _ in range(dims + 1):  # x = y + shift(x)
                x = pre + x - cell(x)[0]
            pre = x
        torch.testing.assert_close(flow(pre)[0], z_true, atol=1e-5, rtol=0)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: flow(v.view(1, c, h, w))[0].flatten()))(pre.flatten(1))
    log_abs_det = torch.linalg.slogdet(jac)[1]
    true_kl = q0.log_prob(pre).flatten(1).sum(1) - log_abs_det - prior.log_prob(z_true).flatten(1).sum(1)

    standard_error = math.hypot(estimate.std() / math.sqrt(n), true_kl.detach().std() / math.sqrt(m))
    assert abs(estimate.mean() - true_kl.mean()) < 4 * standard_error + 0.05, (estimate.mean(), true_kl.mean())
    # The flows matter here: the KL of the Normal before them is far off.
    assert abs(q0.kl(prior).sum() - true_kl.mean()) > 20 * standard_error


def test_with_identity_flows_the_kl_estimate_averages_to_the_analytic_kl():
    plain = make(seed=0).eval()
    flowed = with_flows_of(make(seed=0, num_flows=1), plain).eval()
    with torch.no_grad():
        for param in flowed.flows.parameters():
            param.zero_()  # zero shifts (a zero direction normalises to a zero weight): z = z0
    repeats = 200
    x = images(plain.config, n=2).repeat(repeats, 1, 1, 1)  # eval mode: every row is an independent draw
    torch.manual_seed(3)
    analytic = plain.loss(x, reg_weight=0).kl_per_group.view(repeats, 2, -1)
    torch.manual_seed(3)  # the same noise, so the same latents
    sampled = flowed.loss(x, reg_weight=0).kl_per_group.view(repeats, 2, -1)
    assert not torch.allclose(sampled, analytic, atol=0.1)  # the flow model does take the one-sample route
    error = (sampled - analytic).std(0) / math.sqrt(repeats)
    assert ((sampled.mean(0) - analytic.mean(0)).abs() < 4 * error + 1e-3).all()


# ---------------------------------------------------------------- num_flows = 0 is the model as it was
def test_num_flows_0_gives_the_outputs_of_the_model_without_flows():
    """The flow-free pass, written out as it was before flows existed, against the model's methods."""
    model = make(seed=0).eval()
    assert len(model.flows) == 0 and not any("flows" in name for name in model.state_dict())
    x = images(model.config)

    def reference(repeats: int, use_mean: bool = False):
        features = [f.repeat_interleave(repeats, dim=0).contiguous(memory_format=torch.channels_last)
                    for f in model._bottom_up(x)]
        zs, qs, ps = [], [], []

        def choose_z(g, s, prior):
            q = model._posterior(g, features[g], s, prior)
            zs.append(q.mu if use_mean else q.rsample())
            qs.append(q)
            ps.append(prior)
            return zs[-1]

        return model._top_down(x.shape[0] * repeats, choose_z), zs, qs, ps

    with torch.no_grad():
        torch.manual_seed(5)
        out = model.loss(x)
        torch.manual_seed(5)
        params, zs, qs, ps = reference(1)
        assert torch.equal(out.recon, -model._log_likelihood(params, x))
        analytic = [q.kl(p).flatten(1).sum(1) for q, p in zip(qs, ps, strict=True)]
        assert torch.equal(out.kl_per_group, torch.stack(analytic, 1))

        torch.manual_seed(6)
        nll = model.nll(x, num_samples=3)
        torch.manual_seed(6)
        params, zs, qs, ps = reference(3)
        log_w = model._log_likelihood(params, x.repeat_interleave(3, dim=0))
        for z, q, p in zip(zs, qs, ps, strict=True):
            log_w = log_w + (p.log_prob(z) - q.log_prob(z)).flatten(1).sum(1)
        assert torch.equal(nll, math.log(3) - torch.logsumexp(log_w.view(-1, 3), dim=1))

        _, means, _, _ = reference(1, use_mean=True)
        assert all(torch.equal(a, b) for a, b in zip(model.encode(x).z, means, strict=True))


def test_old_configs_without_num_flows_load_as_flow_free_models():
    data = NVAEConfig.preset("tiny").to_dict()
    del data["num_flows"]
    config = NVAEConfig.from_dict(data)
    assert config.num_flows == 0 and config == NVAEConfig.preset("tiny")


def test_the_flow_free_layers_start_from_the_same_weights_as_without_flows():
    plain, flowed = make(seed=4).state_dict(), make(seed=4, num_flows=2).state_dict()
    assert all(torch.equal(value, flowed[name]) for name, value in plain.items())
    assert set(flowed) - set(plain) and all(name.startswith("flows.") for name in set(flowed) - set(plain))


@pytest.mark.parametrize("value", [-1, 9, 1.5, True, "1"])
def test_bad_num_flows_are_rejected(value):
    with pytest.raises(ValueError, match=r"NVAEConfig\.num_flows=.*integer from 0 \(no flows\) to 8"):
        NVAEConfig.preset("tiny").replace(num_flows=value)


# ---------------------------------------------------------------- training and evaluation with flows
def test_gradients_reach_every_flow_parameter_and_respect_the_masks():
    model = make(num_flows=2).train()
    model.loss(images(model.config), kl_weight=0.5).total.backward()
    flow_params = dict(model.flows.named_parameters())
    assert len(flow_params) == model.num_groups * 4 * 7  # groups x cells x (3 weights, 3 gains, 1 bias)
    for name, param in flow_params.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    for conv in (m for m in model.flows.modules() if getattr(m, "mask", None) is not None):
        assert torch.count_nonzero(conv.weight.grad * (1 - conv.mask)) == 0  # masked entries stay out


def test_a_model_with_flows_trains_with_a_falling_loss():
    model = make(num_flows=1, num_scales=1, groups_per_scale=2)  # one scale: half the time per step
    flow_weight = model.flows[0].cells[0].expand.weight.detach().clone()
    losses = train_on_patterns(model, steps=200, batch_size=8)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) < 0.3 * sum(losses[:20]) and sum(losses[-20:]) < sum(losses[80:100])
    assert not torch.equal(flow_weight, model.flows[0].cells[0].expand.weight)


def test_importance_weighted_nll_with_flows_is_not_above_the_negative_elbo():
    model = make(num_flows=1).eval()
    strengthen(model.flows, gain=0.5, bias_std=0.3)
    x = images(model.config, n=8)
    torch.manual_seed(0)
    out = model.loss(x.repeat(16, 1, 1, 1))  # eval mode: 16 independent draws per image
    neg_elbo = (out.recon + out.kl).mean()
    iw = model.nll(x, num_samples=64).mean()
    assert iw <= neg_elbo
    # K=1 is the negative ELBO estimate: its average agrees with the loss's
    k1 = model.nll(x.repeat(16, 1, 1, 1), num_samples=1).mean()
    assert abs(k1 - neg_elbo) < 0.02 * neg_elbo


# ---------------------------------------------------------------- flows touch only the posterior
def test_sampling_runs_no_flow_and_matches_the_model_without_flows():
    plain = make(seed=0).eval()
    flowed = with_flows_of(make(seed=0, num_flows=1), plain).eval()
    strengthen(flowed.flows)
    calls = []
    hooks = [cell.register_forward_hook(lambda *args: calls.append(1)) for cell in flowed.flows.modules()
             if isinstance(cell, FlowCell)]
    assert torch.equal(flowed.sample(3, temperature=0.8, seed=1), plain.sample(3, temperature=0.8, seed=1))
    assert calls == []
    x = images(plain.config)
    z_flowed, z_plain = flowed.encode(x), plain.encode(x)
    assert len(calls) == flowed.num_groups * 2
    for a, b in zip(z_flowed.z, z_plain.z, strict=True):  # encode returns the flowed means
        assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)
    for hook in hooks:
        hook.remove()
    # The decoder consumed the flowed latents that encode returns: decoding them gives the pass's own output.
    with torch.no_grad():
        params, _, _, _ = flowed._posterior_pass(x, use_mean=True)
    torch.testing.assert_close(flowed.reconstruct(x), flowed.likelihood(params).mean(), atol=1e-6, rtol=0)
    assert flowed.swap(x, images(plain.config, seed=1), [0]).shape == x.shape


def test_weights_and_config_with_flows_round_trip(tmp_path):
    model = make(num_flows=2).train()
    model.loss(images(model.config))  # move BN statistics and spectral vectors away from their init
    strengthen(model.flows)
    model.eval()
    save_pretrained(model, tmp_path / "flows")
    loaded = NVAE.from_pretrained(tmp_path / "flows")
    assert loaded.config == model.config and loaded.config.num_flows == 2
    x = images(model.config)
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(x).z, model.encode(x).z, strict=True))
    torch.manual_seed(0)
    expected = model.nll(x, num_samples=4)
    torch.manual_seed(0)
    assert torch.equal(loaded.nll(x, num_samples=4), expected)

    plain_config = (tmp_path / "flows" / "config.json").read_text().replace('"num_flows": 2', '"num_flows": 0')
    (tmp_path / "flows" / "config.json").write_text(plain_config)
    with pytest.raises(PretrainedLoadError, match=r"unexpected weight\(s\): flows\.0\.cells"):
        NVAE.from_pretrained(tmp_path / "flows")


# ---------------------------------------------------------------- the paper's flow presets
REFERENCE_MILLIONS = {"cifar10": 130.9, "celeba64": 153.3, "celeba256": 330.8}  # the official code's counts


@pytest.mark.parametrize("preset", ["cifar10", "celeba64", "celeba256"])
def test_flow_presets_build_on_cpu_with_the_reference_parameter_counts(preset):
    model = make(preset=preset)
    assert model.config.num_flows == {"cifar10": 1, "celeba64": 1, "celeba256": 2}[preset]
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - REFERENCE_MILLIONS[preset]) < 0.05, millions
    assert len(model.flows) == model.num_groups == sum(model.groups_per_scale)
    assert abs(model.config.estimated_num_parameters() / 1e6 - millions) <= 0.01 * millions  # the config's estimate


def test_the_cifar10_preset_trains_a_step_on_cpu():
    """One full step at batch 1 of the cifar10 preset's structure (its scale, 30 groups, cells and flows) at a quarter
    of its channels: the whole preset takes about a minute per step on a small CPU, for the same code."""
    preset = NVAEConfig.preset("cifar10")
    model = make(preset="cifar10", num_channels=preset.num_channels // 4).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    x = images(model.config, n=1)
    before = model.flows[0].cells[1].shift.bias.detach().clone()
    out = model.loss(x, kl_weight=0.5)
    out.total.backward()
    optimizer.step()
    assert torch.isfinite(out.total) and out.kl_per_group.shape == (1, 30)
    assert not torch.equal(before, model.flows[0].cells[1].shift.bias)
