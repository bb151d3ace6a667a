"""Training runs as the sweep and comparison items read them: the folders that ``train/run.py`` writes.

A run folder holds ``args.json`` (the training options: data set, beta, seed, recipe), ``final/`` (the EMA model:
config.json, model.safetensors, README.md) and, when trained with ``--eval-every``, ``eval.jsonl`` (the test loss
during training). ``--models`` may name a run folder or its ``final/`` folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvae_hub.config import NVAEConfig
from nvae_hub.hub import load_pretrained
from nvae_hub.model import NVAE
from nvae_hub.weights import PretrainedLoadError

from .common import AnalysisError


@dataclass
class TrainingRun:
    """One run folder: its options (``args``), its model's config and its folder."""

    folder: Path
    args: dict[str, Any]
    config: NVAEConfig

    @property
    def dataset(self) -> str:
        """The data set it was trained on."""
        return self.args["dataset"]

    @property
    def beta(self) -> float:
        """The KL weight after warm-up (runs from before ``--beta`` trained the ELBO: 1)."""
        return float(self.args.get("beta", 1.0))

    @property
    def seed(self) -> int:
        """The training seed."""
        return int(self.args.get("seed", 0))

    @property
    def latent_size(self) -> int:
        """Latent variables per image: every group's channels x height x width."""
        return sum(math.prod(self.config.latent_shape(s)) for s, n in enumerate(self.config.groups_per_scale_list)
                   for _ in range(n))

    @property
    def image_size(self) -> int:
        """Numbers per image: channels x height x width."""
        return self.config.channels * self.config.image_size**2

    def model(self, device: str = "cpu") -> NVAE:
        """The final (EMA) model, in eval mode."""
        try:
            return load_pretrained(self.folder / "final", device=device)
        except PretrainedLoadError as error:
            raise AnalysisError(f"cannot load the model of run {self.folder}: {error}") from error

    def eval_curve(self) -> list[dict[str, Any]]:
        """The records of ``eval.jsonl`` (step, epoch, test_neg_elbo_nats, ...), in step order."""
        path = self.folder / "eval.jsonl"
        text = path.read_text() if path.is_file() else ""
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not records:
            raise AnalysisError(f"{path} is missing or empty: train the run with --eval-every N to record the test "
                                f"loss during training")
        return sorted(records, key=lambda r: r["step"])


def load_run(folder: str | Path) -> TrainingRun:
    """The run in ``folder`` (a run folder or its ``final/``); ``AnalysisError`` saying what is missing."""
    folder = Path(folder)
    if folder.name == "final" and (folder.parent / "args.json").is_file():
        folder = folder.parent
    args_file, config_file = folder / "args.json", folder / "final" / "config.json"
    for path in (args_file, config_file):
        if not path.is_file():
            raise AnalysisError(f"{folder} is not a finished training run: {path} is missing (pass folders written "
                                f"by train/run.py --output-dir, after training ends)")
    try:
        args = json.loads(args_file.read_text())
        config = NVAEConfig.load(config_file)
    except (ValueError, TypeError) as error:
        raise AnalysisError(f"cannot read run {folder}: {error}") from error
    if not isinstance(args, dict) or "dataset" not in args:
        raise AnalysisError(f"{args_file} does not name the training data set")
    return TrainingRun(folder, args, config)


def load_runs(folders: list[Path], item: str, minimum: int = 2) -> list[TrainingRun]:
    """The runs of ``folders`` (at least ``minimum``, no folder twice)."""
    if len(folders) < minimum:
        raise AnalysisError(f"{item} compares models: pass at least {minimum} training runs with --models, got "
                            f"{len(folders)}")
    runs = [load_run(folder) for folder in folders]
    seen = [run.folder.resolve() for run in runs]
    duplicates = sorted({str(f) for f in seen if seen.count(f) > 1})
    if duplicates:
        raise AnalysisError(f"{item}: the same run is given twice: {', '.join(duplicates)}")
    return runs
