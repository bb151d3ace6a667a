"""What the KL weight beta does (beta-VAE, Higgins et al., ICLR 2017): the models of a sweep (``--models DIR ...``,
runs of ``train/run.py --beta B`` that differ in beta and seed only) against beta and against the normalised beta,
beta x latent size / image size (Higgins et al.'s, which makes betas comparable across latent sizes).

For every model: the test ELBO, its reconstruction term and its KL (nats per image; one posterior sample per image,
the same seeded binarisation for every model), and, on a data set with known factors (sprites), the five
disentanglement scores of its posterior means (all groups, each reduced by a PCA; see ``disentangle``), with the
pixel-PCA baseline drawn as a dashed line. Several seeds of one beta are drawn as points with their mean.

The question it answers: do larger betas trade reconstruction for disentanglement, and is the curve of
disentanglement against the normalised beta an inverted U, as Higgins et al. report on dSprites?
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from nvae_hub import sprites
from nvae_hub.data import build_dataset
from nvae_hub.evaluation import mean_and_stderr, scored_batches, seeded_eval
from nvae_hub.model import NVAE

from . import disentangle
from .common import AnalysisError, Inputs, Result
from .training_runs import TrainingRun, load_runs

NEEDS = ("models",)
TEST_IMAGES = {"full": 10_000, "quick": 64}
TERMS = {"elbo": "test ELBO (nats/image)", "recon": "reconstruction -log p(x|z) (nats/image)",
         "kl": "KL(q || p) (nats/image)"}


@torch.no_grad()
def elbo_terms(model: NVAE, dataset: Any, *, limit: int, seed: int, progress: bool = True) -> dict[str, float]:
    """Mean test ELBO, reconstruction term and KL in nats per image (one seeded posterior sample), with standard
    errors."""
    recon, kl = [], []
    with seeded_eval(model, seed):
        for x in scored_batches(model, dataset, seed=seed, limit=limit, progress=progress, desc="ELBO"):
            out = model.loss(x, kl_weight=1.0, reg_weight=0.0)
            recon.append(out.recon.double().cpu())
            kl.append(out.kl.double().cpu())
    r, k = torch.cat(recon), torch.cat(kl)
    (elbo, elbo_se), (rec, rec_se), (kl_mean, kl_se) = (mean_and_stderr(v) for v in (-(r + k), r, k))
    return {"elbo": elbo, "elbo_stderr": elbo_se, "recon": rec, "recon_stderr": rec_se, "kl": kl_mean,
            "kl_stderr": kl_se}


def check_sweep(runs: list[TrainingRun]) -> None:
    """``AnalysisError`` unless the runs share their data set and differ in beta."""
    datasets = sorted({run.dataset for run in runs})
    if len(datasets) > 1:
        listing = ", ".join(f"{run.folder} ({run.dataset})" for run in runs)
        raise AnalysisError(f"a beta sweep compares models trained on one data set; these were trained on "
                            f"{', '.join(datasets)}: {listing}")
    if len({run.beta for run in runs}) < 2:
        raise AnalysisError(f"a beta sweep needs models trained with at least two betas; all {len(runs)} have "
                            f"beta = {runs[0].beta:g}")


def check(inputs: Inputs) -> list[TrainingRun]:
    """The runs of the sweep, sorted by beta and seed; ``AnalysisError`` unless they make a sweep that this item can
    score."""
    runs = sorted(load_runs(inputs.models, "beta"), key=lambda r: (r.beta, r.seed, str(r.folder)))
    check_sweep(runs)
    if inputs.dataset is not None and inputs.dataset != runs[0].dataset:
        raise AnalysisError(f"--dataset {inputs.dataset} differs from the sweep's training data set {runs[0].dataset}")
    if runs[0].dataset in sprites.IMAGE_SIZES:
        disentangle.check_pool_size(inputs)
    return runs


def run(inputs: Inputs) -> Result:
    """ELBO terms and disentanglement scores of every model of the sweep."""
    runs = check(inputs)
    dataset_name = runs[0].dataset
    n_test = inputs.size(TEST_IMAGES["full"], TEST_IMAGES["quick"])
    has_factors = dataset_name in sprites.IMAGE_SIZES
    protocol = disentangle.protocol_of(inputs)
    pool = None
    if has_factors:
        pool = disentangle.factor_pool(sprites.IMAGE_SIZES[dataset_name], disentangle.check_pool_size(inputs),
                                       inputs.seed)

    models = []
    for training_run in runs:
        print(f"model {training_run.folder} (beta {training_run.beta:g}, seed {training_run.seed})", file=sys.stderr)
        model = training_run.model(inputs.device)
        cfg = model.config
        test_set = build_dataset(dataset_name, "test", data_dir=inputs.data_dir, image_size=cfg.image_size,
                                 channels=cfg.channels, seed=inputs.seed)
        entry: dict[str, Any] = {
            "run": str(training_run.folder), "beta": training_run.beta, "seed": training_run.seed,
            "latent_size": training_run.latent_size, "image_size": training_run.image_size,
            "normalised_beta": training_run.beta * training_run.latent_size / training_run.image_size,
            "test": elbo_terms(model, test_set, limit=n_test, seed=inputs.seed, progress=inputs.progress),
        }
        if pool is not None:
            codes, _ = disentangle.posterior_codes(model, pool, components=inputs.pca_components, seed=inputs.seed,
                                                   progress=inputs.progress)
            results = disentangle.score_codes(codes["all groups"], pool.factors, protocol, inputs.seed,
                                              jobs=inputs.jobs)
            entry["scores"] = disentangle.summary(results)
        models.append(entry)

    baseline = None
    if pool is not None:
        print("baseline: pixel PCA", file=sys.stderr)
        pixels = disentangle.pixel_codes(pool, len(sprites.FACTOR_NAMES), inputs.seed)["pixel PCA"]
        baseline = disentangle.summary(disentangle.score_codes(pixels, pool.factors, protocol, inputs.seed,
                                                               jobs=inputs.jobs))

    numbers: dict[str, Any] = {
        "sizes": {"models": len(models), "test_images": min(n_test, len(test_set)),
                  "pool_images": len(pool) if pool is not None else None,
                  "pca_components_per_group": inputs.pca_components if pool is not None else None,
                  "protocol": protocol if pool is not None else None},
        "training_dataset": dataset_name,
        "models": models,
        "by_beta": by_beta(models),
        "baseline_scores": baseline,
        "normalised_beta": "beta x latent size / image size (latent variables per image over pixels x channels)",
        "representation": "posterior means of all groups, each reduced by a PCA (see disentangle)" if pool else None,
    }
    return Result(numbers, figure(numbers))


def quantities(entry: dict[str, Any]) -> dict[str, float | None]:
    """Every plotted number of one model: the ELBO terms and the scores."""
    return {**{key: entry["test"][key] for key in TERMS}, **entry.get("scores", {})}


def by_beta(models: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over seeds of every quantity, per beta."""
    groups: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for entry in models:
        groups[entry["beta"]].append(entry)
    out = {}
    for beta, entries in sorted(groups.items()):
        values = [quantities(e) for e in entries]
        stats = {}
        for key in values[0]:
            column = np.array([v[key] for v in values if v[key] is not None], dtype=np.float64)
            stats[key] = {"mean": float(column.mean()) if len(column) else None,
                          "std": float(column.std()) if len(column) else None}
        out[f"{beta:g}"] = {"beta": beta, "normalised_beta": entries[0]["normalised_beta"], "seeds": len(entries),
                            **stats}
    return out


def figure(numbers: dict[str, Any]) -> Figure:
    """Two panels per quantity, side by side: against beta and against the normalised beta (log scales)."""
    models = numbers["models"]
    keys = list(quantities(models[0]))
    titles = {**TERMS, **disentangle.TITLES, "dci_completeness": "DCI completeness",
              "dci_informativeness": "DCI informativeness (test accuracy)"}
    rows = (len(keys) + 1) // 2
    fig = Figure(figsize=(18, 3.2 * rows + 0.8))
    axes = fig.subplots(rows, 4, squeeze=False)
    summary = numbers["by_beta"]
    handles = {}
    for index, key in enumerate(keys):
        for col, x_key in enumerate(["beta", "normalised_beta"]):
            ax = axes[index // 2, 2 * (index % 2) + col]
            ys = [quantities(m)[key] for m in models]
            handles["one model (seed)"] = ax.scatter([m[x_key] for m in models],
                                                     [np.nan if y is None else y for y in ys], s=16, alpha=0.6)
            mean_y = [np.nan if s[key]["mean"] is None else s[key]["mean"] for s in summary.values()]
            (handles["mean over seeds"],) = ax.plot([s[x_key] for s in summary.values()], mean_y, "-o",
                                                    color="black", markersize=4)
            baseline = (numbers.get("baseline_scores") or {}).get(key)
            if baseline is not None:
                handles["pixel-PCA baseline"] = ax.axhline(baseline, color="grey", linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("beta" if x_key == "beta" else "normalised beta", fontsize=9)
            ax.set_title(titles[key], fontsize=9)
    for ax in axes.flat[len(keys) * 2:]:
        ax.set_axis_off()
    fig.legend(list(handles.values()), list(handles), loc="upper right", ncol=3, fontsize=9)
    fig.suptitle(f"Beta sweep on {numbers['training_dataset']}: {len(models)} models (normalised beta = beta x "
                 f"latent size / image size)", x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.2 * rows + 0.8)))
    return fig


def section(numbers: dict[str, Any]) -> str:
    """A table per beta (means over seeds)."""
    keys = list(quantities(numbers["models"][0]))

    def cell(stats: dict[str, Any]) -> str:
        if stats["mean"] is None:
            return "-"
        return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats["std"] else "")

    header = "| beta | normalised beta | seeds | " + " | ".join(keys) + " |\n"
    header += "|" + "---|" * (3 + len(keys)) + "\n"
    rows = "".join(f"| {s['beta']:g} | {s['normalised_beta']:.3g} | {s['seeds']} | "
                   + " | ".join(cell(s[k]) for k in keys) + " |\n" for s in numbers["by_beta"].values())
    baseline = numbers.get("baseline_scores")
    note = ""
    if baseline:
        note = "\nPixel-PCA baseline: " + ", ".join(f"{k} {v:.3f}" for k, v in baseline.items() if v is not None)
    return (f"{numbers['sizes']['models']} models trained on {numbers['training_dataset']}; ELBO terms on "
            f"{numbers['sizes']['test_images']} test images (nats per image), mean ± standard deviation over "
            f"seeds.\n\n" + header + rows + note + "\n")
