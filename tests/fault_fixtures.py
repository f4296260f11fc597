"""Helpers of the fault-injection tests: a tiny run as CLI arguments, killing a run at a
named pause point, and comparing the tables of two run directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline_fixtures import tiny_overrides

#: Files whose content must not depend on how a run got there (timings live in the manifest).
TABLES = (
    "neurons.csv",
    "regimes.json",
    "token_split.json",
    "analyses/claims.csv",
    "analyses/coordination.csv",
    "analyses/spatial.csv",
    "analyses/spectra.csv",
    "analyses/specificity.csv",
    "analyses/routing.csv",
    "analyses/routing_heads.csv",
)


def run_args(model_dir: Path, corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    args = ["run", "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    for name, value in tiny_overrides(model_dir, corpus).items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return [*args, *extra]


def _env(pause_at: str | None, marker: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RARETOKEN_PAUSE_AT", None)
    if pause_at is not None and marker is not None:
        env["RARETOKEN_PAUSE_AT"] = pause_at
        env["RARETOKEN_PAUSE_FILE"] = str(marker)
    return env


def start(args: list[str], *, pause_at: str | None = None, marker: Path | None = None,
          log: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "raretoken.cli", *args],
        env=_env(pause_at, marker),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def kill_at(args: list[str], point: str, tmp: Path, timeout: float = 120.0) -> int:
    """Start a run, wait until it pauses at ``point``, ``kill -9`` it; returns its pid."""
    marker = tmp / f"paused-{point}"
    marker.unlink(missing_ok=True)
    log = tmp / f"log-{point}.txt"
    proc = start(args, pause_at=point, marker=marker, log=log)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (rc {proc.returncode}) before {point}: {log.read_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"run did not reach {point} in {timeout} s")
        time.sleep(0.05)
    pid = int(marker.read_text())
    assert pid == proc.pid
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return pid


def tables(run_dir: Path) -> dict[str, bytes]:
    return {rel: (run_dir / rel).read_bytes() for rel in TABLES if (run_dir / rel).exists()}


def files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}


def manifest(run_dir: Path) -> dict[str, object]:
    data = json.loads((run_dir / "manifest.json").read_text())
    assert isinstance(data, dict)
    return data
