"""Sampling speed of PyTorch (``NVAE.decode_noise``, eager and, with ``--compile``, ``torch.compile``d: CUDA graphs
on a GPU; ``sample_compiled`` is the whole ``NVAE.sample(..., compile=True)`` call) against onnxruntime
(``decoder.onnx``, CPU provider): images per second and median latency at each batch size, on the same noise.
Prints one JSON line.

    python bench/sampling.py --model mnist
    python bench/sampling.py --preset mnist-small --batch-sizes 1 64 --repeats 20
    python bench/sampling.py --preset mnist --device cuda --compile --no-onnx --batch-sizes 1 64

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
import torch

from nvae_hub import NVAE, NVAEConfig

# isort: split
# A module next to this script: Python puts the script's folder (bench/) first on sys.path.
from timing import exclusive


def median_seconds(runs: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall-clock seconds of each run over ``repeats`` calls, after ``warmup`` untimed ones. The runs
    take turns, so that load from other processes on a shared machine affects them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    with exclusive():  # a no-op unless bench/gpu_check.py --together runs other jobs beside this one
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def load_model(args: argparse.Namespace) -> NVAE:
    """The pretrained model named by ``--model``, or a randomly initialised ``--preset``; eval mode."""
    if args.model is not None:
        from nvae_hub.hub import load_pretrained

        return load_pretrained(args.model, device=args.device)
    torch.manual_seed(0)
    return NVAE(NVAEConfig.preset(args.preset)).to(args.device).eval()


def bench(model: NVAE, runtime: object | None, batch_sizes: list[int], repeats: int, warmup: int,
          compile: bool) -> dict[str, object]:
    """Time every runtime at each batch size; also report how far the others' images are from eager PyTorch."""
    names = (["pytorch_eager"] + ["pytorch_compiled", "sample_compiled"] * compile
             + ["onnxruntime"] * (runtime is not None))
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
    max_abs_diff: dict[str, dict[str, float]] = {name: {} for name in names[1:]}
    compile_seconds: dict[str, float] = {}
    temperatures = torch.ones(model.num_groups, device=model.device)
    decoder = model.compiled_decoder() if compile else None

    def synchronized(run: Callable[[], object]) -> Callable[[], np.ndarray]:
        def timed() -> np.ndarray:
            out = run()
            if isinstance(out, torch.Tensor):
                out = out.cpu().numpy()  # waits for the device, as a user reading the images would
            return out
        return timed

    for batch in batch_sizes:
        noise = model.sample_noise(batch, seed=0)
        runs: dict[str, Callable[[], np.ndarray]] = {}
        runs["pytorch_eager"] = synchronized(lambda noise=noise: model.decode_noise(noise, 1.0))
        if decoder is not None:
            start = time.perf_counter()
            with torch.inference_mode():
                decoder(noise, temperatures)
            compile_seconds[str(batch)] = round(time.perf_counter() - start, 1)
            runs["pytorch_compiled"] = synchronized(lambda noise=noise, decoder=decoder: decoder(noise, temperatures))
            # the whole public call: noise drawn on the CPU and moved, eval mode, the compiled decoder, a copy out
            runs["sample_compiled"] = synchronized(lambda batch=batch: model.sample(batch, 1.0, seed=0, compile=True))
        if runtime is not None:
            noise_np = [z.cpu().numpy() for z in noise]
            runs["onnxruntime"] = lambda noise_np=noise_np: runtime.decode_noise(noise_np, 1.0)
        with torch.inference_mode():
            medians = median_seconds(runs, repeats, warmup)
            reference = runs["pytorch_eager"]()
            for name in names[1:]:
                max_abs_diff[name][str(batch)] = float(np.abs(runs[name]() - reference).max())
        for name, seconds in medians.items():
            results[name][str(batch)] = {
                "median_latency_ms": round(seconds * 1e3, 3),
                "ms_per_image": round(seconds * 1e3 / batch, 3),
                "images_per_second": round(batch / seconds, 1),
            }
    speedup = {name: {str(b): round(results["pytorch_eager"][str(b)]["median_latency_ms"]
                                    / results[name][str(b)]["median_latency_ms"], 2) for b in batch_sizes}
               for name in names[1:]}
    return {**results, "speedup_over_eager": speedup, "max_abs_diff": max_abs_diff,
            "compile_seconds": compile_seconds}


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
    parser.add_argument("--device", default="cpu", help="PyTorch's device (default: cpu); onnxruntime uses the CPU")
    parser.add_argument("--compile", action="store_true", help="also time NVAE.compiled_decoder (torch.compile)")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the ONNX export and onnxruntime")
    args = parser.parse_args()
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    runtime, provider, ort_version = None, None, None
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_onnx:
            import onnxruntime as ort

            from nvae_hub.export import export_onnx
            from nvae_hub.onnx import OnnxNVAE

            export_dir = args.export_dir
            if export_dir is None:
                export_dir = Path(tmp)
                export_onnx(model, export_dir, source=args.model or f"preset:{args.preset}")
            runtime = OnnxNVAE(export_dir, num_threads=args.threads)
            provider, ort_version = runtime.provider, ort.__version__
        timings = bench(model, runtime, args.batch_sizes, args.repeats, args.warmup, args.compile)

    device = model.device
    result = {
        "benchmark": "sampling",
        "model": args.model or f"preset:{args.preset}",
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "repeats": args.repeats,
        **timings,
        "onnxruntime_provider": provider,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": args.threads or "default",
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "onnxruntime_version": ort_version,
        "machine": platform.machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
