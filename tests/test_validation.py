"""One validation path (``nvae_hub.validation``) for every public method of NVAE: NumPy scalars and arrays work as
plain numbers, NaN or negative temperatures are refused inside lists too, text is refused with a clear message,
seeds are range-checked, images of any float dtype work. test_onnx.py checks that the ONNX runtime gives the very
same errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.validation import MAX_SEED

NAN = float("nan")


@pytest.fixture(scope="module")
def model() -> NVAE:
    torch.manual_seed(0)
    return NVAE(NVAEConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand((2, 1, 16, 16), generator=generator).bernoulli(generator=generator)


def seeded(call, *args, **kwargs):
    """``call`` with torch's global generator seeded (``nll`` draws posterior samples from it)."""
    torch.manual_seed(0)
    return call(*args, **kwargs)


def test_numpy_scalars_and_arrays_work_as_plain_numbers(model, x):
    g = model.num_groups
    expected = model.sample(2, temperature=0.5, seed=3)
    for temperature in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.full(g, 0.5, np.float32),
                        torch.full((g,), 0.5), [np.float32(0.5)] * g):
        images = model.sample(np.int64(2), temperature=temperature, seed=np.uint64(3))
        assert torch.equal(images, expected), type(temperature)
    torch.testing.assert_close(model.sample(2, temperature=np.float32(0.7), seed=3),
                               model.sample(2, temperature=0.7, seed=3))
    assert torch.equal(seeded(model.nll, x, num_samples=np.int32(2)), seeded(model.nll, x, num_samples=2))
    assert torch.equal(model.swap(x, x.flip(0), np.array([0])), model.swap(x, x.flip(0), [0]))
    assert torch.equal(model.encode(x, sample=np.bool_(False)).z[0], model.encode(x).z[0])


def test_the_largest_seed_works_and_the_next_is_refused(model):
    assert model.sample(1, seed=MAX_SEED).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 18446744073709551615, got "
                                         r"18446744073709551616"):
        model.sample(1, seed=2**64)


def test_images_of_any_float_dtype_give_the_model_dtype_results(model, x):
    nll = seeded(model.nll, x, num_samples=2)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):  # binary pixels: exact in every dtype
        assert torch.equal(seeded(model.nll, x.to(dtype), num_samples=2), nll)
        assert torch.equal(model.reconstruct(x.to(dtype)), model.reconstruct(x))
    assert torch.equal(seeded(model.bits_per_dim, x.double(), num_samples=2),
                       seeded(model.bits_per_dim, x, num_samples=2))
    assert seeded(model.loss, x.double()).total.dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m, x: m.sample(2, temperature=[0.7, NAN, 0.7]), ValueError,
         r"temperature\[1\] must be a finite number >= 0, got nan"),
        (lambda m, x: m.sample(2, temperature=[0.7, 0.7, -0.1]), ValueError,
         r"temperature\[2\] must be a finite number >= 0, got -0.1"),
        (lambda m, x: m.sample(2, temperature=np.array([0.7, np.inf, 0.7])), ValueError, r"temperature\[1\].*inf"),
        (lambda m, x: m.sample(2, temperature=torch.tensor([0.7, -1.0, 0.7])), ValueError, r"temperature\[1\]"),
        (lambda m, x: m.sample(2, temperature="0.7"), TypeError,
         r"temperature must be a number, got the string '0.7' \(pass a number, not text\)"),
        (lambda m, x: m.sample(2, temperature=["0.7"] * 3), TypeError, r"temperature\[0\] must be a number"),
        (lambda m, x: m.sample(2, temperature=None), TypeError, "temperature must be a number, got None"),
        (lambda m, x: m.sample(2, temperature=True), TypeError, "temperature must be a number"),
        (lambda m, x: m.sample(2, temperature=[[0.7]] * 3), TypeError, r"temperature\[0\] must be a number"),
        (lambda m, x: m.sample("2"), TypeError, "the number of samples must be an integer, got the string '2'"),
        (lambda m, x: m.sample(2.0), TypeError, "the number of samples must be an integer, got 2.0"),
        (lambda m, x: m.sample(np.float32(2)), TypeError, "the number of samples must be an integer"),
        (lambda m, x: m.sample(0), ValueError, "the number of samples must be a positive integer, got 0"),
        (lambda m, x: m.sample(2, seed=-1), ValueError, "seed must be an integer from 0 to"),
        (lambda m, x: m.sample(2, seed="7"), TypeError, "seed must be an integer, got the string '7'"),
        (lambda m, x: m.sample_noise(2, seed=1.5), TypeError, "seed must be an integer"),
        (lambda m, x: m.decode_noise(m.sample_noise(2)[:2]), ValueError, "expected 3 noise groups, got 2"),
        (lambda m, x: m.decode_noise(m.sample_noise(2)[0]), TypeError, "a list of noise tensors"),
        (lambda m, x: m.decode_noise([z.long() for z in m.sample_noise(2)]), ValueError,
         "noise group 0 must be float, got dtype int64"),
        (lambda m, x: m.decode_noise(m.sample_noise(2), temperature=-1), ValueError, "temperature must be"),
        (lambda m, x: m.encode(x, sample="yes"), TypeError, "sample must be True or False"),
        (lambda m, x: m.encode(x.numpy()), TypeError, "expected x to be a torch.Tensor"),
        (lambda m, x: m.encode(x * NAN), ValueError, r"values in \[0, 1\] for x, got values in \[nan, nan\]"),
        (lambda m, x: m.decode([z[:1] if g == 1 else z for g, z in enumerate(m.encode(x).z)]), ValueError,
         r"latent group 1 has shape \(1, 4, 8, 8\)"),
        (lambda m, x: m.swap(x, x, 0), TypeError, "scales must be a list of scale indices, got 0"),
        (lambda m, x: m.swap(x, x, "01"), TypeError, "scales must be a list of scale indices"),
        (lambda m, x: m.swap(x, x, ["0"]), TypeError, "each scale must be an integer"),
        (lambda m, x: m.swap(x, x, [2]), ValueError, r"unknown scale\(s\) \[2\]; this model has scales 0..1"),
        (lambda m, x: m.swap(x, x * 2, [0]), ValueError, r"values in \[0, 1\] for x_b"),
        (lambda m, x: m.nll(x, num_samples=0), ValueError, "num_samples must be a positive integer"),
        (lambda m, x: m.nll(x, num_samples="10"), TypeError, "num_samples must be an integer"),
        (lambda m, x: m.nll(x, chunk_size=0), ValueError, "chunk_size must be a positive integer"),
        (lambda m, x: m.nll(x.long()), ValueError, "float images"),
        (lambda m, x: m.bits_per_dim(x, num_samples=1.5), TypeError, "num_samples must be an integer"),
        (lambda m, x: m.readjust_bn(temperature=NAN), ValueError, "temperature must be a finite number"),
        (lambda m, x: m.readjust_bn(temperature=[0.7, -1, 0.7]), ValueError, r"temperature\[1\]"),
        (lambda m, x: m.readjust_bn(num_batches=0), ValueError, "num_batches must be a positive integer"),
        (lambda m, x: m.readjust_bn(batch_size="64"), TypeError, "batch_size must be an integer"),
        (lambda m, x: m.readjust_bn(seed=2**64), ValueError, "seed must be an integer from 0 to"),
    ],
)
def test_bad_arguments_are_refused_with_clear_messages(model, x, call, error, message):
    with pytest.raises(error, match=message):
        call(model, x)


def test_a_refused_readjust_bn_leaves_the_statistics_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in (dict(num_batches=0), dict(temperature=-0.5), dict(batch_size=0)):
        with pytest.raises(ValueError):
            model.readjust_bn(**bad)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not model.training


def test_the_validation_module_imports_neither_torch_nor_numpy():
    code = ("import sys, nvae_hub.validation; bad = {'torch', 'numpy'} & set(sys.modules); "
            "assert not bad, bad; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
