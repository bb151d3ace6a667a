"""The NVAE training loop, on one or many devices with Accelerate.

The recipe is the paper's (Vahdat & Kautz, 2020, and the official code): Adamax with weight decay, a linear
learning-rate warm-up then cosine decay to a floor, KL warm-up over the first 30% of training with KL
balancing, and the spectral and batch-norm regularisers (annealed with the KL weight when the config asks).
On top of it, three tricks of later deep VAEs: gradient-norm clipping, skipping updates whose gradient norm
is not finite or too large (counted and logged), and an exponential moving average (EMA) of the weights,
which is what samples, evaluation and the exported model use.

A run is deterministic given its options: the data order is a function of (seed, step) and every random
number generator is saved in the checkpoints, so a run resumed with ``--resume`` ends with exactly the
weights of an uninterrupted one (on the same hardware and process count).

Outputs in ``--output-dir``: ``log.jsonl`` (one record per step), ``checkpoints/``, ``samples/`` (PNG grids),
``tensorboard/``, ``plots/`` (learning curves, KL per group), ``final/`` (the EMA model with its card),
``summary.json``, ``args.json``, ``.lock`` (see rundir.py: the folder is locked while a run uses it) and, with
``--eval-every``, ``eval.jsonl`` (the test loss during training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.card import TrainingInfo
from nvae_hub.data import binarize, build_dataset
from nvae_hub.evaluation import evaluate_nll
from nvae_hub.hub import load_pretrained, push_to_hub, save_pretrained
from nvae_hub.schedules import KL_CONSTANT_FRACTION, kl_warmup, learning_rate, reg_weight, warmup_length
from nvae_hub.training import EMA, STAT_NAMES, Adamax, TrainStep, default_thresholds, loss_dict
from nvae_hub.weights import PretrainedLoadError

# isort: split
# Modules next to this one: Python puts the folder of the script it runs (train/) first on sys.path.
import plots
from checkpoint import check_config, find_resume_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from rundir import SetupError, lock_output_dir, read_log, truncate_log

RECON_IMAGES = 8
"""Images in the reconstruction grids."""
MAX_CONSECUTIVE_SKIPS = 50
"""Stop with an error after this many skipped updates in a row: the run is stuck, not unlucky."""


# ---------------------------------------------------------------------------------------------- pieces


class LossModule(nn.Module):
    """``NVAE.loss`` as a ``forward``: DistributedDataParallel synchronises the gradients of what ``forward``
    computes, so the training loss must go through a module's forward, not a method of the model."""

    def __init__(self, model: NVAE, beta: float = 1.0) -> None:
        super().__init__()
        self.model, self.beta = model, beta

    def forward(self, x: Tensor, kl_weight: Tensor, reg_weight: Tensor) -> dict[str, Tensor]:
        return loss_dict(self.model, x, kl_weight, reg_weight, beta=self.beta)


class StatsCopy:
    """The statistics rows of a few steps on their way from the device to the host (averaged over processes).

    The copy starts when this is made and is waited for only in ``records``, a step later, by when the device
    has long finished it: logging never makes the device idle.
    """

    def __init__(self, entries: list[tuple[int, dict[str, float], Tensor]], accelerator: Accelerator) -> None:
        self.entries = entries
        block = accelerator.reduce(torch.stack([row for _, _, row in entries]), reduction="mean")
        self.done: torch.cuda.Event | None = None
        if block.device.type == "cuda":
            self.host = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
            self.host.copy_(block, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = block

    def records(self) -> list[tuple[int, dict[str, float], list[float]]]:
        """(step, schedule values, statistics row) of each step."""
        if self.done is not None:
            self.done.synchronize()
        rows = self.host.tolist()
        return [(step, schedule, row) for (step, schedule, _), row in zip(self.entries, rows, strict=True)]


class StepBatchSampler(Sampler[list[int]]):
    """This process's dataset indices for every step from ``start_step`` to ``max_steps``.

    Each epoch is a fresh permutation drawn from (seed, epoch); it is cut into global batches of
    ``batch_size * num_processes`` (an incomplete last batch is dropped) and each global batch into one slice
    per process. The batch of a step depends only on (seed, step), so a run resumed mid-epoch continues with
    exactly the batch it would have seen.
    """

    def __init__(self, dataset_size: int, batch_size: int, num_processes: int, rank: int, seed: int,
                 start_step: int, max_steps: int) -> None:
        self.dataset_size, self.batch_size, self.rank, self.seed = dataset_size, batch_size, rank, seed
        self.start_step, self.max_steps = start_step, max_steps
        self.global_batch = batch_size * num_processes
        self.steps_per_epoch = dataset_size // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data set has {dataset_size} images, fewer than one global batch of "
                             f"{batch_size} x {num_processes} processes; lower --batch-size")

    def __len__(self) -> int:
        return self.max_steps - self.start_step

    def __iter__(self) -> Iterator[list[int]]:
        order, order_epoch = None, -1
        for step in range(self.start_step, self.max_steps):
            epoch, index = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = np.random.default_rng((self.seed, epoch)).permutation(self.dataset_size), epoch
            start = index * self.global_batch + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()


def model_config(args: argparse.Namespace) -> NVAEConfig:
    """The model config: a JSON file given with --config, else the preset."""
    return NVAEConfig.load(args.config) if args.config else NVAEConfig.preset(args.preset)


def initial_model(args: argparse.Namespace) -> NVAE | None:
    """The trained model named by --init-from (loaded strictly from safetensors), or None to start afresh."""
    if args.init_from is None:
        return None
    try:
        return load_pretrained(args.init_from)
    except (PretrainedLoadError, OSError, ValueError) as error:
        raise SetupError(f"--init-from {args.init_from}: {error}") from error


def hardware_description(accelerator: Accelerator) -> str:
    """E.g. '2 x NVIDIA H100 80GB HBM3, mixed precision bf16', '1 x CPU (16 cores), mixed precision no' or, where
    several processes share the CPU cores, '2 processes on a CPU (2 cores), mixed precision no'."""
    device, processes = accelerator.device, accelerator.num_processes
    if device.type == "cuda":
        where = f"{processes} x {torch.cuda.get_device_name(device)}"
    elif processes > 1:
        where = f"{processes} processes on a CPU ({os.cpu_count()} cores)"
    else:
        where = f"1 x CPU ({os.cpu_count()} cores)"
    return f"{where}, mixed precision {accelerator.mixed_precision}"


def parameter_checksum(model: nn.Module) -> float:
    """An order-sensitive checksum of the parameters, to check that all processes hold the same model."""
    return sum((i + 1) * p.detach().double().sum().item() for i, p in enumerate(model.parameters()))


def finite_or_none(value: float) -> float | None:
    """``value``, or None if it is NaN or infinite (JSON has no NaN)."""
    return value if math.isfinite(value) else None


def eval_record(model: NVAE, test_set: Dataset, args: argparse.Namespace, step: int, epoch: float) -> dict[str, Any]:
    """The eval.jsonl record of ``step``: the negative ELBO (one posterior sample, seeded) of ``model`` on the first
    ``--eval-limit`` images of ``test_set``."""
    result = evaluate_nll(model, test_set, num_samples=1, limit=args.eval_limit, batch_size=args.batch_size,
                          seed=args.seed, progress=False)
    return {"step": step, "epoch": epoch, "test_neg_elbo_nats": result["nll_nats"],
            "test_neg_elbo_nats_stderr": result["nll_nats_stderr"], "images": result["num_images"]}


# ---------------------------------------------------------------------------------------------- training


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train an NVAE as the options ``args`` of ``train/run.py`` say; return the run's summary.

    The output folder is locked for the whole run. ``SetupError`` says why a run cannot start (the folder is in
    use, the checkpoints are damaged or of another model, the data is unreadable...); it comes before any step.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(log_with="tensorboard", project_dir=args.output_dir)
    lock = lock_output_dir(accelerator, Path(args.output_dir))
    try:
        return run_training(args, accelerator)
    finally:
        lock.release()
        torch.set_num_threads(threads)


def run_training(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    """``train``'s work, in a locked output folder."""
    out_dir = Path(args.output_dir)
    main = accelerator.is_main_process
    checkpoint_dir, log_path, eval_path = out_dir / "checkpoints", out_dir / "log.jsonl", out_dir / "eval.jsonl"

    if args.cuda_graph:
        problem = ("it needs a CUDA device" if accelerator.device.type != "cuda" else
                   "it runs in one process" if accelerator.num_processes > 1 else
                   "fp16 needs a gradient scaler, which reads values on the host; use bf16"
                   if accelerator.mixed_precision == "fp16" else None)
        if problem:
            raise SetupError(f"--cuda-graph: {problem}")

    # ---- resume (the checkpoint's config is compared before anything is built), or refuse to overwrite a run
    initial = initial_model(args)
    cfg = initial.config if initial is not None else model_config(args)
    resume_from = find_resume_checkpoint(accelerator, checkpoint_dir, args.resume) if args.resume else None
    if resume_from is not None:
        check_config(resume_from, cfg)
    elif args.resume:
        accelerator.print(f"no checkpoint in {checkpoint_dir}; starting from scratch")
    elif latest_checkpoint(checkpoint_dir) is not None:
        raise SetupError(f"{out_dir} already holds checkpoints; pass --resume to continue that run or choose "
                         f"another --output-dir")

    # ---- model, EMA, optimizer (the same initial weights in every process, then per-process noise)
    set_seed(args.seed)
    # Fine-tuning starts from the loaded model itself: its weights, BN statistics and spectral vectors.
    model = initial if initial is not None else NVAE(cfg)
    ema = EMA(model, args.ema_decay)
    ema.module.to(accelerator.device)
    set_seed(args.seed, device_specific=True)
    if accelerator.device.type == "cuda" and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = Adamax(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, eps=1e-3)
    loss_module, optimizer = accelerator.prepare(LossModule(model, args.beta), optimizer)
    model = accelerator.unwrap_model(loss_module).model
    loss_fn = loss_module
    if args.compile:  # forward and backward; one graph unless DistributedDataParallel splits it at its buckets
        mode = None if args.compile == "default" else args.compile
        loss_fn = torch.compile(loss_module, mode=mode, fullgraph=accelerator.num_processes == 1)

    # ---- data: a step-indexed order, so a resumed run continues at the right batch
    # Image folders are checked here, before the first step (the main process first; the others use its cache).
    data_options = dict(data_dir=args.data_dir, image_size=cfg.image_size, channels=cfg.channels, seed=args.seed,
                        skip_bad_images=args.skip_bad_images)
    try:
        with accelerator.main_process_first():
            dataset = build_dataset(args.dataset, "train", **data_options)
            test_set = (build_dataset(args.dataset, "test", **data_options)
                        if args.eval_samples > 0 or args.eval_every > 0 else None)
    except (ValueError, OSError) as error:
        raise SetupError(f"--dataset {args.dataset}: {error}") from error
    global_batch = args.batch_size * accelerator.num_processes
    steps_per_epoch = len(dataset) // global_batch
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    warmup_steps = warmup_length(max_steps, args.lr_warmup, args.lr_warmup_steps)
    kl_warmup_steps, kl_constant_steps = round(args.kl_warmup * max_steps), round(KL_CONSTANT_FRACTION * max_steps)
    binary = cfg.output == "bernoulli"

    # ---- resume
    start_step, skipped, consecutive_skips, elapsed = 0, 0, 0, 0.0
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, model=model, ema=ema.module, optimizer=optimizer)
        start_step, skipped, elapsed = state["step"], state["skipped"], state["elapsed_seconds"]
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    if main:
        for path in [log_path, *([eval_path] if eval_path.exists() else [])]:
            note = truncate_log(path, start_step)
            if note is not None:
                accelerator.print(note)
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=1) + "\n")
    try:
        sampler = StepBatchSampler(len(dataset), args.batch_size, accelerator.num_processes,
                                   accelerator.process_index, args.seed, start_step, max_steps)
    except ValueError as error:
        raise SetupError(str(error)) from error
    # A private generator: the loader must not draw from the global RNG, whose state the checkpoints carry.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        generator=torch.Generator(), pin_memory=accelerator.device.type == "cuda")
    recon_images = torch.stack([dataset[i] for i in range(RECON_IMAGES)])
    if binary:
        recon_images = binarize(recon_images, torch.Generator().manual_seed(args.seed))

    accelerator.init_trackers("tensorboard", config={k: v for k, v in vars(args).items()
                                                     if isinstance(v, int | float | str | bool)})
    dims = cfg.channels * cfg.image_size**2
    progress = tqdm(total=max_steps, initial=start_step, desc="train", disable=not main, dynamic_ncols=True)
    log_file = log_path.open("a") if main else None
    loop_start = time.perf_counter()

    def checkpoint(step: int) -> None:
        state = {"skipped": skipped, "elapsed_seconds": elapsed + time.perf_counter() - loop_start,
                 "config": cfg.to_dict(), "args": vars(args)}
        save_checkpoint(accelerator, checkpoint_dir, step, model=model, ema=ema.module, optimizer=optimizer,
                        state=state, keep=args.keep_checkpoints)

    # ---- the loop; `step` counts completed steps, so the schedules see 0, 1, ... and the log 1, 2, ...
    # Nothing in it reads a value back from the device: the statistics of each step stay there until they are
    # logged (`flush`), a step after every --log-every steps (and before a checkpoint, which needs the counts).
    default_clip, default_skip = default_thresholds(cfg)
    grad_clip = default_clip if args.grad_clip is None else args.grad_clip
    skip_threshold = default_skip if args.skip_threshold is None else args.skip_threshold
    if args.cuda_graph:  # not through Accelerate's wrappers: its autocast caches cast weights, which a capture must not
        train_step = TrainStep(model, optimizer.optimizer, ema, grad_clip=grad_clip, skip_threshold=skip_threshold,
                               loss_fn=LossModule(model, args.beta),
                               autocast_dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16" else None,
                               cuda_graph=True)
    else:
        train_step = TrainStep(model, optimizer, ema, grad_clip=grad_clip, skip_threshold=skip_threshold,
                               loss_fn=loss_fn, accelerator=accelerator)
    unlogged: list[tuple[int, dict[str, float], Tensor]] = []
    in_flight: StatsCopy | None = None

    def write_records(copy: StatsCopy) -> None:
        nonlocal skipped, consecutive_skips
        for step, schedule, row in copy.records():
            stats = dict(zip(STAT_NAMES, row, strict=False))
            skip = stats["skipped"] > 0.5
            skipped, consecutive_skips = skipped + skip, (consecutive_skips + 1) * skip
            record = {
                "step": step, "loss": stats["loss"], "recon": stats["recon"], "kl": stats["kl"],
                "bits_per_dim": (stats["recon"] + stats["kl"]) / (dims * math.log(2)), "spectral": stats["spectral"],
                "bn": stats["bn"], "kl_groups": row[len(STAT_NAMES):], **schedule, "grad_norm": stats["grad_norm"],
                "skipped": skip, "skipped_total": skipped, "resumed_from": start_step,
            }
            record = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in record.items()}
            record["kl_groups"] = [finite_or_none(v) for v in record["kl_groups"]]
            if main:
                log_file.write(json.dumps(record) + "\n")
            if step % args.log_every == 0 or step == max_steps:
                progress.set_postfix(loss=f"{stats['loss']:.2f}", kl=f"{stats['kl']:.2f}",
                                     bpd=f"{record['bits_per_dim'] or math.nan:.4f}", skipped=skipped)
                scalars = {f"loss/{k}": record[k] for k in ("loss", "recon", "kl", "spectral", "bn", "bits_per_dim")}
                scalars |= {f"kl_group/{g:02d}": v for g, v in enumerate(record["kl_groups"])}
                scalars |= {f"train/{k}": record[k] for k in ("lr", "grad_norm", "kl_weight", "reg_weight")}
                scalars["train/skipped_updates"] = skipped
                accelerator.log({k: v for k, v in scalars.items() if v is not None}, step=step)
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise RuntimeError(f"the last {consecutive_skips} updates were all skipped (gradient norm "
                                   f"{stats['grad_norm']:.4g}, --skip-threshold {skip_threshold:g}); lower --lr or "
                                   f"raise --skip-threshold")
        if main:
            log_file.flush()

    def write_in_flight() -> None:
        """Write the records of the copy under way, if any."""
        nonlocal in_flight
        if in_flight is not None:
            write_records(in_flight)
            in_flight = None

    def flush(wait: bool) -> None:
        """Write the records whose copy is done; start copying the unlogged ones (and write them if ``wait``)."""
        nonlocal in_flight, unlogged
        write_in_flight()
        if unlogged:
            in_flight, unlogged = StatsCopy(unlogged, accelerator), []
            if wait:
                write_in_flight()

    loss_module.train()
    for step, x in enumerate(loader, start=start_step + 1):
        model._check_images(x)  # on the host, before the batch goes to the device
        kl_weight = kl_warmup(step - 1, kl_warmup_steps, kl_constant_steps)
        schedule = {"kl_weight": kl_weight, "reg_weight": reg_weight(kl_weight, cfg.reg_weight, cfg.reg_weight_init),
                    "lr": learning_rate(step - 1, max_steps, args.lr, args.lr_min, warmup_steps)}
        x = x.to(accelerator.device, non_blocking=True)
        x = binarize(x) if binary else x
        if args.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        row = train_step(x, kl_weight=kl_weight, reg_weight=schedule["reg_weight"], lr=schedule["lr"],
                         num_updates=step)
        unlogged.append((step, schedule, row))
        progress.update(1)
        write_in_flight()  # copied during this step
        checkpoint_now = step % args.checkpoint_every == 0 or step == max_steps
        if step % args.log_every == 0 or checkpoint_now:
            flush(wait=checkpoint_now)  # a checkpoint records the count of skipped updates so far
        if main and (step % args.sample_every == 0 or step == max_steps):
            name = f"samples/step-{step:08d}"
            plots.save_samples(ema.module, out_dir / f"{name}-samples.png", args.temperatures)
            plots.save_reconstructions(ema.module, recon_images, out_dir / f"{name}-recon.png")
        if main and args.eval_every and (step % args.eval_every == 0 or step == max_steps):
            record = eval_record(ema.module, test_set, args, step, step / steps_per_epoch)
            with eval_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if checkpoint_now:
            checkpoint(step)
    progress.close()
    session_seconds = time.perf_counter() - loop_start
    session_steps = max_steps - start_step

    # ---- every process must hold the same weights (DistributedDataParallel keeps them in step)
    checksums = accelerator.gather(torch.tensor([parameter_checksum(model)], dtype=torch.float64,
                                                device=accelerator.device)).tolist()
    summary: dict[str, Any] = {}
    if main:
        log_file.close()
        summary = finish(args, accelerator, cfg, ema.module, test_set if args.eval_samples > 0 else None,
                         steps_per_epoch=steps_per_epoch, max_steps=max_steps, skipped=skipped,
                         wall_time=elapsed + session_seconds,
                         images_per_second=session_steps * global_batch / session_seconds if session_steps else None,
                         checksums=checksums)
    accelerator.end_training()
    if len(set(checksums)) != 1:
        raise RuntimeError(f"the processes ended with different weights (parameter checksums {checksums})")
    return summary


def finish(args: argparse.Namespace, accelerator: Accelerator, cfg: NVAEConfig, ema_model: NVAE,
           test_set: Dataset[Tensor] | None, *,
           steps_per_epoch: int, max_steps: int, skipped: int, wall_time: float, images_per_second: float | None,
           checksums: list[float]) -> dict[str, Any]:
    """After training (main process): evaluate on ``test_set`` (if given), plot, export ``final/``, write
    ``summary.json``, push."""
    out_dir = Path(args.output_dir)
    history = read_log(out_dir / "log.jsonl")
    tail = history[-max(1, len(history) // 10):]  # the last 10% of the steps

    metrics: dict[str, float] = {}
    metrics_note = ""
    if test_set is not None:
        result = evaluate_nll(ema_model, test_set, num_samples=args.eval_samples, limit=args.eval_limit,
                              batch_size=args.batch_size, seed=args.seed)
        metrics = {"test_nll_nats": result["nll_nats"], "test_bits_per_dim": result["bits_per_dim"]}
        metrics_note = (f"Importance-weighted NLL with {result['num_samples']} samples on {result['num_images']} "
                        f"{args.dataset} test images (standard error {result['nll_nats_stderr']:.2f} nats), EMA "
                        f"weights, evaluation seed {result['seed']}"
                        + (", dynamic binarisation." if cfg.output == "bernoulli" else "."))

    plots_dir = out_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots.plot_learning_curves(history, plots_dir / "learning_curves.png")
    kl_groups = [float(np.mean([r["kl_groups"][g] for r in tail if r["kl_groups"][g] is not None] or [math.nan]))
                 for g in range(len(ema_model.scale_of_group))]
    plots.plot_kl_per_group(kl_groups, ema_model.scale_of_group, plots_dir / "kl_per_group.png")

    info = TrainingInfo(command=args.command, dataset=args.dataset, steps=max_steps, wall_time_seconds=wall_time,
                        hardware=hardware_description(accelerator), metrics=metrics, metrics_note=metrics_note,
                        beta=args.beta)
    save_pretrained(ema_model, out_dir / "final", training=info)

    def tail_mean(key: str) -> float | None:
        values = [r[key] for r in tail if r[key] is not None]
        return float(np.mean(values)) if values else None

    summary = {
        "steps": max_steps, "epochs": max_steps / steps_per_epoch, "wall_time_seconds": wall_time,
        "images_per_second": images_per_second, "skipped_updates": skipped,
        "num_processes": accelerator.num_processes, "replica_checksums": checksums,
        "final": {key: tail_mean(key) for key in ("loss", "recon", "kl", "bits_per_dim")},
        "test": metrics,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.push_to_hub:
        url = push_to_hub(ema_model, args.push_to_hub, training=info, private=args.private or None)
        accelerator.print(f"pushed to {url}")
    return summary
