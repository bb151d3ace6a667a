"""How disentangled the latents are: the five standard scores (``nvae_hub.analysis.disentanglement``) of the
posterior means on a data set with known factors (``sprites``, ``sprites32``), with raw pixels as baselines.

Protocol:

- The pool: ``--num-images`` images (default 50,000; ``--quick`` 600) drawn uniformly without replacement from
  the whole factor grid (737,280 images, train and test alike, as the metrics' protocols draw from the generator).
  Every score draws its samples from this pool, so every representation is scored on the same images. With
  ``--num-images 737280`` the pool is the grid itself and the protocols are exactly the published ones.
- The representation is the posterior mean of every latent group (``NVAE.encode``). A group holds C x H x W
  numbers, thousands in all, so each group is reduced by a PCA to ``--pca-components`` components (fitted on the
  first 10,000 pool images); "all groups" concatenates every group's components, "scale s" those of scale s.
- Baselines on the same images: "pixel PCA", a PCA of the pixels with as many components as factors, and "pixels",
  the raw pixels. DCI and SAP are not computed on the raw pixels: they fit one gradient-boosted classifier per
  factor on every pixel (hours) and one SVM per pixel and factor.
- Sample sizes: disentanglement_lib's (Locatello et al., 2019) by default, recorded in the JSON; ``--quick`` uses
  far smaller ones (and 2 boosting stages for DCI), a smoke test, not a measurement.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

from nvae_hub import sprites
from nvae_hub.evaluation import seeded_eval
from nvae_hub.model import NVAE

from . import disentanglement as dm
from .common import AnalysisError, Inputs, Result

NEEDS = ("model", "data", "factors")
POOL = {"full": 50_000, "quick": 600}
PCA_FIT_IMAGES = 10_000
BATCH_SIZE = 256
METRICS: dict[str, Callable[..., dict[str, Any]]] = {
    "beta_vae": dm.beta_vae_score, "factor_vae": dm.factor_vae_score, "mig": dm.mig, "dci": dm.dci, "sap": dm.sap,
}
TITLES = {"beta_vae": "BetaVAE score", "factor_vae": "FactorVAE score", "mig": "MIG", "dci": "DCI disentanglement",
          "sap": "SAP"}
PROTOCOL = {  # disentanglement_lib's sizes (unsupervised_study_v1)
    "beta_vae": dict(batch_size=64, num_train=10_000, num_eval=5_000),
    "factor_vae": dict(batch_size=64, num_train=10_000, num_eval=5_000, num_variance_estimate=10_000),
    "mig": dict(num_points=10_000, num_bins=20),
    "dci": dict(num_train=10_000, num_test=5_000, n_estimators=100),
    "sap": dict(num_train=10_000, num_test=5_000),
}
QUICK_PROTOCOL = {
    "beta_vae": dict(batch_size=16, num_train=200, num_eval=100),
    "factor_vae": dict(batch_size=16, num_train=200, num_eval=100, num_variance_estimate=1_000),
    "mig": dict(num_points=500, num_bins=20),
    "dci": dict(num_train=400, num_test=200, n_estimators=2),
    "sap": dict(num_train=400, num_test=200),
}
PIXEL_SKIPS = {"dci": "not computed on raw pixels: one gradient-boosted classifier per factor on every pixel",
               "sap": "not computed on raw pixels: one linear SVM per pixel and factor"}
MAX_DETAIL_DIMS = 64
"""Matrices (votes, mutual information, importance, SAP accuracies) go into the JSON for representations up to
this many dimensions."""


# ---------------------------------------------------------------------------------------------- the pool


def factor_pool(image_size: int, size: int, seed: int) -> sprites.SpritesDataset:
    """``size`` images drawn uniformly without replacement from the whole sprites grid."""
    size = min(size, sprites.NUM_IMAGES)
    indices = np.random.default_rng(seed).choice(sprites.NUM_IMAGES, size, replace=False)
    return sprites.SpritesDataset(image_size, indices)


def fit_pca(features: np.ndarray, components: int, seed: int) -> PCA:
    """A PCA of ``features`` (N, D) with ``components`` components (at most D and N), deterministic."""
    components = min(components, *features.shape)
    return PCA(n_components=components, svd_solver="full", random_state=seed).fit(features)


@torch.no_grad()
def posterior_codes(model: NVAE, pool: sprites.SpritesDataset, *, components: int, seed: int,
                    progress: bool = True) -> tuple[dict[str, np.ndarray], list[float]]:
    """The model's representations of the pool: {"all groups": ..., "scale 0": ..., ...}, (N, D) float32 arrays
    of per-group PCA components of the posterior means, and the variance fraction each group's PCA keeps.

    The PCAs are fitted on the first ``PCA_FIT_IMAGES`` pool images, then every batch is projected as it is
    encoded, so the pool's full posterior means are never held in memory."""
    n = len(pool)
    fit_size = min(n, PCA_FIT_IMAGES)
    pcas: list[PCA] = []
    held: list[list[np.ndarray]] = [[] for _ in range(model.num_groups)]
    reduced: list[list[np.ndarray]] = [[] for _ in range(model.num_groups)]
    starts = range(0, n, BATCH_SIZE)
    with seeded_eval(model, seed):
        for start in tqdm(starts, desc="encode", disable=not progress, file=sys.stderr):
            x = pool.images(np.arange(start, min(start + BATCH_SIZE, n))).to(model.device)
            means = [z.flatten(1).float().cpu().numpy() for z in model.encode(x).z]
            if not pcas:
                for g, m in enumerate(means):
                    held[g].append(m)
                if start + BATCH_SIZE < fit_size:
                    continue
                pcas = [fit_pca(np.concatenate(h)[:fit_size], components, seed) for h in held]
                means = [np.concatenate(h) for h in held]
            for g, m in enumerate(means):
                reduced[g].append(pcas[g].transform(m).astype(np.float32))
    groups = [np.concatenate(r) for r in reduced]
    codes = {"all groups": np.concatenate(groups, axis=1)}
    for scale in sorted(set(model.scale_of_group)):
        codes[f"scale {scale}"] = np.concatenate(
            [groups[g] for g, s in enumerate(model.scale_of_group) if s == scale], axis=1)
    return codes, [float(p.explained_variance_ratio_.sum()) for p in pcas]


def pixel_codes(pool: sprites.SpritesDataset, num_factors: int, seed: int) -> dict[str, np.ndarray]:
    """The baselines: "pixel PCA" (as many components as factors, fitted on the first ``PCA_FIT_IMAGES`` pool
    images) and "pixels" (uint8, N x pixels)."""
    pixels = pool.renderer.render(pool.factors).reshape(len(pool), -1)
    pca = fit_pca(pixels[:PCA_FIT_IMAGES].astype(np.float32), num_factors, seed)
    projected = [pca.transform(pixels[i:i + PCA_FIT_IMAGES].astype(np.float32))  # in chunks: float pixels are big
                 for i in range(0, len(pixels), PCA_FIT_IMAGES)]
    return {"pixel PCA": np.concatenate(projected).astype(np.float32), "pixels": pixels}


# ---------------------------------------------------------------------------------------------- scoring


def score_codes(codes: np.ndarray, factors: np.ndarray, protocol: dict[str, dict[str, Any]], seed: int,
                skip: dict[str, str] | None = None, jobs: int = 1,
                log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> dict[str, Any]:
    """Every metric's result on one representation ({metric: result dict}, or {"skipped": reason}); ``jobs``
    processes fit DCI's classifiers."""
    out: dict[str, Any] = {}
    for name, metric in METRICS.items():
        if skip and name in skip:
            out[name] = {"skipped": skip[name]}
            continue
        start = time.perf_counter()
        out[name] = metric(codes, factors, seed=seed, **protocol[name], **({"jobs": jobs} if name == "dci" else {}))
        log(f"  {TITLES[name]}: {out[name]['score']:.3f} ({codes.shape[1]} dims, {time.perf_counter() - start:.1f} s)")
    return out


def summary(results: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of one representation's results: the five scores plus DCI's completeness and
    informativeness (None where skipped)."""
    def get(metric: str, key: str = "score") -> float | None:
        return results[metric].get(key)

    return {"beta_vae": get("beta_vae"), "factor_vae": get("factor_vae"), "mig": get("mig"), "dci": get("dci"),
            "dci_completeness": get("dci", "completeness"), "dci_informativeness": get("dci", "informativeness_test"),
            "sap": get("sap")}


def compact(results: dict[str, Any], dims: int) -> dict[str, Any]:
    """``results`` without the matrices when the representation is wide (they would dwarf the JSON)."""
    if dims <= MAX_DETAIL_DIMS:
        return results
    matrices = {"votes", "mutual_information", "importance", "score_matrix"}
    return {m: {k: v for k, v in r.items() if k not in matrices} for m, r in results.items()}


def protocol_of(inputs: Inputs) -> dict[str, dict[str, Any]]:
    """The metric sizes: quick or disentanglement_lib's."""
    return QUICK_PROTOCOL if inputs.quick else PROTOCOL


def check_pool_size(inputs: Inputs) -> int:
    """The pool size of ``inputs`` (``--num-images``, else the default); ``AnalysisError`` if it is smaller than
    the distinct images that MIG, DCI and SAP draw."""
    protocol = protocol_of(inputs)
    needed = max(protocol["mig"]["num_points"], protocol["dci"]["num_train"] + protocol["dci"]["num_test"],
                 protocol["sap"]["num_train"] + protocol["sap"]["num_test"])
    size = inputs.size(POOL["full"], POOL["quick"])
    if size < needed:
        raise AnalysisError(f"--num-images {size} is too small: the {'quick ' if inputs.quick else ''}protocol draws "
                            f"{needed} distinct images (MIG, DCI, SAP); use at least that many")
    return size


def check(inputs: Inputs) -> None:
    """Refuse a pool too small for the protocol before anything runs (see ``check_pool_size``)."""
    check_pool_size(inputs)


def run(inputs: Inputs) -> Result:
    """The five scores of ``inputs.model``'s posterior means (all groups, each scale) and of the pixel baselines."""
    model = inputs.model
    assert model is not None
    dataset = inputs.images()
    assert isinstance(dataset, sprites.SpritesDataset)  # checked by the "factors" need
    pool = factor_pool(dataset.renderer.image_size, check_pool_size(inputs), inputs.seed)
    protocol = protocol_of(inputs)
    codes, kept = posterior_codes(model, pool, components=inputs.pca_components, seed=inputs.seed,
                                  progress=inputs.progress)
    codes |= pixel_codes(pool, len(sprites.FACTOR_NAMES), inputs.seed)
    results = {}
    for name, features in codes.items():
        print(f"scoring {name} ({features.shape[1]} dims)", file=sys.stderr)
        results[name] = score_codes(features, pool.factors, protocol, inputs.seed,
                                    skip=PIXEL_SKIPS if name == "pixels" else None, jobs=inputs.jobs)
    dims = {name: int(features.shape[1]) for name, features in codes.items()}
    numbers: dict[str, Any] = {
        "sizes": {"pool_images": len(pool), "pca_components_per_group": inputs.pca_components,
                  "pca_fit_images": min(len(pool), PCA_FIT_IMAGES), "protocol": protocol},
        "factors": {"names": list(sprites.FACTOR_NAMES), "sizes": list(sprites.FACTOR_SIZES)},
        "pool": f"{len(pool)} images drawn uniformly without replacement from the whole factor grid "
                f"({sprites.NUM_IMAGES}), seed {inputs.seed}; every metric draws its samples from it",
        "representation": "posterior means (NVAE.encode); each group reduced by a PCA to "
                          f"{inputs.pca_components} components fitted on the first pool images; 'all groups' "
                          "concatenates every group, 'scale s' the groups of scale s",
        "baselines": f"'pixel PCA': a PCA of the pixels with {len(sprites.FACTOR_NAMES)} components (one per "
                     "factor); 'pixels': the raw pixels",
        "pca_variance_kept_per_group": kept,
        "dimensions": dims,
        "scores": {name: summary(r) for name, r in results.items()},
        "details": {name: compact(r, dims[name]) for name, r in results.items()},
    }
    return Result(numbers, figure(numbers))


def figure(numbers: dict[str, Any]) -> Figure:
    """Grouped bars of the five scores per representation, beside the DCI importance matrix of all groups."""
    scores = numbers["scores"]
    names = list(scores)
    fig = Figure(figsize=(14, 4.8))
    ax_bars, ax_heat = fig.subplots(1, 2, width_ratios=[2.2, 1])
    colour = matplotlib.colormaps["tab10"]
    width = 0.8 / len(names)
    metrics = list(TITLES)
    for i, name in enumerate(names):
        values = [scores[name][m] if scores[name][m] is not None else 0.0 for m in metrics]
        bars = ax_bars.bar(np.arange(len(metrics)) + (i - (len(names) - 1) / 2) * width, values, width,
                           label=f"{name} ({numbers['dimensions'][name]} dims)", color=colour(i % 10))
        for bar, metric in zip(bars, metrics, strict=True):
            if scores[name][metric] is None:
                bar.set_hatch("//")
                bar.set_height(0.02)
    ax_bars.set_xticks(np.arange(len(metrics)), [TITLES[m] for m in metrics], fontsize=9)
    ax_bars.set_ylim(0, 1.05)
    ax_bars.set_ylabel("score (1 = disentangled)")
    ax_bars.set_title(f"Disentanglement of the posterior means ({numbers['sizes']['pool_images']} images)")
    handles, _ = ax_bars.get_legend_handles_labels()
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="not computed (raw pixels)"))
    ax_bars.legend(handles=handles, fontsize=8, loc="upper right")
    importance = numbers["details"]["all groups"]["dci"].get("importance")
    if importance is not None:
        image = ax_heat.imshow(np.asarray(importance), aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax_heat, label="feature importance")
        ax_heat.set_xticks(range(len(numbers["factors"]["names"])), numbers["factors"]["names"], fontsize=8)
        ax_heat.set_ylabel("code (PCA components, group by group)")
        ax_heat.set_title("DCI importance: all groups")
    else:
        ax_heat.set_axis_off()
    fig.tight_layout()
    return fig


def section(numbers: dict[str, Any]) -> str:
    """A table of the scores per representation, and the protocol in words."""
    columns = ["beta_vae", "factor_vae", "mig", "dci", "dci_completeness", "dci_informativeness", "sap"]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = "".join(f"| {name} | {numbers['dimensions'][name]} | "
                   + " | ".join(cell(numbers["scores"][name][c]) for c in columns) + " |\n"
                   for name in numbers["scores"])
    protocol = "; ".join(f"{TITLES[m]}: " + ", ".join(f"{k} {v}" for k, v in sizes.items())
                         for m, sizes in numbers["sizes"]["protocol"].items())
    return ("| representation | dims | BetaVAE | FactorVAE | MIG | DCI D | DCI C | DCI I | SAP |\n"
            "|---|---|---|---|---|---|---|---|---|\n" + rows
            + f"\nPool: {numbers['pool']}. Representation: {numbers['representation']}. Baselines: "
              f"{numbers['baselines']}. '-': not computed on raw pixels (too slow). Sizes: {protocol}.\n")
