"""Command-line pieces shared by train/run.py and train/evaluate.py: the --threads option and range checks."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable

THREADS_HELP = (
    "CPU threads of PyTorch in each process (default: {default} here: $OMP_NUM_THREADS if set, else 1). An NVAE "
    "step is thousands of small operations, each of which waits for its slowest thread, so a thread whose core is "
    "busy with other work stalls them all: measured on a shared 2-core machine, a mnist-small step (batch 64) took "
    "8.5 to 20 s on 1 thread and over 60 s on 2. Raise it on CPU cores that nothing else uses"
)


def default_threads() -> int:
    """The default of --threads: ``$OMP_NUM_THREADS`` if set to a positive number, else 1 (see ``THREADS_HELP``)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def add_threads_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add --threads, with its default and the reason for it in the help."""
    default = default_threads()
    parser.add_argument("--threads", type=int, default=default, help=THREADS_HELP.format(default=default))


def option_name(dest: str) -> str:
    """The command-line spelling of an argparse destination: eval_limit -> --eval-limit."""
    return "--" + dest.replace("_", "-")


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace, *, at_least_one: Iterable[str] = (),
                 non_negative: Iterable[str] = (), fractions: Iterable[str] = ()) -> None:
    """Exit with a usage error unless every named option that was given (not None) is a finite number: at least 1,
    at least 0, or between 0 and 1."""
    rules = [(at_least_one, "at least 1", lambda v: v >= 1), (non_negative, "at least 0", lambda v: v >= 0),
             (fractions, "between 0 and 1", lambda v: 0 <= v <= 1)]
    for names, rule, ok in rules:
        for name in names:
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                parser.error(f"{option_name(name)} must be a number {rule}, got {value}")
