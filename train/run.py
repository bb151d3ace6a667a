"""Train an NVAE.

    python train/run.py --preset mnist-small --dataset mnist --output-dir runs/mnist --epochs 10
    accelerate launch --num_processes 2 --mixed_precision bf16 train/run.py --preset cifar10 --dataset cifar10 ...

The number of processes (one per GPU) and mixed precision come from ``accelerate launch``; ``--batch-size`` is
per process. Rerun the same command with ``--resume`` to continue an interrupted run from its last checkpoint.
See train/trainer.py for the recipe and the outputs.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from accelerate import PartialState
from huggingface_hub.utils import HFValidationError, validate_repo_id

from nvae_hub import NVAEConfig
from nvae_hub.data import DATASETS
from nvae_hub.schedules import LR_WARMUP_STEPS

# isort: split
# Modules next to this script: Python puts the script's folder (train/) first on sys.path.
from options import add_threads_option, check_ranges
from rundir import SetupError
from trainer import train


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("model and data")
    model = what.add_mutually_exclusive_group()
    model.add_argument("--preset", default="mnist-small", choices=NVAEConfig.presets(),
                       help="model configuration (default: mnist-small)")
    model.add_argument("--config", default=None, help="a model config JSON file, instead of --preset")
    model.add_argument("--init-from", default=None, metavar="MODEL",
                       help="fine-tune: start from a trained model's config and weights (a folder with config.json "
                            "+ model.safetensors, a bundled name or a Hub repo id); optimizer and schedules start "
                            "afresh")
    what.add_argument("--dataset", required=True, choices=DATASETS, help="training data set")
    what.add_argument("--data-dir", default=None,
                      help="data folder: the download cache for mnist/cifar10 (default $NVAE_HUB_CACHE or "
                           "~/.cache/nvae_hub), the folder of images for imagefolder")
    what.add_argument("--num-workers", type=int, default=0,
                      help="data-loading worker processes (default: 0; raise it for imagefolder)")
    what.add_argument("--skip-bad-images", action="store_true",
                      help="imagefolder: train without the files that cannot be decoded (listed at the start) "
                           "instead of stopping before training")
    add_threads_option(what)

    how_long = parser.add_argument_group("length").add_mutually_exclusive_group(required=True)
    how_long.add_argument("--epochs", type=int, help="train for this many passes over the data")
    how_long.add_argument("--max-steps", type=int, help="train for this many optimizer steps")

    recipe = parser.add_argument_group("optimisation (defaults: the paper's MNIST recipe)")
    recipe.add_argument("--batch-size", type=int, default=64, help="images per process per step (default: 64)")
    recipe.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of Adamax (default: 1e-2)")
    recipe.add_argument("--lr-min", type=float, default=1e-4,
                        help="learning rate at the end of the cosine decay (default: 1e-4)")
    recipe.add_argument("--lr-warmup", type=float, default=0.0125,
                        help="fraction of training with a linear learning-rate warm-up (default: 0.0125, "
                             "the paper's 5 of 400 epochs)")
    recipe.add_argument("--lr-warmup-steps", type=int, default=LR_WARMUP_STEPS,
                        help=f"but warm up for at least this many steps, however short the run (default: "
                             f"{LR_WARMUP_STEPS}); Adamax at the peak rate from a random start diverges")
    recipe.add_argument("--weight-decay", type=float, default=3e-4, help="Adamax weight decay (default: 3e-4)")
    recipe.add_argument("--kl-warmup", type=float, default=0.3,
                        help="fraction of training over which the KL weight ramps up to 1, with KL balancing "
                             "(default: 0.3)")
    recipe.add_argument("--beta", type=float, default=1.0,
                        help="weight of the KL term after warm-up, as in the beta-VAE (default: 1, the ELBO)")
    recipe.add_argument("--grad-clip", type=float, default=None,
                        help="clip the gradient norm to this (default: proportional to the values in an image, from "
                             "measured norms: 784 for MNIST, 7840 for fashion-mnist-small; 0 turns clipping off)")
    recipe.add_argument("--skip-threshold", type=float, default=None,
                        help="skip updates whose gradient norm exceeds this (default: 5x the default clip; 0 turns it "
                             "off); updates with a NaN or infinite gradient norm are always skipped")
    recipe.add_argument("--ema-decay", type=float, default=0.999,
                        help="decay of the exponential moving average of the weights (default: 0.999)")
    recipe.add_argument("--seed", type=int, default=0,
                        help="seed of the initialisation, the data order and the noise (default: 0)")

    speed = parser.add_argument_group("speed")
    speed.add_argument("--compile", nargs="?", const="default", default=None,
                       choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                       help="compile the loss (forward and backward) with torch.compile, optionally in this mode "
                            "(reduce-overhead: CUDA graphs); the first steps then take minutes")
    speed.add_argument("--cuda-graph", action="store_true",
                       help="capture the whole training step (forward, backward, optimizer, EMA) as one CUDA graph "
                            "after 3 eager steps and replay it: one process on a CUDA GPU, fp32 or bf16, not with "
                            "--compile; no compilation, so it starts at once")

    output = parser.add_argument_group("outputs")
    output.add_argument("--output-dir", required=True, help="folder for logs, checkpoints, samples and final/")
    output.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint in OUTPUT_DIR/checkpoints (or from the given "
                             "checkpoint folder)")
    output.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default: 500)")
    output.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints to keep (default: 3)")
    output.add_argument("--log-every", type=int, default=50,
                        help="steps between TensorBoard records and progress-bar updates (default: 50)")
    output.add_argument("--sample-every", type=int, default=1000,
                        help="steps between grids of samples and reconstructions (default: 1000)")
    output.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.8, 0.6],
                        help="temperatures of the sample grids, one row each (default: 1.0 0.8 0.6)")
    output.add_argument("--eval-samples", type=int, default=0,
                        help="at the end, measure the test NLL with this many importance samples and put it in "
                             "the model card (default: 0, no evaluation)")
    output.add_argument("--eval-every", type=int, default=0,
                        help="every N steps and at the end, write the test negative ELBO of the EMA model (on "
                             "--eval-limit images) to eval.jsonl (default: 0, never)")
    output.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate on only the first N test images (default: all)")
    output.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                        help="upload final/ to this Hugging Face Hub model repo at the end")
    output.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")

    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse the command line and check every option, so that a mistake is a usage error before anything runs."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    check_ranges(parser, args, at_least_one=["epochs", "max_steps", "batch_size", "checkpoint_every",
                                             "keep_checkpoints", "log_every", "sample_every", "eval_limit", "threads"],
                 non_negative=["lr", "lr_min", "weight_decay", "grad_clip", "skip_threshold", "num_workers",
                               "eval_samples", "eval_every", "lr_warmup_steps"],
                 fractions=["lr_warmup", "kl_warmup", "ema_decay"])
    if not 0 < args.beta < math.inf:
        parser.error(f"--beta must be a positive number, got {args.beta}")
    if args.lr_min > args.lr:
        parser.error(f"--lr-min ({args.lr_min}) must not exceed --lr ({args.lr})")
    bad = [t for t in args.temperatures if not (math.isfinite(t) and t >= 0)]
    if bad:
        parser.error(f"--temperatures must be finite numbers >= 0, got {', '.join(map(str, bad))}")
    if args.config is not None:
        try:
            NVAEConfig.load(args.config)
        except (OSError, ValueError, TypeError) as error:
            parser.error(f"--config {args.config}: {error}")
    if args.dataset == "imagefolder" and (args.data_dir is None or not Path(args.data_dir).is_dir()):
        parser.error(f"--dataset imagefolder needs --data-dir, an existing folder of images (got {args.data_dir})")
    if args.resume not in (None, "latest") and not (Path(args.resume) / "state.json").is_file():
        parser.error(f"--resume {args.resume}: not a checkpoint folder (one like OUTPUT_DIR/checkpoints/"
                     f"step-00000500 with a state.json); give --resume alone for the newest checkpoint")
    if args.eval_limit is not None and args.eval_samples == 0 and args.eval_every == 0:
        parser.error("--eval-limit needs --eval-samples or --eval-every")
    if args.push_to_hub is not None:
        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as error:
            parser.error(f"--push-to-hub: {error}")
    elif args.private:
        parser.error("--private needs --push-to-hub")
    if args.cuda_graph and args.compile:
        parser.error("--cuda-graph does not combine with --compile (use --compile reduce-overhead for compiled CUDA "
                     "graphs)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line and train; return the run's summary (empty on processes other than the main).

    Mistakes in the options exit with a usage error (status 2); a run that cannot start (a locked output folder,
    damaged checkpoints, unreadable data...) exits with its reason (status 1), both before the first step."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parse_args(argv, parser)
    args.command = shlex.join([*launcher(), "train/run.py", *argv])
    try:
        return train(args)
    except SetupError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n" if PartialState().is_main_process else None)


def launcher() -> list[str]:
    """How this script was started, for the model card: python, or accelerate launch with its process count and
    mixed precision (which ``accelerate launch`` passes on in environment variables)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if processes == 1 and precision == "no":
        return ["python"]
    return ["accelerate", "launch", "--num_processes", str(processes), "--mixed_precision", precision]


if __name__ == "__main__":
    main()
