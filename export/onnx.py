"""Export a pretrained NVAE to ONNX: decoder.onnx, decode_latents.onnx, encoder.onnx and nvae_onnx.json.

    python export/onnx.py --model mnist --output exported/mnist
    python export/onnx.py --model path/to/folder --output out --readjust-bn-temperature 0.7

The exported directory runs without torch: ``nvae_hub.onnx.OnnxNVAE(DIR)``. Options that cannot work are usage
errors (exit status 2), checked before the model is loaded; a model whose samples come out degenerate (NaN, or flat
such as all black) is refused (exit status 1) before anything is written.
"""

import sys
from pathlib import Path

# Python puts this script's folder first on sys.path, where this file would shadow the `onnx` package that
# the exporter imports; drop it before importing anything else.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse
import json
import logging
import re

from nvae_hub.export import (
    DEFAULT_READJUST_BN_BATCH_SIZE,
    DEFAULT_READJUST_BN_BATCHES,
    MIN_OPSET,
    DegenerateModelError,
    check_export_options,
    export_onnx,
)
from nvae_hub.hub import load_pretrained
from nvae_hub.weights import PretrainedLoadError


def as_flags(message: str) -> str:
    """A message of ``nvae_hub.export`` with its argument names written as this tool's options."""
    return re.sub(r"\b(opset|readjust_bn_\w+)\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, export, and print where the files went and what the JSON records."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local model folder, a bundled model name or a Hub repo id")
    parser.add_argument("--output", required=True, type=Path, help="directory for the .onnx files and the JSON")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    parser.add_argument("--readjust-bn-temperature", type=float, default=None, metavar="T",
                        help="re-estimate BatchNorm statistics on samples at temperature T before exporting")
    parser.add_argument("--readjust-bn-batches", type=int, default=None, metavar="N",
                        help=f"batches for --readjust-bn-temperature (default {DEFAULT_READJUST_BN_BATCHES})")
    parser.add_argument("--readjust-bn-batch-size", type=int, default=None, metavar="N",
                        help=f"samples per batch for --readjust-bn-temperature (default "
                             f"{DEFAULT_READJUST_BN_BATCH_SIZE})")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset, at least {MIN_OPSET} (default: the exporter's)")
    args = parser.parse_args(argv)
    options = dict(opset=args.opset, readjust_bn_temperature=args.readjust_bn_temperature,
                   readjust_bn_batches=args.readjust_bn_batches, readjust_bn_batch_size=args.readjust_bn_batch_size)
    try:
        check_export_options(args.output, **options)
    except (TypeError, ValueError) as err:
        parser.error(as_flags(str(err)))

    # The exporter logs, at warning level, every torchvision op it cannot register; this tool needs none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        model = load_pretrained(args.model, revision=args.revision)
    except PretrainedLoadError as err:
        parser.error(f"--model: {err}")
    try:
        meta = export_onnx(model, args.output, source=args.model, **options)
    except (DegenerateModelError, OSError) as err:
        parser.exit(1, f"{parser.prog}: error: {as_flags(str(err))}\n")
    summary = {key: meta[key] for key in ("source", "opset", "num_groups", "groups_per_scale", "bn_readjust")}
    print(json.dumps({"output": str(args.output), **summary}))


if __name__ == "__main__":
    main()
