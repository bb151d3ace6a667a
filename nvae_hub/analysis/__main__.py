"""Analyse a trained NVAE: each ITEM writes ITEM.png and ITEM.json into --output-dir and its section of report.md.

    python -m nvae_hub.analysis all --model mnist --dataset mnist --output-dir analysis/mnist --quick
    python -m nvae_hub.analysis curves --run runs/mnist-small --output-dir analysis/mnist
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nvae_hub.data import DATASETS

from . import ITEMS
from .common import AnalysisError, Inputs
from .report import expand, run_items


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; the epilog lists every item."""
    width = max(len(name) for name in ITEMS)
    items = "\n".join(f"  {name:<{width}}  {item.summary}" for name, item in ITEMS.items())
    parser = argparse.ArgumentParser(
        prog="python -m nvae_hub.analysis", description=__doc__,
        epilog=f"items:\n  {'all':<{width}}  every item below that the inputs allow\n{items}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="+", metavar="ITEM", help="what to analyse: all, or items listed below")
    parser.add_argument("--model", default=None,
                        help="a bundled model name (e.g. mnist), a folder written by save_pretrained or a Hub repo id")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    parser.add_argument("--dataset", default=None, choices=DATASETS, help="the data set of the test images")
    parser.add_argument("--data-dir", default=None,
                        help="data folder (download cache for mnist/fashion-mnist/cifar10, the images for imagefolder)")
    parser.add_argument("--split", default="test", help="the split of the test images (default: test)")
    parser.add_argument("--run", default=None, type=Path, help="a training run's folder (train/run.py's --output-dir)")
    parser.add_argument("--output-dir", required=True, type=Path, help="where the PNG, JSON and report.md files go")
    parser.add_argument("--quick", action="store_true", help="small sizes: a fast check, not a measurement")
    parser.add_argument("--num-images", type=int, default=None,
                        help="test images (or image pairs, or samples) per analysis, instead of each one's default")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    parser.add_argument("--models", nargs="+", type=Path, default=[], metavar="DIR",
                        help="training runs (train/run.py's --output-dir) of a sweep or comparison: beta, convergence")
    parser.add_argument("--pca-components", type=int, default=2,
                        help="disentangle: PCA components kept per latent group (default: 2)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="disentangle, beta: processes that fit DCI's classifiers side by side (default: 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the analyses the command line asks for; return the exit code (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_images is not None and args.num_images < 2:
        parser.error(f"--num-images must be at least 2, got {args.num_images}")
    for name in ("pca_components", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        expand(args.items)  # unknown items fail before anything is loaded
        model = None
        if args.model is not None:
            from nvae_hub.hub import load_pretrained
            from nvae_hub.weights import PretrainedLoadError

            try:
                model = load_pretrained(args.model, revision=args.revision, device=args.device)
            except PretrainedLoadError as error:
                raise AnalysisError(str(error)) from error
        inputs = Inputs(model=model, model_name=args.model, dataset=args.dataset, data_dir=args.data_dir,
                        split=args.split, run_dir=args.run, quick=args.quick, num_images=args.num_images,
                        seed=args.seed, progress=not args.no_progress, pca_components=args.pca_components,
                        models=args.models, device=args.device, jobs=args.jobs)
        run_items(args.items, inputs, args.output_dir)
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {args.output_dir / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
