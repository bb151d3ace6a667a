"""The five disentanglement scores (nvae_hub.analysis.disentanglement) on representations whose answer is known:
the ground-truth factors themselves, random codes, and the factors with two of them mixed into two dimensions
(x + y, x - y); the mutual information gap on a small hand-worked example; DCI's aggregation on hand-made
importance matrices; and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nvae_hub.analysis import disentanglement as dm

SIZES = (3, 4, 5, 6)
GRID = np.stack(np.unravel_index(np.arange(math.prod(SIZES)), SIZES), axis=1)
FACTORS = np.tile(GRID, (20, 1))  # a pool of 2,400 images: the whole grid, 20 times
SMALL = {  # protocol sizes small enough for a test
    "beta_vae_score": dict(batch_size=16, num_train=300, num_eval=200),
    "factor_vae_score": dict(batch_size=16, num_train=300, num_eval=200, num_variance_estimate=1000),
    "mig": dict(num_points=2000),
    "dci": dict(num_train=500, num_test=300, n_estimators=10),
    "sap": dict(num_train=500, num_test=300),
}
METRICS = list(SMALL)


def score(metric: str, codes: np.ndarray, factors: np.ndarray = FACTORS, seed: int = 0, **sizes: int) -> dict:
    return getattr(dm, metric)(codes, factors, seed=seed, **{**SMALL[metric], **sizes})


def mixed(codes: np.ndarray) -> np.ndarray:
    """Factors 2 and 3 mixed: one dimension holds their sum, the next their difference."""
    out = codes.copy()
    out[:, 2], out[:, 3] = codes[:, 2] + codes[:, 3], codes[:, 2] - codes[:, 3]
    return out


GROUND_TRUTH = FACTORS.astype(np.float64)
RANDOM = np.random.default_rng(0).normal(size=FACTORS.shape)
# (ground truth at least, random at most, mixed at most). Chance is 1/4 for the BetaVAE and FactorVAE scores. SAP's
# one-dimensional linear SVMs cannot carve 5 or 6 classes out of one axis, so even the ground truth scores ~0.4.
BOUNDS = {
    "beta_vae_score": (0.95, 0.4, 0.9),
    "factor_vae_score": (0.95, 0.4, 0.85),
    "mig": (0.95, 0.05, 0.7),
    "dci": (0.95, 0.1, 0.85),
    "sap": (0.3, 0.08, 0.3),
}


@pytest.mark.parametrize("metric", METRICS)
def test_ground_truth_scores_near_the_top_random_codes_near_the_bottom_and_mixing_lowers_it(metric: str) -> None:
    top, bottom, mixed_at_most = BOUNDS[metric]
    truth = score(metric, GROUND_TRUTH)["score"]
    assert truth >= top, truth
    assert score(metric, RANDOM)["score"] <= bottom
    mix = score(metric, mixed(GROUND_TRUTH))["score"]
    assert mix <= mixed_at_most and mix < truth - 0.05, (mix, truth)


@pytest.mark.parametrize("metric", METRICS)
def test_scores_are_deterministic_given_the_seed(metric: str) -> None:
    codes = mixed(GROUND_TRUTH) + np.random.default_rng(1).normal(scale=0.1, size=FACTORS.shape)
    sizes = {"n_estimators": 3} if metric == "dci" else {}
    first = score(metric, codes, **sizes)
    assert first == score(metric, codes, **sizes)
    assert first != score(metric, codes, seed=1, **sizes)


def test_dci_completeness_and_informativeness() -> None:
    """The ground truth is complete and predicts every factor; random codes predict near chance (the mean of
    1/3, 1/4, 1/5, 1/6 is 0.24); the mixed factors each need two codes, so completeness drops."""
    truth, rand, mix = (score("dci", codes) for codes in (GROUND_TRUTH, RANDOM, mixed(GROUND_TRUTH)))
    assert truth["completeness"] >= 0.95 and truth["informativeness_test"] >= 0.97
    assert rand["informativeness_test"] <= 0.35 and rand["informativeness_train"] > rand["informativeness_test"]
    assert mix["completeness"] < truth["completeness"] - 0.1
    assert np.asarray(truth["importance"]).shape == (4, 4)
    assert np.argmax(truth["importance"], axis=0).tolist() == [0, 1, 2, 3]


def test_dci_fits_the_factors_in_parallel_processes_with_the_same_result() -> None:
    codes = mixed(GROUND_TRUTH) + np.random.default_rng(3).normal(scale=0.3, size=FACTORS.shape)
    assert score("dci", codes, n_estimators=3, jobs=2) == score("dci", codes, n_estimators=3)


def test_factor_vae_score_divides_by_each_dimension_s_spread_and_prunes_collapsed_ones() -> None:
    """Rescaling dimensions changes nothing (variances are divided by the global ones; without that, the shrunken
    dimension 1 would have the least variance in every batch); a dimension whose spread is below the threshold
    takes no votes."""
    noisy = GROUND_TRUTH + np.random.default_rng(2).normal(scale=0.1, size=FACTORS.shape)
    rescaled = score("factor_vae_score", noisy * np.array([1.0, 0.08, 30.0, 1.0]))
    assert rescaled["score"] >= 0.97 and rescaled["active_dims"] == 4
    collapsed = score("factor_vae_score", GROUND_TRUTH * np.array([1.0, 1e-3, 1.0, 1.0]))
    assert collapsed["active_dims"] == 3 and not any(row[1] for row in collapsed["votes"])
    assert collapsed["score"] == pytest.approx(0.75, abs=0.08)  # factor 1's points are all misclassified


def test_mig_on_a_hand_worked_example() -> None:
    """Two binary factors a, b (all four combinations, 25 times); code 1 = a, code 2 = a AND b.

    I(code 1; a) = ln 2, I(code 1; b) = 0. code 2 is 1 on a quarter of the images: H(code 2) = ln 4 - 3/4 ln 3, and
    given a it is 0 (a = 0) or a fair coin (a = 1): H(code 2 | a) = 1/2 ln 2, so I(code 2; a) = 3/2 ln 2 - 3/4 ln 3
    = 0.2158, and the same for b. Gaps over H = ln 2: a: 1 - 0.2158 / ln 2 = 3/4 log2(3) - 1/2 = 0.6887;
    b: 0.2158 / ln 2 = 3/2 - 3/4 log2(3) = 0.3113. MIG: their mean, 1/2."""
    a, b = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    factors = np.tile(np.stack([a, b], axis=1), (25, 1))
    codes = np.tile(np.stack([a, a & b], axis=1), (25, 1)).astype(np.float64)
    result = dm.mig(codes, factors, num_points=100)
    i2 = 1.5 * math.log(2) - 0.75 * math.log(3)
    np.testing.assert_allclose(result["mutual_information"], [[math.log(2), 0.0], [i2, i2]], atol=1e-12)
    np.testing.assert_allclose(result["entropy"], [math.log(2)] * 2, atol=1e-12)
    np.testing.assert_allclose(result["per_factor"], [0.75 * math.log2(3) - 0.5, 1.5 - 0.75 * math.log2(3)],
                               atol=1e-12)
    assert result["score"] == pytest.approx(0.5, abs=1e-12)


def test_mutual_information_and_discretisation() -> None:
    x = np.array([0.0, 0.1, 0.5, 0.96, 1.0])
    np.testing.assert_array_equal(dm.histogram_discretize(x[:, None], 20)[:, 0], [1, 3, 11, 20, 20])
    y = np.arange(8) % 4
    assert dm.mutual_information(y, y) == pytest.approx(math.log(4))
    assert dm.mutual_information(y, y % 2) == pytest.approx(math.log(2))
    assert dm.mutual_information(y, np.zeros(8, np.int64)) == 0.0


def test_dci_aggregation_on_hand_made_importance_matrices() -> None:
    eye = np.diag([5.0] * 4)
    assert dm.dci_from_importance(eye) == pytest.approx((1.0, 1.0))
    # each code explains two factors equally: disentanglement 1 - log 2 / log 8; every factor has one code
    assert dm.dci_from_importance(np.hstack([eye, eye])) == pytest.approx((1 - math.log(2) / math.log(8), 1.0))
    # two codes per factor: completeness 1 - log 2 / log 8
    assert dm.dci_from_importance(np.vstack([eye, eye])) == pytest.approx((1.0, 1 - math.log(2) / math.log(8)))
    # an unused code carries no weight; weights follow each code's share of the importance
    assert dm.dci_from_importance(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))[0] == pytest.approx(1.0)
    r = np.array([[3.0, 0.0], [1.0, 1.0]])  # code 0: pure (D = 1), weight 3/5; code 1: uniform (D = 0), weight 2/5
    assert dm.dci_from_importance(r)[0] == pytest.approx(0.6)
    assert dm.dci_from_importance(np.zeros((3, 3))) == pytest.approx((0.0, 0.0), abs=1e-6)


def test_sap_is_the_gap_between_the_two_best_dimensions() -> None:
    """A duplicated ground truth predicts every factor equally well from two dimensions: the gap, and SAP, is 0."""
    result = score("sap", np.hstack([GROUND_TRUTH, GROUND_TRUTH]))
    assert result["score"] == pytest.approx(0.0, abs=0.02)
    assert min(max(column) for column in zip(*result["score_matrix"], strict=True)) > 0.3


@pytest.mark.parametrize("metric", METRICS)
def test_bad_input_is_refused_with_a_clear_message(metric: str) -> None:
    with pytest.raises(ValueError, match="one row per image"):
        score(metric, GROUND_TRUTH[:-1])
    with pytest.raises(ValueError, match=r"factor\(s\) \[1\] take a single value"):
        score(metric, GROUND_TRUTH, np.stack([FACTORS[:, 0], np.zeros(len(FACTORS), np.int64)], axis=1))
    with pytest.raises(ValueError, match="NaN or infinite"):
        score(metric, np.where(np.arange(len(FACTORS))[:, None] == 3, np.nan, GROUND_TRUTH))
    with pytest.raises(ValueError, match="integer factor indices"):
        score(metric, GROUND_TRUTH, FACTORS.astype(np.float64))


@pytest.mark.parametrize("metric", ["mig", "dci", "sap"])
def test_a_pool_too_small_for_the_protocol_says_so(metric: str) -> None:
    with pytest.raises(ValueError, match="distinct images, and the pool has 100"):
        rows = np.random.default_rng(0).choice(len(FACTORS), 100, replace=False)
        score(metric, GROUND_TRUTH[rows], FACTORS[rows])
