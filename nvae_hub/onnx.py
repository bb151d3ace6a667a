"""Run an exported NVAE with onnxruntime alone: sample, encode, decode, reconstruct and swap on NumPy arrays.

This module imports neither torch nor the rest of nvae_hub's PyTorch code, so an app can run on onnxruntime
alone. An export directory (written by ``nvae_hub.export.export_onnx``) holds three graphs and a JSON file:

* ``decoder.onnx``: ``temperature`` (G,) and ``noise_0 .. noise_{G-1}`` -> ``images`` (prior sampling);
* ``decode_latents.onnx``: ``z_0 .. z_{G-1}`` -> ``images``;
* ``encoder.onnx``: ``x`` -> ``z_0 .. z_{G-1}`` (posterior means);
* ``nvae_onnx.json``: shapes, the latent hierarchy, the model config and where the export came from.

Seeds: ``OnnxNVAE.sample(seed=...)`` draws its noise with NumPy (``np.random.default_rng(seed)``), while
``NVAE.sample(seed=...)`` uses torch's generator. A seed therefore gives the same images every time within
each runtime, but not the same images in both; feed the same noise to compare them.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import validation

META_FILE = "nvae_onnx.json"
FORMAT_VERSION = 1
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def cuda_is_usable() -> bool:
    """Whether onnxruntime's CUDA provider can really run here: listed by this build, with an NVIDIA driver
    and the CUDA/cuDNN libraries that the provider links against. Checked quietly, because asking
    onnxruntime for a provider it cannot load prints errors."""
    if CUDA_PROVIDER not in ort.get_available_providers():
        return False
    provider_lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL("libcuda.so.1")
        ctypes.CDLL(os.fspath(provider_lib))
    except OSError:
        return False
    return True


def default_providers() -> list[str]:
    """CUDA then CPU where CUDA is usable, else CPU only."""
    return [CUDA_PROVIDER, CPU_PROVIDER] if cuda_is_usable() else [CPU_PROVIDER]


class OnnxNVAE:
    """An exported NVAE on onnxruntime. Images are float32 arrays (N, C, H, W) with values in [0, 1].

    ``providers`` is passed to onnxruntime as is; by default CUDA is used where it really runs, else the CPU.
    ``provider`` is the provider the sessions actually got. ``num_threads`` sets onnxruntime's intra-op threads
    (default: its own choice, one per physical core).
    """

    def __init__(self, export_dir: str | os.PathLike, providers: Sequence[str] | None = None,
                 num_threads: int | None = None) -> None:
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
        self.num_threads = num_threads
        self.export_dir = Path(export_dir)
        meta_path = self.export_dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {self.export_dir} is not an NVAE ONNX export")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path} has format_version {self.meta.get('format_version')!r}; this runtime "
                             f"reads version {FORMAT_VERSION}")
        self.num_scales: int = self.meta["num_scales"]
        self.num_groups: int = self.meta["num_groups"]
        self.groups_per_scale: list[int] = self.meta["groups_per_scale"]
        self.scale_of_group: list[int] = self.meta["scale_of_group"]
        self.latent_shapes: list[tuple[int, int, int]] = [tuple(s) for s in self.meta["latent_shapes"]]
        self.image_size: int = self.meta["image_size"]
        self.channels: int = self.meta["channels"]

        providers = list(providers) if providers is not None else default_providers()
        graphs = self.meta["graphs"]
        self._decoder = self._session(graphs["decoder"]["file"], providers)
        # Once the first session shows which provider really runs, the others need not try the rest.
        self.provider: str = self._decoder.get_providers()[0]
        providers = providers[providers.index(self.provider):] if self.provider in providers else providers
        self._decode_latents = self._session(graphs["decode_latents"]["file"], providers)
        self._encoder = self._session(graphs["encoder"]["file"], providers)

    def _session(self, file: str, providers: list[str]) -> ort.InferenceSession:
        path = self.export_dir / file
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the export in {self.export_dir} is incomplete")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads sleep instead of spinning, which would take the CPU from other work between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.num_threads is not None:
            options.intra_op_num_threads = self.num_threads
        return ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)

    def __repr__(self) -> str:
        return (f"OnnxNVAE({os.fspath(self.export_dir)!r}, provider={self.provider!r}, "
                f"groups_per_scale={self.groups_per_scale})")

    # ------------------------------------------------------------------ validation
    # The rules are nvae_hub.validation's, the same as NVAE's (PyTorch), with the same messages.
    def _temperatures(self, temperature: float | Sequence[float] | np.ndarray) -> np.ndarray:
        return np.asarray(validation.temperatures(temperature, self.num_groups), dtype=np.float32)

    def _images(self, x: np.ndarray, name: str = "x") -> np.ndarray:
        x = np.asarray(x)
        validation.image_batch(x.shape, str(x.dtype), (self.channels, self.image_size, self.image_size), name)
        validation.pixel_range(float(x.min()), float(x.max()), name)
        return x.astype(np.float32, copy=False)

    def _latents(self, latents: Sequence[np.ndarray], what: str) -> list[np.ndarray]:
        zs = [np.asarray(z) for z in latents]
        validation.latent_batch([z.shape for z in zs], [str(z.dtype) for z in zs], self.latent_shapes, what)
        return [z.astype(np.float32, copy=False) for z in zs]

    # ------------------------------------------------------------------ the model
    def sample_noise(self, n: int, seed: int | None = None) -> list[np.ndarray]:
        """Standard-normal noise for every group, shapes (n, C, H, W), float32, from NumPy's generator."""
        n, seed = validation.integer(n, "the number of samples"), validation.seed(seed)
        rng = np.random.default_rng(seed)
        return [rng.standard_normal((n, *shape), dtype=np.float32) for shape in self.latent_shapes]

    def decode_noise(self, noise: Sequence[np.ndarray], temperature: float | Sequence[float] = 1.0) -> np.ndarray:
        """Images from given prior noise: group g's z = mu_p + temperature_g * sigma_p * noise_g."""
        feeds = {f"noise_{g}": z for g, z in enumerate(self._latents(noise, "noise"))}
        feeds["temperature"] = self._temperatures(temperature)
        return self._decoder.run(["images"], feeds)[0]

    def sample(self, n: int, temperature: float | Sequence[float] = 1.0, seed: int | None = None) -> np.ndarray:
        """``n`` images (n, C, H, W) from the prior, with sigma scaled by ``temperature`` (one value, or one per
        group). The same seed gives the same images with this runtime (not the same as PyTorch's)."""
        temperature = self._temperatures(temperature)
        return self.decode_noise(self.sample_noise(n, seed), temperature)

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        """The posterior means of ``x``, one array per group, coarsest scale first."""
        return self._encoder.run([f"z_{g}" for g in range(self.num_groups)], {"x": self._images(x)})

    def decode(self, latents: Sequence[np.ndarray]) -> np.ndarray:
        """Images decoded from one latent array per group."""
        feeds = {f"z_{g}": z for g, z in enumerate(self._latents(latents, "latent"))}
        return self._decode_latents.run(["images"], feeds)[0]

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def swap(self, x_a: np.ndarray, x_b: np.ndarray, scales: Iterable[int]) -> np.ndarray:
        """Decode x_a's latents with every group of the listed scales taken from x_b's latents."""
        x_a, x_b = self._images(x_a, "x_a"), self._images(x_b, "x_b")
        if x_a.shape != x_b.shape:
            raise ValueError(f"x_a and x_b must have the same shape, got {x_a.shape} and {x_b.shape}")
        wanted = validation.scales(scales, self.num_scales)
        n = x_a.shape[0]
        both = self.encode(np.concatenate([x_a, x_b]))  # one encoder run for the two batches
        zs = [z[n:] if s in wanted else z[:n] for z, s in zip(both, self.scale_of_group, strict=True)]
        return self.decode(zs)
