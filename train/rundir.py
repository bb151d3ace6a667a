"""A training run's output folder: the lock that keeps two runs out of one folder, and the step log.

The lock is an advisory ``flock`` on ``OUTPUT/.lock``, taken by the main process only (the other processes of
an ``accelerate launch`` run write nothing outside the checkpoint folder the main process publishes). The
operating system drops the lock when its process ends, however it ends, so the lock of a killed run is stale
as soon as the process is gone and the next run takes it over. The file holds the holder's pid, host, start
time and command, so that a refused run can say which process holds the folder.

``log.jsonl`` holds one JSON record per line, one line per step, appended and flushed as the run goes. A run
killed while writing leaves a torn last line (no newline, not valid JSON); ``truncate_log``, which prepares the
log for a resumed run, drops such a line and says so, and refuses any other damaged line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

LOCK_NAME = ".lock"


class SetupError(Exception):
    """A run cannot start as asked (a locked folder, a damaged checkpoint, bad data...): the message says what to
    do, and ``train/run.py`` prints it without a traceback."""


# ---------------------------------------------------------------------------------------------- the lock


class OutputLock:
    """An exclusive lock on a run's output folder, held from ``acquire`` until ``release`` or the process ends."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.file: IO[str] | None = None

    def acquire(self) -> str | None:
        """Take the lock, or raise ``SetupError`` naming the process that holds it. Returns a note when the lock
        of a run that no longer runs was taken over (None otherwise). Without lock support on the file system,
        returns a warning and runs unlocked."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = self._holder(file)
            file.close()
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise SetupError(f"{self.path.parent} is in use by another training run: {holder}. Wait for it to "
                                 f"end, or choose another --output-dir") from None
            return (f"warning: cannot lock {self.path} ({error.strerror}); make sure that no other run writes into "
                    f"{self.path.parent}")
        previous = self._holder(file, retries=0)
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": sys.argv}) + "\n")
        file.flush()
        self.file = file
        if previous is None:
            return None
        return f"took over the lock of {previous}, which no longer runs"

    def release(self) -> None:
        """Empty the lock file and let go of the lock (the file stays: removing it would race with a new run)."""
        if self.file is not None:
            self.file.truncate(0)
            self.file.close()  # closing releases the flock
            self.file = None

    @staticmethod
    def _holder(file: IO[str], retries: int = 20) -> str | None:
        """'process PID on host HOST, started ...' from the lock file; None if it is empty (no run held it, or the
        last one ended cleanly). A holder writes its details just after locking, so an empty file is read again
        a few times before it is believed."""
        for attempt in range(retries + 1):
            file.seek(0)
            text = file.read().strip()
            if text or attempt == retries:
                break
            time.sleep(0.05)
        if not text:
            return None if retries == 0 else "a process that has not yet written its details"
        try:
            info = json.loads(text)
            return (f"process {info['pid']} on host {info['host']}, started {info['started']} "
                    f"({' '.join(info['command'])})")
        except (ValueError, KeyError, TypeError):
            return f"an unknown process (the lock file holds {text[:200]!r})"


def lock_output_dir(accelerator: Accelerator, folder: Path) -> OutputLock:
    """Lock ``folder`` in the main process and tell every process the outcome, so that all of them raise the same
    ``SetupError`` when another run holds it (and none writes anything). Prints a note when a stale lock was
    taken over."""
    lock = OutputLock(folder)
    outcome: list[str | None] = [None, None]  # a note, an error
    if accelerator.is_main_process:
        try:
            outcome[0] = lock.acquire()
        except SetupError as error:
            outcome[1] = str(error)
    broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise SetupError(outcome[1])
    if outcome[0] is not None:
        accelerator.print(outcome[0])
    return lock


# ---------------------------------------------------------------------------------------------- the log


def _parse_log(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The records of a ``log.jsonl`` file (none if it does not exist) and its torn last line, if any: one that is
    unterminated and not valid JSON. Raises ValueError, with the line number, for any other damaged line."""
    if not path.exists():
        return [], None
    lines = path.read_text().split("\n")  # the last element is "" when the file ends with a newline
    records, torn = [], None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a JSON object with a step")
        except ValueError as error:
            if number == len(lines):
                torn = line
                continue
            raise ValueError(f"{path}, line {number}: not a log record ({error}); the log is damaged: repair or "
                             f"remove that line") from None
        records.append(record)
    return records, torn


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` file (none if it does not exist); ValueError if a line is not one."""
    records, torn = _parse_log(path)
    if torn is not None:
        raise ValueError(f"{path}: the last line is torn (unterminated and not a JSON record): {torn[:60]!r}")
    return records


def truncate_log(path: Path, last_step: int) -> str | None:
    """Atomically drop the records after ``last_step`` (steps that a resumed run will redo) and a torn last line
    (a run killed while writing it); return a note that says so when a torn line was dropped. Complete records up
    to ``last_step`` are all kept; a damaged line elsewhere raises ``SetupError``."""
    try:
        records, torn = _parse_log(path)
    except ValueError as error:
        raise SetupError(str(error)) from None
    kept = [r for r in records if r["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    if torn is None:
        return None
    return f"dropped the torn last line of {path} (written when the run was stopped): {torn[:60]!r}"
