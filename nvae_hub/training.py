"""One NVAE training update that never waits for the device: what the trainer (train/) and the benchmark
(bench/) share.

A GPU runs ahead of Python only as long as Python never asks it for a value. The usual training step asks
several times: is the gradient norm finite (to skip the update), how many updates so far (for the regulariser),
what is the loss (to log it). Here every such decision is made on the device:

- ``Adamax`` takes a 0-d ``skip`` tensor and applies the update, or leaves the parameters and its state
  exactly as they were, with arithmetic only (no Python ``if`` on a tensor);
- ``select_`` restores the buffers (batch-norm statistics, the spectral regulariser's vectors) of a skipped
  update, bit for bit, also when they hold NaNs;
- ``EMA`` updates the moving average with ``foreach`` operations and a weight that is 0 for a skipped update;
- ``TrainStep`` returns the step's statistics as one tensor on the device, for the caller to read when it
  logs (every ``--log-every`` steps), not at every step.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .config import NVAEConfig
from .model import NVAE

if TYPE_CHECKING:
    from accelerate import Accelerator

THRESHOLDS_PER_VALUE = {"bernoulli": (1.0, 5.0), "logistic_mixture": (10.0, 50.0)}
"""Default (gradient-norm clip, skip threshold) per value of an image (C x H x W), by output distribution: the
loss is summed over the values, and so are its gradients (see ``default_thresholds``)."""
STAT_NAMES = ("loss", "recon", "kl", "spectral", "bn", "grad_norm", "skipped")
"""The first entries of ``TrainStep``'s statistics row; the KL of every group follows."""

_SAME_SIZE_INTEGER = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
                      torch.bfloat16: torch.int16}


def _as_integers(tensors: list[Tensor]) -> dict[torch.dtype, list[Tensor]]:
    """Integer views of the same bits (integer tensors as they are), grouped by dtype: a foreach operation on
    one dtype is a few kernel launches, on mixed dtypes one per tensor."""
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        view = t.view(_SAME_SIZE_INTEGER[t.dtype]) if t.is_floating_point() else t
        groups.setdefault(view.dtype, []).append(view)
    return groups


@torch.no_grad()
def zero_unless_(tensors: list[Tensor], keep: Tensor) -> None:
    """Set every tensor to 0 unless ``keep`` (a 0-d bool tensor) is true, on the device.

    Multiplying by 0 leaves NaN and infinity as they are, so the multiplication is done on the bits, viewed as
    integers: x * 1 is x, x * 0 is the bit pattern of +0.0.
    """
    for group in _as_integers(tensors).values():
        torch._foreach_mul_(group, keep.to(torch.int32))


@torch.no_grad()
def select_(tensors: list[Tensor], others: list[Tensor], take_others: Tensor) -> None:
    """Where ``take_others`` (a 0-d bool tensor) is true, copy ``others`` into ``tensors``; else leave them.
    Exact and NaN-proof (``zero_unless_``'s integer arithmetic); ``others`` is left as it was."""
    take = take_others.to(torch.int32)
    mine, theirs = _as_integers(tensors), _as_integers(others)
    if mine.keys() != theirs.keys() or any(len(mine[k]) != len(theirs[k]) for k in mine):
        raise ValueError("select_ needs two lists of tensors with the same dtypes")
    for dtype, group in mine.items():
        chosen = torch._foreach_mul(theirs[dtype], take)
        torch._foreach_mul_(group, 1 - take)
        torch._foreach_add_(group, chosen)


def default_thresholds(config: NVAEConfig) -> tuple[float, float]:
    """(gradient-norm clip, skip threshold) for a model of ``config``, proportional to the number of values in an
    image: the loss is in nats per image, a sum over them, and so are its gradients (at initialisation, 0.4 to 0.7
    per value for every Bernoulli preset, 0.3 for every logistic-mixture one). Healthy runs measured on the CPU
    stayed below 1 per value with Bernoulli pixels; with the 8-bit logistic mixture the norm grows as the scales
    sharpen, to 5.7 per value within 120 steps of fashion-mnist-small (README, "Gradient norms"). MNIST gets
    784 and 3920, fashion-mnist-small 7840 and 39200; a diverging run passes both within steps."""
    clip, skip = THRESHOLDS_PER_VALUE[config.output]
    values = config.channels * config.image_size**2
    return clip * values, skip * values


class Adamax(torch.optim.Optimizer):
    """Adamax (Kingma & Ba, 2015) with L2 weight decay added to the gradient, as ``torch.optim.Adamax``
    computes it (same state names, so the state dicts are interchangeable), that can skip an update on the
    device.

    Before ``step()``, set ``optimizer.skip`` to a 0-d bool tensor: where it is true the step leaves the
    parameters and the state exactly as they were, whatever the gradients hold (NaN included). The step
    counts and all arithmetic stay on the device, so ``step()`` never synchronises. It also honours
    ``found_inf`` and ``grad_scale``, which ``torch.amp.GradScaler`` sets on optimizers that declare
    ``_step_supports_amp_scaling`` (float16 training).

    ``optimizer.lr``, when set to a 0-d tensor, is the learning rate of every group instead of their ``lr``
    (a CUDA graph replays the step with the numbers it was captured with: a Python float would be frozen).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 2e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if min(lr, eps, weight_decay) < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.skip: Tensor | None = None
        self.lr: Tensor | None = None

    def _skip_flag(self, device: torch.device) -> Tensor:
        """This step's skip decision: ``self.skip`` or GradScaler's ``found_inf``, as a 0-d bool on ``device``."""
        skip = torch.zeros((), dtype=torch.bool, device=device)
        if self.skip is not None:
            skip = skip | self.skip.to(device)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            skip = skip | (found_inf.to(device) > 0)
        return skip

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update the parameters that have gradients (or, if ``skip``/``found_inf`` says so, nothing)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            device = params[0].device
            beta1, beta2 = group["betas"]
            keep = (~self._skip_flag(device)).float()
            lr = group["lr"] if self.lr is None else self.lr.to(device)
            grads = [p.grad for p in params]
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale.to(device))
            states = [self._state(p, group["eps"]) for p in params]
            exp_avgs, exp_infs, steps = ([s[k] for s in states] for k in ("exp_avg", "exp_inf", "step"))

            # g = keep * (grad + weight_decay * param): exactly 0 for a skipped update, NaNs included
            g = torch._foreach_mul(params, group["weight_decay"]) if group["weight_decay"] else None
            if g is None:
                g = [grad.clone() for grad in grads]
            else:
                torch._foreach_add_(g, grads)
            zero_unless_(g, keep.bool())
            torch._foreach_add_(steps, [keep] * len(steps))  # (the Tensor overload reads `keep` on the host)
            # exp_avg <- b1 * exp_avg + (1 - beta1) * g, with b1 = beta1, or 1 when skipped
            torch._foreach_mul_(exp_avgs, 1.0 - keep * (1.0 - beta1))
            torch._foreach_add_(exp_avgs, g, alpha=1.0 - beta1)
            # exp_inf <- max(b2 * exp_inf, |g| + eps), with b2 = beta2, or max(exp_inf, eps) = exp_inf when skipped
            # (exp_inf >= eps always)
            torch._foreach_mul_(exp_infs, 1.0 - keep * (1.0 - beta2))
            torch._foreach_abs_(g)
            torch._foreach_add_(g, group["eps"])
            torch._foreach_maximum_(exp_infs, g)
            # param <- param - lr / (1 - beta1**step) * exp_avg / exp_inf (a step of 0 when skipped)
            corrections = torch._foreach_pow(beta1, torch._foreach_clamp_min(steps, 1.0))
            torch._foreach_sub_(corrections, 1.0)  # beta1**step - 1 < 0
            torch._foreach_reciprocal_(corrections)
            torch._foreach_mul_(corrections, keep * lr)  # -lr / (1 - beta1**step), or 0
            update = torch._foreach_div(exp_avgs, exp_infs)
            torch._foreach_mul_(update, corrections)
            torch._foreach_add_(params, update)
        return loss

    def _state(self, param: Tensor, eps: float) -> dict[str, Tensor]:
        """The state of ``param``, created on first use. ``exp_inf`` starts at ``eps`` rather than 0: the same
        first update (max(beta2 * eps, |g| + eps) = |g| + eps), and never a 0/0 when the first one is skipped."""
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_inf"] = torch.full_like(param, eps, memory_format=torch.preserve_format)
        elif state["step"].device != param.device:  # a state dict loaded from elsewhere
            state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
        return state


class EMA:
    """An exponential moving average of a model's parameters, with its buffers (batch-norm statistics, the
    spectral regulariser's vectors) copied from the model.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates, so that the average is not
    dominated by the random initialisation in short runs.
    """

    def __init__(self, model: NVAE, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int | Tensor, keep: Tensor | None = None) -> None:
        """Move the average towards ``model`` (when ``keep``, a 0-d bool tensor, is true or not given).
        ``num_updates`` may be a 0-d float tensor on the device (what a CUDA graph needs)."""
        if isinstance(num_updates, Tensor):
            decay = ((1 + num_updates) / (10 + num_updates)).clamp(max=self.decay)
        else:
            decay = min(self.decay, (1 + num_updates) / (10 + num_updates))
        averages, params = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        steps = torch._foreach_sub(params, averages)
        torch._foreach_mul_(steps, (1.0 - decay) if keep is None else keep.float() * (1.0 - decay))
        torch._foreach_add_(averages, steps)
        if keep is None:
            torch._foreach_copy_(list(self.module.buffers()), list(model.buffers()))
        else:
            select_(list(self.module.buffers()), list(model.buffers()), keep)


class TrainStep:
    """One update of an NVAE: forward and backward under autocast, gradient-norm clipping, the skip decision,
    the optimizer and EMA updates, and the restoring of the buffers after a skipped update, with no host
    synchronisation anywhere.

    An update is skipped when the gradient norm is not finite or above ``skip_threshold`` (0: never for a
    finite norm). ``loss_fn(x, kl_weight, reg_weight)`` returns ``NVAE.loss``'s fields as a dict; it is the
    model's own loss unless given (the trainer passes its DistributedDataParallel-wrapped, perhaps compiled,
    module). With an ``accelerator``, its autocast, backward, clipping (which unscales float16 gradients) and
    optimizer wrapper are used.

    With ``cuda_graph=True`` (a model on a CUDA device, no ``accelerator``) the first ``graph_warmup`` calls run
    eagerly on a side stream; the next one captures the whole update (forward, backward, clipping, optimizer,
    EMA) as one CUDA graph, and every later call with a batch of that shape and dtype copies the batch in and
    replays it: one launch instead of about ten thousand, which otherwise bound the step on a GPU. A batch of
    another shape (a smaller last batch) runs eagerly. Everything that changes from step to step (the weights of
    the loss, the learning rate, the update count for the EMA) lives in 0-d tensors on the device that each call
    fills in, so the replayed graph reads the current values.
    """

    def __init__(self, model: NVAE, optimizer: Adamax | Any, ema: EMA | None, *, grad_clip: float,
                 skip_threshold: float, loss_fn: Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]] | None = None,
                 accelerator: Accelerator | None = None, autocast_dtype: torch.dtype | None = None,
                 cuda_graph: bool = False, graph_warmup: int = 3) -> None:
        self.model, self.optimizer, self.ema, self.accelerator = model, optimizer, ema, accelerator
        self.grad_clip, self.skip_threshold = grad_clip, skip_threshold
        self.loss_fn = loss_fn if loss_fn is not None else (lambda x, kl, reg: loss_dict(model, x, kl, reg))
        self.autocast_dtype = autocast_dtype
        self.raw_optimizer: Adamax = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        if not isinstance(self.raw_optimizer, Adamax):
            raise TypeError("TrainStep needs nvae_hub.training.Adamax, which can skip an update on the device")
        if cuda_graph and model.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {model.device}")
        if cuda_graph and accelerator is not None:
            raise ValueError("cuda_graph=True runs without an accelerator (one process; bf16 via autocast_dtype)")
        model.warm_up_spectral_vectors()  # here, not at the first step: no step reads a device value
        device = model.device
        self.kl_weight = torch.zeros((), device=device)
        self.reg_weight = torch.zeros((), device=device)
        self.lr = torch.zeros((), device=device)
        self.num_updates = torch.zeros((), device=device)
        self.raw_optimizer.lr = self.lr
        self.buffers = list(model.buffers())
        self.saved_buffers = [b.detach().clone() for b in self.buffers]
        self.cuda_graph, self.warmup_left = cuda_graph, graph_warmup  # eager calls before the capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: Tensor | None = None
        self.static_row: Tensor | None = None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.accelerator is not None:
            return self.accelerator.autocast()
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # autocast's cache of cast weights must not outlive a graph capture
        return torch.autocast(self.model.device.type, dtype=self.autocast_dtype, cache_enabled=not self.cuda_graph)

    def __call__(self, x: Tensor, *, kl_weight: float, reg_weight: float, lr: float, num_updates: int) -> Tensor:
        """Train on the batch ``x`` (on the model's device, values in [0, 1], not checked here); return the
        statistics row (``STAT_NAMES``, then the KL per group) as a float32 tensor on the device."""
        self.kl_weight.fill_(kl_weight)
        self.reg_weight.fill_(reg_weight)
        self.lr.fill_(lr)
        self.num_updates.fill_(num_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # what a checkpoint of the optimizer records; the step reads self.lr
        if not self.cuda_graph:
            return self._update(x)
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream(self.model.device)  # as torch.cuda.graph asks of the steps before a capture
            side.wait_stream(torch.cuda.current_stream(self.model.device))
            with torch.cuda.stream(side):
                row = self._update(x)
            torch.cuda.current_stream(self.model.device).wait_stream(side)
            return row
        if self.graph is None:
            self.static_x = x.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_row = self._update(self.static_x)
        elif x.shape != self.static_x.shape or x.dtype != self.static_x.dtype:
            return self._update(x)
        else:
            self.static_x.copy_(x)
        self.graph.replay()
        return self.static_row.clone()  # the next replay overwrites static_row

    def _update(self, x: Tensor) -> Tensor:
        """The update itself: nothing in it reads a Python number that changes from step to step."""
        torch._foreach_copy_(self.saved_buffers, self.buffers)

        with self._autocast():
            out = self.loss_fn(x, self.kl_weight, self.reg_weight)
        if self.accelerator is not None:
            self.accelerator.backward(out["total"])
            clip = self.accelerator.clip_grad_norm_
        else:
            out["total"].backward()
            clip = torch.nn.utils.clip_grad_norm_
        grad_norm = clip(self.model.parameters(), self.grad_clip or math.inf)
        skip = ~torch.isfinite(grad_norm)
        if self.skip_threshold > 0:
            skip = skip | (grad_norm > self.skip_threshold)
        self.raw_optimizer.skip = skip
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        select_(self.buffers, self.saved_buffers, skip)
        if self.ema is not None:
            self.ema.update(self.model, self.num_updates, keep=~skip)

        parts = [out["total"], out["recon"].mean(), out["kl"].mean(), out["spectral"], out["bn"], grad_norm, skip]
        kl_per_group = out["kl_per_group"].detach().float().mean(0)
        return torch.cat([torch.stack([p.detach().float() for p in parts]), kl_per_group])


def loss_dict(model: NVAE, x: Tensor, kl_weight: Tensor | float, reg_weight: Tensor | float,
              beta: float = 1.0) -> dict[str, Tensor]:
    """``model.loss`` without input checks, as a plain dict (what ``torch.compile`` and DDP handle best)."""
    out = model.loss(x, kl_weight=kl_weight, reg_weight=reg_weight, beta=beta, check_inputs=False)
    return {name: getattr(out, name) for name in ("total", "recon", "kl", "kl_per_group", "spectral", "bn")}
