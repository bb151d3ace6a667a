"""nvae_hub: NVAE, the deep hierarchical VAE of Vahdat & Kautz (NeurIPS 2020), ready to train, load, sample,
export and explore.

    from nvae_hub import load_pretrained, NVAE, NVAEConfig

The names are imported on first use, so that ``nvae_hub.onnx`` (the onnxruntime runtime) works without PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import NVAEConfig
    from .hub import load_pretrained
    from .model import NVAE, Latents, LossOutput

_HOME = {"NVAE": "model", "Latents": "model", "LossOutput": "model", "NVAEConfig": "config", "load_pretrained": "hub"}
__all__ = ["NVAE", "Latents", "LossOutput", "NVAEConfig", "load_pretrained"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'nvae_hub' has no attribute {name!r}")
