"""Add-on stages of a run directory: stages that extend a finished identification in place.

The per-layer identification (``layers``) and the interventions (``interventions``) add files
to a published run directory. When the same run is republished (same configuration and
schema: ``raretoken analyze``, a rerun of ``raretoken run``), :func:`carry_addons` copies
their files, ``stages`` entries and ``outputs`` entries into the new directory, but only when
the identification they were computed from is unchanged: each add-on stage records, when it
ends (:meth:`~raretoken.run.manifest.RunDirectory.end`), the keys of :func:`identification_basis`
as ``basis``; an add-on whose keys differ from the new identification's, that records none, or
whose files are missing is dropped with a warning.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manifest import RunDirectory

log = logging.getLogger(__name__)

#: Stages that extend a finished identification in place, with the prefix of their outputs'
#: names in ``outputs``. Republishing the same run (same configuration and schema) carries
#: them over while the identification they were computed from is unchanged (see
#: :meth:`~raretoken.run.manifest.RunDirectory.publish`).
ADDON_STAGES: dict[str, str] = {"layers": "layers:", "interventions": "interventions:"}


def identification_basis(stages: Mapping[str, Any]) -> dict[str, Any]:
    """The identification keys an add-on stage's results depend on: the token counts that
    split rare from common targets (``token_statistics.key``), the scored windows
    (``sampling.key``), their capture by the model (``forward.key``: model files, dtype,
    device) and the reference windows' capture (``forward.reference_key``: n̄)."""

    def get(stage: str, key: str) -> Any:
        info = stages.get(stage)
        return info.get(key) if isinstance(info, dict) else None

    return {
        "token_statistics": get("token_statistics", "key"),
        "sampling": get("sampling", "key"),
        "forward": get("forward", "key"),
        "reference": get("forward", "reference_key"),
    }


def _inside(root: Path, rel: Any) -> Path | None:
    """``root / rel`` when ``rel`` is a relative path that stays inside ``root``."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        return None
    p = root / rel
    try:
        p.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return p


def carry_addons(old_path: Path, old: Mapping[str, Any], run: RunDirectory) -> list[str]:
    """Copy the still-valid add-on stages of the run at ``old_path`` into ``run`` (staging).

    Returns the names of the stages carried; the others are dropped with a warning.
    """
    basis = identification_basis(run.manifest["stages"])
    got_stages, got_outputs = old.get("stages"), old.get("outputs")
    old_stages: dict[str, Any] = got_stages if isinstance(got_stages, dict) else {}
    old_outputs: dict[str, Any] = got_outputs if isinstance(got_outputs, dict) else {}
    carried = []
    for name, prefix in ADDON_STAGES.items():
        info = old_stages.get(name)
        if not isinstance(info, dict):
            continue
        recorded = info.get("basis")
        if not isinstance(recorded, dict):
            why = "it records no identification keys (written by an older raretoken)"
        elif None in basis.values() or recorded != basis:
            changed = [k for k in basis if recorded.get(k) != basis[k]] or list(basis)
            why = (
                "it was computed from another identification ("
                + ", ".join(f"{k} key" for k in changed)
                + " changed)"
            )
        else:
            why = ""
        entries = {k: v for k, v in old_outputs.items() if k.startswith(prefix)}
        files = []
        for entry in entries.values():
            rel = entry.get("path") if isinstance(entry, dict) else None
            src, dst = _inside(old_path, rel), _inside(run.path, rel)
            if src is None or dst is None or not src.is_file():
                why = why or f"its file {rel!r} is missing"
                break
            files.append((src, dst))
        if why:
            log.warning("%s: dropped the results of stage %r: %s; run it again",
                        old_path, name, why)  # fmt: skip
            continue
        for src, dst in files:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        run.manifest["stages"][name] = dict(info)
        run.manifest["outputs"].update(entries)
        carried.append(name)
    if carried:
        log.info("%s: kept the results of %s (same identification)", old_path,
                 ", ".join(carried))  # fmt: skip
    return carried
