"""The five standard disentanglement scores, as plain functions of a representation and its ground-truth factors.

Every function takes ``codes``, an (N, D) array (one row per image: the representation), and ``factors``, an
(N, K) integer array (the images' factor indices, e.g. ``SpritesDataset.factors``). The N rows are a *pool*: the
protocols draw their samples (random images, pairs sharing a factor, batches with one factor fixed) from it. When
the pool is the whole factor grid, this is exactly the published protocol (which draws from the data generator);
for a uniform random subset of the grid it is the same protocol with images reused. Each function returns a dict
with ``score`` and the intermediate numbers, and takes the sample sizes of the protocol as keyword arguments, with
the defaults of disentanglement_lib (Locatello et al., ICML 2019), the reference implementation of all five:

- ``beta_vae_score`` (Higgins et al., ICLR 2017): a point is the mean absolute difference of the codes of
  ``batch_size`` image pairs that share the value of one random factor; a linear classifier (logistic regression)
  learns from ``num_train`` points which factor was shared; the score is its accuracy on ``num_eval`` new points.
- ``factor_vae_score`` (Kim & Mnih, ICML 2018): codes are divided by their standard deviation over
  ``num_variance_estimate`` images and dimensions whose deviation is below ``prune_threshold`` are dropped; a point
  is (the fixed factor, the dimension of least variance over ``batch_size`` images that share one factor value); a
  majority-vote classifier maps dimensions to factors; the score is its accuracy on ``num_eval`` new points.
- ``mig`` (Chen et al., NeurIPS 2018): every code dimension is discretised into ``num_bins`` equal-width bins;
  for every factor, the gap between the two largest mutual informations with a code dimension, divided by the
  factor's entropy, averaged over factors (``num_points`` images).
- ``dci`` (Eastwood & Williams, ICLR 2018): one gradient-boosted tree classifier per factor (scikit-learn's
  defaults: 100 stages of depth-3 trees), fitted on ``num_train`` images; its feature importances form the matrix
  R (D x K). Disentanglement: 1 - entropy (base K) of each code's row of R, weighted by the code's share of R;
  completeness: 1 - entropy (base D) of each factor's column, weighted likewise; informativeness: the classifiers'
  accuracy on ``num_train`` and on ``num_test`` other images.
- ``sap`` (Kumar et al., ICLR 2018), for discrete factors: for every (code dimension, factor) a linear SVM
  (C = 0.01, balanced class weights) on that one dimension predicts the factor; its accuracy on ``num_test``
  other images fills a D x K matrix; the score is the gap between the best and second-best dimension, averaged
  over factors.

No code is normalised except where a protocol says so (FactorVAE). All randomness comes from ``seed``.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.svm import LinearSVC

CHUNK = 256
"""Points built at once by the BetaVAE and FactorVAE scores (bounds the memory of pixel representations)."""


# ---------------------------------------------------------------------------------------------- input checks


def check_inputs(codes: np.ndarray, factors: np.ndarray, min_codes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``codes`` as a 2-D numeric array and ``factors`` as 2-D int64 factor indices with the same number of rows;
    ValueError otherwise (also when a factor takes a single value, which makes every score undefined)."""
    codes, factors = np.asarray(codes), np.asarray(factors)
    if codes.ndim != 2 or not (np.issubdtype(codes.dtype, np.number) or codes.dtype == bool):
        raise ValueError(f"codes must be a numeric (N, D) array, got {codes.dtype} {codes.shape}")
    if factors.ndim != 2 or not np.issubdtype(factors.dtype, np.integer):
        raise ValueError(f"factors must be integer factor indices (N, K), got {factors.dtype} {factors.shape}")
    if len(codes) != len(factors):
        raise ValueError(f"codes and factors must have one row per image, got {len(codes)} and {len(factors)} rows")
    if codes.shape[1] < min_codes:
        raise ValueError(f"this score needs at least {min_codes} code dimensions, got {codes.shape[1]}")
    if factors.min() < 0:
        raise ValueError("factor indices must be >= 0")
    constant = [k for k in range(factors.shape[1]) if np.all(factors[:, k] == factors[0, k])]
    if constant:
        raise ValueError(f"factor(s) {constant} take a single value in this pool; every factor must vary")
    if np.issubdtype(codes.dtype, np.floating) and not np.isfinite(codes).all():
        raise ValueError("codes contain NaN or infinite values")
    return codes, factors.astype(np.int64)


def _disjoint_draws(n: int, sizes: tuple[int, ...], rng: np.random.Generator, what: str) -> list[np.ndarray]:
    """Disjoint random subsets of range(n) with the given sizes (ValueError if the pool is too small)."""
    if sum(sizes) > n:
        raise ValueError(f"{what} needs {' + '.join(map(str, sizes))} = {sum(sizes)} distinct images, and the pool "
                         f"has {n}; use a larger pool or smaller sample sizes")
    order = rng.permutation(n)[:sum(sizes)]
    return np.split(order, np.cumsum(sizes)[:-1])


class _ValueSampler:
    """Draws pool rows that share a given value of a given factor, uniformly and with replacement."""

    def __init__(self, factors: np.ndarray) -> None:
        self.factors = factors
        self.order = [np.argsort(factors[:, k], kind="stable") for k in range(factors.shape[1])]
        self.counts = [np.bincount(factors[:, k]) for k in range(factors.shape[1])]
        self.starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in self.counts]

    def draw(self, k: int, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One row index per entry of ``values`` (any shape), each a random row whose factor ``k`` has that value."""
        offset = np.floor(rng.random(values.shape) * self.counts[k][values]).astype(np.int64)
        return self.order[k][self.starts[k][values] + offset]


def _rows(codes: np.ndarray, index: np.ndarray) -> np.ndarray:
    return codes[index].astype(np.float64)


# ---------------------------------------------------------------------------------------------- BetaVAE score


def beta_vae_points(codes: np.ndarray, factors: np.ndarray, num_points: int, batch_size: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(features (num_points, D), labels (num_points,)): for each point a random factor k (the label) and the mean
    over ``batch_size`` pairs of |code(a) - code(b)|, where a is a random image and b a random image with a's value
    of factor k."""
    sampler = _ValueSampler(factors)
    labels = rng.integers(0, factors.shape[1], num_points)
    features = np.empty((num_points, codes.shape[1]))
    for start in range(0, num_points, CHUNK):
        k = labels[start:start + CHUNK]
        a = rng.integers(0, len(codes), (len(k), batch_size))
        b = np.empty_like(a)
        for factor in np.unique(k):
            rows = k == factor
            b[rows] = sampler.draw(factor, factors[a[rows], factor], rng)
        features[start:start + len(k)] = np.abs(_rows(codes, a) - _rows(codes, b)).mean(axis=1)
    return features, labels


def beta_vae_score(codes: np.ndarray, factors: np.ndarray, *, batch_size: int = 64, num_train: int = 10_000,
                   num_eval: int = 5_000, seed: int = 0) -> dict[str, Any]:
    """The BetaVAE score: accuracy of a logistic regression that tells from the mean |difference| of codes over
    pairs which factor the pairs share (chance: 1/K). Returns ``score`` (= ``eval_accuracy``) and
    ``train_accuracy``."""
    codes, factors = check_inputs(codes, factors)
    rng = np.random.default_rng(seed)
    x_train, y_train = beta_vae_points(codes, factors, num_train, batch_size, rng)
    x_eval, y_eval = beta_vae_points(codes, factors, num_eval, batch_size, rng)
    classifier = OneVsRestClassifier(LogisticRegression(solver="liblinear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train, y_train)
    accuracy = float(classifier.score(x_eval, y_eval))
    return {"score": accuracy, "train_accuracy": float(classifier.score(x_train, y_train)),
            "eval_accuracy": accuracy,
            "sizes": {"batch_size": batch_size, "num_train": num_train, "num_eval": num_eval}}


# ---------------------------------------------------------------------------------------------- FactorVAE score


def factor_vae_votes(codes: np.ndarray, factors: np.ndarray, num_points: int, batch_size: int, scale: np.ndarray,
                     active: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Votes (K, D): for each point a random factor k, a value of it (that of a random image) and ``batch_size``
    images with that value; the vote goes to (k, the active dimension whose variance over the batch, divided by
    ``scale`` (its variance over the data), is least)."""
    sampler = _ValueSampler(factors)
    active_dims = np.flatnonzero(active)
    votes = np.zeros((factors.shape[1], codes.shape[1]), dtype=np.int64)
    ks = rng.integers(0, factors.shape[1], num_points)
    for start in range(0, num_points, CHUNK):
        k = ks[start:start + CHUNK]
        values = factors[rng.integers(0, len(codes), len(k)), k]
        batch = np.empty((len(k), batch_size), dtype=np.int64)
        for factor in np.unique(k):
            rows = k == factor
            batch[rows] = sampler.draw(factor, np.repeat(values[rows, None], batch_size, axis=1), rng)
        variance = _rows(codes, batch)[:, :, active_dims].var(axis=1, ddof=1) / scale[active_dims]
        np.add.at(votes, (k, active_dims[np.argmin(variance, axis=1)]), 1)
    return votes


def factor_vae_score(codes: np.ndarray, factors: np.ndarray, *, batch_size: int = 64, num_train: int = 10_000,
                     num_eval: int = 5_000, num_variance_estimate: int = 10_000, prune_threshold: float = 0.05,
                     seed: int = 0) -> dict[str, Any]:
    """The FactorVAE score: accuracy of the majority-vote classifier from (least-variance dimension) to (fixed
    factor). Returns ``score`` (= ``eval_accuracy``), ``train_accuracy``, ``active_dims`` and the ``votes`` of
    the training points (K x D)."""
    codes, factors = check_inputs(codes, factors)
    rng = np.random.default_rng(seed)
    sample = rng.integers(0, len(codes), num_variance_estimate)
    variance = _rows(codes, sample).var(axis=0, ddof=1)
    active = np.sqrt(variance) >= prune_threshold
    sizes = {"batch_size": batch_size, "num_train": num_train, "num_eval": num_eval,
             "num_variance_estimate": num_variance_estimate, "prune_threshold": prune_threshold}
    if not active.any():
        return {"score": 0.0, "train_accuracy": 0.0, "eval_accuracy": 0.0, "active_dims": 0, "votes": None,
                "sizes": sizes}
    train_votes = factor_vae_votes(codes, factors, num_train, batch_size, variance, active, rng)
    eval_votes = factor_vae_votes(codes, factors, num_eval, batch_size, variance, active, rng)
    factor_of_dim = np.argmax(train_votes, axis=0)  # the classifier: each dimension votes for one factor
    dims = np.arange(codes.shape[1])
    train_accuracy = train_votes[factor_of_dim, dims].sum() / train_votes.sum()
    eval_accuracy = eval_votes[factor_of_dim, dims].sum() / eval_votes.sum()
    return {"score": float(eval_accuracy), "train_accuracy": float(train_accuracy),
            "eval_accuracy": float(eval_accuracy), "active_dims": int(active.sum()), "votes": train_votes.tolist(),
            "sizes": sizes}


# ---------------------------------------------------------------------------------------------- MIG


def histogram_discretize(codes: np.ndarray, num_bins: int) -> np.ndarray:
    """Every column of ``codes`` (N, D) mapped to bins 1..num_bins of equal width between its minimum and maximum
    (a constant column falls in one bin)."""
    out = np.empty(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, d], num_bins)
        out[:, d] = np.digitize(codes[:, d], edges[:-1])
    return out


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Mutual information in nats between two discrete variables given by paired integer samples."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.bincount(a * (b.max() + 1) + b, minlength=(a.max() + 1) * (b.max() + 1)).reshape(a.max() + 1, -1)
    p = joint / len(a)
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nonzero = p > 0
    return float(max(0.0, (p[nonzero] * np.log(p[nonzero] / outer[nonzero])).sum()))


def mig(codes: np.ndarray, factors: np.ndarray, *, num_points: int = 10_000, num_bins: int = 20,
        seed: int = 0) -> dict[str, Any]:
    """The mutual information gap. Returns ``score`` (mean over factors), ``per_factor`` gaps, the mutual
    information matrix ``mutual_information`` (D x K, nats) and the factors' ``entropy``."""
    codes, factors = check_inputs(codes, factors, min_codes=2)
    (rows,) = _disjoint_draws(len(codes), (num_points,), np.random.default_rng(seed), "MIG")
    binned, y = histogram_discretize(_rows(codes, rows), num_bins), factors[rows]
    info = np.array([[mutual_information(binned[:, d], y[:, k]) for k in range(y.shape[1])]
                     for d in range(binned.shape[1])])
    entropy = np.array([mutual_information(y[:, k], y[:, k]) for k in range(y.shape[1])])
    top = np.sort(info, axis=0)[::-1]
    gaps = (top[0] - top[1]) / entropy
    return {"score": float(gaps.mean()), "per_factor": gaps.tolist(), "mutual_information": info.tolist(),
            "entropy": entropy.tolist(), "sizes": {"num_points": num_points, "num_bins": num_bins}}


# ---------------------------------------------------------------------------------------------- DCI


def _entropy_rows(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy (log base ``base``) of every row of nonnegative weights ``p`` (normalised; an all-zero row counts as
    uniform)."""
    p = p + 1e-11
    p = p / p.sum(axis=1, keepdims=True)
    return -(p * np.log(p)).sum(axis=1) / math.log(base)


def dci_from_importance(importance: np.ndarray) -> tuple[float, float]:
    """(disentanglement, completeness) of an importance matrix R (D codes x K factors)."""
    r = np.abs(np.asarray(importance, dtype=np.float64))
    d_codes, k_factors = r.shape
    weights = r if r.sum() > 0 else np.ones_like(r)
    per_code = 1 - _entropy_rows(r, k_factors) if k_factors > 1 else np.ones(d_codes)
    per_factor = 1 - _entropy_rows(r.T, d_codes) if d_codes > 1 else np.ones(k_factors)
    disentanglement = (per_code * weights.sum(axis=1) / weights.sum()).sum()
    completeness = (per_factor * weights.sum(axis=0) / weights.sum()).sum()
    return float(disentanglement), float(completeness)


def _boosted_trees(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   n_estimators: int, seed: int) -> tuple[np.ndarray, float, float]:
    """(feature importances, train accuracy, test accuracy) of one factor's gradient-boosted classifier."""
    model = GradientBoostingClassifier(n_estimators=n_estimators, random_state=seed).fit(x_train, y_train)
    return np.abs(model.feature_importances_), model.score(x_train, y_train), model.score(x_test, y_test)


def dci(codes: np.ndarray, factors: np.ndarray, *, num_train: int = 10_000, num_test: int = 5_000,
        n_estimators: int = 100, seed: int = 0, jobs: int = 1) -> dict[str, Any]:
    """Disentanglement, completeness and informativeness from gradient-boosted trees. Returns ``score`` (=
    ``disentanglement``), ``completeness``, ``informativeness_train``/``_test`` (mean accuracy over factors) and
    the ``importance`` matrix (D x K). ``jobs`` processes fit the factors' classifiers side by side (the same
    result; the slowest factor bounds the time)."""
    codes, factors = check_inputs(codes, factors)
    train, test = _disjoint_draws(len(codes), (num_train, num_test), np.random.default_rng(seed), "DCI")
    x_train, x_test = _rows(codes, train), _rows(codes, test)
    tasks = [(x_train, factors[train, k], x_test, factors[test, k], n_estimators, seed)
             for k in range(factors.shape[1])]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks))) as pool:
            fits = list(pool.map(_boosted_trees, *zip(*tasks, strict=True)))
    else:
        fits = [_boosted_trees(*task) for task in tasks]
    importance = np.stack([f[0] for f in fits], axis=1)
    train_accuracy, test_accuracy = [f[1] for f in fits], [f[2] for f in fits]
    disentanglement, completeness = dci_from_importance(importance)
    return {"score": disentanglement, "disentanglement": disentanglement, "completeness": completeness,
            "informativeness_train": float(np.mean(train_accuracy)),
            "informativeness_test": float(np.mean(test_accuracy)), "importance": importance.tolist(),
            "sizes": {"num_train": num_train, "num_test": num_test, "n_estimators": n_estimators}}


# ---------------------------------------------------------------------------------------------- SAP


def sap(codes: np.ndarray, factors: np.ndarray, *, num_train: int = 10_000, num_test: int = 5_000,
        seed: int = 0) -> dict[str, Any]:
    """The SAP score for discrete factors. Returns ``score`` (mean over factors of the gap between the two most
    predictive dimensions), ``per_factor`` and the accuracy matrix ``score_matrix`` (D x K)."""
    codes, factors = check_inputs(codes, factors, min_codes=2)
    train, test = _disjoint_draws(len(codes), (num_train, num_test), np.random.default_rng(seed), "SAP")
    x_train, x_test = _rows(codes, train), _rows(codes, test)
    matrix = np.zeros((codes.shape[1], factors.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for d in range(codes.shape[1]):
            for k in range(factors.shape[1]):
                classifier = LinearSVC(C=0.01, class_weight="balanced")
                classifier.fit(x_train[:, d:d + 1], factors[train, k])
                matrix[d, k] = classifier.score(x_test[:, d:d + 1], factors[test, k])
    top = np.sort(matrix, axis=0)[::-1]
    gaps = top[0] - top[1]
    return {"score": float(gaps.mean()), "per_factor": gaps.tolist(), "score_matrix": matrix.tolist(),
            "sizes": {"num_train": num_train, "num_test": num_test}}
