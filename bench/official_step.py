"""Images per second and peak memory of one training step of the OFFICIAL NVAE code (NVlabs/NVAE) in its MNIST
configuration, for a side-by-side comparison with ``bench/train_step.py`` (same CLI, same JSON line).

    python bench/official_step.py --official /path/to/NVAE --device cpu --batch-size 4 --steps 2 --warmup 1
    python bench/official_step.py --official /path/to/NVAE --device cuda --batch-size 16 200 --precision fp32 fp16 bf16

The official code is under NVIDIA's research-only license, so nothing of it is copied here: ``--official`` names an
unmodified checkout of https://github.com/NVlabs/NVAE and its modules (``model``, ``utils``, ``thirdparty``) are
imported from there through ``sys.path``. Its ``train.py`` is not imported (it pulls in the data sets, FID and
Inception); the step below follows its ``train()`` loop line by line instead:

    zero_grad -> autocast(model(x) -> decoder_output -> utils.reconstruction_loss (Bernoulli, cropped to 28x28)
    -> utils.kl_balancer(kl_all, kl_coeff, kl_balance=True, alpha_i=utils.kl_balancer_coeff(..., 'square'))
    -> mean nelbo + (spectral_norm_parallel() + batchnorm_loss()) * weight_decay_norm)
    -> GradScaler(2**10).scale(loss).backward() -> utils.average_gradients (a no-op on one process)
    -> scaler.step(Adamax) -> scaler.update()

Configuration: the README's MNIST command (batch 200 per GPU on 2 GPUs, num_latent_scales 2, num_groups_per_scale
10, num_postprocess_cells 3, num_preprocess_cells 3, num_cell_per_cond_enc 2, num_cell_per_cond_dec 2,
num_latent_per_group 20, num_preprocess_blocks 2, num_postprocess_blocks 2, weight_decay_norm 1e-2,
num_channels_enc 32, num_channels_dec 32, num_nf 0, ada_groups, use_se, res_dist, fast_adamax) with train.py's
defaults for the rest (arch_instance res_mbconv, learning_rate 1e-2, weight_decay 3e-4, num_x_bits 8, 400 epochs,
5 warm-up epochs, kl_anneal_portion 0.3, kl_const_portion 1e-4, kl_const_coeff 1e-4). The step is taken at the end
of the learning-rate warm-up: MNIST's 60000 images at 200 x 2 per step give 150 steps per epoch, so global_step =
750 of 60000, learning rate 1e-2 and KL coefficient utils.kl_coeff(750, 18000, 6, 1e-4) = 0.0413 (KL balancing is
on, as it is whenever that coefficient is below 1). Inputs are random binary 1x32x32 images (the official pads MNIST
to 32x32 and binarises it dynamically).

Precisions: ``fp16`` is what the official trains with (``torch.cuda.amp.autocast()`` and ``GradScaler(2**10)``);
``fp32`` runs without autocast and ``bf16`` with a bfloat16 autocast, both with the scaler disabled (a pass-through).

What is shimmed, at import time or before the step, without editing any official file:

* ``tensorboardX``: ``utils.py`` imports ``SummaryWriter`` from it at module level; a stub module with a dummy
  ``SummaryWriter`` is put in ``sys.modules`` when tensorboardX is not installed (no writer is ever created: the
  model gets ``writer=None``, which it only stores).
* ``torch.distributed``: the official always runs inside ``init_process_group`` (``init_processes`` in train.py, even
  for one GPU) and its ``SyncBatchNormSwish.forward`` calls ``torch.distributed.get_world_size()``. A real
  single-process ``gloo`` group over an in-memory ``HashStore`` is initialised, so the world size is 1 and the layer
  takes its own non-synchronised branch (``F.batch_norm`` then its Swish), as on one GPU.
* CPU only: ``SyncBatchNormSwish.forward`` refuses non-CUDA inputs, so on ``--device cpu`` it is replaced by that same
  non-synchronised branch (batch norm with ``num_batches_tracked`` counting, then the official ``thirdparty.swish``
  Function); and ``torch.Tensor.cuda`` is made a no-op because the official creates the spectral-norm power-iteration
  vectors and the KL-balancing coefficients with hard ``.cuda()`` calls. Neither patch is applied on CUDA.
* Optimizer: the official ``thirdparty.adamax.Adamax`` (``--fast_adamax``, TorchScript) when it imports and runs,
  else ``torch.optim.Adamax`` with the same arguments; the JSON says which ("optimizer").

Nothing else is changed: the model, distributions, losses and optimizer are the official code as checked out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# isort: split
# A module next to this script: Python puts the script's folder (bench/) first on sys.path.
from timing import add_timing_options, chosen_device, machine, time_steps

# The README's MNIST command, with train.py's defaults for the options it leaves out.
OFFICIAL_MNIST_ARGS: dict[str, Any] = dict(
    dataset="mnist", batch_size=200, epochs=400, warmup_epochs=5, num_latent_scales=2, num_groups_per_scale=10,
    min_groups_per_scale=1, num_postprocess_cells=3, num_preprocess_cells=3, num_cell_per_cond_enc=2,
    num_cell_per_cond_dec=2, num_latent_per_group=20, num_preprocess_blocks=2, num_postprocess_blocks=2,
    weight_decay_norm=1e-2, weight_decay_norm_init=10.0, weight_decay_norm_anneal=False, num_channels_enc=32,
    num_channels_dec=32, num_nf=0, ada_groups=True, use_se=True, res_dist=True, fast_adamax=True,
    arch_instance="res_mbconv", learning_rate=1e-2, learning_rate_min=1e-4, weight_decay=3e-4, num_x_bits=8,
    kl_anneal_portion=0.3, kl_const_portion=1e-4, kl_const_coeff=1e-4, num_mixture_dec=10, num_process_per_node=2,
    distributed=False, seed=1,
)
MNIST_TRAIN_IMAGES = 60000


def official_commit(official: Path) -> str | None:
    """The checkout's commit when it is a git work tree (a ``git archive`` export has none)."""
    try:
        result = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    # A plain folder inside another repository would report that repository's commit.
    top = subprocess.run(["git", "-C", str(official), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    return commit if Path(top.stdout.strip()).resolve() == official.resolve() else None


def import_official(official: Path, device: torch.device) -> dict[str, types.ModuleType]:
    """Import the official ``model``, ``utils``, ``thirdparty.adamax`` and the batch-norm module with the shims that
    the module docstring lists."""
    if not (official / "model.py").is_file() or not (official / "thirdparty" / "adamax.py").is_file():
        raise SystemExit(f"{official} is not a checkout of NVlabs/NVAE (no model.py / thirdparty/adamax.py)")
    try:
        importlib.import_module("tensorboardX")
    except ImportError:
        stub = types.ModuleType("tensorboardX")

        class SummaryWriter:  # never instantiated: the model gets writer=None
            def __init__(self, *args: object, **kwargs: object) -> None:
                pass

        stub.SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
        sys.modules["tensorboardX"] = stub
    sys.path.insert(0, str(official))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript and deprecation warnings of 2020 code on today's torch
        modules = {name: importlib.import_module(name) for name in
                   ("utils", "model", "thirdparty.adamax", "thirdparty.inplaced_sync_batchnorm", "thirdparty.swish")}

    if device.type == "cuda" and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    if device.type == "cpu":
        batchnorm = modules["thirdparty.inplaced_sync_batchnorm"]
        swish = modules["thirdparty.swish"].Swish

        def forward_one_process(self: Any, input: torch.Tensor) -> torch.Tensor:
            # SyncBatchNormSwish.forward's own branch for a world size of 1, without its CUDA-only check.
            momentum = 0.0 if self.momentum is None else self.momentum
            if self.training and self.track_running_stats:
                self.num_batches_tracked = self.num_batches_tracked + 1
                if self.momentum is None:
                    momentum = 1.0 / self.num_batches_tracked.item()
            out = F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               self.training or not self.track_running_stats, momentum, self.eps)
            return swish.apply(out)

        batchnorm.SyncBatchNormSwish.forward = forward_one_process
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    return modules


def make_optimizer(modules: dict[str, types.ModuleType], model: torch.nn.Module, args: argparse.Namespace,
                   device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The official fast Adamax if it works here (TorchScript of 2020 on today's torch), else torch.optim.Adamax."""
    kwargs = dict(weight_decay=args.weight_decay, eps=1e-3)
    try:
        probe = torch.nn.Parameter(torch.ones(3, device=device))
        probe.grad = torch.ones(3, device=device)
        modules["thirdparty.adamax"].Adamax([probe], args.learning_rate, **kwargs).step()
        return modules["thirdparty.adamax"].Adamax(model.parameters(), args.learning_rate, **kwargs), \
            "official thirdparty.adamax.Adamax"
    except Exception as error:  # any failure of the 2020 TorchScript optimizer means the fallback
        print(f"official fast Adamax unusable ({type(error).__name__}: {error}); using torch.optim.Adamax",
              file=sys.stderr)
        return torch.optim.Adamax(model.parameters(), args.learning_rate, **kwargs), "torch.optim.Adamax"


def official_args() -> argparse.Namespace:
    args = argparse.Namespace(**OFFICIAL_MNIST_ARGS)
    steps_per_epoch = MNIST_TRAIN_IMAGES // (args.batch_size * args.num_process_per_node)
    args.num_total_iter = steps_per_epoch * args.epochs
    args.global_step = steps_per_epoch * args.warmup_epochs  # the end of the learning-rate warm-up
    return args


def build_model(modules: dict[str, types.ModuleType], args: argparse.Namespace,
                device: torch.device) -> torch.nn.Module:
    utils, model = modules["utils"], modules["model"]
    # the constructor prints layer counts: keep stdout for the JSON line
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        return model.AutoEncoder(args, None, utils.get_arch_cells(args.arch_instance)).to(device)


def count_parameters(model: torch.nn.Module) -> int:
    """As utils.count_parameters_in_M (which excludes "auxiliary" parameters), in units."""
    return sum(p.numel() for name, p in model.named_parameters() if "auxiliary" not in name)


def measure(modules: dict[str, types.ModuleType], device: torch.device, batch_size: int, precision: str, steps: int,
            warmup: int) -> tuple[dict[str, object], int]:
    """Time ``steps`` official training steps of a fresh model after ``warmup`` untimed ones; return the timings
    and the model's parameter count."""
    utils = modules["utils"]
    args = official_args()
    torch.manual_seed(args.seed)
    model = build_model(modules, args, device)
    optimizer, optimizer_name = make_optimizer(modules, model, args, device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2**10, enabled=precision == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    alpha_i = utils.kl_balancer_coeff(num_scales=model.num_latent_scales, groups_per_scale=model.groups_per_scale,
                                      fun="square").to(device)
    kl_coeff = utils.kl_coeff(args.global_step, args.kl_anneal_portion * args.num_total_iter,
                              args.kl_const_portion * args.num_total_iter, args.kl_const_coeff)
    x = torch.rand((batch_size, 1, 32, 32), generator=torch.Generator().manual_seed(0)).bernoulli().to(device)
    x = utils.pre_process(x, args.num_x_bits)
    model.train()

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, _log_q, _log_p, kl_all, _kl_diag = model(x)
            output = model.decoder_output(logits)
            recon_loss = utils.reconstruction_loss(output, x, crop=model.crop_output)
            balanced_kl, _kl_coeffs, _kl_vals = utils.kl_balancer(kl_all, kl_coeff, kl_balance=True, alpha_i=alpha_i)
            loss = torch.mean(recon_loss + balanced_kl)
            norm_loss = model.spectral_norm_parallel()
            bn_loss = model.batchnorm_loss()
            loss = loss + norm_loss * args.weight_decay_norm + bn_loss * args.weight_decay_norm
        scaler.scale(loss).backward()
        utils.average_gradients(model.parameters(), args.distributed)
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    timings, losses = time_steps(lambda n: step(), device, batch_size, steps, warmup)
    result = {
        "batch_size": batch_size,
        "precision": precision,
        "compile": "none",
        **timings,
        "loss": round(float(losses[-1]), 3),
        "kl_coeff": round(kl_coeff, 5),
        "optimizer": optimizer_name,
        "grad_scale": scaler.get_scale() if scaler.is_enabled() else None,
    }
    return result, count_parameters(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="an unmodified checkout of NVlabs/NVAE")
    parser.add_argument("--official-commit", default=None,
                        help="the checkout's commit, for the JSON (found by git when --official is a git work tree)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"])
    add_timing_options(parser)
    args = parser.parse_args()

    device = chosen_device(args)
    official = args.official.resolve()
    modules = import_official(official, device)
    measured = [measure(modules, device, batch_size, precision, args.steps, args.warmup)
                for precision, batch_size in itertools.product(args.precision, args.batch_size)]
    results = [result for result, _ in measured]
    parameters = measured[0][1]  # the same model every time
    print(json.dumps({
        "benchmark": "train_step",
        "implementation": "official",
        "preset": "mnist",
        "num_flows": OFFICIAL_MNIST_ARGS["num_nf"],
        "params_millions": round(parameters / 1e6, 2),
        "params": parameters,
        "official_commit": args.official_commit or official_commit(official),
        "official_args": OFFICIAL_MNIST_ARGS,
        "steps": args.steps,
        "results": results,
        **machine(device),
    }))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
