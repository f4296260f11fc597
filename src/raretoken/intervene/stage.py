"""The interventions as a stage of a run directory: recorded in its manifest and summary.

While :func:`~raretoken.intervene.intervene` measures, the manifest says ``running`` (stage
``interventions``); once its files are written they are registered under ``interventions:``
(files of an earlier intervention that this one did not write are removed), ``summary.md``
gains the section ``interventions/summary.md`` (:mod:`raretoken.run.summary`), and the stage
is recorded with its settings and the identification keys it was computed from, the run's
status (``identified`` or ``complete``) unchanged. An error or Ctrl-C is recorded (``error``,
with the stage's name) but leaves the run's status as its finished stages make it
(:meth:`~raretoken.run.manifest.RunDirectory.stop`), and ``summary.md`` without this section.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ..run.analysis_stage import config_of_run_dir
from ..run.manifest import RunDirectory
from ..run.summary import write_summary

STAGE = "interventions"
PREFIX = "interventions:"


class InterventionStage:
    """Context manager recording the ``interventions`` stage of the run at ``run_dir``.

    With ``record=False`` it records nothing (an intervention that writes no files).
    """

    def __init__(self, run_dir: Path, info: dict[str, Any], *, record: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.info = info
        self.record = record
        self._run: RunDirectory | None = None
        self._t0 = 0.0

    def __enter__(self) -> InterventionStage:
        if self.record:
            run = RunDirectory.open_existing(self.run_dir, config_of_run_dir(self.run_dir))
            self._t0 = time.perf_counter()
            run.begin(STAGE)
            self._run = run
        return self

    def written(self, files: dict[str, str]) -> None:
        """Register the files written (relative path -> description) and rewrite
        ``summary.md`` with the interventions' section."""
        if self._run is None:
            return
        self._run.replace_outputs(PREFIX, files)
        write_summary(self.run_dir, also=(STAGE,))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        if exc is not None:
            run.stop(STAGE, exc)
            write_summary(self.run_dir)  # without the section of a stage that did not finish
            return
        run.end(
            STAGE,
            run.settled_status(),
            seconds=round(time.perf_counter() - self._t0, 3),
            **self.info,
        )
