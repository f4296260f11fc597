"""The sweep file: models x revisions x shared run settings, expanded into tasks.

A ``sweep.toml``::

    # any RunConfig setting, shared by every task (top level or in [run])
    preset = "demo"
    corpus = "data/wiki.jsonl"
    n_boot = 50
    revisions = ["main"]            # default revisions of every model (optional)

    [analysis]                       # AnalysisOptions of every task (optional)
    routing = false

    [[models]]
    model = "EleutherAI/pythia-70m"  # hub id, local directory or .gguf file
    revisions = ["step1000", "step143000"]
    n_rare = 300                     # per-model override of any setting

    [[models]]
    model = "checkpoints/run1"       # a local directory ...
    revisions = ["checkpoint-*"]     # ... whose sub-directories matching a glob are the tasks

    [[models]]
    model = "EleutherAI/pythia-160m"
    revisions = "pythia-log:12"      # a schedule: 12 of Pythia's 154 public checkpoints

``revisions`` is an array of revisions, globs and schedules, or one glob or schedule:
``"pythia-log"`` (Pythia's 154 public checkpoints), ``"pythia-log:K"`` (K of them,
log-spaced), ``"every:N"`` and ``"every:N:LAST"`` (every checkpoint whose step is a
multiple of N, and the last); see :mod:`raretoken.sweep.revisions`. A plain revision of a
local directory names its sub-directory. Each task records its training ``step`` when its
revision or checkpoint directory names one (``step1000``, ``checkpoint-1000``).

One task is one (model, revision). Relative paths (``model``, ``corpus``, ``freq_corpus``)
that exist beside the sweep file are made absolute; other strings are left as written (hub ids).

Settings apply in this order, later ones winning: the preset, the file's shared settings, the
model's own settings, then ``overrides`` (``raretoken sweep``'s command-line flags).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..run import AnalysisOptions, RunConfig, make_config
from ..run.config import PRESETS, _coerce, read_toml
from .revisions import GLOB_CHARS, SCHEDULE_FORMS, expand_revisions, is_schedule

_PATH_SETTINGS = ("model", "corpus", "freq_corpus")
_SWEEP_KEYS = ("revisions",)
_MODEL_KEYS = ("model", "name", "revisions")


@dataclass(frozen=True)
class SweepTask:
    """One (model, revision) of a sweep: its name, identity and full run configuration.

    ``revision`` is the label of the revision (a hub revision, or the checkpoint directory's
    name when a glob or schedule chose it; ``None`` for the model as it is). ``step`` is the
    training step that label (or a local model directory's name) names, ``None`` when it
    names none (``main``, a model without revisions).
    """

    name: str
    model: str
    revision: str | None
    config: RunConfig
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "revision": self.revision,
            "step": self.step,
            "config": self.config.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepTask:
        step = d.get("step")  # absent in files written before steps were recorded
        return cls(
            name=str(d["name"]),
            model=str(d["model"]),
            revision=None if d["revision"] is None else str(d["revision"]),
            config=RunConfig(**d["config"]),
            step=None if step is None else int(step),
        )


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep: the shared settings, the analysis options and the expanded tasks.

    ``settings`` are the file's shared settings with ``overrides`` (the command line's) applied;
    ``overrides`` are kept apart too, to say where a value came from.
    """

    settings: dict[str, Any]
    analysis: AnalysisOptions
    tasks: tuple[SweepTask, ...]
    source: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "source": self.source,
            "settings": dict(self.settings),
            "overrides": dict(self.overrides),
            "analysis": asdict(self.analysis),
            "tasks": [t.to_dict() for t in self.tasks],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepSpec:
        a = dict(d["analysis"])
        a["percentiles"] = tuple(a.get("percentiles", ()))
        a["definitions"] = tuple(a.get("definitions", ()))
        return cls(
            settings=dict(d["settings"]),
            analysis=AnalysisOptions(**a),
            tasks=tuple(SweepTask.from_dict(t) for t in d["tasks"]),
            source=d.get("source"),
            overrides=dict(d.get("overrides") or {}),
        )


def _analysis_options(table: Any, where: str) -> AnalysisOptions:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: 'analysis' must be a table ([analysis])")
    kinds = {f.name: str(f.type) for f in fields(AnalysisOptions)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in kinds:
            raise ConfigError(
                f"{where}: unknown analysis option {key!r}; known: {', '.join(kinds)}"
            )
        kind = kinds[key]
        if kind.startswith("tuple"):
            elem = (int, float) if "float" in kind else (str,)
            ok = isinstance(value, list) and all(
                isinstance(v, elem) and not isinstance(v, bool) for v in value
            )
            value = tuple(float(v) if "float" in kind else v for v in value) if ok else value
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(f"{where}: analysis option {key!r} must be {kind}, got {value!r}")
        out[key] = value
    return AnalysisOptions(**out)


def _settings(table: Mapping[str, Any], where: str, skip: tuple[str, ...]) -> dict[str, Any]:
    """Type-checked run settings of ``table`` (keys in ``skip`` are the sweep's own)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key in ("model", "revision"):
            hint = "[[models]] tables" if key == "model" else "'revisions = [...]'"
            raise ConfigError(f"{where}: {key!r} is not a shared setting of a sweep; use {hint}")
        try:
            out[key] = _coerce(key, value, origin="TOML")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return out


def _revisions(value: Any, where: str) -> list[str]:
    """The ``revisions`` entries: an array of strings, or one schedule or glob."""
    if isinstance(value, str) and (is_schedule(value) or GLOB_CHARS.search(value)):
        return [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"{where}: 'revisions' must be a non-empty array of strings, a schedule "
            f"({SCHEDULE_FORMS}) or a glob of checkpoint directories, got {value!r}"
        )
    for v in value:
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{where}: every revision must be a non-empty string, got {v!r}")
    return list(value)


def _local(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    if not p.is_absolute() and (base / p).exists():
        return str((base / p).resolve())
    return str(p) if p.is_absolute() else value


def task_name(model: str, revision: str | None, prefix: str | None = None) -> str:
    """``<model name>[@<revision>]`` with characters other than ``[A-Za-z0-9._-@]`` as ``_``."""
    stem = prefix or Path(model.rstrip("/")).name
    if stem.endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    name = stem if revision is None else f"{stem}@{revision}"
    return re.sub(r"[^A-Za-z0-9._@-]", "_", name)


def _overrides(overrides: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """Type-checked ``overrides`` (``None`` values dropped, existing relative paths absolute)."""
    where = f"{source}: command-line settings"
    out: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ("model", "revision", "revisions"):
            raise ConfigError(
                f"{where}: {key!r} cannot be overridden for a whole sweep; edit the sweep file"
            )
        try:
            out[key] = _coerce(key, value, origin="Python")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if "preset" in out and out["preset"] not in PRESETS:
        raise ConfigError(
            f"{where}: unknown preset {out['preset']!r}; choose one of {sorted(PRESETS)}"
        )
    for key in _PATH_SETTINGS:
        if isinstance(out.get(key), str):
            out[key] = _local(out[key], Path.cwd())
    return out


def parse_sweep(
    data: Mapping[str, Any],
    base_dir: Path | str = ".",
    source: str = "sweep",
    overrides: Mapping[str, Any] | None = None,
) -> SweepSpec:
    """The :class:`SweepSpec` of a parsed sweep file (``data`` as ``tomllib`` returns it).

    ``overrides`` are run settings applied over every task's settings, winning over the
    file's shared and per-model settings (``raretoken sweep``'s flags; ``None`` values are
    ignored, relative paths that exist are taken from the working directory). They are
    type-checked as the file's settings; ``preset`` may be overridden, ``model`` and
    ``revision`` may not.
    """
    base = Path(base_dir)
    over = _overrides(overrides, source)
    top = {k: v for k, v in data.items() if k not in ("models", "analysis", "run")}
    run_table = data.get("run", {})
    if not isinstance(run_table, dict):
        raise ConfigError(f"{source}: 'run' must be a table ([run])")
    shared = _settings(top, source, _SWEEP_KEYS)
    for key, value in _settings(run_table, f"{source} [run]", ()).items():
        if key in shared:
            raise ConfigError(
                f"{source}: setting {key!r} is given both in [run] and at the top level"
            )
        shared[key] = value
    for key in _PATH_SETTINGS:
        if isinstance(shared.get(key), str):
            shared[key] = _local(shared[key], base)
    default_revs = _revisions(top["revisions"], source) if "revisions" in top else None
    analysis = _analysis_options(data.get("analysis", {}), f"{source} [analysis]")

    models = data.get("models")
    if models is None or (isinstance(models, list) and not models):
        raise ConfigError(
            f'{source}: no models; add at least one [[models]] table with model = "..."'
        )
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ConfigError(f"{source}: 'models' must be an array of tables ([[models]])")

    tasks: list[SweepTask] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(models, start=1):
        where = f"{source} [[models]] #{i}"
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigError(f'{where}: needs model = "<hub id, directory or .gguf file>"')
        prefix = entry.get("name")
        if prefix is not None and (not isinstance(prefix, str) or not prefix):
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        where = f"{source} [[models]] #{i} ({model})"
        own = _settings(entry, where, _MODEL_KEYS)
        for key in _PATH_SETTINGS:
            if isinstance(own.get(key), str):
                own[key] = _local(own[key], base)
        revs = _revisions(entry["revisions"], where) if "revisions" in entry else default_revs
        model = _local(model, base)
        settings = {**shared, **own, **over}
        for r in expand_revisions(model, revs, where):
            name = task_name(model, r.label, prefix)
            if name in seen:
                raise ConfigError(
                    f"{where}: duplicate task name {name!r} (also from {seen[name]}); "
                    'give the models distinct name = "..."'
                )
            seen[name] = where
            opts = dict(settings, model=r.path, revision=r.revision)
            preset = opts.pop("preset", None)
            try:
                cfg = make_config(preset=preset, overrides=opts)
            except ConfigError as exc:
                raise ConfigError(f"{where}, task {name}: {exc}") from None
            tasks.append(
                SweepTask(name=name, model=r.path, revision=r.label, config=cfg, step=r.step)
            )
    return SweepSpec(
        settings={**shared, **over},
        analysis=analysis,
        tasks=tuple(tasks),
        source=source,
        overrides=over,
    )


def load_sweep(path: Path | str, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and expand a ``sweep.toml`` (errors: :class:`ConfigError`, one line).

    ``overrides``: run settings that win over the file's (see :func:`parse_sweep`).
    """
    path = Path(path)
    data = read_toml(path, "sweep file")
    return parse_sweep(data, path.resolve().parent, source=str(path), overrides=overrides)
