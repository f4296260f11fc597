"""Self-contained HTML reports of run and sweep directories (``report.html``).

>>> from raretoken.report import write_run_report, write_sweep_report  # doctest: +SKIP
>>> write_run_report("raretoken-runs/embedded-demo")       # doctest: +SKIP
>>> write_sweep_report("raretoken-sweeps/pythia")           # doctest: +SKIP

Sits above :mod:`raretoken.run`: it reads the files a run or a sweep wrote to disk and runs
nothing; it does not import :mod:`raretoken.sweep`, and neither ``run`` nor ``sweep`` import it.
A page loads nothing from anywhere: style inline, figures as ``data:`` images, no script.
"""

from __future__ import annotations

from .markdown import markdown_to_html
from .run_report import REPORT, run_report_html, write_run_report
from .sweep_report import sweep_report_html, write_sweep_report

__all__ = [
    "REPORT",
    "markdown_to_html",
    "run_report_html",
    "sweep_report_html",
    "write_run_report",
    "write_sweep_report",
]
