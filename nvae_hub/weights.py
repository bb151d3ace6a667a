"""The files of a pretrained NVAE folder: ``config.json`` and ``model.safetensors``, read and written strictly.

Every problem with a file (missing, unreadable, corrupt, not matching the model: names, shapes, dtypes, NaN or
infinite values) raises ``PretrainedLoadError`` with the file's path and the tensors' names in the message. Weights
are only ever read with safetensors, never with pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import NVAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_SHOWN = 5  # names listed in an error message before "..."


class PretrainedLoadError(ValueError):
    """A pretrained model could not be loaded: a file is missing, corrupt or does not match the model."""


# ---------------------------------------------------------------------- config
def parse_config(data: Any, source: str) -> NVAEConfig:
    """Build an ``NVAEConfig`` from parsed JSON ``data``; ``source`` (a file or repo) is named in errors."""
    try:
        return NVAEConfig.from_dict(data)
    except ValueError as err:
        raise PretrainedLoadError(f"{source} is not a valid NVAE config: {err}") from err


def read_config(path: str | Path) -> NVAEConfig:
    """Read and validate a ``config.json``."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedLoadError(f"config file not found: {path}")
    try:
        return NVAEConfig.from_json(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise PretrainedLoadError(f"{path} is not a valid NVAE config: {err}") from err


# ---------------------------------------------------------------------- weights
def save_weights(module: nn.Module, path: str | Path) -> None:
    """Write ``module``'s state dict (parameters and persistent buffers) to a safetensors file, on the CPU."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a safetensors file into ``module`` strictly: every weight present, none extra, every shape equal, every
    dtype of the module's kind (a float may change precision; an integer or bool must match exactly) and every
    float value finite in the module's dtype.

    The file is read on the CPU and copied into the module's tensors (so onto the module's device and dtype).
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedLoadError(f"weights file not found: {path}")
    try:
        state = load_file(path, device="cpu")
    except SafetensorError as err:
        raise PretrainedLoadError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    _check_state_dict(module.state_dict(), state, path)
    module.load_state_dict(state, strict=True)


def _check_state_dict(expected: dict[str, Tensor], found: dict[str, Tensor], path: Path) -> None:
    """Raise one ``PretrainedLoadError`` listing every missing, unexpected and mis-shaped weight."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    both = [name for name in expected if name in found]
    mismatched = [
        f"{name} (expected {tuple(expected[name].shape)}, found {tuple(found[name].shape)})"
        for name in both
        if expected[name].shape != found[name].shape
    ]
    wrong_dtype = [
        f"{name} (expected {_dtype(expected[name].dtype)}, found {_dtype(found[name].dtype)})"
        for name in both
        if not _same_kind(expected[name].dtype, found[name].dtype)
    ]
    non_finite = [
        name for name in both
        if expected[name].is_floating_point() and found[name].is_floating_point()
        and not torch.isfinite(found[name].to(expected[name].dtype)).all()
    ]
    problems = [
        f"{len(names)} {kind}: {_some(names)}"
        for kind, names in [("missing weight(s)", missing), ("unexpected weight(s)", unexpected),
                            ("shape mismatch(es)", mismatched), ("dtype mismatch(es)", wrong_dtype),
                            ("weight(s) with NaN or infinite values", non_finite)]
        if names
    ]
    if problems:
        raise PretrainedLoadError(
            f"{path} does not match the model ({'; '.join(problems)}); was it saved from a model with another config, "
            f"or damaged?"
        )


def _same_kind(expected: torch.dtype, found: torch.dtype) -> bool:
    """Floats load into floats of any precision; any other dtype (integer counters, bool) must match exactly."""
    return (expected.is_floating_point and found.is_floating_point) or expected == found


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _some(names: list[str]) -> str:
    """The first few names, comma-separated."""
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
