"""Sweeps: one identification + analysis run per (model, revision), and a cross-run table.

>>> from raretoken.sweep import load_sweep, run_sweep, sweep_table  # doctest: +SKIP
>>> result = run_sweep(load_sweep("sweep.toml"), "raretoken-sweeps/pythia")   # doctest: +SKIP
>>> sweep_table("raretoken-sweeps/pythia").to_pylist()                         # doctest: +SKIP

Sits above :mod:`raretoken.run` (it calls :func:`raretoken.run.identify` and
:func:`raretoken.run.analyze`); nothing in ``run`` imports it.
"""

from __future__ import annotations

from .executors import EXECUTORS, RayExecutor, make_executor
from .outputs import ABOUT as SWEEP_OUTPUTS
from .outputs import write_sweep_outputs
from .spec import SweepSpec, SweepTask, load_sweep, parse_sweep
from .table import SWEEP_TABLE, format_table, sweep_table, write_sweep_table
from .tasks import SWEEP_MANIFEST, SweepResult, TaskResult, run_sweep, run_task, write_outputs

__all__ = [
    "EXECUTORS",
    "SWEEP_MANIFEST",
    "SWEEP_OUTPUTS",
    "SWEEP_TABLE",
    "RayExecutor",
    "SweepResult",
    "SweepSpec",
    "SweepTask",
    "TaskResult",
    "format_table",
    "load_sweep",
    "make_executor",
    "parse_sweep",
    "run_sweep",
    "run_task",
    "sweep_table",
    "write_outputs",
    "write_sweep_outputs",
    "write_sweep_table",
]
