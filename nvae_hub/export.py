"""Export an NVAE to ONNX: three self-contained graphs and a JSON description, read by ``nvae_hub.onnx.OnnxNVAE``.

The export works on a copy of the model (on the CPU, float32, eval mode) with weight normalisation folded
into plain weights, and optionally with BatchNorm statistics re-estimated at a chosen temperature. The graphs
take the prior noise or the latents as inputs, so none of them draws random numbers. It uses the dynamo
exporter (``torch.onnx.export(..., dynamo=True)``) with a dynamic batch dimension, and embeds the weights in
each ``.onnx`` file.

Options that cannot work (an opset the exporter cannot write, zero re-estimation batches, an output path that is a
file, ...) are refused before anything is exported, and so is a model whose samples are degenerate (NaN, or flat:
black, white or one grey), e.g. after a failed BatchNorm re-estimation.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from . import validation
from .model import NVAE
from .onnx import FORMAT_VERSION, META_FILE

DECODER_FILE = "decoder.onnx"
DECODE_LATENTS_FILE = "decode_latents.onnx"
ENCODER_FILE = "encoder.onnx"
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})
EXAMPLE_BATCH = 2  # batch size of the example inputs; 1 would let torch.export specialise the batch dimension
MIN_OPSET = 18  # the dynamo exporter writes opset 18 and up; asked for less, it silently writes 18
DEFAULT_READJUST_BN_BATCHES = 20
DEFAULT_READJUST_BN_BATCH_SIZE = 64
CHECK_SAMPLES = 8  # samples drawn to check that the exported model is not degenerate
MIN_CONTRAST = 1 / 256  # a sample whose pixels all lie closer together than one 8-bit grey level is flat


class DegenerateModelError(RuntimeError):
    """The model to export draws degenerate samples (NaN or infinite values, or every sample flat)."""


def check_export_options(output_dir: str | os.PathLike, opset: int | None = None,
                         readjust_bn_temperature: float | None = None, readjust_bn_batches: int | None = None,
                         readjust_bn_batch_size: int | None = None) -> tuple[int | None, float | None, int, int]:
    """The options of ``export_onnx`` checked, as plain Python values with the re-estimation defaults filled in:
    (opset, temperature or None, batches, batch size). Raises ``ValueError``/``TypeError``, before any model is loaded
    or exported, for options that cannot work: an output path that exists and is not a folder, an opset outside
    what the exporter writes, a bad re-estimation temperature, batch count or batch size, or a batch count or
    size without a temperature."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} exists and is not a folder")
    if opset is not None:
        opset = validation.integer(opset, "opset", MIN_OPSET, onnx.defs.onnx_opset_version())
    if readjust_bn_temperature is None:
        given = [name for name, value in [("readjust_bn_batches", readjust_bn_batches),
                                          ("readjust_bn_batch_size", readjust_bn_batch_size)] if value is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise ValueError(f"{' and '.join(given)} only {verb} with readjust_bn_temperature (the BatchNorm "
                             f"re-estimation); give a temperature or leave it out")
        return opset, None, DEFAULT_READJUST_BN_BATCHES, DEFAULT_READJUST_BN_BATCH_SIZE
    temperature = validation.temperature(readjust_bn_temperature, "readjust_bn_temperature")
    batches = DEFAULT_READJUST_BN_BATCHES if readjust_bn_batches is None else readjust_bn_batches
    batch_size = DEFAULT_READJUST_BN_BATCH_SIZE if readjust_bn_batch_size is None else readjust_bn_batch_size
    return (opset, temperature, validation.integer(batches, "readjust_bn_batches"),
            validation.integer(batch_size, "readjust_bn_batch_size"))


def check_samples(model: NVAE, temperature: float) -> None:
    """Raise ``DegenerateModelError`` if ``model``'s samples at ``temperature`` (seed 0) hold NaN or infinite
    values, or are all flat (every pixel of each within ``MIN_CONTRAST`` of the others: black, white or grey)."""
    with torch.no_grad():
        images = model.sample(CHECK_SAMPLES, temperature, seed=0).float()
    if not torch.isfinite(images).all():
        raise DegenerateModelError(f"the model's samples at temperature {temperature} hold NaN or infinite values")
    contrast = (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3))).max().item()
    if contrast < MIN_CONTRAST:
        raise DegenerateModelError(
            f"the model's samples at temperature {temperature} are flat: every pixel of each lies within "
            f"{contrast:.2g} of the others (mean {images.mean().item():.3g}); the weights or the BatchNorm "
            f"statistics are broken"
        )


class _NoiseDecoder(nn.Module):
    """(temperature (G,), noise_0, ..., noise_{G-1}) -> images: ``NVAE.decode_noise``."""

    def __init__(self, model: NVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, temperature: Tensor, *noise: Tensor) -> Tensor:
        return self.model._decode_noise(noise, [temperature[g] for g in range(self.model.num_groups)])


class _LatentDecoder(nn.Module):
    """(z_0, ..., z_{G-1}) -> images: ``NVAE.decode``."""

    def __init__(self, model: NVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, *zs: Tensor) -> Tensor:
        return self.model.decode(zs)


class _Encoder(nn.Module):
    """x -> (z_0, ..., z_{G-1}), the posterior means (with flows, pushed through them, as ``NVAE.encode`` returns;
    the flows' masked weights are constants of the graph). Wraps the unvalidated posterior pass, because
    ``NVAE.encode`` checks the pixel range with data-dependent branches that cannot be exported."""

    def __init__(self, model: NVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        _, zs, _, _ = self.model._posterior_pass(x, use_mean=True)
        return tuple(zs)


def prepare_for_export(model: NVAE, readjust_bn_temperature: float | None = None,
                       readjust_bn_batches: int = DEFAULT_READJUST_BN_BATCHES,
                       readjust_bn_batch_size: int = DEFAULT_READJUST_BN_BATCH_SIZE) -> NVAE:
    """A copy of ``model`` ready to export: CPU, float32, the decoder's BatchNorm statistics optionally re-estimated
    for sampling at ``readjust_bn_temperature``, weight normalisation folded, eval mode. ``model`` itself is not
    changed."""
    prepared = copy.deepcopy(model).to("cpu", torch.float32)
    if readjust_bn_temperature is not None:
        prepared.readjust_bn(readjust_bn_temperature, readjust_bn_batches, readjust_bn_batch_size)
    prepared.fold_weight_norm()
    return prepared.eval()


def _export_graph(module: nn.Module, args: tuple[Tensor, ...], path: Path, input_names: list[str],
                  output_names: list[str], dynamic_shapes: tuple[Any, ...], opset: int | None) -> dict[str, Any]:
    """Export one graph with the dynamo exporter, weights embedded; check it and return its description: file
    name, opset, and inputs and outputs (name, dtype, shape with 'batch' for the dynamic dimension)."""
    with warnings.catch_warnings():
        # Noise from inside the exporter: every input shares the one batch dimension, about which it warns once
        # per input, and torch.export trips over a deprecation of torch's own.
        warnings.filterwarnings("ignore", message=".*The axis name")
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        torch.onnx.export(module.eval(), args, path, dynamo=True, external_data=False, opset_version=opset,
                          input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
                          verbose=False)
    onnx.checker.check_model(os.fspath(path), full_check=True)
    proto = onnx.load(os.fspath(path))
    random_ops = RANDOM_OPS & graph_op_types(proto)
    if random_ops:
        raise RuntimeError(f"{path.name} contains random-number ops {sorted(random_ops)}")

    def values(infos: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": info.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim],
            }
            for info in infos
        ]

    written_opset = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    if opset is not None and written_opset != opset:
        raise RuntimeError(f"{path.name}: the exporter wrote opset {written_opset} instead of the opset {opset} "
                           f"asked for")
    return {
        "file": path.name,
        "opset": written_opset,
        "inputs": values(proto.graph.input),
        "outputs": values(proto.graph.output),
    }


def graph_op_types(proto: onnx.ModelProto) -> set[str]:
    """The op types of every node of an ONNX model, subgraphs and local functions included."""
    graphs = [proto.graph]
    ops = {node.op_type for function in proto.functions for node in function.node}
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)
    return ops


def export_onnx(model: NVAE, output_dir: str | os.PathLike, *, source: str | None = None, opset: int | None = None,
                readjust_bn_temperature: float | None = None, readjust_bn_batches: int | None = None,
                readjust_bn_batch_size: int | None = None) -> dict[str, Any]:
    """Write ``decoder.onnx``, ``decode_latents.onnx``, ``encoder.onnx`` and ``nvae_onnx.json`` to ``output_dir``.

    ``source`` (the model's name or path) is recorded in the JSON. ``opset`` defaults to the exporter's.
    With ``readjust_bn_temperature`` the decoder's BatchNorm statistics are first re-estimated on
    ``readjust_bn_batches`` (default 20) batches of ``readjust_bn_batch_size`` (default 64) samples at that
    temperature, for the sampling graph only (``NVAE.readjust_bn``). ``model`` is not changed. Options that cannot
    work raise ``ValueError`` (``check_export_options``) and a model with degenerate samples at the temperature (1
    without re-estimation) raises ``DegenerateModelError``, both before anything is written. Returns the JSON's
    content.
    """
    opset, temperature, batches, batch_size = check_export_options(
        output_dir, opset, readjust_bn_temperature, readjust_bn_batches, readjust_bn_batch_size)
    prepared = prepare_for_export(model, temperature, batches, batch_size)
    check_samples(prepared, 1.0 if temperature is None else temperature)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, num_groups = prepared.config, prepared.num_groups
    batch = torch.export.Dim("batch", min=1)
    per_group = tuple({0: batch} for _ in range(num_groups))
    noise = prepared.sample_noise(EXAMPLE_BATCH, seed=0)
    noise_names = [f"noise_{g}" for g in range(num_groups)]
    z_names = [f"z_{g}" for g in range(num_groups)]
    x = torch.full((EXAMPLE_BATCH, cfg.channels, cfg.image_size, cfg.image_size), 0.5)

    # The sampling graph decodes with the BatchNorm statistics re-estimated for sampling (if any); the graphs
    # that start from data keep the learned ones, as NVAE.decode_noise and NVAE.encode/decode do.
    sampler = copy.deepcopy(prepared)
    sampler.bake_readjusted_bn()
    with torch.no_grad():
        graphs = {
            "decoder": _export_graph(_NoiseDecoder(sampler), (torch.ones(num_groups), *noise), out / DECODER_FILE,
                                     ["temperature", *noise_names], ["images"], ({}, per_group), opset),
            "decode_latents": _export_graph(_LatentDecoder(prepared), tuple(noise), out / DECODE_LATENTS_FILE,
                                            z_names, ["images"], (per_group,), opset),
            "encoder": _export_graph(_Encoder(prepared), (x,), out / ENCODER_FILE, ["x"], z_names, ({0: batch},),
                                     opset),
        }

    meta = {
        "format_version": FORMAT_VERSION,
        "graphs": graphs,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "num_scales": prepared.num_scales,
        "num_groups": num_groups,
        "groups_per_scale": list(prepared.groups_per_scale),
        "scale_of_group": list(prepared.scale_of_group),
        "latent_shapes": [list(shape) for shape in prepared.latent_shapes()],
        "config": cfg.to_dict(),
        "source": source,
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch_version": torch.__version__,
        "opset": graphs["decoder"]["opset"],
        "bn_readjust": {
            "applied": temperature is not None,
            "temperature": temperature,
            "num_batches": batches if temperature is not None else None,
            "batch_size": batch_size if temperature is not None else None,
        },
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
