"""ONNX export and the onnxruntime runtime: parity with PyTorch, the exported files, the CLI, input validation.

``assert_onnx_parity(model, export_dir)`` checks any model against its export; the tests use the tiny preset,
exported once per module.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.external_data_helper import uses_external_data

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.export import RANDOM_OPS, export_onnx
from nvae_hub.hub import save_pretrained
from nvae_hub.onnx import META_FILE, OnnxNVAE

ROOT = Path(__file__).resolve().parents[1]
ONNX_FILES = ["decode_latents.onnx", "decoder.onnx", "encoder.onnx"]


def export_cli():
    """export/onnx.py as a module (the script's name would shadow the onnx package if imported as `onnx`)."""
    spec = importlib.util.spec_from_file_location("export_onnx_cli", ROOT / "export" / "onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images(config: NVAEConfig, n: int, seed: int) -> torch.Tensor:
    """Random test images for ``config``: binary for a Bernoulli model, else uniform in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, config.channels, config.image_size, config.image_size), generator=g)
    return x.bernoulli(generator=g) if config.output == "bernoulli" else x


def _assert_close(actual: np.ndarray, expected: torch.Tensor, atol: float, what: str) -> None:
    expected_np = expected.detach().float().cpu().numpy()
    assert actual.shape == expected_np.shape, f"{what}: shape {actual.shape} != {expected_np.shape}"
    assert actual.dtype == np.float32, f"{what}: dtype {actual.dtype}"
    error = float(np.abs(actual - expected_np).max())
    assert error <= atol, f"{what}: onnxruntime and PyTorch differ by {error:.3g} (max abs) > {atol}"


@torch.no_grad()
def assert_onnx_parity(model: NVAE, export_dir: str | os.PathLike, batch_sizes: tuple[int, ...] = (1, 7),
                       atol: float = 1e-4, seed: int = 0) -> None:
    """onnxruntime on ``export_dir`` and PyTorch on ``model`` agree to ``atol`` (max abs) at every batch size,
    on the same noise/images: sampling (one temperature and one per group), encoding, reconstruction and
    swapping each scale."""
    runtime = OnnxNVAE(export_dir)
    model = model.eval()
    per_group = torch.linspace(0.2, 1.0, model.num_groups).tolist()
    for n in batch_sizes:
        noise = model.sample_noise(n, seed)
        noise_np = [z.cpu().numpy() for z in noise]
        for temperature in (0.7, per_group):
            _assert_close(runtime.decode_noise(noise_np, temperature), model.decode_noise(noise, temperature), atol,
                          f"sampling at batch {n}, temperature {temperature}")
        x_a, x_b = images(model.config, n, seed + 1), images(model.config, n, seed + 2)
        for g, (z_onnx, z_torch) in enumerate(zip(runtime.encode(x_a.numpy()), model.encode(x_a).z, strict=True)):
            _assert_close(z_onnx, z_torch, atol, f"encoding group {g} at batch {n}")
        _assert_close(runtime.reconstruct(x_a.numpy()), model.reconstruct(x_a), atol, f"reconstruction at batch {n}")
        for scale in range(model.num_scales):
            _assert_close(runtime.swap(x_a.numpy(), x_b.numpy(), [scale]), model.swap(x_a, x_b, [scale]), atol,
                          f"swapping scale {scale} at batch {n}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[NVAE, Path, dict, dict]:
    """A tiny model with normalising flows in its posterior, its export directory, the JSON export_onnx returned and
    the model's state before export. (The CLI test below and the bundled model's test export flow-free models.)"""
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny").replace(num_flows=1)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_dir = tmp_path_factory.mktemp("tiny_onnx")
    meta = export_onnx(model, export_dir, source="preset:tiny")
    return model, export_dir, meta, before


@pytest.fixture(scope="module")
def runtime(tiny: tuple[NVAE, Path, dict, dict]) -> OnnxNVAE:
    return OnnxNVAE(tiny[1])


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("batch_size", [1, 7])
def test_onnxruntime_matches_pytorch(tiny, batch_size):
    model, export_dir, _, _ = tiny
    assert_onnx_parity(model, export_dir, batch_sizes=(batch_size,))


def test_export_leaves_the_model_alone(tiny):
    model, _, _, before = tiny
    after = model.state_dict()
    assert after.keys() == before.keys()  # weight normalisation was folded on a copy only
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not model.training


# ---------------------------------------------------------------- the exported files
def test_export_dir_holds_three_self_contained_graphs_and_the_json(tiny):
    _, export_dir, _, _ = tiny
    assert sorted(os.listdir(export_dir)) == sorted([*ONNX_FILES, META_FILE])
    for name in ONNX_FILES:
        onnx.checker.check_model(os.fspath(export_dir / name), full_check=True)
        proto = onnx.load(os.fspath(export_dir / name))
        assert proto.graph.initializer, name
        assert not any(uses_external_data(t) for t in proto.graph.initializer), name


def test_only_the_encoder_graph_runs_the_flows(tiny, runtime):
    model, export_dir, _, _ = tiny
    names = {name: {t.name for t in onnx.load(os.fspath(export_dir / name)).graph.initializer} for name in ONNX_FILES}
    assert sum(".flows." in n for n in names["encoder.onnx"]) == model.num_groups * 2  # the shift biases
    assert not any(".flows." in n for name in ("decoder.onnx", "decode_latents.onnx") for n in names[name])
    x = images(model.config, 2, seed=3)
    with torch.no_grad():
        _, _, posteriors, _ = model._posterior_pass(x, use_mean=True)
    for z, q in zip(runtime.encode(x.numpy()), posteriors, strict=True):  # flowed, not the Normal's mean
        assert np.abs(z - q.z0.numpy()).max() > 1e-3


def test_graphs_draw_no_random_numbers(tiny):
    _, export_dir, _, _ = tiny
    for name in ONNX_FILES:
        proto = onnx.load(os.fspath(export_dir / name))
        ops = {node.op_type for node in proto.graph.node}
        ops |= {node.op_type for function in proto.functions for node in function.node}
        assert "Conv" in ops, name
        assert not ops & RANDOM_OPS, f"{name} has random ops {sorted(ops & RANDOM_OPS)}"


def test_graph_inputs_and_outputs(tiny):
    model, export_dir, _, _ = tiny
    g = model.num_groups
    image_shape = ["batch", 1, 16, 16]
    expected = {
        "decoder.onnx": (["temperature", *[f"noise_{i}" for i in range(g)]], ["images"]),
        "decode_latents.onnx": ([f"z_{i}" for i in range(g)], ["images"]),
        "encoder.onnx": (["x"], [f"z_{i}" for i in range(g)]),
    }
    for name, (inputs, outputs) in expected.items():
        session = ort.InferenceSession(os.fspath(export_dir / name), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == inputs
        assert [o.name for o in session.get_outputs()] == outputs
    decoder = ort.InferenceSession(os.fspath(export_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert decoder.get_inputs()[0].shape == [g]
    assert decoder.get_inputs()[1].shape == ["batch", *model.latent_shapes()[0]]
    assert decoder.get_outputs()[0].shape == image_shape


def test_json_describes_the_export(tiny):
    model, export_dir, meta, _ = tiny
    assert json.loads((export_dir / META_FILE).read_text()) == meta
    assert meta["num_groups"] == model.num_groups == 3
    assert meta["num_scales"] == model.num_scales == 2
    assert meta["groups_per_scale"] == model.groups_per_scale == [1, 2]
    assert meta["scale_of_group"] == model.scale_of_group == [0, 1, 1]
    assert meta["latent_shapes"] == [list(s) for s in model.latent_shapes()]
    assert (meta["image_size"], meta["channels"]) == (16, 1)
    assert NVAEConfig.from_dict(meta["config"]) == model.config
    assert meta["source"] == "preset:tiny"
    assert meta["bn_readjust"] == {"applied": False, "temperature": None, "num_batches": None, "batch_size": None}
    assert isinstance(meta["opset"], int) and meta["opset"] >= 18
    exported_at = datetime.datetime.fromisoformat(meta["exported_at"])
    assert abs(datetime.datetime.now(datetime.UTC) - exported_at) < datetime.timedelta(hours=1)
    decoder = meta["graphs"]["decoder"]
    assert decoder["file"] == "decoder.onnx"
    assert decoder["inputs"][0] == {"name": "temperature", "dtype": "float32", "shape": [3]}
    assert decoder["inputs"][1] == {"name": "noise_0", "dtype": "float32", "shape": ["batch", 4, 4, 4]}
    assert decoder["outputs"] == [{"name": "images", "dtype": "float32", "shape": ["batch", 1, 16, 16]}]
    assert [o["name"] for o in meta["graphs"]["encoder"]["outputs"]] == ["z_0", "z_1", "z_2"]


# ---------------------------------------------------------------- the runtime
def test_runtime_describes_the_model(tiny, runtime):
    model, _, _, _ = tiny
    assert runtime.provider == "CPUExecutionProvider"  # no usable CUDA on the test machines
    assert runtime.num_scales == model.num_scales
    assert runtime.num_groups == model.num_groups
    assert runtime.groups_per_scale == model.groups_per_scale
    assert runtime.scale_of_group == model.scale_of_group
    assert (runtime.image_size, runtime.channels) == (16, 1)
    assert runtime.meta["source"] == "preset:tiny"


def test_sampling_is_reproducible_per_seed(runtime):
    a, b, c = runtime.sample(3, seed=5), runtime.sample(3, seed=5), runtime.sample(3, seed=6)
    assert a.shape == (3, 1, 16, 16) and a.dtype == np.float32
    assert ((a >= 0) & (a <= 1)).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    cold = runtime.sample(2, temperature=[0.0, 0.0, 0.0], seed=1)
    np.testing.assert_allclose(cold, runtime.sample(2, temperature=0.0, seed=2), atol=1e-6)  # T=0: the means


def test_the_runtime_imports_without_torch():
    code = "import sys, nvae_hub.onnx; assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.sample(0), "positive integer"),
        (lambda r: r.sample(2, temperature=-0.5), "finite number >= 0"),
        (lambda r: r.sample(2, temperature=float("nan")), "finite number >= 0"),
        (lambda r: r.sample(2, temperature=[1.0, 1.0]), "one temperature or 3"),
        (lambda r: r.encode(np.zeros((2, 1, 8, 8), np.float32)), r"shape \(N, 1, 16, 16\)"),
        (lambda r: r.encode(np.zeros((2, 16, 16), np.float32)), r"shape \(N, 1, 16, 16\)"),
        (lambda r: r.encode(np.zeros((0, 1, 16, 16), np.float32)), "empty batch"),
        (lambda r: r.encode(np.zeros((2, 1, 16, 16), np.uint8)), "float images"),
        (lambda r: r.reconstruct(np.full((2, 1, 16, 16), 2.0, np.float32)), r"values in \[0, 1\]"),
        (lambda r: r.decode([np.zeros((1, 4, 4, 4), np.float32)]), "expected 3 latent groups"),
        (lambda r: r.decode([np.zeros((1, 4, 4, 4), np.float32)] * 3), "latent group 1 has shape"),
        (lambda r: r.decode_noise([np.zeros((2, 4, 4, 4)), np.zeros((1, 4, 8, 8)), np.zeros((1, 4, 8, 8))]),
         "noise group 1 has shape"),
        (lambda r: r.swap(np.zeros((2, 1, 16, 16)), np.zeros((3, 1, 16, 16)), [0]), "same shape"),
        (lambda r: r.swap(np.zeros((2, 1, 16, 16)), np.zeros((2, 1, 16, 16)), [2]), r"unknown scale\(s\) \[2\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(runtime, call, message):
    with pytest.raises(ValueError, match=message):
        call(runtime)


NAN = float("nan")
X = np.random.default_rng(0).integers(0, 2, (2, 1, 16, 16)).astype(np.float32)


def zero_latents(convert, dtype=np.float32) -> list:
    """Zero latents (or noise) of the tiny model, batch 2, through ``convert`` (to torch or NumPy)."""
    return [convert(np.zeros((2, *shape), dtype)) for shape in ((4, 4, 4), (4, 8, 8), (4, 8, 8))]


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("sample", lambda t: (2, [0.7, NAN, 0.7])),
        ("sample", lambda t: (2, [0.7, 0.7, -0.1])),
        ("sample", lambda t: (2, np.array([0.7, np.inf, 0.7]))),
        ("sample", lambda t: (2, "0.7")),
        ("sample", lambda t: (2, ["0.7"] * 3)),
        ("sample", lambda t: (2, None)),
        ("sample", lambda t: (2, [1.0, 1.0])),
        ("sample", lambda t: ("2",)),
        ("sample", lambda t: (2.0,)),
        ("sample", lambda t: (True,)),
        ("sample", lambda t: (np.int64(0),)),
        ("sample", lambda t: (2, 1.0, 2**64)),
        ("sample", lambda t: (2, 1.0, -1)),
        ("sample", lambda t: (2, 1.0, "7")),
        ("sample_noise", lambda t: (2, 1.5)),
        ("decode_noise", lambda t: ([t(np.zeros((2, 4, 4, 4), np.float32))] * 2,)),
        ("decode_noise", lambda t: (zero_latents(t, np.int64),)),
        ("decode_noise", lambda t: (zero_latents(t), [0.5, NAN, 0.5])),
        ("decode", lambda t: (zero_latents(t)[:2],)),
        ("encode", lambda t: (t(X * NAN),)),
        ("encode", lambda t: (t(X[:, :, :8]),)),
        ("encode", lambda t: (t(X[:0]),)),
        ("encode", lambda t: (t(X.astype(np.uint8)),)),
        ("reconstruct", lambda t: (t(X * 2),)),
        ("decode", lambda t: ([t(np.zeros((1, 4, 4, 4), np.float32))] * 3,)),
        ("swap", lambda t: (t(X), t(X), 0)),
        ("swap", lambda t: (t(X), t(X), "01")),
        ("swap", lambda t: (t(X), t(X), ["0"])),
        ("swap", lambda t: (t(X), t(X), [2])),
        ("swap", lambda t: (t(X), t(X), [-1])),
        ("swap", lambda t: (t(X), t(X * 2), [0])),
        ("swap", lambda t: (t(X), t(X[:1]), [0])),
    ],
)
def test_pytorch_and_onnxruntime_refuse_the_same_inputs_with_the_same_errors(tiny, runtime, method, args):
    errors = []
    for target, convert in ((tiny[0], torch.from_numpy), (runtime, np.asarray)):
        with pytest.raises((TypeError, ValueError)) as refused:
            getattr(target, method)(*args(convert))
        errors.append((type(refused.value), str(refused.value)))
    assert errors[0] == errors[1]


def test_the_runtime_takes_numpy_scalars_and_the_largest_seed(tiny, runtime):
    noise = runtime.sample_noise(np.int64(2), seed=np.uint64(2**64 - 1))
    expected = tiny[0].decode_noise([torch.from_numpy(z) for z in noise], 0.5).detach().numpy()
    for temperature in (np.float32(0.5), np.full(3, 0.5, np.float32), [np.float64(0.5)] * 3, torch.tensor(0.5)):
        np.testing.assert_allclose(runtime.decode_noise(noise, temperature), expected, atol=1e-4)
    np.testing.assert_array_equal(runtime.swap(X, X[::-1], np.array([0])), runtime.swap(X, X[::-1], [0]))


def test_missing_export_and_bad_options_are_clear_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an NVAE ONNX export"):
        OnnxNVAE(tmp_path)
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        OnnxNVAE(tiny[1], num_threads=0)
    assert OnnxNVAE(tiny[1], num_threads=1).sample(1, seed=0).shape == (1, 1, 16, 16)


# ---------------------------------------------------------------- the CLI, with BN re-estimation
@torch.no_grad()
def test_cli_exports_a_saved_model_with_readjusted_batchnorm_for_sampling_only(tmp_path, capsys):
    """export/onnx.py on a saved model, trained a little so that its BatchNorm statistics are not the initial ones:
    the sampling graph uses the re-estimated statistics, the graphs that start from data (encoder, reconstruction)
    the learned ones, exactly as the model does. (The script is run in-process: a subprocess would spend most of the
    time importing; tests/test_export_checks.py runs it as a script.)
    Mutation checked: exporting every graph from the readjusted copy makes the encoder and reconstruction differ."""
    from test_faithful import binary_images, trained_a_little

    model = trained_a_little()
    save_pretrained(model, tmp_path / "model")
    out = tmp_path / "onnx"
    export_cli().main(["--model", os.fspath(tmp_path / "model"), "--output", os.fspath(out),
                       "--readjust-bn-temperature", "0.6", "--readjust-bn-batches", "2",
                       "--readjust-bn-batch-size", "8"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output"] == os.fspath(out)

    meta = json.loads((out / META_FILE).read_text())
    assert meta["bn_readjust"] == {"applied": True, "temperature": 0.6, "num_batches": 2, "batch_size": 8}
    assert meta["source"] == os.fspath(tmp_path / "model")
    runtime = OnnxNVAE(out, num_threads=1)
    x = binary_images(model.config, 3, seed=7)
    for g, (onnx_z, z) in enumerate(zip(runtime.encode(x.numpy()), model.encode(x).z, strict=True)):
        _assert_close(onnx_z, z, 1e-4, f"encoding group {g} after BN re-estimation")
    _assert_close(runtime.reconstruct(x.numpy()), model.reconstruct(x), 1e-4, "reconstruction after BN re-estimation")
    readjusted = trained_a_little()
    readjusted.readjust_bn(0.6, num_batches=2, batch_size=8)
    noise = model.sample_noise(3, seed=1)
    onnx_images = runtime.decode_noise([z.numpy() for z in noise], 0.6)
    _assert_close(onnx_images, readjusted.decode_noise(noise, 0.6), 1e-4, "sampling after BN re-estimation")
    assert np.abs(onnx_images - model.decode_noise(noise, 0.6).numpy()).max() > 1e-3  # the statistics did change
