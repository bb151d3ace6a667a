"""The model, training and export on a CUDA GPU: `make test-gpu` (or `pytest -m cuda`), deselected otherwise.

They fail, not skip, on a machine without a GPU: asking for them there is a mistake worth hearing about.
TF32 is off so that CUDA computes in true float32 and can be compared with the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.hub import load_pretrained
from nvae_hub.training import EMA, STAT_NAMES, Adamax, TrainStep, loss_dict

pytestmark = pytest.mark.cuda
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))
import trainer  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def cuda_in_float32():
    if not torch.cuda.is_available():
        pytest.fail("the CUDA tests need a CUDA GPU (`make test` runs everything else)")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(autouse=True)
def fresh_state():
    from accelerate.state import AcceleratorState

    torch._dynamo.reset()
    AcceleratorState._reset_state(reset_partial_state=True)  # each test picks its own mixed precision
    yield


def model_on(preset: str, device: str, seed: int = 0) -> NVAE:
    torch.manual_seed(seed)
    return NVAE(NVAEConfig.preset(preset)).to(device)


def binary_batch(n: int, size: int, seed: int = 0, device: str = "cuda") -> torch.Tensor:
    """Pure noise: every pixel 0 or 1 with probability 1/2 (nothing to learn: 784 ln 2 = 543.4 nats at 28x28)."""
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)).bernoulli()
    return x.to(device)


def rectangles_batch(n: int, size: int, seed: int = 0, device: str = "cuda") -> torch.Tensor:
    """Binary images with something to learn: one white rectangle each, of random size and place, on black."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    for image in x:
        top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        height, width = torch.randint(size // 4, size // 2, (2,), generator=generator).tolist()
        image[:, top:top + height, left:left + width] = 1.0
    return x.to(device)


# ---------------------------------------------------------------------------------------------- same results


@pytest.mark.parametrize("which", ["bundled", "mnist-small"])
def test_the_same_seed_gives_the_same_images_on_cpu_and_cuda(which):
    cpu = load_pretrained("mnist") if which == "bundled" else model_on(which, "cpu").eval()
    gpu = load_pretrained("mnist", device="cuda") if which == "bundled" else model_on(which, "cuda").eval()
    for temperature in (1.0, 0.6):
        want = cpu.sample(6, temperature=temperature, seed=3)
        got = gpu.sample(6, temperature=temperature, seed=3)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    x = binary_batch(4, 28, device="cpu")
    torch.testing.assert_close(gpu.reconstruct(x.cuda()).cpu(), cpu.reconstruct(x), rtol=1e-4, atol=1e-4)
    a, b = binary_batch(3, 28, seed=1, device="cpu"), binary_batch(3, 28, seed=2, device="cpu")
    torch.testing.assert_close(gpu.swap(a.cuda(), b.cuda(), [0]).cpu(), cpu.swap(a, b, [0]), rtol=1e-4, atol=1e-4)


def test_export_from_a_cuda_model_matches_pytorch(tmp_path):
    from nvae_hub.export import export_onnx
    from nvae_hub.onnx import OnnxNVAE

    model = load_pretrained("mnist", device="cuda")
    export_onnx(model, tmp_path, source="mnist")
    assert model.device.type == "cuda"  # the export works on a copy
    runtime = OnnxNVAE(tmp_path)
    noise = model.sample_noise(2, seed=0)
    with torch.no_grad():
        want = model.decode_noise(noise, 0.8).cpu().numpy()
    got = runtime.decode_noise([z.cpu().numpy() for z in noise], 0.8)
    assert abs(got - want).max() < 1e-4


# ---------------------------------------------------------------------------------------------- the training step


def cuda_step(preset: str, bf16: bool, accelerator=None, cuda_graph: bool = False) -> TrainStep:
    model = model_on(preset, "cuda").train()
    optimizer = Adamax(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=3e-4)
    loss_fn = None
    if accelerator is not None:
        loss_module, optimizer = accelerator.prepare(trainer.LossModule(model), optimizer)
        loss_fn = loss_module
    step = TrainStep(model, optimizer, EMA(model, 0.999), grad_clip=200.0, skip_threshold=2000.0,
                     loss_fn=loss_fn, accelerator=accelerator, autocast_dtype=torch.bfloat16 if bf16 else None,
                     cuda_graph=cuda_graph)
    return step


@pytest.mark.parametrize("bf16", [False, True])
def test_a_training_step_never_waits_for_the_gpu(bf16):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no")
    step = cuda_step("mnist-small", bf16, accelerator)
    x = binary_batch(16, 28)
    for n in range(1, 3):  # first calls: cuDNN plans, lazy CUDA state
        step(x, kl_weight=0.3, reg_weight=1e-2, lr=1e-3, num_updates=n)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = [step(x, kl_weight=0.3, reg_weight=1e-2, lr=1e-3, num_updates=n) for n in range(3, 6)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(torch.stack(rows)).all()


def test_bf16_training_steps_stay_finite_and_lower_the_loss():
    step = cuda_step("mnist-small", bf16=True)
    x = rectangles_batch(64, 28)
    rows = torch.stack([step(x, kl_weight=min(1.0, n / 50), reg_weight=1e-2, lr=1e-3 * min(1.0, n / 20),
                             num_updates=n) for n in range(1, 101)]).cpu()
    assert torch.isfinite(rows).all()
    assert rows[:, STAT_NAMES.index("skipped")].sum() == 0
    loss = rows[:, STAT_NAMES.index("recon")]
    assert loss[-10:].mean() < 0.7 * loss[:10].mean()


def copy_training_state_(into: TrainStep, source: TrainStep) -> None:
    """Make ``into``'s model, optimizer state and EMA equal ``source``'s, in place (a captured graph keeps its
    tensors)."""
    with torch.no_grad():
        for a, b in zip(into.model.state_dict().values(), source.model.state_dict().values(), strict=True):
            a.copy_(b)
        for a, b in zip(into.ema.module.state_dict().values(), source.ema.module.state_dict().values(),
                        strict=True):
            a.copy_(b)
        for p, q in zip(into.model.parameters(), source.model.parameters(), strict=True):
            for name, value in into.raw_optimizer.state[p].items():
                value.copy_(source.raw_optimizer.state[q][name])


@pytest.mark.parametrize("bf16", [False, True])
def test_a_training_step_captured_as_a_cuda_graph_equals_the_eager_step(monkeypatch, bf16):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    eager, graphed = cuda_step("mnist-small", bf16), cuda_step("mnist-small", bf16, cuda_graph=True)
    batches = [rectangles_batch(16, 28, seed=n) for n in range(8)]
    settings = [dict(kl_weight=0.1 * n, reg_weight=1e-2 / n, lr=1e-3 * n, num_updates=n) for n in range(1, 9)]
    for x, s in zip(batches[:4], settings[:4], strict=True):  # three eager steps on a side stream, then the capture
        eager(x, **s)
        graphed(x, **s)
    assert graphed.graph is not None
    copy_training_state_(graphed, eager)  # the capture drew its noise at another offset of the generator
    torch.cuda.synchronize()
    rows = []
    torch.cuda.set_sync_debug_mode("error")  # a replay waits for nothing (the comparisons below do, so they wait)
    try:
        for n, (x, s) in enumerate(zip(batches[4:], settings[4:], strict=True), start=4):
            if n == 6:
                x = x[:10]  # a smaller batch runs eagerly, outside the graph
            torch.cuda.manual_seed(n)
            want = eager(x, **s)
            torch.cuda.manual_seed(n)
            rows.append((graphed(x, **s), want))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for got, want in rows:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(graphed.model.state_dict().values(), eager.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(graphed.ema.module.parameters(), eager.ema.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_compiled_loss_agrees_with_eager_on_cuda(monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # the same random numbers as eager
    eager, compiled = model_on("tiny", "cuda").train(), model_on("tiny", "cuda").train()
    for model in (eager, compiled):  # as the training step does before its first update (not inside the graph)
        model.warm_up_spectral_vectors()
    x = binary_batch(8, 16)
    kl_weight, reg_weight = torch.tensor(0.4, device="cuda"), torch.tensor(1e-2, device="cuda")
    loss = torch.compile(loss_dict, fullgraph=True)
    for seed in range(2):
        torch.manual_seed(seed)
        want = loss_dict(eager, x, kl_weight, reg_weight)
        want["total"].backward()
        torch.manual_seed(seed)
        got = loss(compiled, x, kl_weight, reg_weight)
        got["total"].backward()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-3)
        for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)


def test_compiled_sampling_with_cuda_graphs_matches_eager():
    model = load_pretrained("mnist", device="cuda")
    for n in (1, 4, 1):  # one CUDA graph per batch size, replayed
        for seed in (0, 1):
            got = model.sample(n, temperature=0.7, seed=seed, compile=True)
            torch.testing.assert_close(got, model.sample(n, temperature=0.7, seed=seed), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- accelerate launch


def launch(*args: str, timeout: int = 600) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--dynamo_backend", "no", *args]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda_graph"])
def test_accelerate_launch_trains_a_few_hundred_steps_on_cuda(tmp_path, precision, cuda_graph):
    launch("--mixed_precision", precision, "train/run.py", "--preset", "tiny", "--dataset", "synthetic",
           "--batch-size", "32", "--max-steps", "300", "--log-every", "50", "--sample-every", "300",
           "--checkpoint-every", "300", "--output-dir", str(tmp_path), *["--cuda-graph"] * cuda_graph)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_updates"] == 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 301))
    assert sum(r["loss"] for r in log[-20:]) < 0.5 * sum(r["loss"] for r in log[:20])
    card = (tmp_path / "final" / "README.md").read_text()
    assert torch.cuda.get_device_name() in card and f"mixed precision {precision}" in card


def test_accelerate_launch_with_compile(tmp_path):
    launch("--mixed_precision", "bf16", "train/run.py", "--preset", "tiny", "--dataset", "synthetic",
           "--batch-size", "32", "--max-steps", "30", "--compile", "--log-every", "10", "--output-dir", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_updates"] == 0 and summary["final"]["loss"] is not None
