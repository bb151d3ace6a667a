"""What every analysis shares: its inputs (``Inputs``), its output (``Result``), the error for bad input
(``AnalysisError``) and the passes over test images that several analyses make."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from nvae_hub.data import build_dataset, dataset_labels
from nvae_hub.evaluation import scored_batches, seeded_eval
from nvae_hub.model import NVAE

NEEDS = ("model", "data", "labels", "run", "factors", "models")
"""What an item can need: a model, the model's test images, their class labels, a training run's folder, known
generative factors of the images (sprites), several training runs' folders (a sweep, a comparison)."""


class AnalysisError(ValueError):
    """The inputs do not allow the analysis; the message says what to change. Nothing has been written."""


@dataclass
class Result:
    """An analysis' output: ``numbers`` (JSON-ready: every number in the figure and the sizes used) and
    ``figure`` (a matplotlib figure a person reads without the JSON)."""

    numbers: dict[str, Any]
    figure: Figure


@dataclass
class Inputs:
    """What the analyses read. In a notebook: ``Inputs(model=load_pretrained("mnist"), dataset="mnist")``.

    ``quick`` shrinks every analysis to a smoke-test size; ``num_images`` overrides the number of test images
    (or pairs, or samples) that an analysis uses. ``seed`` fixes every random choice: the same inputs and seed
    give the same numbers.
    """

    model: NVAE | None = None
    model_name: str | None = None
    dataset: str | None = None
    data_dir: str | Path | None = None
    split: str = "test"
    run_dir: Path | None = None
    quick: bool = False
    num_images: int | None = None
    seed: int = 0
    progress: bool = True
    pca_components: int = 2
    models: list[Path] = field(default_factory=list)
    device: str = "cpu"
    jobs: int = 1
    _datasets: dict[str, Dataset[Tensor]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ checks
    def check(self, needs: tuple[str, ...], item: str) -> None:
        """Raise ``AnalysisError`` unless everything in ``needs`` is there (loading the data to check it)."""
        if "run" in needs:
            _check_run_dir(self.run_dir, item)
        if {"model", "data", "labels"} & set(needs) and self.model is None:
            raise AnalysisError(f"{item} needs a model: pass --model NAME_OR_PATH")
        if {"data", "labels"} & set(needs):
            self.images(self.split)
        if "factors" in needs and not hasattr(self.images(self.split), "factors"):
            raise AnalysisError(f"{item} needs images with known generative factors, and the {self.dataset!r} data "
                                f"set has none; use sprites or sprites32")
        if "models" in needs and not self.models:
            raise AnalysisError(f"{item} needs training runs: pass --models DIR [DIR ...] (folders written by "
                                f"train/run.py)")
        if "labels" in needs and self.labels(self.split) is None:
            raise AnalysisError(f"{item} needs class labels, and the {self.dataset!r} data set has none; use a "
                                f"labelled data set (mnist, fashion-mnist)")

    def missing(self, needs: tuple[str, ...], item: str,
                extra_check: Callable[[Inputs], None] | None = None) -> str | None:
        """Why the item cannot run (the message of ``check``, then of the item's own ``extra_check``), or None if it
        can."""
        try:
            self.check(needs, item)
            if extra_check is not None:
                extra_check(self)
        except AnalysisError as error:
            return str(error)
        return None

    # ------------------------------------------------------------------ data
    def images(self, split: str | None = None) -> Dataset[Tensor]:
        """The images of ``split`` (default: ``self.split``) at the model's size and channel count."""
        split = split or self.split
        if split not in self._datasets:
            if self.dataset is None:
                raise AnalysisError("this analysis needs test images: pass --dataset")
            assert self.model is not None
            cfg = self.model.config
            try:
                self._datasets[split] = build_dataset(self.dataset, split, data_dir=self.data_dir,
                                                      image_size=cfg.image_size, channels=cfg.channels,
                                                      seed=self.seed)
            except (ValueError, FileNotFoundError) as error:
                raise AnalysisError(f"the model ({cfg.channels}x{cfg.image_size}x{cfg.image_size}) and the data "
                                    f"set {self.dataset!r} do not fit: {error}") from error
        return self._datasets[split]

    def labels(self, split: str | None = None) -> np.ndarray | None:
        """The class labels of ``split``, or None if the data set has none."""
        assert self.dataset is not None
        return dataset_labels(self.dataset, split or self.split, data_dir=self.data_dir)

    def size(self, full: int, quick: int) -> int:
        """How many images an analysis uses: ``num_images`` if given, else ``quick`` or ``full``."""
        if self.num_images is not None:
            return self.num_images
        return quick if self.quick else full

    def count(self, full: int, quick: int, split: str | None = None) -> int:
        """``size(full, quick)``, capped at the number of images in ``split``."""
        return min(self.size(full, quick), len(self.images(split)))

    def describe(self) -> dict[str, Any]:
        """The facts every JSON file records: model, data set, split, seed, mode, run or runs."""
        return {"model": self.model_name, "dataset": self.dataset, "split": self.split, "seed": self.seed,
                "quick": self.quick, "run": str(self.run_dir) if self.run_dir is not None else None,
                "models": [str(m) for m in self.models] or None}


def _check_run_dir(run_dir: Path | None, item: str) -> None:
    if run_dir is None:
        raise AnalysisError(f"{item} needs a training run: pass --run DIR (a folder written by train/run.py)")
    log = Path(run_dir) / "log.jsonl"
    if not Path(run_dir).is_dir():
        raise AnalysisError(f"{item}: the run folder {run_dir} does not exist")
    if not log.is_file() or not log.read_text().strip():
        raise AnalysisError(f"{item}: {log} is missing or empty; is {run_dir} a folder written by train/run.py?")


# ---------------------------------------------------------------------------------------------- shared passes


@dataclass
class PosteriorStats:
    """Per latent group (decoder order): the posterior means ``means[g]`` (N, C, H, W) and the KL of every
    channel ``kl[g]`` (N, C) in nats (summed over the channel's positions)."""

    means: list[Tensor]
    kl: list[Tensor]
    scales: list[int]


@torch.no_grad()
def posterior_stats(model: NVAE, dataset: Dataset[Tensor], *, limit: int, seed: int, sample: bool,
                    progress: bool = True, batch_size: int = 64) -> PosteriorStats:
    """One pass over the first ``limit`` images as the model scores them (see ``nvae_hub.evaluation``).

    With ``sample=False`` every group's z is its posterior mean (what ``NVAE.encode`` returns; with flows, the
    mean pushed through them); with ``sample=True`` z is drawn from the posterior (as in the ELBO; the draws come
    from ``seed``) and the means are those of the encoder's Normals.
    """
    means: list[list[Tensor]] = [[] for _ in range(model.num_groups)]
    kls: list[list[Tensor]] = [[] for _ in range(model.num_groups)]
    with seeded_eval(model, seed):
        for x in scored_batches(model, dataset, batch_size=batch_size, seed=seed, limit=limit, progress=progress,
                                desc="encode"):
            _, _, posteriors, priors = model._posterior_pass(x, use_mean=not sample)
            for g, (q, p) in enumerate(zip(posteriors, priors, strict=True)):
                means[g].append((q.normal.mu if sample else q.z).cpu())
                kls[g].append(q.kl(p).sum(dim=(2, 3)).cpu())
    return PosteriorStats([torch.cat(m) for m in means], [torch.cat(k) for k in kls], list(model.scale_of_group))


def first_images(dataset: Dataset[Tensor], n: int) -> Tensor:
    """The first ``n`` images of ``dataset`` stacked into one batch."""
    return torch.stack([dataset[i] for i in range(n)])


def finite(value: float) -> float | None:
    """``value`` as a float, or None when it is NaN or infinite (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def show_image(ax: Axes, picture: Image.Image, title: str | None = None) -> None:
    """Draw a PIL picture (a grid of images) on ``ax`` at its pixel aspect, without axes."""
    ax.imshow(np.asarray(picture.convert("RGB")), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def picture_figure(picture: Image.Image, title: str, dpi: int = 100) -> Figure:
    """A figure showing one PIL picture at about its own size, under ``title``."""
    fig = Figure(figsize=(max(6.0, picture.width / dpi + 0.4), picture.height / dpi + 0.9))
    show_image(fig.subplots(), picture, title)
    fig.tight_layout()
    return fig
