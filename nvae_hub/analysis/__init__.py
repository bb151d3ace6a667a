"""What the hierarchy learned: analyses of a trained NVAE, each a PNG figure plus a JSON file of its numbers.

    python -m nvae_hub.analysis ITEM --model NAME_OR_PATH --dataset DATASET --output-dir DIR [--quick]

Every item is one module of this package with the same three names:

- ``NEEDS``: what it reads, a tuple of "model", "data" (the model's test images), "labels" (their classes),
  "run" (a training run's folder), "factors" (images with known generative factors), "models" (training runs);
- ``run(inputs: Inputs) -> Result``: computes the numbers (a JSON-ready dict) and draws the figure;
- ``section(numbers) -> str``: the Markdown that ``report.md`` shows under the figure;
- optionally ``check(inputs)``: raises ``AnalysisError`` for inputs the item cannot use beyond its ``NEEDS``, before
  anything runs or is written.

Each module also has plain functions that a notebook can call for the numbers alone (``kl.active_units``,
``latent_map.knn_accuracy``, ``control.transfer_matrix``, ...). ``run_items`` runs items and writes ``ITEM.png``,
``ITEM.json`` and ``report.md`` (see ``nvae_hub.analysis.report``).

Adding an item: write its module here, and add one ``Item`` line to ``ITEMS`` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Item:
    """One analysis: its command-line name and a one-line summary; the code is the module of the same name
    (with ``_`` for ``-``) in this package."""

    name: str
    summary: str

    @property
    def module(self) -> ModuleType:
        """The item's module (imported on first use, so that ``--help`` stays fast)."""
        return importlib.import_module(f"{__name__}.{self.name.replace('-', '_')}")


ITEMS: dict[str, Item] = {item.name: item for item in [
    Item("curves", "reconstruction loss, KL and total loss against step, and the KL of each group (--run DIR)"),
    Item("recon", "test images above their reconstructions; test MSE, negative ELBO and importance-weighted NLL"),
    Item("samples", "random samples at temperatures 1.0-0.4, with and without BatchNorm re-estimation"),
    Item("sample-quality", "how confidently, and as which classes, a classifier reads samples at temperature 0.7"),
    Item("latent-map", "t-SNE of the posterior means by class, and k-NN class accuracy per scale vs. pixels"),
    Item("kl", "KL of every group and channel on the test set, and active units by two rules"),
    Item("control", "which scale carries which property: transfer matrix T[scale, property] from latent swaps"),
    Item("temperature", "samples from the same noise with the temperature of one scale changed at a time"),
    Item("disentangle", "BetaVAE, FactorVAE, MIG, DCI and SAP scores of the latents on sprites, vs. pixels"),
    Item("beta", "a beta sweep (--models DIR ...): ELBO, recon, KL and disentanglement against (normalised) beta"),
    Item("convergence", "single- vs multi-scale models (--models DIR ...): test loss against epochs, epochs ratio"),
]}
"""Every analysis, in the order ``all`` runs them and ``report.md`` shows them."""

__all__ = ["ITEMS", "Item"]
