"""A small convolutional classifier that the ``control`` and ``sample-quality`` analyses train on the training
split, to tell the class of a decoded image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .common import AnalysisError, Inputs

SETTINGS = {"full": {"images": 60000, "epochs": 2, "test_images": 10000},
            "quick": {"images": 5000, "epochs": 2, "test_images": 1000}}


def small_cnn(channels: int, num_classes: int) -> nn.Sequential:
    """Two strided convolutions and a linear layer: ~99% on MNIST after a few epochs."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, num_classes),
    )


def train_classifier(images: Dataset[Tensor], labels: np.ndarray, *, num_images: int, epochs: int, seed: int,
                     batch_size: int = 64, lr: float = 2e-3, progress: bool = True) -> nn.Module:
    """A ``small_cnn`` trained with Adam on the first ``num_images`` of ``images``/``labels`` (CPU, seeded)."""
    n = min(num_images, len(images))
    x = torch.stack([images[i] for i in range(n)])
    y = torch.as_tensor(labels[:n], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = small_cnn(x.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    steps = epochs * max(1, n // batch_size)
    bar = tqdm(total=steps, desc="classifier", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, max(1, n - batch_size + 1), batch_size):
            index = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(net(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update(1)
    bar.close()
    return net.eval()


@torch.no_grad()
def class_probabilities(net: nn.Module, images: Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The classifier's class probabilities of ``images`` (N, C, H, W), shape (N, classes)."""
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    return torch.cat([net(chunk).softmax(dim=1) for chunk in images.split(batch_size)]).numpy()


def predict(net: nn.Module, images: Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The predicted class of every image, shape (N,)."""
    return class_probabilities(net, images, batch_size).argmax(axis=1)


@dataclass(frozen=True)
class FittedClassifier:
    """A classifier trained on a data set's training split, its class probabilities of the first test images, its
    accuracy on them, and the sizes used."""

    net: nn.Module
    test_probabilities: np.ndarray
    test_accuracy: float
    sizes: dict[str, Any]


def fit_classifier(inputs: Inputs) -> FittedClassifier:
    """A ``small_cnn`` trained on ``inputs``' training split with the sizes of ``SETTINGS`` (quick or full) and the
    seed of ``inputs``, scored on the first test images."""
    train_labels = inputs.labels("train")
    test_labels = inputs.labels()
    if train_labels is None or test_labels is None:
        raise AnalysisError(f"a classifier needs class labels, and the {inputs.dataset!r} data set has none")
    settings = SETTINGS["quick" if inputs.quick else "full"]
    net = train_classifier(inputs.images("train"), train_labels, num_images=settings["images"],
                           epochs=settings["epochs"], seed=inputs.seed, progress=inputs.progress)
    test = inputs.images()
    n_test = min(len(test), settings["test_images"])
    probabilities = class_probabilities(net, torch.stack([test[i] for i in range(n_test)]))
    accuracy = float(np.mean(probabilities.argmax(axis=1) == test_labels[:n_test]))
    sizes = {"classifier_train_images": min(settings["images"], len(train_labels)),
             "classifier_epochs": settings["epochs"], "classifier_test_images": n_test}
    return FittedClassifier(net, probabilities, accuracy, sizes)
