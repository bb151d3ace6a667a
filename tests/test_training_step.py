"""The training step (nvae_hub/training.py): Adamax that skips on the device, NaN-proof restoring, the EMA, and a
step that never reads a value back from the device.

"No host synchronisation" is checked on the CPU with a dispatch mode that fails on every operation that hands
a tensor's value to Python (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``if t:``: all of them go
through ``aten._local_scalar_dense``) or whose output size depends on values (``nonzero``, boolean masks): on
a GPU each of those waits for the device. tests/test_cuda.py checks the same with CUDA's own sync detector.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.training import EMA, STAT_NAMES, Adamax, TrainStep, select_, zero_unless_

HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t), `if t:`
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten._unique2.default,
}
INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}


class NoHostReads(TorchDispatchMode):
    """Fails on every operation that would make the host wait for a GPU. (``.tolist()`` and ``.cpu()`` do not
    pass through the dispatcher on a CPU tensor; the CUDA test catches those.)"""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_mask = func in INDEXING and any(
            index is not None and index.dtype == torch.bool for index in args[1])
        if func in HOST_READS or boolean_mask:
            raise AssertionError(f"{func} reads a device value back to the host")
        return func(*args, **(kwargs or {}))


def tiny_model(seed: int = 0) -> NVAE:
    torch.manual_seed(seed)
    return NVAE(NVAEConfig.preset("tiny")).train()


def batch(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)).bernoulli()


def snapshot(model: NVAE, optimizer: torch.optim.Optimizer | None = None, ema: EMA | None = None) -> list[torch.Tensor]:
    tensors = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    if optimizer is not None:
        tensors += [v.clone() for state in optimizer.state.values() for v in state.values()]
    if ema is not None:
        tensors += [t.clone() for t in ema.module.state_dict().values()]
    return tensors


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------- the detector


def test_the_detector_catches_what_stalls_a_gpu():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: int(x.sum()), lambda: float(x[0]),
                 lambda: x[x > 0], lambda: x.nonzero()):
        with NoHostReads(), pytest.raises(AssertionError, match="reads a device value"):
            read()


# ---------------------------------------------------------------------------------------------- Adamax


def test_adamax_matches_torch_and_skips_exactly():
    torch.manual_seed(0)
    mine = [torch.randn(6, 4), torch.randn(5)]
    theirs = [p.clone() for p in mine]
    optimizer = Adamax(mine, lr=1e-2, eps=1e-3, weight_decay=3e-4)
    reference = torch.optim.Adamax(theirs, lr=1e-2, eps=1e-3, weight_decay=3e-4)
    for step in range(12):
        grads = [torch.randn_like(p) for p in mine]
        skip = step in (0, 5, 6)  # the very first update too: no 0/0 from a state that never moved
        if step == 5:
            grads[0][1, 2] = math.nan
        if step == 6:
            grads[1][0] = math.inf
        for p, g in zip(mine, grads, strict=True):
            p.grad = g.clone()
        before = [p.clone() for p in mine] + [v.clone() for s in optimizer.state.values() for v in s.values()]
        optimizer.skip = torch.tensor(skip)
        optimizer.step()
        after = [p.clone() for p in mine] + [v.clone() for s in optimizer.state.values() for v in s.values()]
        if skip:
            assert identical(before, after) or step == 0  # step 0 creates the state
            assert all(torch.equal(p, q) for p, q in zip(before, mine, strict=False))
            continue
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        reference.step()
        for p, q in zip(mine, theirs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert optimizer.state[mine[0]]["step"].item() == 9
    # The state dicts are interchangeable with torch.optim.Adamax's.
    other = torch.optim.Adamax([p.clone() for p in mine], lr=1e-2, eps=1e-3, weight_decay=3e-4)
    other.load_state_dict(optimizer.state_dict())
    torch.testing.assert_close(other.state_dict()["state"][0]["exp_inf"], optimizer.state[mine[0]]["exp_inf"])


def test_a_learning_rate_tensor_replaces_every_groups_rate():
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(5)]
    grads = [torch.randn_like(p) for p in start]
    mine = [p.clone() for p in start]
    optimizer = Adamax([{"params": [mine[0]], "lr": 5.0}, {"params": [mine[1]], "lr": 7.0}], eps=1e-3)
    optimizer.lr = torch.tensor(0.02)  # what a captured CUDA graph reads; the groups' numbers are ignored
    reference = [p.clone() for p in start]
    other = Adamax(reference, lr=0.02, eps=1e-3)
    for optim, params in ((optimizer, mine), (other, reference)):
        for _ in range(2):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optim.step()
    for p, q in zip(mine, reference, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    optimizer.lr.fill_(0.0)
    before = [p.clone() for p in mine]
    optimizer.step()
    assert identical(before, mine)


def test_adamax_honours_grad_scaler_found_inf():
    p = torch.ones(3, requires_grad=True)
    optimizer = Adamax([p], lr=0.1)
    p.grad = torch.ones(3)
    optimizer.found_inf = torch.tensor(1.0)  # what GradScaler sets on optimizers with _step_supports_amp_scaling
    optimizer.step()
    assert torch.equal(p.detach(), torch.ones(3))
    optimizer.found_inf = torch.tensor(0.0)
    optimizer.step()
    assert (p.detach() < 1).all()


def test_masks_are_exact_and_nan_proof():
    values = [torch.tensor([1.5, math.nan, -math.inf]), torch.tensor([7], dtype=torch.long)]
    saved = [torch.tensor([2.0, 3.0, 4.0]), torch.tensor([9], dtype=torch.long)]
    select_(values, saved, torch.tensor(False))
    assert values[0][0] == 1.5 and math.isnan(values[0][1]) and values[1].item() == 7
    select_(values, saved, torch.tensor(True))
    assert identical(values, saved) and values[0] is not saved[0]
    grads = [torch.tensor([math.nan, 2.0, -0.5])]
    zero_unless_(grads, torch.tensor(True))
    assert math.isnan(grads[0][0]) and grads[0][1] == 2.0
    zero_unless_(grads, torch.tensor(False))
    assert torch.equal(grads[0], torch.zeros(3))


# ---------------------------------------------------------------------------------------------- the step


def make_step(model: NVAE, **kwargs) -> tuple[TrainStep, Adamax, EMA]:
    optimizer = Adamax(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=3e-4)
    ema = EMA(model, 0.999)
    options = {"grad_clip": 200.0, "skip_threshold": 0.0} | kwargs
    return TrainStep(model, optimizer, ema, **options), optimizer, ema


def test_a_training_step_never_reads_a_device_value():
    model = tiny_model()
    step, _, _ = make_step(model, skip_threshold=1e4)
    x = batch()
    with NoHostReads():
        for n in range(1, 4):
            row = step(x, kl_weight=0.3, reg_weight=1e-2, lr=1e-3, num_updates=n)
    assert row.shape == (len(STAT_NAMES) + model.num_groups,) and torch.isfinite(row).all()
    assert model.sr_steps.item() == 3


def test_a_skipped_step_leaves_model_optimizer_and_ema_untouched():
    model = tiny_model()
    step, optimizer, ema = make_step(model)
    x = batch()
    step(x, kl_weight=0.3, reg_weight=1e-2, lr=1e-3, num_updates=1)
    before = snapshot(model, optimizer, ema)

    real_loss = step.loss_fn

    def nan_loss(*args):
        out = real_loss(*args)
        return out | {"total": out["total"] * math.nan}

    step.loss_fn = nan_loss
    row = step(x, kl_weight=0.3, reg_weight=1e-2, lr=1e-3, num_updates=2)
    stats = dict(zip(STAT_NAMES, row.tolist(), strict=False))
    assert stats["skipped"] == 1.0 and math.isnan(stats["grad_norm"])
    assert identical(before, snapshot(model, optimizer, ema))  # BN statistics and power iteration restored too

    step.loss_fn = real_loss
    row = step(x, kl_weight=0.3, reg_weight=1e-2, lr=1e-3, num_updates=3)
    assert row[STAT_NAMES.index("skipped")] == 0 and not identical(before, snapshot(model, optimizer, ema))


def test_updates_above_the_threshold_are_skipped_and_clipping_bounds_the_rest(monkeypatch):
    model = tiny_model()
    step, _, _ = make_step(model, skip_threshold=1e-3)
    before = snapshot(model)
    row = step(batch(), kl_weight=0.3, reg_weight=1e-2, lr=1e-3, num_updates=1)
    assert row[STAT_NAMES.index("skipped")] == 1 and identical(before, snapshot(model))

    model = tiny_model()
    step, _, _ = make_step(model, grad_clip=1.0)
    seen = []
    original = Adamax.step

    def spy(self, closure=None):
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        return original(self, closure)

    monkeypatch.setattr(Adamax, "step", spy)
    row = step(batch(), kl_weight=0.3, reg_weight=1e-2, lr=1e-3, num_updates=1)
    assert row[STAT_NAMES.index("grad_norm")] > 1.0 and seen[0] == pytest.approx(1.0, rel=1e-4)


def test_the_ema_moves_only_with_kept_updates():
    model = tiny_model()
    ema = EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.sr_steps.fill_(7)
    before = snapshot(ema.module)
    ema.update(model, num_updates=100, keep=torch.tensor(False))
    assert identical(before, snapshot(ema.module))
    ema.update(model, num_updates=100, keep=torch.tensor(True))
    for average, param, old in zip(ema.module.parameters(), model.parameters(), before, strict=False):
        torch.testing.assert_close(average, 0.5 * (param + old))
    assert ema.module.sr_steps.item() == 7


@pytest.mark.parametrize("n", [0, 3, 50, 20000])  # the ramp (1 + n) / (10 + n), then the decay itself
def test_the_ema_weight_from_a_tensor_update_count_equals_the_integer_one(n):
    model, ema_int, ema_tensor = tiny_model(), EMA(tiny_model(1), 0.999), EMA(tiny_model(1), 0.999)
    ema_int.update(model, num_updates=n)
    ema_tensor.update(model, num_updates=torch.tensor(float(n)))
    for a, b in zip(ema_tensor.module.parameters(), ema_int.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not identical(snapshot(tiny_model(1)), snapshot(ema_int.module))


def test_each_step_trains_at_the_learning_rate_it_is_given():
    model = tiny_model()
    step, _, _ = make_step(model)
    x = batch()
    step(x, kl_weight=0.3, reg_weight=1e-2, lr=1e-3, num_updates=1)
    before = [p.detach().clone() for p in model.parameters()]
    step(x, kl_weight=0.3, reg_weight=1e-2, lr=0.0, num_updates=2)  # lr 0: Adamax moves nothing
    assert identical(before, [p.detach() for p in model.parameters()])
    step(x, kl_weight=0.3, reg_weight=1e-2, lr=1e-3, num_updates=3)
    assert not identical(before, [p.detach() for p in model.parameters()])


def test_a_cuda_graph_needs_a_cuda_model_and_no_accelerator():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs a model on a CUDA device, not cpu"):
        make_step(model, cuda_graph=True)


# ---------------------------------------------------------------------------------------------- the regulariser


def assert_converged(model: NVAE) -> None:
    for conv in (model.stem, model.head[1]):
        weight = conv.effective_weight().flatten(1).detach()
        estimate = conv.sr_u @ weight @ conv.sr_v
        torch.testing.assert_close(estimate, torch.linalg.matrix_norm(weight, ord=2), rtol=2e-3, atol=1e-4)


def test_the_singular_vectors_are_converged_before_the_first_update_and_kept_once_updated():
    # The official code runs 10x the power iterations at its first step; here they run when the training step is
    # made (or at the first training-mode regulariser call), so that no step needs to ask whether it is the first.
    model = tiny_model()
    TrainStep(model, Adamax(model.parameters()), None, grad_clip=1e9, skip_threshold=1e9)
    assert model.sr_steps.item() == 0
    assert_converged(model)
    first_call, warmed = tiny_model(), tiny_model()
    first_call.regularizers()
    warmed.warm_up_spectral_vectors()
    warmed.regularizers()
    assert all(torch.equal(x, y) for x, y in zip(first_call.buffers(), warmed.buffers(), strict=True))
    updated = tiny_model()
    updated.sr_steps.fill_(5)  # as in trained or loaded weights: their vectors are kept as they are
    before = [b.clone() for b in updated.buffers()]
    updated.warm_up_spectral_vectors()
    assert all(torch.equal(x, y) for x, y in zip(before, updated.buffers(), strict=True))


def test_the_spectral_regulariser_runs_in_float32_under_autocast():
    plain, autocast = tiny_model(), tiny_model()
    want = plain.regularizers()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = autocast.regularizers()
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert torch.equal(autocast.stem.sr_u, plain.stem.sr_u) and torch.equal(autocast.stem.sr_v, plain.stem.sr_v)
