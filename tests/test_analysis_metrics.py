"""The analyses' metrics on cases whose answer is known: transfer matrix, k-NN accuracy, thickness and slant,
active units, and the shared test-set metrics of nvae_hub.evaluation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from nvae_hub import NVAE, NVAEConfig
from nvae_hub.analysis import classifier, control, curves, kl, latent_map, morphology, sample_quality, samples
from nvae_hub.data import build_dataset
from nvae_hub.evaluation import evaluate_nll, reconstruction_metrics
from nvae_hub.model import Latents

# ---------------------------------------------------------------------------------------------- transfer matrix

BANDS = 3  # property k of an image is the brightness of its horizontal band k


class BandModel:
    """A fake model whose latent scale k holds exactly property k: encode reads each band's brightness, decode
    paints it back. Swapping scale k therefore moves property k, and nothing else, from B to A."""

    num_scales = BANDS

    def encode(self, x: torch.Tensor) -> Latents:
        bands = x[:, 0].reshape(len(x), BANDS, -1).mean(dim=2)
        return Latents([bands[:, k, None, None, None] for k in range(BANDS)], list(range(BANDS)))

    def decode(self, latents: Latents) -> torch.Tensor:
        bands = torch.cat([z.flatten(1) for z in latents.z], dim=1)
        return bands.repeat_interleave(4, dim=1)[:, None, :, None].expand(-1, 1, -1, 4).contiguous()


def band_property(k: int) -> control.Property:
    return control.Property(f"band {k}", lambda images: images[:, 0, 4 * k:4 * k + 4].mean(axis=(1, 2)))


def band_class(k: int) -> control.Property:
    """A categorical property: is band k bright?"""
    return control.Property(f"band {k} bright", lambda images: images[:, 0, 4 * k].mean(axis=1) > 0.5,
                            categorical=True)


def band_images(n: int, seed: int) -> torch.Tensor:
    values = torch.rand((n, BANDS), generator=torch.Generator().manual_seed(seed))
    return values.repeat_interleave(4, dim=1)[:, None, :, None].expand(-1, 1, -1, 4).contiguous()


def test_a_model_that_copies_property_k_with_scale_k_gives_the_identity():
    properties = [band_property(k) for k in range(BANDS)]
    matrix, values = control.transfer_matrix(BandModel(), band_images(50, 0), band_images(50, 1), properties,
                                             batch_size=16)
    np.testing.assert_allclose(matrix, np.eye(BANDS), atol=1e-6)
    assert set(values["swapped"]) == {p.name for p in properties}


def test_each_property_is_placed_in_the_column_of_its_carrier():
    properties = [band_property(2), band_property(0)]
    matrix, _ = control.transfer_matrix(BandModel(), band_images(30, 4), band_images(30, 5), properties)
    np.testing.assert_allclose(matrix, [[0, 1], [0, 0], [1, 0]], atol=1e-6)


def test_a_categorical_property_is_carried_by_its_scale_only():
    properties = [band_class(k) for k in range(BANDS)]
    matrix, _ = control.transfer_matrix(BandModel(), band_images(60, 2), band_images(60, 3), properties)
    np.testing.assert_allclose(matrix, np.eye(BANDS))


def test_transfer_of_a_half_way_move_and_of_no_change():
    a, b = np.array([0.0, 1.0, 2.0, 5.0]), np.array([2.0, 0.0, 4.0, 5.0])
    assert control.transfer(a, b, (a + b) / 2) == pytest.approx(0.5)
    assert control.transfer(a, b, a) == 0.0
    assert control.transfer(a, b, b + (b - a)) == 1.0  # clipped
    assert math.isnan(control.transfer(a, a, b))
    assert control.transfer(np.array([1, 2, 3]), np.array([1, 5, 6]), np.array([7, 5, 3]), categorical=True) == 0.5


# ---------------------------------------------------------------------------------------------- k-NN


def test_knn_accuracy_is_one_on_separable_clusters_and_chance_on_random_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (4, 8))

    def clusters(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 4, n)
        return centres[y] + rng.normal(0, 0.5, (n, 8)), y

    (train_x, train_y), (test_x, test_y) = clusters(200), clusters(100)
    assert latent_map.knn_accuracy(train_x, train_y, test_x, test_y) == 1.0
    random_accuracy = latent_map.knn_accuracy(train_x, rng.integers(0, 4, 200), test_x, rng.integers(0, 4, 100))
    assert 0.1 <= random_accuracy <= 0.4  # chance is 0.25


# ---------------------------------------------------------------------------------------------- thickness, slant


def stroke(width: float, angle_degrees: float, size: int = 28, length: float = 16.0,
           supersample: int = 8) -> np.ndarray:
    """A straight stroke drawn with a round pen of diameter ``width`` through the centre, its top leaning right by
    the angle from vertical, anti-aliased like MNIST's digits: each pixel's value is the fraction of it (sampled on
    a ``supersample`` grid) within width / 2 of the segment."""
    fine = size * supersample
    y, x = (np.indices((fine, fine), dtype=np.float64) + 0.5) / supersample
    angle = math.radians(angle_degrees)
    dx, dy = math.sin(angle), -math.cos(angle)  # unit vector towards the top
    rx, ry = x - size / 2, y - size / 2
    along = np.clip(rx * dx + ry * dy, -length / 2, length / 2)
    inside = np.hypot(rx - along * dx, ry - along * dy) <= width / 2
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


@pytest.mark.parametrize("width", [2.0, 4.0, 6.0])
def test_thickness_of_drawn_strokes(width):
    measured = morphology.thickness(np.stack([stroke(width, a) for a in (0.0, -15.0, 30.0)]))
    np.testing.assert_allclose(measured, width, atol=0.45)


@pytest.mark.parametrize("angle", [-30.0, -10.0, 0.0, 15.0, 35.0])
def test_slant_of_drawn_strokes(angle):
    measured = morphology.slant(np.stack([stroke(2.0, angle), stroke(2.0, angle, length=12.0)])[:, None])
    np.testing.assert_allclose(np.degrees(measured), angle, atol=3.0)


def test_blank_images_have_no_thickness_or_slant():
    assert np.isnan(morphology.thickness(np.zeros((1, 28, 28)))).all()
    assert np.isnan(morphology.slant(np.zeros((1, 1, 28, 28)))).all()
    with pytest.raises(ValueError, match="one-channel"):
        morphology.thickness(np.zeros((1, 3, 28, 28)))


# ---------------------------------------------------------------------------------------------- active units


def test_active_units_count_the_variances_above_the_threshold():
    generator = torch.Generator().manual_seed(0)
    stds = torch.tensor([0.0, 0.05, 0.2, 1.0, 3.0])  # variances 0, 0.0025, 0.04, 1, 9
    means = torch.randn((4000, 5, 2, 2), generator=generator) * stds[None, :, None, None] + 7.0
    assert kl.active_units_by_variance(means) == 3 * 4
    assert kl.active_units_by_variance(means, threshold=2.0) == 1 * 4


def test_active_channels_count_the_mean_kl_above_a_tenth_of_a_nat():
    kl_per_channel = torch.tensor([[0.0, 0.05, 0.29, 2.0], [0.1, 0.1, 0.0, 2.0], [0.0, 0.2, 0.0, 2.0]])
    # means over images: 0.033, 0.117, 0.097, 2.0
    assert kl.active_channels_by_kl(kl_per_channel) == 2


# ---------------------------------------------------------------------------------------------- sample quality


def test_readout_of_hand_set_class_probabilities():
    probabilities = np.array([[0.95, 0.05, 0.0], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.0, 0.02, 0.98]])
    r = sample_quality.readout(probabilities)
    top = np.array([0.95, 0.5, 0.8, 0.98])
    assert r["mean_top_probability"] == pytest.approx(0.8075)
    assert r["mean_top_probability_stderr"] == pytest.approx(math.sqrt(np.sum((top - 0.8075) ** 2) / 3) / 2)
    assert r["fraction_above_0.9"] == 0.5
    assert r["class_counts"] == [1, 1, 2] and r["classes_present"] == 3
    assert sample_quality.readout(np.array([[0.1, 0.9, 0.0]]))["fraction_above_0.9"] == 0.0  # strictly above


def test_class_probabilities_are_the_softmax_of_the_logits_in_every_chunk():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 1.0, 4.0], [1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    expected = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    got = classifier.class_probabilities(torch.nn.Identity(), logits, batch_size=2)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)


def test_drawn_samples_are_the_models_samples_decoded_in_chunks_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny")).eval()
    n = samples.CHUNK + 44  # two chunks, the second one partial
    as_drawn = torch.from_numpy(samples.sample_grid(model, (0.7,), n, seed=3, readjust=False)[0.7])
    torch.testing.assert_close(as_drawn, model.sample(n, temperature=0.7, seed=3), rtol=0, atol=0)
    readjusted = torch.from_numpy(samples.sample_grid(model, (0.7,), n, seed=3, readjust=True)[0.7])
    reference = copy.deepcopy(model)
    reference.readjust_bn(0.7, seed=4)
    torch.testing.assert_close(readjusted, reference.sample(n, temperature=0.7, seed=3), rtol=0, atol=0)
    assert not torch.equal(readjusted, as_drawn)
    assert not model.has_readjusted_bn


# ---------------------------------------------------------------------------------------------- curves


def test_curves_bin_by_mean_and_skip_missing_values():
    steps = np.arange(1, 11, dtype=np.float64)
    values = np.array([1, 3, np.nan, 5, 5, 7, 1, 1, 2, 4], dtype=np.float64)
    x, y = curves.binned(steps, values, max_points=5)
    assert x == [1.5, 4.0, 5.5, 7.5, 9.5]
    assert y == [2.0, 5.0, 6.0, 1.0, 3.0]
    records = [{"step": s, "recon": 2.0 * s, "kl": None, "loss": 1.0, "kl_groups": [1.0, None]} for s in range(1, 5)]
    out = curves.curves(records, max_points=2)
    assert out["recon"] == {"step": [1.5, 3.5], "value": [3.0, 7.0]}
    assert out["kl"] == {"step": [], "value": []}
    assert out["kl_groups"][1] == {"step": [], "value": []}


# ---------------------------------------------------------------------------------------------- evaluation


def test_reconstruction_metrics_and_nll_agree_with_the_model_on_a_batch():
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny")).eval()
    dataset = build_dataset("synthetic", "test", data_dir=None, image_size=16, channels=1, synthetic_size=6)
    x = torch.stack([dataset[i] for i in range(6)])  # binary already, so binarising changes nothing
    metrics = reconstruction_metrics(model, dataset, batch_size=4, progress=False)
    with torch.no_grad():
        mse = (model.reconstruct(x) - x).square().flatten(1).mean(dim=1)
    assert metrics["num_images"] == 6
    assert metrics["mse"] == pytest.approx(mse.mean().item(), rel=1e-5)
    assert metrics["mse_stderr"] == pytest.approx(mse.double().std().item() / math.sqrt(6), rel=1e-4)
    one_sample = evaluate_nll(model, dataset, num_samples=1, batch_size=4, progress=False, seed=5)
    many = evaluate_nll(model, dataset, num_samples=20, batch_size=4, progress=False, seed=5)
    # The negative ELBO estimates agree within noise; more importance samples give a tighter (lower) bound.
    assert one_sample["nll_nats"] == pytest.approx(metrics["neg_elbo_nats"], rel=0.05)
    assert many["nll_nats"] < one_sample["nll_nats"]
    assert many["bits_per_dim"] == pytest.approx(many["nll_nats"] / (256 * math.log(2)))
