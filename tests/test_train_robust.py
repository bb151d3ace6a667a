"""Training that survives faults: damaged checkpoints and logs, two runs in one folder, a changed config, bad image
files, bad options and CLI mistakes (issue 11, items 10-17).

The runs use the tiny preset on synthetic data for a handful of steps, in this process where they can (an
in-process run costs no interpreter start); the lock test needs a second process.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.hub import save_pretrained

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))  # the scripts of train/ import each other as siblings

import checkpoint  # noqa: E402
import evaluate  # noqa: E402
import options  # noqa: E402
import run  # noqa: E402
import rundir  # noqa: E402
import trainer  # noqa: E402

OPTIONS = ["--dataset", "synthetic", "--batch-size", "16", "--lr-warmup", "0.1", "--threads", "1"]
TINY = ["--preset", "tiny", *OPTIONS]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Image-folder checks are cached under $NVAE_HUB_CACHE: keep them out of the user's cache."""
    monkeypatch.setenv("NVAE_HUB_CACHE", str(tmp_path_factory.mktemp("cache")))


def steps(out: Path) -> list[int]:
    return [r["step"] for r in rundir.read_log(out / "log.jsonl")]


def run_fails(argv: list[str], capsys, status: int) -> str:
    """Run train/run.py's main in this process; it must exit with ``status``; return what it printed."""
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv)
    assert exit_info.value.code == status
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out + captured.err


def write_png(path: Path, seed: int, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- 10: checkpoints


def test_resume_falls_back_from_a_truncated_newest_checkpoint_and_says_why(tmp_path, capsys):
    args = [*TINY, "--max-steps", "4", "--checkpoint-every", "2", "--output-dir", str(tmp_path)]
    run.main(args)
    newest = tmp_path / "checkpoints" / "step-00000004"
    intact = {name: (newest / name).read_bytes() for name in ("model.safetensors", "ema.safetensors")}
    model_file = newest / "model.safetensors"
    model_file.write_bytes(intact["model.safetensors"][:1000])
    capsys.readouterr()

    run.main([*args, "--resume"])
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest}: model.safetensors has 1000 bytes, but " in out
    assert "resumed from " + str(tmp_path / "checkpoints" / "step-00000002") in out
    assert steps(tmp_path) == list(range(1, 5))
    # Steps 3 and 4 were redone exactly, and the damaged checkpoint replaced by an intact one.
    for name, content in intact.items():
        assert (newest / name).read_bytes() == content, name
    checkpoint.verify_checkpoint(newest)


def test_a_damaged_checkpoint_fails_verification_with_the_reason(tmp_path):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny"))
    optimizer = torch.optim.Adamax(model.parameters())
    path = checkpoint.save_checkpoint(accelerator, tmp_path, 1, model=model, ema=model, optimizer=optimizer,
                                      state={}, keep=3)
    assert checkpoint.verify_checkpoint(path)["step"] == 1

    ema = path / "ema.safetensors"
    intact = ema.read_bytes()
    flipped = bytearray(intact)
    flipped[-1] ^= 1  # one flipped bit, same size
    ema.write_bytes(bytes(flipped))
    with pytest.raises(checkpoint.CheckpointError, match=r"ema\.safetensors does not have the sha256"):
        checkpoint.verify_checkpoint(path)
    ema.write_bytes(intact)
    (path / "rng-0.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"rng-0\.safetensors is missing"):
        checkpoint.verify_checkpoint(path)
    state = json.loads((path / "state.json").read_text())
    del state["files"]
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError, match=r"has no 'files' entry .* written before nvae_hub recorded"):
        checkpoint.verify_checkpoint(path)
    (path / "state.json").write_text('{"step": 1, "fi')
    with pytest.raises(checkpoint.CheckpointError, match=r"state\.json cannot be read"):
        checkpoint.verify_checkpoint(path)

    # --resume with nothing intact stops and lists every checkpoint with its problem.
    with pytest.raises(rundir.SetupError, match=r"no checkpoint verifies:\n  .*step-00000001: its state.json"):
        checkpoint.find_resume_checkpoint(accelerator, tmp_path, "latest")
    # A checkpoint asked for by name is not replaced by another.
    good = checkpoint.save_checkpoint(accelerator, tmp_path, 2, model=model, ema=model, optimizer=optimizer,
                                      state={}, keep=3)
    assert checkpoint.find_resume_checkpoint(accelerator, tmp_path, "latest") == good
    with pytest.raises(rundir.SetupError, match="step-00000001"):
        checkpoint.find_resume_checkpoint(accelerator, tmp_path, str(path))


def test_saving_older_steps_never_prunes_them_in_favour_of_newer_checkpoints(tmp_path):
    # A run resumed from step 1 because step 3 is damaged must keep what it saves, not the damaged step 3.
    accelerator = Accelerator(cpu=True)
    model = NVAE(NVAEConfig.preset("tiny"))
    optimizer = torch.optim.Adamax(model.parameters())
    for step in (1, 3, 2):
        checkpoint.save_checkpoint(accelerator, tmp_path, step, model=model, ema=model, optimizer=optimizer,
                                   state={}, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


# ---------------------------------------------------------------------------------------------- 11: the log


def test_resume_drops_a_torn_last_log_line_and_says_so(tmp_path, capsys):
    args = [*TINY, "--max-steps", "4", "--checkpoint-every", "4", "--output-dir", str(tmp_path)]
    run.main(args)
    log = tmp_path / "log.jsonl"
    complete = log.read_text()
    log.write_text(complete + '{"step": 5, "loss": 12')  # killed while writing step 5
    capsys.readouterr()

    run.main([*args, "--resume"])
    assert "dropped the torn last line of " + str(log) in capsys.readouterr().out
    assert log.read_text() == complete  # every complete line kept, as it was


def test_the_log_keeps_every_complete_line_and_refuses_damage_elsewhere(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}')  # the last line complete, only its newline missing
    assert rundir.truncate_log(log, 10) is None
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert rundir.truncate_log(log, 2) is None and rundir.read_log(log) == [{"step": 1}, {"step": 2}]

    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(rundir.SetupError, match="line 2: not a log record"):
        rundir.truncate_log(log, 10)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n'  # untouched
    log.write_text('{"step": 1}\n{"step": 2, "lo\n')  # damaged but terminated: not a torn write
    with pytest.raises(rundir.SetupError, match="line 2"):
        rundir.truncate_log(log, 10)


# ---------------------------------------------------------------------------------------------- 12: the lock


def test_a_second_run_in_the_same_folder_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    args = [*TINY, "--max-steps", "100000", "--checkpoint-every", "100000", "--output-dir", str(tmp_path)]
    stderr = tmp_path.parent / f"{tmp_path.name}-stderr.txt"
    with stderr.open("w") as err:
        first = subprocess.Popen([sys.executable, "train/run.py", *args], cwd=REPO, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "log.jsonl").exists() and (tmp_path / "log.jsonl").read_text().count("\n") >= 2):
            assert first.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "the first run took too long to start"
            time.sleep(0.05)

        message = run_fails([*TINY, "--max-steps", "5", "--output-dir", str(tmp_path)], capsys, status=1)
        assert f"is in use by another training run: process {first.pid} on host {socket.gethostname()}" in message
        logged = steps(tmp_path)
        assert logged == list(range(1, len(logged) + 1))  # the refused run touched nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    run.main([*TINY, "--max-steps", "2", "--output-dir", str(tmp_path), "--resume"])
    assert f"took over the lock of process {first.pid} on host {socket.gethostname()}" in capsys.readouterr().out
    assert steps(tmp_path) == [1, 2]
    assert (tmp_path / rundir.LOCK_NAME).read_text() == ""  # released at the end


def test_only_the_main_process_locks(tmp_path, monkeypatch):
    class Worker:  # what lock_output_dir sees in a process other than the main one
        is_main_process = False

        def print(self, *args):
            raise AssertionError("a worker has nothing to say")

    monkeypatch.setattr(rundir, "broadcast_object_list", lambda objects: objects)
    lock = rundir.lock_output_dir(Worker(), tmp_path)
    assert lock.file is None and not (tmp_path / rundir.LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------- 13: config


def test_resuming_with_another_config_names_the_fields_before_loading_anything(tmp_path, capsys, monkeypatch):
    run.main([*TINY, "--max-steps", "2", "--output-dir", str(tmp_path)])
    other = tmp_path / "other.json"
    NVAEConfig.preset("tiny").replace(latent_channels=5, num_channels=12).save(other)

    def must_not_run(*args, **kwargs):
        raise AssertionError("called before the configs were compared")

    monkeypatch.setattr(trainer, "load_checkpoint", must_not_run)
    monkeypatch.setattr(trainer, "build_dataset", must_not_run)
    monkeypatch.setattr(trainer, "NVAE", must_not_run)
    message = run_fails([*OPTIONS, "--config", str(other), "--max-steps", "2", "--output-dir", str(tmp_path),
                         "--resume"], capsys, status=1)
    assert "num_channels: 8 in the checkpoint, 12 now" in message
    assert "latent_channels: 4 in the checkpoint, 5 now" in message
    assert "groups_per_scale" not in message


# ---------------------------------------------------------------------------------------------- 14: image folders


def test_training_stops_before_the_first_step_on_a_bad_image_or_trains_without_it(tmp_path, capsys):
    folder = tmp_path / "images"
    for i in range(16):
        write_png(folder / "train" / f"{i:02d}.png", i)
    write_png(folder / "test" / "t.png", 99)
    truncated = folder / "train" / "truncated.png"
    truncated.write_bytes(write_png(truncated, 100)[:300])
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--dataset", "imagefolder", "--data-dir", str(folder), "--batch-size", "8",
            "--max-steps", "2", "--threads", "1", "--output-dir", str(out)]
    message = run_fails(argv, capsys, status=1)
    assert f"1 of the 17 train image files under {folder} cannot be decoded:\n  {truncated}: " in message
    assert "--skip-bad-images" in message
    assert not (out / "log.jsonl").exists() and not (out / "checkpoints").exists()

    summary = run.main([*argv, "--skip-bad-images"])
    assert summary["steps"] == 2 and summary["epochs"] == 2 / (16 // 8)


# ---------------------------------------------------------------------------------------------- 15 and 16: options


@pytest.mark.parametrize(("options", "message"), [
    (["--temperatures", "1.0", "nan"], "--temperatures must be finite numbers >= 0, got nan"),
    (["--temperatures", "-0.5"], "--temperatures must be finite numbers >= 0, got -0.5"),
    (["--temperatures", "inf"], "got inf"),
    (["--lr", "nan"], "--lr must be a number at least 0, got nan"),
    (["--lr", "1e-3", "--lr-min", "1e-2"], "--lr-min (0.01) must not exceed --lr (0.001)"),
    (["--grad-clip", "-1"], "--grad-clip must be a number at least 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a number at least 0, got inf"),
    (["--ema-decay", "1.5"], "--ema-decay must be a number between 0 and 1"),
    (["--kl-warmup", "nan"], "--kl-warmup must be a number between 0 and 1"),
    (["--threads", "0"], "--threads must be a number at least 1"),
    (["--eval-limit", "5"], "--eval-limit needs --eval-samples"),
    (["--private"], "--private needs --push-to-hub"),
    (["--push-to-hub", "not a/valid/repo id"], "--push-to-hub: "),
    (["--config", "missing.json"], "--config missing.json: [Errno 2] No such file"),
    (["--resume", "/nonexistent"], "--resume /nonexistent: not a checkpoint folder"),
    (["--dataset", "imagefolder"], "--dataset imagefolder needs --data-dir"),
    (["--cuda-graph", "--compile"], "--cuda-graph does not combine with --compile"),
])
def test_train_options_are_checked_before_anything_runs(options, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "train", lambda args: pytest.fail("train started"))
    argv = [*OPTIONS, "--max-steps", "1", "--output-dir", str(tmp_path), *options]
    assert message in run_fails(argv, capsys, status=2)


def test_cuda_graphs_on_a_machine_without_cuda_stop_before_the_first_step(tmp_path, capsys):
    message = run_fails([*TINY, "--max-steps", "2", "--cuda-graph", "--output-dir", str(tmp_path)], capsys, status=1)
    assert "--cuda-graph: it needs a CUDA device" in message
    assert not (tmp_path / "log.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_a_config_file_that_is_not_a_config_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"num_channels": 8, "typo_field": 1}')
    message = run_fails([*OPTIONS, "--config", str(bad), "--max-steps", "1", "--output-dir", str(tmp_path / "out")],
                        capsys, status=2)
    assert "unknown NVAEConfig field(s): typo_field" in message


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    save_pretrained(NVAE(NVAEConfig.preset("tiny")), folder)
    return folder


@pytest.mark.parametrize(("options", "message"), [
    (["--dataset", "synthetic", "--split", "validation"],
     "--split 'validation' is not a split of synthetic; choose one of: train, test"),
    (["--dataset", "mnist", "--split", "validation"], "choose one of: train, valid, test"),
    (["--dataset", "mnist"], "--dataset mnist: mnist images are 1x28x28 (channels x height x width), but"),
    (["--dataset", "imagefolder"], "--dataset imagefolder needs --data-dir"),
    (["--dataset", "synthetic", "--num-samples", "0"], "--num-samples must be a number at least 1, got 0"),
    (["--dataset", "synthetic", "--threads", "0"], "--threads must be a number at least 1"),
    (["--dataset", "synthetic", "--device", "nonsense"], "--device nonsense: "),
])
def test_evaluate_mistakes_are_usage_errors(options, message, tiny_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(tiny_model), *options])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: " in err and message in err


def test_evaluate_reports_a_missing_model_as_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(tmp_path / "nothing"), "--dataset", "synthetic"])
    assert exit_info.value.code == 2
    assert f"--model {tmp_path / 'nothing'}: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 17: threads


def test_the_threads_option_holds_for_the_run_only(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    seen = []

    def first_step(self, *args, **kwargs):  # record the thread count of the first training step, then stop
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(NVAE, "loss", first_step)
    before = torch.get_num_threads()
    with pytest.raises(Stop):
        run.main([*TINY, "--threads", "2", "--max-steps", "1", "--output-dir", str(tmp_path)])
    assert seen == [2] and torch.get_num_threads() == before == 1
    assert (tmp_path / rundir.LOCK_NAME).read_text() == ""  # a failed run lets go of its folder too


def test_the_default_thread_count_is_one_unless_omp_num_threads_says_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert options.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert options.default_threads() == 3
    for module in (run, evaluate):
        text = " ".join(module.build_parser().format_help().split())
        assert "--threads THREADS CPU threads of PyTorch in each process (default: 3 here: $OMP_NUM_THREADS" in text
        assert "8.5 to 20 s on 1 thread and over 60 s on 2" in text
