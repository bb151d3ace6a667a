"""Export an NVAE to ONNX: three self-contained graphs and a JSON description, read by ``nvae_hub.onnx.OnnxNVAE``.

The export works on a copy of the model (on the CPU, float32, eval mode) with weight normalisation folded
into plain weights, and optionally with BatchNorm statistics re-estimated at a chosen temperature. The graphs
take the prior noise or the latents as inputs, so none of them draws random numbers. It uses the dynamo
exporter (``torch.onnx.export(..., dynamo=True)``) with a dynamic batch dimension, and embeds the weights in
each ``.onnx`` file.
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

from .model import NVAE
from .onnx import FORMAT_VERSION, META_FILE

DECODER_FILE = "decoder.onnx"
DECODE_LATENTS_FILE = "decode_latents.onnx"
ENCODER_FILE = "encoder.onnx"
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})
EXAMPLE_BATCH = 2  # batch size of the example inputs; 1 would let torch.export specialise the batch dimension


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


def prepare_for_export(model: NVAE, readjust_bn_temperature: float | None = None, readjust_bn_batches: int = 20,
                       readjust_bn_batch_size: int = 64) -> NVAE:
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

    return {
        "file": path.name,
        "opset": next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")),
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
                readjust_bn_temperature: float | None = None, readjust_bn_batches: int = 20,
                readjust_bn_batch_size: int = 64) -> dict[str, Any]:
    """Write ``decoder.onnx``, ``decode_latents.onnx``, ``encoder.onnx`` and ``nvae_onnx.json`` to ``output_dir``.

    ``source`` (the model's name or path) is recorded in the JSON. ``opset`` defaults to the exporter's.
    With ``readjust_bn_temperature`` the decoder's BatchNorm statistics are first re-estimated on
    ``readjust_bn_batches`` batches of ``readjust_bn_batch_size`` samples at that temperature, for the sampling
    graph only (``NVAE.readjust_bn``). ``model`` is not changed. Returns the JSON's content.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_for_export(model, readjust_bn_temperature, readjust_bn_batches, readjust_bn_batch_size)
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
            "applied": readjust_bn_temperature is not None,
            "temperature": readjust_bn_temperature,
            "num_batches": readjust_bn_batches if readjust_bn_temperature is not None else None,
            "batch_size": readjust_bn_batch_size if readjust_bn_temperature is not None else None,
        },
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
