"""Measure a trained NVAE's test likelihood: the importance-weighted NLL in nats and bits per dimension.

    python train/evaluate.py --model OUTPUT/final --dataset mnist --split test --num-samples 1000

prints one JSON object with the mean NLL, its standard error, the number of images, the number of importance
samples K and the seed. With K = 1 the estimate is the negative ELBO; it tightens towards -log p(x) as K grows
(the paper uses K = 1000). Bernoulli models see dynamically binarised images, drawn from the seed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from nvae_hub.data import DATASETS, build_dataset, dataset_splits
from nvae_hub.evaluation import evaluate_nll
from nvae_hub.hub import load_pretrained

# isort: split
# A module next to this script: Python puts the script's folder (train/) first on sys.path.
from options import add_threads_option, check_ranges


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a folder written by save_pretrained (e.g. OUTPUT/final) or a Hugging Face Hub repo id")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="the data set to evaluate on")
    parser.add_argument("--data-dir", default=None,
                        help="data folder (cache folder for mnist/cifar10, the images for imagefolder)")
    parser.add_argument("--split", default="test",
                        help="the split to evaluate: train or test, and valid for mnist (default: test)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="imagefolder: leave out the files that cannot be decoded (listed) instead of stopping")
    parser.add_argument("--num-samples", type=int, default=100,
                        help="importance samples K per image (default: 100; the paper uses 1000)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the binarisation and the importance samples (default: 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on (default: cuda if available, else cpu)")
    add_threads_option(parser)
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse the command line and check every option (usage errors, before the model is loaded)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    check_ranges(parser, args, at_least_one=["num_samples", "batch_size", "limit", "threads"])
    if args.split not in dataset_splits(args.dataset):
        parser.error(f"--split {args.split!r} is not a split of {args.dataset}; choose one of: "
                     f"{', '.join(dataset_splits(args.dataset))}")
    if args.dataset == "imagefolder" and args.data_dir is None:
        parser.error("--dataset imagefolder needs --data-dir, the folder of images")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate as the command line says and print the result as one JSON object."""
    parser = build_parser()
    args = parse_args(argv, parser)
    torch.set_num_threads(args.threads)
    try:
        model = load_pretrained(args.model, revision=args.revision, device=args.device)
    except (OSError, ValueError) as error:
        parser.error(f"--model {args.model}: {error}")
    try:
        dataset = build_dataset(args.dataset, args.split, data_dir=args.data_dir, image_size=model.config.image_size,
                                channels=model.config.channels, seed=args.seed, skip_bad_images=args.skip_bad_images)
    except (OSError, ValueError) as error:
        parser.error(f"--dataset {args.dataset}: {error}")
    result = {"model": args.model, "dataset": args.dataset, "split": args.split,
              **evaluate_nll(model, dataset, num_samples=args.num_samples, batch_size=args.batch_size,
                             seed=args.seed, limit=args.limit)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
