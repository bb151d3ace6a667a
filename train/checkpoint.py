"""Training checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder ``step-00001234`` under the run's ``checkpoints/`` folder::

    model.safetensors      training weights and buffers
    ema.safetensors        the exponential moving average of the weights (and a copy of the buffers)
    optimizer.safetensors  the optimizer's per-parameter tensors, keyed "<param index>.<name>"
    state.json             step, skipped updates, elapsed time, model config, the optimizer's param groups,
                           and the size and sha256 of every other file (written last)
    rng-<rank>.safetensors each process's torch RNG state, with Python's and NumPy's in its metadata

The data order needs no saved state: it is a function of (seed, step) (see ``trainer.StepBatchSampler``).
Nothing is pickled and nothing is read with ``torch.load``. Every process writes into a hidden temporary
folder (``.step-00001234.tmp``); only when all files are complete and flushed does the main process rename it
to ``step-00001234``, so a crash while writing leaves either the previous checkpoints or a temporary folder
that is never loaded (and is removed by the next save). A checkpoint damaged later (a truncated copy, a bad
disk) fails ``verify_checkpoint``, and ``--resume`` falls back to the newest one that verifies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nvae_hub import NVAEConfig

# isort: split
from rundir import SetupError

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after ``step`` steps."""
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Published checkpoints under ``root``, oldest first (temporary folders are ignored; use
    ``verify_checkpoint`` to know whether one is intact)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()),
                  key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest published checkpoint under ``root``, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


class CheckpointError(ValueError):
    """A checkpoint is incomplete or damaged."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check that every file of the checkpoint ``path`` is there with the size and sha256 written with it; return
    its state (``state.json``). Raises ``CheckpointError`` saying what is wrong."""
    try:
        state = json.loads((path / "state.json").read_text())
        written = {name: (int(info["size"]), str(info["sha256"])) for name, info in state["files"].items()}
        expected = ["model.safetensors", "ema.safetensors", "optimizer.safetensors",
                    *(f"rng-{rank}.safetensors" for rank in range(int(state["num_processes"])))]
    except KeyError as error:
        raise CheckpointError(f"its state.json has no {error} entry (a damaged file, or a checkpoint written before "
                              f"nvae_hub recorded file checksums, which cannot be verified)") from None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"its state.json cannot be read ({type(error).__name__}: {error})") from None
    for name in expected:
        file = path / name
        if name not in written or not file.is_file():
            raise CheckpointError(f"{name} is missing")
        size, sha256 = written[name]
        if file.stat().st_size != size:
            raise CheckpointError(f"{name} has {file.stat().st_size} bytes, but {size} were written")
        if _sha256(file) != sha256:
            raise CheckpointError(f"{name} does not have the sha256 it was written with (the file is damaged)")
    return state


def find_resume_checkpoint(accelerator: Accelerator, root: Path, requested: str) -> Path | None:
    """The checkpoint to resume from: ``requested`` (a checkpoint folder) or, for "latest", the newest one under
    ``root`` that verifies, saying which newer ones were skipped and why. None if ``root`` holds none.

    The main process verifies the files and tells the others its choice. Raises ``SetupError`` when the requested
    checkpoint, or every checkpoint under ``root``, is damaged.
    """
    choice: list[Any] = [None, None]  # the path, or an error message
    if accelerator.is_main_process:
        candidates = [Path(requested)] if requested != "latest" else list_checkpoints(root)[::-1]
        problems = []
        for path in candidates:
            try:
                verify_checkpoint(path)
            except CheckpointError as error:
                problems.append(f"{path}: {error}")
                if requested == "latest":
                    accelerator.print(f"skipping checkpoint {path}: {error}")
                continue
            choice[0] = str(path)
            break
        if choice[0] is None and problems:
            choice[1] = "cannot resume: no checkpoint verifies:\n  " + "\n  ".join(problems)
    broadcast_object_list(choice)
    if choice[1] is not None:
        raise SetupError(choice[1])
    return None if choice[0] is None else Path(choice[0])


def check_config(path: Path, cfg: NVAEConfig) -> None:
    """Raise ``SetupError`` unless the checkpoint ``path`` was written by a model with config ``cfg``, naming the
    fields that differ. Reads only ``state.json``, so it runs before any weights are loaded."""
    saved = NVAEConfig.from_dict(json.loads((path / "state.json").read_text())["config"])
    differences = [f"{f.name}: {getattr(saved, f.name)!r} in the checkpoint, {getattr(cfg, f.name)!r} now"
                   for f in dataclasses.fields(cfg) if f.compare and getattr(saved, f.name) != getattr(cfg, f.name)]
    if differences:
        raise SetupError(f"{path} holds a model with another config than --preset/--config give:\n  "
                         + "\n  ".join(differences)
                         + "\nresume with the options the run was started with (see args.json in its output folder)")


# ---------------------------------------------------------------------------------------------- tensors


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors (moved to the CPU, made contiguous and unshared) with safetensors."""
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, path, metadata=metadata)


def optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able values."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state dict from ``optimizer_to_flat``'s two halves."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------------- RNG


def save_rng_state(path: Path) -> None:
    """Write this process's Python, NumPy, torch (and CUDA) RNG states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    metadata = {"python": json.dumps(random.getstate()), "numpy": json.dumps(numpy_state)}
    _save_tensors(tensors, path, metadata=metadata)


def load_rng_state(path: Path) -> None:
    """Restore the RNG states written by ``save_rng_state``."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    version, internal, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), gauss))
    numpy_state = json.loads(metadata["numpy"])
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# ---------------------------------------------------------------------------------------------- save / load


def _fsync_tree(folder: Path) -> None:
    """Flush every file in ``folder`` to disk, so the rename that publishes it comes after its contents."""
    for path in folder.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    step: int,
    *,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint after ``step`` steps atomically (every process must call this) and delete all but
    the newest ``keep`` up to this step (newer ones, left when a run resumes from an older checkpoint, are
    replaced when the run reaches them). ``state`` holds JSON-able training state (counters, config, ...)."""
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        for stale in root.glob(".step-*.tmp"):  # left by a crash while saving
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_rng_state(tmp / f"rng-{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        _save_tensors(model.state_dict(), tmp / "model.safetensors")
        _save_tensors(ema.state_dict(), tmp / "ema.safetensors")
        tensors, optimizer_meta = optimizer_to_flat(optimizer.state_dict())
        _save_tensors(tensors, tmp / "optimizer.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        state = {**state, "step": step, "num_processes": accelerator.num_processes, "optimizer": optimizer_meta,
                 "files": files}
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # only when a run is resumed from an older checkpoint than the newest
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in [p for p in list_checkpoints(root) if p.name <= final.name][:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator,
    path: Path,
    *,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """Load a checkpoint into the model, EMA, optimizer and this process's RNGs; return its ``state``.

    The RNG state is restored only if the checkpoint was written by the same number of processes.
    """
    state = json.loads((path / "state.json").read_text())
    # safetensors knows "cpu" but not "cpu:0", the device of every process that `accelerate launch` starts on CPUs.
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    model.load_state_dict(load_file(path / "model.safetensors", device=device))
    ema.load_state_dict(load_file(path / "ema.safetensors", device=device))
    tensors = load_file(path / "optimizer.safetensors", device=device)
    optimizer.load_state_dict(optimizer_from_flat(tensors, state["optimizer"]))
    if state["num_processes"] == accelerator.num_processes:
        load_rng_state(path / f"rng-{accelerator.process_index}.safetensors")
    else:
        accelerator.print(f"warning: {path} was written by {state['num_processes']} processes, this run has "
                          f"{accelerator.num_processes}; random number generators are not restored")
    return state
