"""Images per second and peak memory of the trainer's training step (nvae_hub.training.TrainStep: forward, backward,
regularisers, clipping, the skip decision, Adamax and the EMA update), eager or compiled, fp32 or bf16 autocast,
at one or more batch sizes. Prints one JSON object.

    python bench/train_step.py --preset mnist --batch-size 16
    python bench/train_step.py --preset mnist-small --batch-size 64 --num-flows 1   # the cost of posterior flows
    python bench/train_step.py --preset mnist --device cuda --batch-size 16 200 --precision fp32 bf16 \\
        --compile none default
    python bench/train_step.py --preset mnist --device cuda --batch-size 200 --layout channels_last nchw
    python bench/train_step.py --preset mnist --device cuda --batch-size 16 200 --compile none cuda-graph --warmup 4

Each configuration gets a fresh model (seed 0) and random binary or 8-bit images; ``--warmup`` untimed steps
come first (with ``--compile`` they include the compilation, reported as ``warmup_seconds``). ``--compile
cuda-graph`` compiles nothing: the eager step is captured whole as one CUDA graph (``TrainStep(cuda_graph=True)``)
at the last warm-up step, and the timed steps replay it.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.training import EMA, Adamax, TrainStep, loss_dict

# isort: split
# A module next to this script: Python puts the script's folder (bench/) first on sys.path.
from timing import add_timing_options, chosen_device, machine, time_steps

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "cuda-graph")
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}  # NVAE.memory_format


def measure(config: NVAEConfig, device: torch.device, batch_size: int, precision: str, compile_mode: str,
            layout: str, steps: int, warmup: int) -> dict[str, object]:
    """Time ``steps`` training steps of a fresh model after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = NVAE(config).to(device).train()
    model.memory_format = LAYOUTS[layout]
    optimizer = Adamax(model.parameters(), lr=1e-3, eps=1e-3, weight_decay=3e-4)

    def loss_fn(x: torch.Tensor, kl_weight: torch.Tensor, reg_weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return loss_dict(model, x, kl_weight, reg_weight)

    if compile_mode not in ("none", "cuda-graph"):
        loss_fn = torch.compile(loss_fn, fullgraph=True, mode=None if compile_mode == "default" else compile_mode)
    graph = compile_mode == "cuda-graph"  # warm-up steps before the capture, which is the last warm-up step
    step = TrainStep(model, optimizer, EMA(model, 0.999), grad_clip=200.0, skip_threshold=0.0, loss_fn=loss_fn,
                     autocast_dtype=torch.bfloat16 if precision == "bf16" else None, cuda_graph=graph,
                     graph_warmup=warmup - 1)
    shape = (batch_size, config.channels, config.image_size, config.image_size)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    x = x.bernoulli() if config.output == "bernoulli" else x

    def run(n: int) -> torch.Tensor:
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return step(x, kl_weight=0.5, reg_weight=config.reg_weight, lr=1e-3, num_updates=n)

    timings, _ = time_steps(run, device, batch_size, steps, warmup)
    if graph:  # the replays allocate almost nothing: the graph's memory was set aside at the capture
        timings["peak_memory_note"] = "leaves out the CUDA graph's memory pool, allocated at the capture"
    return {"batch_size": batch_size, "precision": precision, "compile": compile_mode, "layout": layout, **timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist", choices=NVAEConfig.presets())
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--bf16", action="store_true", help="the same as --precision bf16")
    parser.add_argument("--num-flows", type=int, default=None, help="override the preset's num_flows")
    parser.add_argument("--compile", nargs="+", default=["none"], choices=COMPILE_MODES,
                        help="torch.compile mode(s) of the loss (forward and backward); none: eager")
    parser.add_argument("--layout", nargs="+", default=["channels_last"], choices=list(LAYOUTS),
                        help="layout(s) of the activations (NVAE.memory_format; default: channels_last)")
    add_timing_options(parser)
    args = parser.parse_args()
    if "cuda-graph" in args.compile and args.warmup < 2:
        parser.error("--compile cuda-graph needs --warmup 2 or more: eager steps, then the capture")

    device = chosen_device(args)
    config = NVAEConfig.preset(args.preset)
    if args.num_flows is not None:
        config = config.replace(num_flows=args.num_flows)
    precisions = ["bf16"] if args.bf16 else args.precision
    results = []
    for compile_mode, layout, precision, batch_size in itertools.product(args.compile, args.layout, precisions,
                                                                          args.batch_size):
        results.append(measure(config, device, batch_size, precision, compile_mode, layout, args.steps,
                               args.warmup))
    print(json.dumps({
        "benchmark": "train_step",
        "preset": args.preset,
        "num_flows": config.num_flows,
        "params_millions": round(sum(p.numel() for p in NVAE(config).parameters()) / 1e6, 2),
        "steps": args.steps,
        "results": results,
        **machine(device),
    }))


if __name__ == "__main__":
    main()
