"""What the ONNX export refuses before it writes anything: options that cannot work (usage errors of
export/onnx.py, ValueError of export_onnx) and models whose samples are degenerate (NaN, or flat such as black)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_onnx import export_cli

from nvae_hub import NVAE, NVAEConfig, load_pretrained
from nvae_hub.export import DegenerateModelError, check_export_options, export_onnx

ROOT = Path(__file__).resolve().parents[1]
MAX_OPSET = onnx.defs.onnx_opset_version()


@pytest.fixture(scope="module")
def cli():
    return export_cli()


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "existing.txt"
    path.write_text("not a folder")
    return path


USAGE_ERRORS = [
    (["--opset", "5"], rf"--opset must be an integer from 18 to {MAX_OPSET}, got 5"),
    (["--opset", str(MAX_OPSET + 1)], rf"--opset must be an integer from 18 to {MAX_OPSET}, got {MAX_OPSET + 1}"),
    (["--readjust-bn-temperature", "0.7", "--readjust-bn-batches", "0"],
     "--readjust-bn-batches must be a positive integer, got 0"),
    (["--readjust-bn-temperature", "0.7", "--readjust-bn-batch-size", "-3"],
     "--readjust-bn-batch-size must be a positive integer, got -3"),
    (["--readjust-bn-temperature", "nan"], "--readjust-bn-temperature must be a finite number >= 0, got nan"),
    (["--readjust-bn-temperature", "-0.5"], "--readjust-bn-temperature must be a finite number >= 0, got -0.5"),
    (["--readjust-bn-batches", "5"], "--readjust-bn-batches only applies with --readjust-bn-temperature"),
    (["--readjust-bn-batches", "5", "--readjust-bn-batch-size", "8"],
     "--readjust-bn-batches and --readjust-bn-batch-size only apply with --readjust-bn-temperature"),
]


@pytest.mark.parametrize(("options", "message"), USAGE_ERRORS)
def test_options_that_cannot_work_are_usage_errors_before_loading(cli, tmp_path, monkeypatch, capsys, options,
                                                                   message):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a usage error")

    monkeypatch.setattr(cli, "load_pretrained", must_not_load)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--model", "mnist", "--output", os.fspath(tmp_path / "out"), *options])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and message in err
    assert not (tmp_path / "out").exists()


def test_an_existing_file_as_output_is_a_usage_error(cli, a_file, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--model", "mnist", "--output", os.fspath(a_file)])
    assert exited.value.code == 2
    assert f"the output {a_file} exists and is not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "not a folder"


def test_an_unknown_model_is_a_usage_error(cli, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--model", "nope", "--output", os.fspath(tmp_path / "out")])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--model: 'nope' is not a local folder, nor a bundled model (bundled: fashion-mnist, mnist)" in error


def test_the_script_prints_a_usage_error_not_a_traceback(a_file):
    command = [sys.executable, "export/onnx.py", "--model", "mnist", "--output", os.fspath(a_file)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == f"onnx.py: error: the output {a_file} exists and is not a folder"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(opset=17), ValueError, "opset must be an integer from 18 to"),
        (dict(opset="18"), TypeError, "opset must be an integer"),
        (dict(readjust_bn_temperature=0.7, readjust_bn_batches=0), ValueError, "readjust_bn_batches must be a posit"),
        (dict(readjust_bn_temperature=[0.7]), TypeError, "readjust_bn_temperature must be a number"),
        (dict(readjust_bn_batch_size=8), ValueError, "readjust_bn_batch_size only applies with readjust_bn_temp"),
    ],
)
def test_export_onnx_refuses_options_that_cannot_work(tmp_path, options, error, message):
    model = NVAE(NVAEConfig.preset("tiny")).eval()
    with pytest.raises(error, match=message):
        export_onnx(model, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_checked_options_are_plain_values_with_defaults(tmp_path, a_file):
    assert check_export_options(tmp_path, np.int64(18), np.float32(0.5)) == (18, 0.5, 20, 64)
    assert check_export_options(tmp_path) == (None, None, 20, 64)
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_export_options(a_file)


def test_samples_made_black_by_lost_batchnorm_statistics_are_refused_before_writing(tmp_path):
    model = load_pretrained("mnist")  # what readjusting on zero batches did: statistics reset, never re-estimated
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
    with pytest.raises(DegenerateModelError, match=r"samples at temperature 1\.0 are flat: every pixel of each lies "
                                                   r"within [\d.e-]+ of the others \(mean [\d.e-]+\)"):
        export_onnx(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_samples_with_nan_are_refused_before_writing(tmp_path):
    model = NVAE(NVAEConfig.preset("tiny")).eval()
    with torch.no_grad():
        model.h0[0, 0, 0] = float("nan")
    with pytest.raises(DegenerateModelError, match=r"samples at temperature 1\.0 hold NaN or infinite values"):
        export_onnx(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
