"""torch.compile: the loss (forward and backward) and sampling compile to one graph each and agree with eager.

On the CPU the loss goes through AOTAutograd with the "aot_eager" backend (the whole forward and backward
graph, without Inductor's code generation, which takes minutes on a small CPU), on a model smaller than the
tiny preset with every kind of layer; tests/test_cuda.py runs Inductor itself, on the GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nvae_hub import NVAE, NVAEConfig
from nvae_hub import model as model_module
from nvae_hub.training import loss_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import run
import trainer

# One latent group per scale at two scales, one cell everywhere: every layer type, as few layers as possible.
MICRO = NVAEConfig.preset("tiny").replace(groups_per_scale=1, num_channels=4, latent_channels=2, name="micro")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def micro(seed: int = 0) -> NVAE:
    torch.manual_seed(seed)
    return NVAE(MICRO)


def gradients(model: NVAE) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_the_training_loss_compiles_to_one_graph_and_agrees_with_eager():
    eager, compiled = micro().train(), micro().train()
    for model in (eager, compiled):  # as the training step does before its first update (not inside the graph)
        model.warm_up_spectral_vectors()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)).bernoulli()
    kl_weight, reg_weight = torch.tensor(0.4), torch.tensor(1e-2)
    # fullgraph=True: any graph break (a Python branch on a tensor, .item(), ...) is an error
    loss = torch.compile(loss_dict, backend="aot_eager", fullgraph=True)
    for step in range(2):  # the second call reuses the graph, with the state the first one left
        torch.manual_seed(step)
        want = loss_dict(eager, x, kl_weight, reg_weight)
        want["total"].backward()
        torch.manual_seed(step)
        got = loss(compiled, x, kl_weight, reg_weight)
        got["total"].backward()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-4)
        for a, b in zip(gradients(compiled), gradients(eager), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled.buffers(), eager.buffers(), strict=True):  # BN statistics, power iteration, counter
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled.sr_steps.item() == 2
    # A new KL weight is a new value of the same input, not a recompilation.
    with torch.compiler.set_stance("fail_on_recompile"):
        loss(compiled, x, torch.tensor(1.0), reg_weight)


def test_compiled_sampling_matches_eager_for_any_temperature(monkeypatch):
    options, real_compile = [], torch.compile

    def compile_with_aot_eager(fn, **kwargs):
        options.append(kwargs)
        return real_compile(fn, backend="aot_eager", fullgraph=kwargs["fullgraph"], dynamic=kwargs["dynamic"])

    monkeypatch.setattr(model_module.torch, "compile", compile_with_aot_eager)
    model = micro().eval()
    eager = model.sample(3, temperature=0.7, seed=5)
    torch.testing.assert_close(model.sample(3, temperature=0.7, seed=5, compile=True), eager, rtol=1e-5, atol=1e-6)
    per_group = [0.2, 0.9]
    with torch.compiler.set_stance("fail_on_recompile"):  # temperatures are an input, not a constant
        got = model.sample(3, temperature=per_group, seed=6, compile=True)
    torch.testing.assert_close(got, model.sample(3, temperature=per_group, seed=6), rtol=1e-5, atol=1e-6)
    assert options == [{"fullgraph": True, "dynamic": False, "mode": None}]  # CUDA graphs only on CUDA
    copy = model.__class__(MICRO)
    copy.load_state_dict(model.state_dict())
    assert copy._compiled_decode is None and __import__("copy").deepcopy(model)._compiled_decode is None


def test_training_with_compile_runs_the_compiled_loss(tmp_path, monkeypatch):
    options, real_compile = [], torch.compile

    def compile_with_dynamo_only(module, **kwargs):
        options.append(kwargs)
        return real_compile(module, backend="eager", fullgraph=kwargs["fullgraph"])

    monkeypatch.setattr(trainer.torch, "compile", compile_with_dynamo_only)
    MICRO.save(tmp_path / "micro.json")
    summary = run.main(["--config", str(tmp_path / "micro.json"), "--dataset", "synthetic", "--batch-size", "8",
                        "--max-steps", "3", "--compile", "--output-dir", str(tmp_path / "run")])
    assert options == [{"mode": None, "fullgraph": True}]
    assert summary["skipped_updates"] == 0 and summary["final"]["loss"] is not None


def test_compiling_the_loss_before_the_warm_up_is_refused():
    model = micro().train()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)).bernoulli()
    loss = torch.compile(loss_dict, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="call warm_up_spectral_vectors"):
        loss(model, x, torch.tensor(1.0), torch.tensor(1e-2))
