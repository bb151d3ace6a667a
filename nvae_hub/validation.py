"""Checks of the arguments of the public API, shared by ``NVAE`` (PyTorch) and ``OnnxNVAE`` (onnxruntime).

Both runtimes apply these same rules with the same messages. The module is plain Python (it imports neither
torch nor NumPy), so the torch-free ONNX runtime can use it. NumPy scalars and arrays and torch tensors are
accepted wherever their plain Python value would be: they are read through their ``tolist()``.

Wrong types raise ``TypeError``; values of the right type outside their range raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MAX_SEED = 2**64 - 1
"""The largest seed: torch's generator takes seeds up to 2**64 - 1 (NumPy's takes any integer >= 0)."""


def plain(value: Any) -> Any:
    """``value`` as plain Python: NumPy scalars/arrays and torch tensors via ``tolist()``; anything else as is."""
    if isinstance(value, str | bytes):
        return value
    to_list = getattr(value, "tolist", None)
    return to_list() if callable(to_list) else value


def _shown(value: Any) -> str:
    """``value`` for an error message: its repr (cut short) and, for a string, a hint."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, str):
        return f"the string {text} (pass a number, not text)"
    return f"{text} ({type(value).__name__})"


def integer(value: Any, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum]; NumPy integers are accepted, bools and floats are not."""
    number = plain(value)
    if isinstance(number, bool) or not isinstance(number, int):
        raise TypeError(f"{name} must be an integer, got {_shown(value)}")
    if number < minimum or (maximum is not None and number > maximum):
        rule = "a positive integer" if minimum == 1 and maximum is None else (
            f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}")
        raise ValueError(f"{name} must be {rule}, got {number}")
    return number


def seed(value: Any) -> int | None:
    """``None`` or an integer seed from 0 to ``MAX_SEED``."""
    return None if value is None else integer(value, "seed", 0, MAX_SEED)


def flag(value: Any, name: str) -> bool:
    """``value`` as a bool: True or False (also NumPy's)."""
    answer = plain(value)
    if not isinstance(answer, bool):
        raise TypeError(f"{name} must be True or False, got {_shown(value)}")
    return answer


def temperature(value: Any, name: str = "temperature") -> float:
    """One temperature: a finite number >= 0."""
    number = plain(value)
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise TypeError(f"{name} must be a number, got {_shown(value)}")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {number}")
    return float(number)


def temperatures(value: Any, num_groups: int) -> list[float]:
    """One temperature per latent group, from one number (for every group) or a sequence of ``num_groups``."""
    listed = plain(value)
    if not isinstance(listed, list | tuple):
        return [temperature(value)] * num_groups
    if len(listed) != num_groups:
        raise ValueError(f"expected one temperature or {num_groups} (one per group), got {len(listed)}")
    return [temperature(t, f"temperature[{g}]") for g, t in enumerate(listed)]


def scales(value: Any, num_scales: int) -> set[int]:
    """A collection of scale indices, each in 0..num_scales-1."""
    listed = plain(value)
    if isinstance(listed, set | frozenset | range):
        listed = list(listed)
    if not isinstance(listed, list | tuple):
        raise TypeError(f"scales must be a list of scale indices, got {_shown(value)}")
    wanted = {integer(s, "each scale", minimum=0) for s in listed}
    unknown = wanted - set(range(num_scales))
    if unknown:
        raise ValueError(f"unknown scale(s) {sorted(unknown)}; this model has scales 0..{num_scales - 1}")
    return wanted


def is_float(dtype: str) -> bool:
    """Whether a dtype, by its NumPy or torch name ('float32', 'bfloat16', 'torch.float16'), is a float type."""
    return dtype.removeprefix("torch.").startswith(("float", "bfloat"))


def image_batch(shape: Sequence[int], dtype: str, expected: tuple[int, int, int], name: str) -> None:
    """Check the shape (N, C, H, W) with N >= 1 and the float dtype of a batch of images."""
    shape = tuple(shape)
    if len(shape) != 4 or shape[1:] != expected:
        raise ValueError(f"expected {name} of shape (N, {', '.join(map(str, expected))}), got {shape}")
    if not is_float(dtype):
        raise ValueError(f"expected float images in [0, 1] for {name}, got dtype {dtype.removeprefix('torch.')}")
    if shape[0] == 0:
        raise ValueError(f"expected at least one image in {name}, got an empty batch")


def pixel_range(lo: float, hi: float, name: str) -> None:
    """Check that a batch's smallest and largest pixel values lie in [0, 1] (NaN does not)."""
    if not (lo >= 0 and hi <= 1):
        raise ValueError(f"expected pixel values in [0, 1] for {name}, got values in [{lo:.3g}, {hi:.3g}]")


def latent_batch(shapes: Sequence[Sequence[int]], dtypes: Sequence[str], expected: Sequence[tuple[int, int, int]],
                 what: str) -> None:
    """Check one float (N, C, H, W) array per group, with the group's (C, H, W) and one N >= 1 for every group."""
    shapes = [tuple(shape) for shape in shapes]
    if len(shapes) != len(expected):
        raise ValueError(f"expected {len(expected)} {what} groups, got {len(shapes)}")
    n = shapes[0][0] if shapes and shapes[0] else None
    for g, (shape, want) in enumerate(zip(shapes, expected, strict=True)):
        if len(shape) != 4 or shape[1:] != tuple(want) or shape[0] != n or shape[0] == 0:
            raise ValueError(f"{what} group {g} has shape {shape}, expected (N, {', '.join(map(str, want))}) "
                             f"with the same N >= 1 for every group")
    for g, dtype in enumerate(dtypes):
        if not is_float(dtype):
            raise ValueError(f"{what} group {g} must be float, got dtype {dtype.removeprefix('torch.')}")
