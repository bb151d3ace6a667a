"""Running analyses and writing what they found: ``ITEM.png``, ``ITEM.json`` and the ``report.md`` that shows them.

Each file is written whole or not at all (to a temporary file, then renamed). ``report.md`` is rebuilt from every
``ITEM.json`` in the folder, in the order of ``ITEMS``, so items run one at a time add up to one report and a rerun
replaces its section. The JSON files hold numbers rounded to 6 significant digits and nothing that varies between
runs (times go to ``timings.json``), so the same inputs and seed give the same JSON.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nvae_hub import __version__

from . import ITEMS
from .common import AnalysisError, Inputs, Result

REPORT_NAME = "report.md"
TIMINGS_NAME = "timings.json"
SIGNIFICANT_DIGITS = 6


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
        why = inputs.missing(ITEMS[name].module.NEEDS, name)
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
        with os.fdopen(fd, "wb") as f:
            result.figure.savefig(f, format="png", dpi=100)
        os.replace(tmp, output_dir / f"{name}.png")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _write_atomic(output_dir / f"{name}.json", json.dumps(numbers, indent=1) + "\n")
    return numbers


def write_report(output_dir: Path) -> Path:
    """Rebuild ``report.md`` from the ``ITEM.json`` files in ``output_dir``."""
    parts = ["# What the hierarchy learned\n",
             "Written by `python -m nvae_hub.analysis`; every figure's numbers are in the JSON file of the same "
             "name.\n"]
    for name, item in ITEMS.items():
        numbers = _read_json(output_dir / f"{name}.json")
        if numbers is None:
            continue
        source = f"model `{numbers.get('model')}`" if numbers.get("model") else f"run `{numbers.get('run')}`"
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
    if isinstance(value, numbers.Integral):
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
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
