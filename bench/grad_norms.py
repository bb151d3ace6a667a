"""Gradient norms of a short training run with the trainer's step and schedules, to set (and check) the clipping
and skipping thresholds. Prints one JSON line: percentiles of the gradient norm over the run and per tenth of
it, the loss at the start and the end, and how many updates were skipped.

    python bench/grad_norms.py --preset mnist-small --dataset mnist --batch-size 16 --steps 300
    python bench/grad_norms.py --preset mnist --dataset mnist --batch-size 200 --steps 300 --bf16 --device cuda

Clipping and skipping are off unless asked for (``--grad-clip``, ``--skip-threshold``), so that the norms are
the raw ones. The learning rate warms up as the trainer's does (``--lr-warmup-steps``, default the trainer's).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.data import DATASETS, binarize, build_dataset
from nvae_hub.schedules import (
    KL_CONSTANT_FRACTION,
    LR_WARMUP_STEPS,
    kl_warmup,
    learning_rate,
    reg_weight,
    warmup_length,
)
from nvae_hub.training import EMA, STAT_NAMES, Adamax, TrainStep, default_thresholds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist-small", choices=NVAEConfig.presets())
    parser.add_argument("--dataset", default="mnist", choices=DATASETS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300, help="length of the run (the schedules' max_steps)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lr-warmup", type=float, default=0.0125)
    parser.add_argument("--lr-warmup-steps", type=int, default=LR_WARMUP_STEPS)
    parser.add_argument("--kl-warmup", type=float, default=0.3)
    parser.add_argument("--grad-clip", default="0", help="a number (0: no clipping) or 'default' (the trainer's)")
    parser.add_argument("--skip-threshold", default="0",
                        help="a number (0: skip only non-finite norms) or 'default' (the trainer's)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = NVAEConfig.preset(args.preset)
    model = NVAE(cfg).to(device).train()
    optimizer = Adamax(model.parameters(), lr=args.lr, weight_decay=3e-4, eps=1e-3)
    default_clip, default_skip = default_thresholds(cfg)
    grad_clip = default_clip if args.grad_clip == "default" else float(args.grad_clip)
    skip_threshold = default_skip if args.skip_threshold == "default" else float(args.skip_threshold)
    step_fn = TrainStep(model, optimizer, EMA(model, 0.999), grad_clip=grad_clip, skip_threshold=skip_threshold,
                        autocast_dtype=torch.bfloat16 if args.bf16 else None)
    data = build_dataset(args.dataset, "train", data_dir=None, image_size=cfg.image_size, channels=cfg.channels,
                         seed=args.seed)
    order = np.random.default_rng(args.seed).permutation(len(data))
    warmup = warmup_length(args.steps, args.lr_warmup, args.lr_warmup_steps)
    kl_steps, kl_constant = round(args.kl_warmup * args.steps), round(KL_CONSTANT_FRACTION * args.steps)

    rows = []
    start = time.perf_counter()
    for step in range(args.steps):
        index = order[(step * args.batch_size + np.arange(args.batch_size)) % len(data)]
        x = torch.stack([data[int(i)] for i in index]).to(device)
        x = binarize(x) if cfg.output == "bernoulli" else x
        kl_weight = kl_warmup(step, kl_steps, kl_constant)
        rows.append(step_fn(x, kl_weight=kl_weight, reg_weight=reg_weight(kl_weight, cfg.reg_weight,
                                                                               cfg.reg_weight_init),
                            lr=learning_rate(step, args.steps, args.lr, 1e-4, warmup), num_updates=step + 1))
    stats = torch.stack(rows).cpu().numpy()
    seconds = time.perf_counter() - start
    column = {name: stats[:, i] for i, name in enumerate(STAT_NAMES)}
    norms = column["grad_norm"]
    finite = norms[np.isfinite(norms)]

    def percentiles(values: np.ndarray) -> dict[str, float]:
        if values.size == 0:
            return {}
        return {f"p{q}": round(float(np.percentile(values, q)), 2) for q in (50, 90, 99, 100)}

    tenth = max(1, args.steps // 10)
    result = {
        "preset": args.preset, "dataset": args.dataset, "batch_size": args.batch_size, "steps": args.steps,
        "bf16": args.bf16, "device": str(device), "lr": args.lr, "lr_warmup_steps": warmup,
        "grad_clip": grad_clip, "skip_threshold": skip_threshold,
        "grad_norm": percentiles(finite),
        "grad_norm_per_tenth": [percentiles(finite_part) for part in np.array_split(norms, 10)
                                if (finite_part := part[np.isfinite(part)]).size],
        "nonfinite_norms": int((~np.isfinite(norms)).sum()),
        "skipped_updates": int(column["skipped"].sum()),
        "loss_first_tenth": round(float(np.nanmean(column["loss"][:tenth])), 2),
        "loss_last_tenth": round(float(np.nanmean(column["loss"][-tenth:])), 2),
        "elbo_last_tenth": round(float(np.nanmean(column["recon"][-tenth:] + column["kl"][-tenth:])), 2),
        "seconds": round(seconds, 1),
        "torch": torch.__version__, "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
