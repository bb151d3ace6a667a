"""What the benchmarks share (bench/train_step.py, bench/official_step.py, bench/sampling.py): the timed loop, the
machine to itself while it times (``exclusive``), peak memory and the facts about the machine that every result
records."""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

EXCLUSIVE_DIR_ENV = "NVAE_BENCH_EXCLUSIVE_DIR"
"""Set by ``bench/gpu_check.py --together`` for the stages it runs at once: the folder where a benchmark claims the
machine while it times (see ``exclusive``)."""


@contextmanager
def exclusive(settle_seconds: float = 3.0) -> Iterator[None]:
    """Have the machine to this process while the block runs, when a driver runs several jobs at once
    (``bench/gpu_check.py --together``): take the lock in ``$NVAE_BENCH_EXCLUSIVE_DIR``, write a file named for
    this process's id there (the driver then stops every other job with SIGSTOP), and wait ``settle_seconds`` for
    the work they had queued on the GPU to finish. Without that variable, nothing happens."""
    folder = os.environ.get(EXCLUSIVE_DIR_ENV)
    if not folder:
        yield
        return
    with (Path(folder) / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one benchmark times at a time
        claim = Path(folder) / str(os.getpid())
        claim.touch()
        try:
            time.sleep(settle_seconds)
            yield
        finally:
            claim.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run: Callable[[int], torch.Tensor], device: torch.device, batch_size: int, steps: int,
               warmup: int) -> tuple[dict[str, object], list[torch.Tensor]]:
    """Call ``run(n)`` for ``warmup`` untimed then ``steps`` timed steps; return the timings (per step, peak memory
    of the timed steps) and what the timed steps returned."""
    start = time.perf_counter()
    for n in range(warmup):
        run(n)
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outputs = []
    with exclusive():
        start, cpu_start = time.perf_counter(), time.process_time()
        for n in range(steps):
            outputs.append(run(warmup + n))
        synchronize(device)
        seconds = (time.perf_counter() - start) / steps
        cpu_seconds = (time.process_time() - cpu_start) / steps
    return {
        "seconds_per_step": round(seconds, 5),
        # CPU time of this process per step: on a busy shared machine a steadier guide than the wall clock
        "cpu_seconds_per_step": round(cpu_seconds, 5),
        "images_per_second": round(batch_size / seconds, 2),
        "warmup_seconds": round(warmup_seconds, 1),
        "finite": bool(torch.isfinite(torch.stack(outputs)).all()),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                else peak_rss_mb(), 1),
    }, outputs


def machine(device: torch.device) -> dict[str, object]:
    """The facts every benchmark JSON records about where it ran."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "machine": platform.machine(),
    }


def add_timing_options(parser: argparse.ArgumentParser) -> None:
    """The options every training-step benchmark takes: steps, warm-up, device, threads."""
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")


def chosen_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and return the ``--device``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)
