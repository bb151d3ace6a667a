"""bench/gpu_check.py --together: every stage at once, each benchmark's timed loop with the other stages stopped
(bench/timing.py's ``exclusive`` claims the machine; the driver's pauser stops the others with SIGSTOP)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402
import timing  # noqa: E402


def state(pid: int) -> str:
    """The process's state letter from /proc (S sleeping, R running, T stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for_state(pid: int, wanted: str, seconds: float = 5.0) -> str:
    deadline = time.monotonic() + seconds
    while state(pid) != wanted and time.monotonic() < deadline:
        time.sleep(0.02)
    return state(pid)


def test_exclusive_claims_the_machine_only_under_a_driver(tmp_path, monkeypatch):
    monkeypatch.delenv(timing.EXCLUSIVE_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with timing.exclusive(settle_seconds=0):
        assert list(tmp_path.iterdir()) == []
    claims = tmp_path / "claims"
    claims.mkdir()
    monkeypatch.setenv(timing.EXCLUSIVE_DIR_ENV, str(claims))
    with timing.exclusive(settle_seconds=0):
        assert sorted(p.name for p in claims.iterdir()) == [".lock", str(os.getpid())]
    assert sorted(p.name for p in claims.iterdir()) == [".lock"]


def test_the_timed_loops_and_only_they_run_with_the_machine_claimed(tmp_path, monkeypatch):
    import sampling

    claims = tmp_path / "claims"
    claims.mkdir()
    monkeypatch.setenv(timing.EXCLUSIVE_DIR_ENV, str(claims))
    quick = functools.partial(timing.exclusive, settle_seconds=0)
    monkeypatch.setattr(timing, "exclusive", quick)
    monkeypatch.setattr(sampling, "exclusive", quick)
    claimed = (claims / str(os.getpid())).exists
    seen = []
    timing.time_steps(lambda n: seen.append((n, claimed())) or torch.zeros(()), torch.device("cpu"), 1, steps=2,
                      warmup=1)
    assert seen == [(0, False), (1, True), (2, True)]
    seen.clear()
    sampling.median_seconds({"a": lambda: seen.append(claimed())}, repeats=2, warmup=1)
    assert seen == [False, True, True]


def test_the_pauser_stops_every_group_but_the_claimants_and_drops_stale_claims(tmp_path):
    claims = tmp_path / "claims"
    claims.mkdir()
    sleepers = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2)]
    try:
        groups = [p.pid for p in sleepers]
        (claims / str(sleepers[0].pid)).touch()
        assert gpu_check.stop_all_but_claimant(claims, groups) == sleepers[0].pid
        assert wait_for_state(sleepers[1].pid, "T") == "T" and state(sleepers[0].pid) == "S"
        (claims / str(sleepers[0].pid)).unlink()
        assert gpu_check.stop_all_but_claimant(claims, groups) is None
        assert wait_for_state(sleepers[1].pid, "S") == "S"

        gone = subprocess.Popen(["true"])
        gone.wait()
        (claims / str(gone.pid)).touch()  # a benchmark killed inside its timed loop leaves its claim behind
        assert gpu_check.stop_all_but_claimant(claims, groups) is None
        assert not (claims / str(gone.pid)).exists() and state(sleepers[1].pid) == "S"
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


BUSY = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
end = time.monotonic() + 6
while time.monotonic() < end:
    with open(sys.argv[2], "a") as f:
        f.write(".")
    time.sleep(0.01)
"""

TIMER = """
import json, os, sys, time
sys.path.insert(0, "bench")
from timing import exclusive
from pathlib import Path
pid_file, counter = Path(sys.argv[1]), Path(sys.argv[2])
while not pid_file.exists() or not pid_file.read_text():
    time.sleep(0.05)
other = int(pid_file.read_text())
time.sleep(0.5)
with exclusive(settle_seconds=1.5):
    before = counter.stat().st_size
    time.sleep(1.0)
    after = counter.stat().st_size
    stopped = open(f"/proc/{other}/stat").read().rsplit(")", 1)[1].split()[0]
print(json.dumps({"other_state": stopped, "advanced": after - before}))
"""


def test_together_a_benchmark_times_while_the_other_stages_are_stopped(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    pid_file, counter = tmp_path / "busy.pid", tmp_path / "counter"
    counter.touch()
    results = gpu_check.run_together([
        ("busy", 60, [sys.executable, "-c", BUSY, str(pid_file), str(counter)]),
        ("timer", 60, [sys.executable, "-c", TIMER, str(pid_file), str(counter)]),
    ], logs)
    assert list(results) == ["busy", "timer"]
    assert results["busy"]["returncode"] == 0 and results["timer"]["returncode"] == 0, results
    assert results["timer"]["json"] == {"other_state": "T", "advanced": 0}
    assert counter.stat().st_size > 50  # the busy stage ran before and after the timed loop
    assert not [p for p in (logs / "claims").iterdir() if p.name != ".lock"]


def test_together_ends_a_stage_that_outlives_its_limit(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    start = time.monotonic()
    results = gpu_check.run_together([
        ("slow", 1, ["sleep", "30"]),
        ("quick", 30, [sys.executable, "-c", "import json; print(json.dumps({'ok': 1}))"]),
        ("broken", 30, [sys.executable, "-c", "raise SystemExit('no GPU here')"]),
    ], logs)
    assert results["slow"]["returncode"] == "timeout" and time.monotonic() - start < 8
    assert results["quick"]["returncode"] == 0 and results["quick"]["json"] == {"ok": 1}
    assert results["broken"]["returncode"] == 1 and "no GPU here" in results["broken"]["stderr_tail"]
