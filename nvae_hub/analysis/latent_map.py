"""Where the classes lie in latent space: a t-SNE (scikit-learn) of the posterior means of test images, coloured
by class, for all groups together and for each scale; and, as a number that does not depend on the picture, the
k-nearest-neighbour class accuracy of each representation, with raw pixels as the baseline.

k-NN protocol: the representation of an image is its posterior means (``NVAE.encode``) flattened and concatenated
over the groups in question; a k-NN classifier (k = 5, Euclidean distance, majority vote) is fitted on the first
M training images and scored on the first N test images. Pixels are the images as the model sees them.
"""

from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.manifold import TSNE
from sklearn.neighbors import KNeighborsClassifier
from torch import Tensor

from nvae_hub.evaluation import scored_batches

from .common import Inputs, PosteriorStats, Result, posterior_stats

NEEDS = ("model", "data", "labels")
TEST_IMAGES = {"full": 2000, "quick": 300}
TRAIN_IMAGES = {"full": 10000, "quick": 1000}
K = 5
PERPLEXITY = 30.0


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = K) -> float:
    """Accuracy on (test_x, test_y) of a k-nearest-neighbour classifier (Euclidean) fitted on (train_x, train_y)."""
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_x)))
    knn.fit(np.asarray(train_x).reshape(len(train_x), -1), train_y)
    return float(np.mean(knn.predict(np.asarray(test_x).reshape(len(test_x), -1)) == np.asarray(test_y)))


def tsne(features: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE embedding (N, 2) of ``features`` (N, D): PCA initialisation, perplexity 30 (less for few points)."""
    perplexity = min(PERPLEXITY, max(1.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def representations(stats: PosteriorStats, pixels: Tensor) -> dict[str, np.ndarray]:
    """``"all groups"``, ``"scale s"`` for every scale, and ``"pixels"``: (N, D) float arrays."""
    def join(groups: list[int]) -> np.ndarray:
        return np.concatenate([stats.means[g].flatten(1).numpy() for g in groups], axis=1)

    out = {"all groups": join(list(range(len(stats.means))))}
    for scale in sorted(set(stats.scales)):
        out[f"scale {scale}"] = join([g for g, s in enumerate(stats.scales) if s == scale])
    out["pixels"] = pixels.flatten(1).numpy()
    return out


def _scored_images(inputs: Inputs, split: str, n: int) -> tuple[PosteriorStats, Tensor]:
    """Posterior means of the first ``n`` images of ``split`` and those images as the model saw them."""
    assert inputs.model is not None
    dataset = inputs.images(split)
    stats = posterior_stats(inputs.model, dataset, limit=n, seed=inputs.seed, sample=False, progress=inputs.progress)
    pixels = torch.cat(list(scored_batches(inputs.model, dataset, limit=n, seed=inputs.seed, progress=False))).cpu()
    return stats, pixels


def run(inputs: Inputs) -> Result:
    """t-SNE maps and k-NN accuracies of ``inputs.model``'s latents."""
    n_test = inputs.count(TEST_IMAGES["full"], TEST_IMAGES["quick"])
    n_train = inputs.count(TRAIN_IMAGES["full"], TRAIN_IMAGES["quick"], split="train")
    test_labels, train_labels = inputs.labels()[:n_test], inputs.labels("train")[:n_train]
    test = representations(*_scored_images(inputs, inputs.split, n_test))
    train = representations(*_scored_images(inputs, "train", n_train))
    accuracy = {name: knn_accuracy(train[name], train_labels, test[name], test_labels) for name in test}
    maps = {name: tsne(features, inputs.seed) for name, features in test.items() if name != "pixels"}
    numbers: dict[str, Any] = {
        "sizes": {"test_images": n_test, "train_images": n_train},
        "knn_accuracy": accuracy,
        "chance_accuracy": float(np.max(np.bincount(test_labels)) / len(test_labels)),
        "dimensions": {name: int(features.shape[1]) for name, features in test.items()},
        "protocol": {"k": K, "distance": "euclidean", "vote": "majority",
                     "fit": f"first {n_train} images of the train split", "score": f"first {n_test} test images",
                     "features": "posterior means (NVAE.encode), flattened and concatenated over the groups",
                     "tsne": f"scikit-learn TSNE, init=pca, perplexity {min(PERPLEXITY, (n_test - 1) / 3):g}, "
                             f"random_state=seed"},
        "labels": test_labels.tolist(),
        "tsne": {name: {"x": xy[:, 0].round(3).tolist(), "y": xy[:, 1].round(3).tolist()} for name, xy in maps.items()},
    }

    fig = Figure(figsize=(4.6 * (len(maps) + 1), 4.8))
    axes = fig.subplots(1, len(maps) + 1)
    classes = sorted(set(test_labels.tolist()))
    colour = matplotlib.colormaps["tab10"]
    for ax, (name, xy) in zip(axes, maps.items(), strict=False):
        ax.scatter(xy[:, 0], xy[:, 1], c=[colour(int(c) % 10) for c in test_labels], s=4, linewidths=0)
        ax.set_title(f"t-SNE of {name} ({numbers['dimensions'][name]} dims)\nk-NN accuracy {accuracy[name]:.3f}",
                     fontsize=10)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    axes[0].legend(handles=[Line2D([], [], marker="o", linestyle="", color=colour(c % 10), label=str(c))
                            for c in classes], title="class", fontsize=7, loc="best")
    bars = axes[-1]
    names = list(accuracy)
    bars.bar(range(len(names)), [accuracy[n] for n in names], color=["C0"] * (len(names) - 1) + ["C7"])
    bars.axhline(numbers["chance_accuracy"], color="k", linestyle=":", label="majority class")
    bars.set_xticks(range(len(names)), names, rotation=20)
    bars.set_ylim(0, 1)
    bars.set_ylabel(f"{K}-NN test accuracy")
    bars.set_title(f"k-NN class accuracy ({n_train} train / {n_test} test)", fontsize=10)
    bars.legend(fontsize=8)
    fig.tight_layout()
    return Result(numbers, fig)


def section(numbers: dict[str, Any]) -> str:
    """The k-NN accuracies as a table."""
    rows = "".join(f"| {name} | {numbers['dimensions'][name]} | {acc:.3f} |\n"
                   for name, acc in numbers["knn_accuracy"].items())
    p = numbers["protocol"]
    return (f"{p['k']}-NN ({p['distance']}) fitted on the {p['fit']}, scored on the {p['score']}; features: "
            f"{p['features']}. The majority class alone scores {numbers['chance_accuracy']:.3f}.\n\n"
            "| representation | dimensions | k-NN accuracy |\n|---|---|---|\n" + rows)
