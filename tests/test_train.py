"""Training (train/run.py, train/trainer.py, train/checkpoint.py) and evaluation (train/evaluate.py).

Every run uses the tiny preset on synthetic data for a few dozen steps, with one CPU thread per process:
the runs stay fast on a busy machine and bit-for-bit reproducible, which the resume test relies on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.hub import load_pretrained

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))  # the scripts of train/ import each other as siblings

import checkpoint  # noqa: E402
import evaluate  # noqa: E402
import run  # noqa: E402
import trainer  # noqa: E402

TINY = ["--preset", "tiny", "--dataset", "synthetic", "--batch-size", "16", "--lr-warmup", "0.1",
        "--lr-warmup-steps", "0", "--log-every", "5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def read_log(output_dir: Path) -> list[dict]:
    return trainer.read_log(output_dir / "log.jsonl")


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a Python script of the repository in a subprocess (one thread), failing with its output."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# ---------------------------------------------------------------------------------------------- a full run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 40-step run with evaluation and a (monkeypatched) push to the Hub; returns (output dir, pushes)."""
    out = tmp_path_factory.mktemp("run")
    pushes = []

    def fake_push(model, repo_id, training=None, **kwargs):
        pushes.append((model, repo_id, training, kwargs))
        return f"https://huggingface.co/{repo_id}"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "push_to_hub", fake_push)
        run.main([*TINY, "--max-steps", "40", "--output-dir", str(out), "--checkpoint-every", "10",
                  "--keep-checkpoints", "2", "--sample-every", "20", "--eval-samples", "2", "--eval-limit", "8",
                  "--push-to-hub", "someone/tiny-nvae"])
    return out, pushes


def test_training_lowers_the_loss_and_exports_a_loadable_model(trained):
    out, pushes = trained
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 41))
    first_elbo = log[0]["recon"] + log[0]["kl"]
    last_elbo = sum(r["recon"] + r["kl"] for r in log[-5:]) / 5
    assert last_elbo < 0.7 * first_elbo
    assert not any(r["skipped"] for r in log)

    model = load_pretrained(out / "final")
    assert model.config == NVAEConfig.preset("tiny")
    ema = load_file(out / "checkpoints" / "step-00000040" / "ema.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]), name
    assert torch.isfinite(model.sample(4, seed=0)).all()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["skipped_updates"] == 0 and summary["images_per_second"] > 0
    assert set(summary["test"]) == {"test_nll_nats", "test_bits_per_dim"}
    card = (out / "final" / "README.md").read_text()
    assert "train/run.py --preset tiny --dataset synthetic" in card and "test_nll_nats" in card
    assert f"| 1 x CPU ({os.cpu_count()} cores), mixed precision no |" in card

    [(pushed, repo_id, info, _)] = pushes
    assert repo_id == "someone/tiny-nvae" and info.steps == 40 and info.dataset == "synthetic"
    assert torch.equal(pushed.h0, model.h0)


def test_a_run_writes_checkpoints_pictures_and_tensorboard_logs(trained):
    out, _ = trained
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-00000030", "step-00000040"]
    for name in ["samples/step-00000020-samples.png", "samples/step-00000040-recon.png",
                 "plots/learning_curves.png", "plots/kl_per_group.png"]:
        assert (out / name).stat().st_size > 0, name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_a_new_run_refuses_to_overwrite_checkpoints(trained, capsys):
    out, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        run.main([*TINY, "--max-steps", "40", "--output-dir", str(out)])
    assert exit_info.value.code == 1 and "pass --resume to continue that run" in capsys.readouterr().err


def test_evaluate_prints_one_json_object(trained):
    out, _ = trained
    result = python("train/evaluate.py", "--model", str(out / "final"), "--dataset", "synthetic", "--limit", "6",
                    "--num-samples", "3", "--batch-size", "4", "--seed", "1")
    report = json.loads(result.stdout)
    assert report["num_images"] == 6 and report["num_samples"] == 3 and report["seed"] == 1
    assert math.isfinite(report["nll_nats"]) and report["nll_nats_stderr"] > 0
    assert report["bits_per_dim"] == pytest.approx(report["nll_nats"] / (16 * 16 * math.log(2)))


def test_fine_tuning_starts_from_the_given_models_config_and_weights(trained, tmp_path, capsys):
    out, _ = trained
    start = load_pretrained(out / "final")
    # At a learning rate of 0 nothing can move: the fine-tuned model must hold exactly the weights it started from.
    fine_tune = ["--dataset", "synthetic", "--batch-size", "16", "--max-steps", "2", "--lr", "0", "--lr-min", "0"]
    run.main([*fine_tune, "--init-from", str(out / "final"), "--output-dir", str(tmp_path / "tuned")])
    tuned = load_pretrained(tmp_path / "tuned" / "final")
    assert tuned.config == start.config
    for (name, before), after in zip(start.named_parameters(), tuned.parameters(), strict=True):
        assert torch.equal(before, after), name
    assert "--init-from" in (tmp_path / "tuned" / "final" / "README.md").read_text()

    with pytest.raises(SystemExit) as exit_info:
        run.main([*fine_tune, "--init-from", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "refused")])
    assert exit_info.value.code == 1 and "--init-from" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "log.jsonl").exists()


# ---------------------------------------------------------------------------------------------- skipped updates


def test_a_nan_update_is_skipped_counted_and_logged(tmp_path, monkeypatch):
    original_loss, calls = NVAE.loss, []

    def loss_with_one_nan(self, *args, **kwargs):
        out = original_loss(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            return dataclasses.replace(out, total=out.total * math.nan)
        return out

    monkeypatch.setattr(NVAE, "loss", loss_with_one_nan)
    summary = run.main([*TINY, "--max-steps", "5", "--output-dir", str(tmp_path)])
    assert summary["skipped_updates"] == 1
    log = read_log(tmp_path)
    assert [r["skipped"] for r in log] == [False, False, True, False, False]
    assert log[2]["grad_norm"] is None and log[-1]["skipped_total"] == 1
    model = load_pretrained(tmp_path / "final")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_updates_above_the_skip_threshold_leave_the_model_untouched(tmp_path):
    summary = run.main([*TINY, "--max-steps", "3", "--output-dir", str(tmp_path), "--skip-threshold", "1e-9"])
    assert summary["skipped_updates"] == 3
    torch.manual_seed(0)  # the trainer initialises the model from --seed (default 0)
    initial = NVAE(NVAEConfig.preset("tiny")).state_dict()
    for name, value in load_pretrained(tmp_path / "final").state_dict().items():
        assert torch.equal(value, initial[name]), name


# ---------------------------------------------------------------------------------------------- resuming


def test_a_run_killed_mid_training_resumes_with_no_step_lost_or_repeated(tmp_path):
    args = ["train/run.py", *TINY, "--max-steps", "30", "--checkpoint-every", "5", "--sample-every", "10"]
    python(*args, "--output-dir", str(tmp_path / "whole"), timeout=300)

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *args, "--output-dir", str(out)], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        saved = checkpoint.latest_checkpoint(out / "checkpoints")
        try:
            steps = [r["step"] for r in read_log(out)]
        except ValueError:  # caught the run writing its last line
            steps = []
        if saved is not None and steps and steps[-1] > int(saved.name.split("-")[1]):
            break
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    resumed_at = int(checkpoint.latest_checkpoint(out / "checkpoints").name.split("-")[1])
    assert resumed_at < 30

    python(*args, "--output-dir", str(out), "--resume", timeout=300)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert [r["step"] for r in log if r["resumed_from"] == resumed_at] == list(range(resumed_at + 1, 31))
    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    for name, value in load_file(out / "final" / "model.safetensors").items():
        assert torch.equal(value, whole[name]), name


def test_checkpoints_are_written_atomically_and_restore_everything(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny"))
    ema = trainer.EMA(model, 0.9)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2, eps=1e-3)
    model.loss(torch.ones(2, 1, 16, 16)).total.backward()
    optimizer.step()
    ema.update(model, 1)

    def save(step: int) -> Path:
        return checkpoint.save_checkpoint(accelerator, tmp_path, step, model=model, ema=ema.module,
                                          optimizer=optimizer, state={"skipped": step}, keep=2)

    save(1)
    rng_after_save = torch.rand(3)

    def crash(tensors, path, metadata=None):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "_save_tensors", crash)
        with pytest.raises(OSError, match="disk full"):
            save(2)
    assert (tmp_path / ".step-00000002.tmp").is_dir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000001"

    torch.manual_seed(1)
    fresh = NVAE(NVAEConfig.preset("tiny"))
    fresh_ema = trainer.EMA(fresh, 0.9)
    fresh_optimizer = torch.optim.Adamax(fresh.parameters(), lr=1e-2, eps=1e-3)
    state = checkpoint.load_checkpoint(accelerator, tmp_path / "step-00000001", model=fresh,
                                       ema=fresh_ema.module, optimizer=fresh_optimizer)
    assert state["step"] == 1 and state["skipped"] == 1
    assert torch.equal(torch.rand(3), rng_after_save)
    for a, b in [(model, fresh), (ema.module, fresh_ema.module)]:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_inf", "step"):
            assert torch.equal(optimizer.state[p][key], fresh_optimizer.state[q][key])

    save(3)
    save(4)
    assert not (tmp_path / ".step-00000002.tmp").exists()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_the_data_order_depends_only_on_seed_and_step():
    def batches(start: int, rank: int = 0, processes: int = 1) -> list[list[int]]:
        return list(trainer.StepBatchSampler(50, 4, processes, rank, seed=3, start_step=start, max_steps=30))

    whole = batches(0)
    assert batches(17) == whole[17:]  # mid-epoch (12 steps per epoch)
    first_epoch = [i for batch in whole[:12] for i in batch]
    assert len(set(first_epoch)) == len(first_epoch) == 48  # no image twice in an epoch
    assert whole[:12] != whole[12:24]  # a new order every epoch
    rank0, rank1 = batches(0, 0, 2), batches(0, 1, 2)
    assert all(not set(a) & set(b) for a, b in zip(rank0, rank1, strict=True))


def test_the_learning_rate_warms_up_then_decays_to_the_floor():
    rates = [trainer.learning_rate(s, 100, lr=1e-2, lr_min=1e-4, warmup_steps=10) for s in range(100)]
    assert rates[0] == pytest.approx(1e-3) and rates[9] == pytest.approx(1e-2)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)


# ---------------------------------------------------------------------------------------------- two processes


def test_two_processes_train_the_same_model(tmp_path, monkeypatch):
    # `accelerate launch --cpu` starts one process unless MPI is set up; torchrun's launcher (--multi_gpu) with
    # ACCELERATE_USE_CPU starts two CPU processes that talk over gloo.
    monkeypatch.setitem(ENV, "ACCELERATE_USE_CPU", "1")
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    python(*launch, "train/run.py", *TINY, "--max-steps", "4", "--output-dir", str(tmp_path), timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert len(set(summary["replica_checksums"])) == 1  # the trainer also raises if they differ
    assert {p.name for p in (tmp_path / "checkpoints" / "step-00000004").glob("rng-*")} == {
        "rng-0.safetensors", "rng-1.safetensors"}
    card = (tmp_path / "final" / "README.md").read_text()
    assert "accelerate launch --num_processes 2" in card
    assert f"| 2 processes on a CPU ({os.cpu_count()} cores), mixed precision no |" in card

    # Resuming: each process's device is then "cpu:0", which safetensors refused to load onto until it was mapped to
    # "cpu".
    resumed = python(*launch, "train/run.py", *TINY, "--max-steps", "6", "--output-dir", str(tmp_path), "--resume",
                     timeout=300)
    assert "resumed from" in resumed.stdout and "step-00000004 at step 4" in resumed.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and len(set(summary["replica_checksums"])) == 1


# ---------------------------------------------------------------------------------------------- the CLIs


@pytest.mark.parametrize("module", [run, evaluate])
def test_help_documents_every_option(module):
    parser = module.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
