"""A small convolutional classifier that the ``control`` analysis trains on the training split, to tell the class
of a decoded image."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm


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
def predict(net: nn.Module, images: Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The predicted class of every image, shape (N,)."""
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    return torch.cat([net(chunk).argmax(dim=1) for chunk in images.split(batch_size)]).numpy()
