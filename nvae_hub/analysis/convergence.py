"""Does the multi-scale hierarchy converge faster? Single-scale against multi-scale models of the same size (within
10% of the parameters), trained with the same recipe, compared by their test loss against epochs.

``--models DIR ...`` takes training runs made with ``--eval-every`` (which records the test negative ELBO of the
EMA model in ``eval.jsonl``), on one or more data sets: for every data set at least one single-scale run
(``num_scales`` 1) and one multi-scale run (the presets ``*-single`` / ``*-multi``); several runs of one kind are
seeds, averaged at their common evaluation epochs. For every data set the JSON gives the epochs each model needs to
first reach the same loss levels (the single-scale model's loss after 25, 50, 75 and 100% of its epochs, and the
multi-scale model's final loss), interpolated linearly between evaluations, and their ratio (multi / single: below
1 means the multi-scale model gets there in fewer epochs). Users' reports on CelebA and ImageNet claim about 15%
fewer epochs (ratio 0.85), which the JSON records as the reference.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from nvae_hub.model import NVAE

from .common import AnalysisError, Inputs, Result
from .training_runs import TrainingRun, load_runs

NEEDS = ("models",)
REFERENCE_RATIO = 0.85
PARAMETER_TOLERANCE = 0.10
LEVEL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
RECIPE_EXEMPT = {"output_dir", "preset", "config", "seed", "command", "resume", "push_to_hub", "private",
                 "num_workers", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints", "temperatures",
                 "data_dir"}
"""Options that may differ between the runs compared (everything else is the recipe and must agree)."""


def epochs_to_reach(epochs: np.ndarray, losses: np.ndarray, level: float) -> float | None:
    """The first epoch at which the curve (epochs, losses) reaches ``level`` or below, interpolated linearly between
    the evaluation before and the one that reaches it (the first evaluation's epoch if it is already there); None if
    it never does."""
    below = np.flatnonzero(losses <= level)
    if len(below) == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(epochs[0])
    t = (losses[i - 1] - level) / (losses[i - 1] - losses[i])
    return float(epochs[i - 1] + t * (epochs[i] - epochs[i - 1]))


def mean_curve(runs: list[TrainingRun]) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, mean test loss over the runs): the runs must have been evaluated at the same epochs."""
    curves = [r.eval_curve() for r in runs]
    epochs = [tuple(round(c["epoch"], 6) for c in curve) for curve in curves]
    if len(set(epochs)) > 1:
        raise AnalysisError(f"the runs {', '.join(str(r.folder) for r in runs)} were evaluated at different epochs; "
                            f"train them with the same --eval-every and length")
    losses = np.array([[c["test_neg_elbo_nats"] for c in curve] for curve in curves], dtype=np.float64)
    return np.array(epochs[0], dtype=np.float64), losses.mean(axis=0)


def parameters(run: TrainingRun) -> int:
    """The model's parameter count."""
    return sum(p.numel() for p in NVAE(run.config).parameters())


def check_pair(dataset: str, single: list[TrainingRun], multi: list[TrainingRun]) -> tuple[int, int]:
    """``AnalysisError`` unless the runs share their recipe and the two kinds have parameter counts within 10%;
    returns (single, multi) parameter counts."""
    runs = single + multi
    recipe = {k: v for k, v in runs[0].args.items() if k not in RECIPE_EXEMPT}
    for run in runs[1:]:
        other = {k: v for k, v in run.args.items() if k not in RECIPE_EXEMPT}
        differ = sorted(k for k in recipe.keys() | other.keys() if recipe.get(k) != other.get(k))
        if differ:
            raise AnalysisError(f"{dataset}: {runs[0].folder} and {run.folder} were trained with different recipes "
                                f"(options {', '.join(differ)}); compare runs that differ only in the model")
    counts = {kind: {parameters(r) for r in group} for kind, group in (("single", single), ("multi", multi))}
    for kind, values in counts.items():
        if len(values) > 1:
            raise AnalysisError(f"{dataset}: the {kind}-scale runs have different models ({sorted(values)} "
                                f"parameters); seeds of one kind must share the model")
    p_single, p_multi = counts["single"].pop(), counts["multi"].pop()
    if abs(p_multi / p_single - 1) > PARAMETER_TOLERANCE:
        raise AnalysisError(f"{dataset}: the single-scale model has {p_single:,} parameters and the multi-scale one "
                            f"{p_multi:,} ({100 * (p_multi / p_single - 1):+.1f}%); they must agree within "
                            f"{PARAMETER_TOLERANCE:.0%} (use the *-single / *-multi presets)")
    return p_single, p_multi


def compare(single: tuple[np.ndarray, np.ndarray], multi: tuple[np.ndarray, np.ndarray]) -> list[dict[str, Any]]:
    """Epochs to reach each loss level for both curves, and their ratio."""
    (e_single, l_single), (e_multi, l_multi) = single, multi
    levels = [(f"single-scale loss at {f:.0%} of its epochs", float(np.interp(f * e_single[-1], e_single, l_single)))
              for f in LEVEL_FRACTIONS]
    levels.append(("multi-scale final loss", float(l_multi[-1])))
    out = []
    for name, level in levels:
        a, b = epochs_to_reach(e_single, l_single, level), epochs_to_reach(e_multi, l_multi, level)
        out.append({"level": name, "loss": level, "epochs_single": a, "epochs_multi": b,
                    "ratio_multi_over_single": b / a if a and b is not None else None})
    return out


def check(inputs: Inputs) -> dict[str, dict[str, list[TrainingRun]]]:
    """The runs by data set and kind ({dataset: {"single": [...], "multi": [...]}}); ``AnalysisError`` unless every
    data set has a fair pair with recorded test losses."""
    by_dataset: dict[str, dict[str, list[TrainingRun]]] = defaultdict(lambda: {"single": [], "multi": []})
    for training_run in load_runs(inputs.models, "convergence"):
        by_dataset[training_run.dataset]["single" if training_run.config.num_scales == 1 else "multi"].append(
            training_run)
    for dataset, kinds in sorted(by_dataset.items()):
        missing = [kind for kind, group in kinds.items() if not group]
        if missing:
            raise AnalysisError(f"{dataset}: no {' or '.join(missing)}-scale run among --models; convergence compares "
                                f"a single-scale (num_scales 1) with a multi-scale model on every data set")
        check_pair(dataset, kinds["single"], kinds["multi"])
        for group in kinds.values():
            mean_curve(group)
    return dict(sorted(by_dataset.items()))


def run(inputs: Inputs) -> Result:
    """Test-loss curves, epochs to common loss levels and their ratios, per data set."""
    by_dataset = check(inputs)
    datasets: dict[str, Any] = {}
    for dataset, kinds in by_dataset.items():
        p_single, p_multi = check_pair(dataset, kinds["single"], kinds["multi"])
        single, multi = mean_curve(kinds["single"]), mean_curve(kinds["multi"])
        levels = compare(single, multi)
        ratios = [lv["ratio_multi_over_single"] for lv in levels if lv["ratio_multi_over_single"] is not None]
        datasets[dataset] = {
            "runs": {kind: [str(r.folder) for r in group] for kind, group in kinds.items()},
            "presets": {kind: sorted({r.config.name for r in group}) for kind, group in kinds.items()},
            "parameters": {"single": p_single, "multi": p_multi},
            "curves": {"single": {"epoch": single[0].tolist(), "test_neg_elbo_nats": single[1].tolist()},
                       "multi": {"epoch": multi[0].tolist(), "test_neg_elbo_nats": multi[1].tolist()}},
            "levels": levels,
            "epochs_to_single_final_loss": {"single": levels[len(LEVEL_FRACTIONS) - 1]["epochs_single"],
                                            "multi": levels[len(LEVEL_FRACTIONS) - 1]["epochs_multi"]},
            "ratio_at_single_final_loss": levels[len(LEVEL_FRACTIONS) - 1]["ratio_multi_over_single"],
            "geometric_mean_ratio": float(np.exp(np.mean(np.log(ratios)))) if ratios else None,
        }
    numbers = {
        "sizes": {"runs": sum(len(g) for kinds in by_dataset.values() for g in kinds.values()),
                  "datasets": len(datasets)},
        "datasets": datasets,
        "reference_ratio": REFERENCE_RATIO,
        "reference": "users' reports on CelebA and ImageNet: the multi-scale model needs about 15% fewer epochs to "
                     "the same loss",
        "loss": "test negative ELBO of the EMA model (nats per image, one seeded posterior sample), from eval.jsonl",
    }
    return Result(numbers, figure(numbers))


def figure(numbers: dict[str, Any]) -> Figure:
    """One panel per data set: test loss against epochs, single- and multi-scale."""
    datasets = numbers["datasets"]
    fig = Figure(figsize=(5.2 * len(datasets), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(datasets)))
    for ax, (name, data) in zip(axes, datasets.items(), strict=True):
        for kind, colour in (("single", "tab:blue"), ("multi", "tab:orange")):
            curve = data["curves"][kind]
            label = f"{kind}-scale ({data['parameters'][kind] / 1e6:.2f}M params, {len(data['runs'][kind])} run(s))"
            ax.plot(curve["epoch"], curve["test_neg_elbo_nats"], "-o", markersize=3, color=colour, label=label)
        final = data["levels"][len(LEVEL_FRACTIONS) - 1]
        ax.axhline(final["loss"], color="grey", linestyle=":", label="single-scale final loss")
        for kind, colour in (("single", "tab:blue"), ("multi", "tab:orange")):
            if final[f"epochs_{kind}"] is not None:
                ax.axvline(final[f"epochs_{kind}"], color=colour, linestyle=":", linewidth=1)
        ratio = data["ratio_at_single_final_loss"]
        ratio_text = f"{ratio:.2f}" if ratio is not None else "not reached"
        ax.set_title(f"{name}: epochs multi / single to the single's final loss = {ratio_text}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test negative ELBO (nats per image)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def section(numbers: dict[str, Any]) -> str:
    """A table per data set of the loss levels, the epochs to reach them and the ratio."""
    def fmt(value: float | None, digits: str = ".3g") -> str:
        return "not reached" if value is None else format(value, digits)

    parts = []
    for name, data in numbers["datasets"].items():
        rows = "".join(f"| {lv['level']} | {lv['loss']:.2f} | {fmt(lv['epochs_single'])} | {fmt(lv['epochs_multi'])} | "
                       f"{fmt(lv['ratio_multi_over_single'])} |\n" for lv in data["levels"])
        parts.append(f"**{name}** ({data['parameters']['single']:,} vs {data['parameters']['multi']:,} parameters)\n\n"
                     "| loss level | test loss | epochs, single | epochs, multi | multi / single |\n"
                     "|---|---|---|---|---|\n" + rows)
    return "\n".join(parts) + (f"\nReference: {numbers['reference']} (ratio {numbers['reference_ratio']}). "
                               f"Loss: {numbers['loss']}.\n")
