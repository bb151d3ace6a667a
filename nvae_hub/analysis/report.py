"""Running analyses and writing what they found: ``ITEM.png``, ``ITEM.json`` and the ``report.md`` that shows them.

Each file is written whole or not at all (to a temporary file, then renamed). ``report.md`` is rebuilt from every
``ITEM.json`` in the folder, in the order of ``ITEMS``, so items run one at a time add up to one report and a rerun
replaces its section. The JSON files hold numbers rounded to 6 significant digits and nothing that varies between
runs (times go to ``timings.json``), so the same inputs and seed give the same JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

from nvae_hub import __version__

from . import ITEMS
from .common import AnalysisError, Inputs, Result

REPORT_NAME = "report.md"
TIMINGS_NAME = "timings.json"
SIGNIFICANT_DIGITS = 6
FILE_MODE = 0o644  # what open() would give; mkstemp's files are private (0o600)


def expand(names: Sequence[str]) -> list[str]:
    """The items that ``names`` asks for, in registry order (``all`` is every item); unknown names raise
    ``AnalysisError``."""
    unknown = [name for name in names if name != "all" and name not in ITEMS]
    if unknown:
        raise AnalysisError(f"unknown analysis item(s) {', '.join(map(repr, unknown))}; choose from: all, "
                            f"{', '.join(ITEMS)}")
    return [name for name in ITEMS if "all" in names or name in names]


def run_items(names: Sequence[str], inputs: Inputs, output_dir: str | Path,
              log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> dict[str, dict[str, Any]]:
    """Run the items ``names`` (``all`` for every item) on ``inputs`` and write their files into ``output_dir``.

    Every item asked for by name is checked first; if one cannot run (``AnalysisError``), nothing is run or
    written. Under ``all``, an item whose inputs are missing (``curves`` without a run, ``latent-map`` without
    labels) is skipped with a message. Returns the numbers of every item that ran.
    """
    chosen = expand(names)
    explicit = "all" not in names
    runnable = []
    for name in chosen:
        module = ITEMS[name].module
        why = inputs.missing(module.NEEDS, name, getattr(module, "check", None))
        if why is None:
            runnable.append(name)
        elif explicit:
            raise AnalysisError(why)
        else:
            log(f"skipping {name}: {why}")
    if not runnable:
        raise AnalysisError("none of the asked-for items can run with these inputs (see the messages above)")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results, timings = {}, _read_json(output_dir / TIMINGS_NAME) or {}
    for name in runnable:
        log(f"running {name}: {ITEMS[name].summary}")
        start = time.perf_counter()
        result = ITEMS[name].module.run(inputs)
        timings[name] = round(time.perf_counter() - start, 1)
        results[name] = write_result(name, result, inputs, output_dir)
        log(f"{name} done in {timings[name]:.1f} s: {output_dir / name}.png, {output_dir / name}.json")
    _write_atomic(output_dir / TIMINGS_NAME, json.dumps(timings, indent=1) + "\n")
    write_report(output_dir)
    return results


def write_result(name: str, result: Result, inputs: Inputs, output_dir: Path) -> dict[str, Any]:
    """Write ``name.png`` and ``name.json`` (the numbers with the inputs' description and the library version);
    return the numbers as written."""
    numbers = round_numbers({"item": name, **inputs.describe(), "nvae_hub_version": __version__, **result.numbers})
    fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=f".{name}.", suffix=".png")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            result.figure.savefig(f, format="png", dpi=100)
        os.replace(tmp, output_dir / f"{name}.png")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _write_atomic(output_dir / f"{name}.json", json.dumps(numbers, indent=1) + "\n")
    return numbers


def load_results(output_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The numbers of every item that has an ``ITEM.json`` in ``output_dir``, in registry order."""
    found = {name: _read_json(Path(output_dir) / f"{name}.json") for name in ITEMS}
    return {name: numbers for name, numbers in found.items() if isinstance(numbers, dict)}


def key_numbers(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown summary of the headline numbers in ``results`` (from ``load_results``): test MSE and NLL, KL and
    active units per group, k-NN accuracies, the transfer matrix and the classifier's reading of the samples;
    items not run are left out."""
    lines = []
    if recon := results.get("recon"):
        lines.append(f"- **Test reconstruction**: MSE per pixel {recon['mse_per_pixel']:.4f}; negative ELBO "
                     f"{recon['neg_elbo_nats']:.2f} nats; NLL {recon['nll_nats']:.2f} ± {recon['nll_nats_stderr']:.2f} "
                     f"nats ({recon['nll_bits_per_dim']:.4f} bits/dim, K={recon['sizes']['nll_importance_samples']}, "
                     f"{recon['sizes']['nll_images']} images)")
    if kl := results.get("kl"):
        per_group = ", ".join(f"{v:.1f}" for v in kl["kl_per_group"])
        channels = ", ".join(f"{a}/{c}" for a, c in zip(kl["active_channels_kl"], kl["channels_per_group"],
                                                          strict=True))
        units = ", ".join(f"{a}/{u}" for a, u in zip(kl["active_units_variance"], kl["units_per_group"], strict=True))
        lines.append(f"- **KL per group** (coarsest first, nats): {per_group}; total {kl['kl_total']:.1f}")
        lines.append(f"- **Active channels** (KL > 0.1): {channels}; **active units** (Var[mean] > 0.01): {units}")
    if latent := results.get("latent-map"):
        accuracy = ", ".join(f"{name} {value:.3f}" for name, value in latent["knn_accuracy"].items())
        lines.append(f"- **{latent['protocol']['k']}-NN class accuracy**: {accuracy}")
    if control := results.get("control"):
        rows = "; ".join(f"scale {s}: " + ", ".join(f"{p} {'n/a' if v is None else f'{v:.2f}'}"
                                                   for p, v in zip(control["properties"], row, strict=True))
                         for s, row in zip(control["scales"], control["transfer_matrix"], strict=True))
        lines.append(f"- **Transfer matrix T[scale, property]**: {rows}")
    if quality := results.get("sample-quality"):
        reading = {key: quality[key]["mean_top_probability"]
                   for key in ("model_bn", "readjusted_bn", "real_test_images")}
        lines.append(f"- **Samples read by a classifier** ({quality['sizes']['samples']} at T = "
                     f"{quality['temperature']}): "
                     f"mean top-class probability {reading['model_bn']:.3f} as drawn, {reading['readjusted_bn']:.3f} "
                     f"with BatchNorm re-estimated; real test images {reading['real_test_images']:.3f}")
    if disentangle := results.get("disentangle"):
        scores = disentangle["scores"]["all groups"]
        lines.append("- **Disentanglement of all groups**: " + ", ".join(
            f"{name} {scores[key]:.3f}" for key, name in [("beta_vae", "BetaVAE"), ("factor_vae", "FactorVAE"),
                                                          ("mig", "MIG"), ("dci", "DCI"), ("sap", "SAP")]))
    if convergence := results.get("convergence"):
        ratios = ", ".join(
            f"{name} " + ("not reached" if (r := d["ratio_at_single_final_loss"]) is None else f"{r:.2f}")
            for name, d in convergence["datasets"].items())
        lines.append(f"- **Epochs multi / single to the single-scale model's final test loss**: {ratios}")
    return "\n".join(lines)


def write_report(output_dir: Path) -> Path:
    """Rebuild ``report.md`` from the ``ITEM.json`` files in ``output_dir``."""
    results = load_results(output_dir)
    parts = ["# What the hierarchy learned\n",
             "Written by `python -m nvae_hub.analysis`; every figure's numbers are in the JSON file of the same "
             "name.\n", f"{key_numbers(results)}\n"]
    for name, numbers in results.items():
        item = ITEMS[name]
        if numbers.get("model"):
            source = f"model `{numbers['model']}`"
        elif numbers.get("models"):
            source = f"{len(numbers['models'])} training runs"
        else:
            source = f"run `{numbers.get('run')}`"
        if numbers.get("dataset"):
            source += f", {numbers['dataset']} {numbers.get('split')} split"
        mode = ", quick mode" if numbers.get("quick") else ""
        parts.append(f"## {name}: {item.summary}\n\n_{source}, seed {numbers.get('seed')}{mode}_\n\n"
                     f"![{name}]({name}.png)\n\n{item.module.section(numbers).strip()}\n")
    path = output_dir / REPORT_NAME
    _write_atomic(path, "\n".join(parts))
    return path


def round_numbers(value: Any) -> Any:
    """``value`` with every float rounded to 6 significant digits and NaN/infinity as None, for stable JSON."""
    if isinstance(value, dict):
        return {str(k): round_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [round_numbers(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, Integral):
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
