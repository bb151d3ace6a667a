"""Images per second and peak memory of one full NVAE training step (forward, backward, regularisers,
optimizer step). Prints one JSON line.

    python bench/train_step.py --preset mnist --batch-size 16
    python bench/train_step.py --preset mnist-small --batch-size 64 --num-flows 1   # the cost of posterior flows
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from nvae_hub import NVAE, NVAEConfig


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist", choices=NVAEConfig.presets())
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    parser.add_argument("--num-flows", type=int, default=None, help="override the preset's num_flows")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = NVAEConfig.preset(args.preset)
    if args.num_flows is not None:
        config = config.replace(num_flows=args.num_flows)
    device = torch.device(args.device)
    model = NVAE(config).to(device).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3, eps=1e-3, weight_decay=3e-4)
    shape = (args.batch_size, config.channels, config.image_size, config.image_size)
    x = torch.rand(shape, device=device)
    if config.output == "bernoulli":
        x = x.bernoulli()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model.loss(x, kl_weight=0.5).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "num_flows": config.num_flows,
        "device": str(device),
        "bf16": args.bf16,
        "threads": torch.get_num_threads(),
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "seconds_per_step": round(seconds, 4),
        "images_per_second": round(args.batch_size / seconds, 2),
        "peak_memory_mb": round(
            torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb(), 1
        ),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
