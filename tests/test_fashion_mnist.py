"""Fashion-MNIST from Debian's dataset-fashion-mnist package: unpacking the .deb in memory, checksums, the cache,
the error when it cannot be had, and the real data."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nvae_hub import data


def idx(array: np.ndarray) -> bytes:
    """A gzipped IDX file of unsigned bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def ar_member(name: str, payload: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}".encode() + b"`\n"
    return header + payload + (b"\n" if len(payload) % 2 else b"")


def fake_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A .deb (ar archive) whose data.tar.xz holds ``files`` in the package's folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"./{data.FASHION_MNIST_FOLDER}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("control.tar.xz", b"x")
                     + ar_member("data.tar.xz", buffer.getvalue()))
    return path


NAMES = [name for pair in data.FASHION_MNIST_FILES.values() for name in pair]


@pytest.fixture
def fake_package(tmp_path, monkeypatch) -> tuple[Path, dict[str, np.ndarray]]:
    """A fake package of 5 training and 3 test images, pinned as the expected one and not installed; returns
    (its .deb, its arrays)."""
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (5, 28, 28)), "train_y": rng.integers(0, 10, 5),
              "test_x": rng.integers(0, 256, (3, 28, 28)), "test_y": np.array([9, 0, 3])}
    files = dict(zip(NAMES, [idx(arrays[key]) for key in ("train_x", "train_y", "test_x", "test_y")], strict=True))
    deb = fake_deb(tmp_path / "dataset-fashion-mnist_0_all.deb", files)
    monkeypatch.setattr(data, "FASHION_MNIST_SHA256", {n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    monkeypatch.setattr(data, "FASHION_MNIST_DEB_SHA256", hashlib.sha256(deb.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "FASHION_MNIST_INSTALLED", tmp_path / "not-installed")
    return deb, arrays


def fake_apt(deb: Path, calls: list[Path]):
    def download(dest_dir: Path) -> Path:
        calls.append(dest_dir)
        target = dest_dir / deb.name
        target.write_bytes(deb.read_bytes())
        return target
    return download


def test_the_deb_is_unpacked_checked_and_cached(fake_package, tmp_path, monkeypatch):
    deb, arrays = fake_package
    calls: list[Path] = []
    monkeypatch.setattr(data, "_apt_download_fashion_mnist", fake_apt(deb, calls))
    cache = tmp_path / "cache"
    first = data.fashion_mnist_arrays(cache)
    assert len(calls) == 1 and [p.name for p in cache.iterdir()] == [data.FASHION_MNIST_CACHE_FILE]
    second = data.fashion_mnist_arrays(cache)
    assert len(calls) == 1  # served from the cache
    for result in (first, second):
        assert np.array_equal(result["train"][0], arrays["train_x"][:, None].astype(np.float32) / np.float32(255))
        assert np.array_equal(result["test"][1], [9, 0, 3]) and result["test"][1].dtype == np.int64
    dataset = data.build_dataset("fashion-mnist", "test", data_dir=cache, image_size=28, channels=1)
    assert len(dataset) == 3
    assert torch.equal(dataset[2], torch.from_numpy(arrays["test_x"][2][None].astype(np.float32) / np.float32(255)))
    assert np.array_equal(data.dataset_labels("fashion-mnist", "train", cache), arrays["train_y"])


def test_a_deb_in_the_cache_folder_is_used_without_apt(fake_package, tmp_path, monkeypatch):
    deb, arrays = fake_package
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / deb.name).write_bytes(deb.read_bytes())
    monkeypatch.setattr(data, "_apt_download_fashion_mnist", lambda dest: pytest.fail("apt must not be called"))
    assert np.array_equal(data.fashion_mnist_arrays(cache)["train"][1], arrays["train_y"])


def test_the_installed_package_is_used_when_there(fake_package, tmp_path, monkeypatch):
    deb, _ = fake_package
    installed = tmp_path / "installed"
    installed.mkdir()
    for name, payload in data._deb_data_files(deb, NAMES).items():
        (installed / name).write_bytes(payload)
    monkeypatch.setattr(data, "FASHION_MNIST_INSTALLED", installed)
    monkeypatch.setattr(data, "_apt_download_fashion_mnist", lambda dest: pytest.fail("apt must not be called"))
    assert np.array_equal(data.fashion_mnist_arrays(tmp_path / "cache")["test"][1], [9, 0, 3])


def test_a_tampered_deb_is_refused_and_nothing_is_cached(fake_package, tmp_path, monkeypatch):
    deb, _ = fake_package
    tampered = tmp_path / "tampered" / deb.name
    tampered.parent.mkdir()
    tampered.write_bytes(deb.read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(data, "_apt_download_fashion_mnist", fake_apt(tampered, []))
    cache = tmp_path / "cache"
    with pytest.raises(data.ChecksumError, match="expected"):
        data.fashion_mnist_arrays(cache)
    assert not (cache / data.FASHION_MNIST_CACHE_FILE).exists()


def test_an_idx_file_with_other_contents_is_refused(fake_package):
    deb, arrays = fake_package
    files = data._deb_data_files(deb, NAMES)
    files[NAMES[0]] = idx(arrays["train_x"][::-1])
    with pytest.raises(data.ChecksumError, match=NAMES[0]):
        data._fashion_mnist_arrays_from(files)


def test_without_apt_the_error_says_what_to_install(fake_package, tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        data.fashion_mnist_arrays(tmp_path / "cache")
    assert f"apt-get download dataset-fashion-mnist={data.FASHION_MNIST_VERSION}" in str(error.value)
    assert not (tmp_path / "cache" / data.FASHION_MNIST_CACHE_FILE).exists()


def test_real_fashion_mnist():
    """The real package (downloaded with apt-get once per machine into the user cache)."""
    arrays = data.fashion_mnist_arrays()
    assert {split: (x.shape, y.shape) for split, (x, y) in arrays.items()} == {
        "train": ((60000, 1, 28, 28), (60000,)), "test": ((10000, 1, 28, 28), (10000,))}
    for x, y in arrays.values():
        assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
        assert np.array_equal(np.bincount(y), np.full(10, len(y) // 10))
    assert arrays["test"][1][:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt
    with pytest.raises(ValueError, match="1x28x28"):
        data.build_dataset("fashion-mnist", "test", data_dir=None, image_size=32, channels=1)
