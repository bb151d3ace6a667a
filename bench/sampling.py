"""Sampling speed of PyTorch eager (``NVAE.decode_noise``) against onnxruntime (``decoder.onnx``): images per
second and median latency at each batch size, on the same noise. Prints one JSON line.

    python bench/sampling.py --model mnist
    python bench/sampling.py --preset mnist-small --batch-sizes 1 64 --repeats 20

Without ``--export-dir`` the model is first exported to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.export import export_onnx
from nvae_hub.onnx import OnnxNVAE


def median_seconds(runs: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall-clock seconds of each run over ``repeats`` calls, after ``warmup`` untimed ones. The runs
    take turns, so that load from other processes on a shared machine affects them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def load_model(args: argparse.Namespace) -> NVAE:
    """The pretrained model named by ``--model``, or a randomly initialised ``--preset``; eval mode, CPU."""
    if args.model is not None:
        from nvae_hub.hub import load_pretrained

        return load_pretrained(args.model)
    torch.manual_seed(0)
    return NVAE(NVAEConfig.preset(args.preset)).eval()


def bench(model: NVAE, runtime: OnnxNVAE, batch_sizes: list[int], repeats: int, warmup: int) -> dict[str, object]:
    """Time both runtimes at each batch size; also report how far apart their images are."""
    results: dict[str, dict[str, dict[str, float]]] = {"pytorch_eager": {}, "onnxruntime": {}}
    max_abs_diff = {}
    for batch in batch_sizes:
        noise = model.sample_noise(batch, seed=0)
        noise_np = [z.numpy() for z in noise]

        def eager(noise: list[torch.Tensor] = noise) -> torch.Tensor:
            with torch.inference_mode():
                return model.decode_noise(noise, 1.0)

        def onnx(noise_np: list[np.ndarray] = noise_np) -> np.ndarray:
            return runtime.decode_noise(noise_np, 1.0)

        medians = median_seconds({"pytorch_eager": eager, "onnxruntime": onnx}, repeats, warmup)
        for name, seconds in medians.items():
            results[name][str(batch)] = {
                "median_latency_ms": round(seconds * 1e3, 3),
                "images_per_second": round(batch / seconds, 1),
            }
        max_abs_diff[str(batch)] = float(np.abs(eager().numpy() - onnx()).max())
    speedup = {
        str(batch): round(results["pytorch_eager"][str(batch)]["median_latency_ms"]
                          / results["onnxruntime"][str(batch)]["median_latency_ms"], 2)
        for batch in batch_sizes
    }
    return {**results, "onnxruntime_speedup": speedup, "max_abs_diff": max_abs_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a pretrained model: local folder, bundled name or Hub repo id")
    which.add_argument("--preset", choices=NVAEConfig.presets(), help="a preset with random weights")
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="an existing export of the same model (default: export to a temporary directory)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per batch size and runtime")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both PyTorch and onnxruntime (default: each library's own choice)")
    args = parser.parse_args()
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = args.export_dir
        if export_dir is None:
            export_dir = Path(tmp)
            export_onnx(model, export_dir, source=args.model or f"preset:{args.preset}")
        runtime = OnnxNVAE(export_dir, num_threads=args.threads)
        timings = bench(model, runtime, args.batch_sizes, args.repeats, args.warmup)

    result = {
        "model": args.model or f"preset:{args.preset}",
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "repeats": args.repeats,
        **timings,
        "onnxruntime_provider": runtime.provider,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": args.threads or "default",
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
