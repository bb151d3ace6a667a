"""The building blocks of NVAE: weight-normalised convolutions and the residual cells.

Encoder side: residual cells of two BN-Swish-Conv 3x3 layers. Decoder side: MobileNet-style cells
(BN, 1x1 expand, BN-Swish, depthwise 5x5, BN-Swish, 1x1 project, BN). Every cell ends with
squeeze-and-excitation and is added to its skip path with a 0.1 scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_MOMENTUM = 0.05
BN_EPS = 1e-5
WEIGHT_NORM_EPS = 1e-5  # w = exp(g) v / (||v|| + WEIGHT_NORM_EPS), as in the official code


class Conv2d(nn.Conv2d):
    """A convolution with optional weight normalisation, w = exp(log_gain) * v / ||v||.

    Every convolution also keeps the left and right singular-vector estimates (``sr_u``, ``sr_v``) of its
    weight matrix as buffers, for the spectral regulariser; they are saved and loaded with the weights.
    An optional 0/1 ``mask`` of the weight's shape (the masked convolutions of ``nvae_hub.flows``) multiplies
    the weight before it is normalised; it is a non-persistent buffer, so it follows the module to any device
    and is not part of the saved weights.

    Inside ``given_weights`` the convolution uses a weight computed beforehand (``normalised_weights`` computes
    those of many convolutions together) instead of normalising its own.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        weight_norm: bool = True,
        mask: Tensor | None = None,
    ) -> None:
        super().__init__(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=bias)
        if mask is not None and mask.shape != self.weight.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} for a weight of shape {tuple(self.weight.shape)}")
        self.register_buffer("mask", None if mask is None else mask.to(self.weight), persistent=False)
        if weight_norm:
            norm = self.masked_weight().detach().flatten(1).norm(dim=1)
            self.log_gain = nn.Parameter(torch.log(norm + 1e-2))
        else:
            self.register_parameter("log_gain", None)
        rows, cols = self.weight.shape[0], self.weight[0].numel()
        self.register_buffer("sr_u", F.normalize(torch.randn(rows), dim=0, eps=1e-3))
        self.register_buffer("sr_v", F.normalize(torch.randn(cols), dim=0, eps=1e-3))
        self.given_weight: Tensor | None = None

    def masked_weight(self) -> Tensor:
        """The raw weight, times the mask if there is one."""
        return self.weight if self.mask is None else self.weight * self.mask

    def effective_weight(self) -> Tensor:
        """The weight actually used: the (masked) weight, normalised under weight normalisation."""
        weight = self.masked_weight()
        return weight if self.log_gain is None else weight_norm(weight, self.log_gain)

    def fold_weight_norm(self) -> None:
        """Replace (v, log_gain) by the plain weight they define (for export and fast inference)."""
        if self.log_gain is not None:
            with torch.no_grad():
                self.weight.copy_(self.effective_weight())
            self.log_gain = None

    def forward(self, x: Tensor) -> Tensor:
        weight = self.effective_weight() if self.given_weight is None else self.given_weight
        return self._conv_forward(x, weight, self.bias)


def weight_norm(v: Tensor, log_gain: Tensor) -> Tensor:
    """NVAE's weight normalisation, w = exp(log_gain) v / (||v|| + 1e-5), the norm over each output channel's
    weights. ``v`` is (..., out, in, kh, kw) and ``log_gain`` (..., out), so that one call can normalise a stack of
    weights of one shape. Its backward is written out (``WeightNorm``); without gradients it is computed directly."""
    if torch.is_grad_enabled() and (v.requires_grad or log_gain.requires_grad):
        return WeightNorm.apply(v, log_gain)[0]
    return v * _norm_and_scale(v, log_gain)[1][..., None, None, None]


def _norm_and_scale(v: Tensor, log_gain: Tensor) -> tuple[Tensor, Tensor]:
    """||v|| and exp(log_gain) / (||v|| + eps), per output channel."""
    norm = v.flatten(-3).norm(dim=-1)
    return norm, torch.exp(log_gain) / (norm + WEIGHT_NORM_EPS)


class WeightNorm(torch.autograd.Function):
    """``weight_norm`` with its backward written out: with d = <dw, v> and s = exp(g) / (||v|| + eps) per output
    channel,

        dg = s d,     dv = s dw - s d / ((||v|| + eps) ||v||) v

    Two passes over the weights where autograd makes about ten, and nothing weight-sized kept: the ``mnist``
    preset's weights, forward and backward on a CPU (one thread), take about 300 ms against autograd's 420-480.
    ``apply`` returns (w, ||v||, s); the last two are kept for the backward pass (the form that torch.func's
    transforms and torch.compile accept) and have no gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(v: Tensor, log_gain: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        norm, scale = _norm_and_scale(v, log_gain)
        return v * scale[..., None, None, None], norm, scale

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: tuple[Tensor, Tensor, Tensor]) -> None:
        _, norm, scale = output
        ctx.mark_non_differentiable(norm, scale)
        ctx.set_materialize_grads(False)  # no zero gradients made for those two
        ctx.save_for_backward(inputs[0], norm, scale)

    @staticmethod
    def backward(ctx: Any, grad_w: Tensor | None, _grad_norm: None, _grad_scale: None
                 ) -> tuple[Tensor | None, Tensor | None]:
        if grad_w is None:  # only the outputs without gradient were used
            return None, None
        v, norm, scale = ctx.saved_tensors
        dot = (grad_w * v).flatten(-3).sum(dim=-1)
        # a zero row of v has dot 0: the clamp only keeps 0 / 0 out
        coefficient = dot * scale / ((norm + WEIGHT_NORM_EPS) * norm.clamp_min(1e-20))
        grad_v = grad_w * scale[..., None, None, None] - v * coefficient[..., None, None, None]
        return grad_v, dot * scale


def normalised_weights(convs: Sequence[Conv2d], stack: bool | None = None) -> list[Tensor]:
    """The weights that ``convs`` use (each one's ``effective_weight``), in order.

    With ``stack`` the weight normalisation of all the convolutions of one weight shape runs together, on a stack of
    their weights: fewer kernel launches, which bound a GPU training step (a step of ``mnist`` has 150
    weight-normalised convolutions, of 21 shapes). By default it stacks on GPUs and not on a CPU, where one
    convolution at a time is faster (the ``mnist`` preset's weights, forward and backward, one thread: about 300 ms
    one at a time, 520-630 ms in stacks; large stacks fall out of the caches).
    """
    if stack is None:
        stack = len(convs) > 0 and convs[0].weight.device.type != "cpu"  # (dynamo 2.11 cannot trace bool(list))
    if not stack:
        return [conv.effective_weight() for conv in convs]
    weights: list[Tensor | None] = [None] * len(convs)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, conv in enumerate(convs):
        if conv.log_gain is None:
            weights[i] = conv.masked_weight()
        else:
            by_shape.setdefault(tuple(conv.weight.shape), []).append(i)
    for indices in by_shape.values():
        v = torch.stack([convs[i].masked_weight() for i in indices])
        log_gain = torch.stack([convs[i].log_gain for i in indices])
        for i, weight in zip(indices, weight_norm(v, log_gain).unbind(0), strict=True):
            weights[i] = weight
    return weights  # type: ignore[return-value]  # every entry is set


@contextmanager
def given_weights(convs: Sequence[Conv2d], weights: Sequence[Tensor]) -> Iterator[None]:
    """Inside the block, each convolution of ``convs`` uses the matching tensor of ``weights`` (computed once,
    e.g. by ``normalised_weights``) as its weight; afterwards each computes its own again."""
    for conv, weight in zip(convs, weights, strict=True):
        conv.given_weight = weight
    try:
        yield
    finally:
        for conv in convs:
            conv.given_weight = None


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with NVAE's momentum."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class BNSwishConv(nn.Sequential):
    """BatchNorm, Swish, (nearest up-sampling,) 3x3 weight-normalised convolution."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        layers: list[nn.Module] = [batch_norm(c_in), nn.SiLU()]
        if stride == -1:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers.append(Conv2d(c_in, c_out, 3, stride=max(stride, 1), padding=1))
        super().__init__(*layers)


class MBConv(nn.Sequential):
    """MobileNet-v2 inverted residual: BN, 1x1 expand, BN-Swish, depthwise 5x5, BN-Swish, 1x1 project, BN."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if stride == -1:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [
            batch_norm(c_in),
            Conv2d(c_in, hidden, 1, bias=False, weight_norm=False),
            batch_norm(hidden),
            nn.SiLU(),
            Conv2d(hidden, hidden, 5, padding=2, groups=hidden, bias=False, weight_norm=False),
            batch_norm(hidden),
            nn.SiLU(),
            Conv2d(hidden, c_out, 1, bias=False, weight_norm=False),
            batch_norm(c_out),
        ]
        super().__init__(*layers)


class FactorizedReduce(nn.Module):
    """Down-sampling skip path: Swish, then four strided 1x1 convolutions on shifted grids, concatenated."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        quarter = c_out // 4
        sizes = [quarter, quarter, quarter, c_out - 3 * quarter]
        self.convs = nn.ModuleList(Conv2d(c_in, size, 1, stride=2) for size in sizes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.silu(x)
        shifted = [x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :]]
        return torch.cat([conv(part) for conv, part in zip(self.convs, shifted, strict=True)], dim=1)


class UpsampleSkip(nn.Sequential):
    """Up-sampling skip path: bilinear x2, then a 1x1 convolution that halves the channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), Conv2d(c_in, c_out, 1))


class Cell(nn.Module):
    """A residual cell: ``skip(x) + 0.1 * SE(ops(x))``.

    ``kind`` is 'residual' (encoder: two BN-Swish-Conv) or 'mbconv6' / 'mbconv3' (decoder / post-processing);
    ``stride`` is 1 (same size), 2 (down-sample, channels doubled) or -1 (up-sample, channels halved).
    """

    def __init__(self, channels: int, kind: str, stride: int = 1, use_se: bool = True) -> None:
        super().__init__()
        c_out = {1: channels, 2: 2 * channels, -1: channels // 2}[stride]
        if stride == 1:
            self.skip: nn.Module = nn.Identity()
        elif stride == 2:
            self.skip = FactorizedReduce(channels, c_out)
        else:
            self.skip = UpsampleSkip(channels, c_out)
        if kind == "residual":
            self.ops: nn.Module = nn.Sequential(BNSwishConv(channels, c_out, stride), BNSwishConv(c_out, c_out, 1))
        elif kind in ("mbconv6", "mbconv3"):
            self.ops = MBConv(channels, c_out, stride, expand=int(kind[-1]))
        else:
            raise ValueError(f"unknown cell kind {kind!r}")
        self.se = SqueezeExcite(c_out) if use_se else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + 0.1 * self.se(self.ops(x))


def spectral_loss(convs: list[Conv2d], weights: Sequence[Tensor], iterations: int, update: bool) -> Tensor:
    """Sum of the largest singular values of the weight matrices ``weights`` of ``convs`` (the paper's L_SR).

    Weights of the same shape are stacked so that each power iteration is one batched matmul. The weights are
    those the forward pass used (``normalised_weights``), so that they are not computed twice.
    With ``update`` the singular-vector buffers take ``iterations`` more power-iteration steps first. It all
    runs in float32, also under autocast: in bfloat16 the power iteration does not converge but jitters from step
    to step (measured on ``mnist-small`` at initialisation: the sum of the estimates moves by about 0.1% per
    step, at times above the true value, and singular-vector entries differ from float32's by up to 0.013).
    """
    with torch.autocast(convs[0].weight.device.type, enabled=False):
        return _spectral_loss(convs, weights, iterations, update)


def _spectral_loss(convs: list[Conv2d], weights: Sequence[Tensor], iterations: int, update: bool) -> Tensor:
    by_shape: dict[tuple[int, ...], list[tuple[Conv2d, Tensor]]] = {}
    for conv, weight in zip(convs, weights, strict=True):
        by_shape.setdefault(tuple(conv.weight.shape), []).append((conv, weight))
    total = convs[0].weight.new_zeros(())
    for pairs in by_shape.values():
        group = [conv for conv, _ in pairs]
        w = torch.stack([weight.flatten(1) for _, weight in pairs])  # K, rows, cols
        u = torch.stack([conv.sr_u for conv in group])
        v = torch.stack([conv.sr_v for conv in group])
        if update:
            with torch.no_grad():
                w_detached = w.detach().float()
                for _ in range(iterations):
                    v = F.normalize(torch.bmm(u.unsqueeze(1), w_detached).squeeze(1), dim=1, eps=1e-3)
                    u = F.normalize(torch.bmm(w_detached, v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-3)
                # one multi-tensor copy per list rather than two copies per convolution (launches, on a GPU)
                torch._foreach_copy_([conv.sr_u for conv in group], list(u.unbind(0)))
                torch._foreach_copy_([conv.sr_v for conv in group], list(v.unbind(0)))
        sigma = torch.bmm(u.unsqueeze(1), torch.bmm(w, v.unsqueeze(2)))
        total = total + sigma.sum()
    return total


def batchnorm_loss(norms: list[nn.BatchNorm2d]) -> Tensor:
    """Sum over BatchNorm layers of the largest |scale| (the paper's BN regulariser)."""
    return torch.stack([bn.weight.abs().max() for bn in norms]).sum()
