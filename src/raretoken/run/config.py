"""Run configuration: one flat, frozen record of every setting, with presets.

Presets
-------
Rare targets are a fraction of a percent of running text, so both main presets draw windows of
512 tokens until they hold enough rare targets (``sampling="until_rare"``) and score every
rare target plus a seeded sample of ``max_common`` common targets (``scoring="rare+common"``,
see :mod:`raretoken.data.scoring`): the ablation's cost grows with the rare targets.

``demo`` (the default)
    600 rare targets and 4,096 common ones, 100 bootstrap resamples: finishes on a 2-core
    CPU within about 10 minutes on the embedded SmolLM2 model.
``paper``
    2,000 rare targets and 8,192 common ones, 200 resamples.
``paper-windows``
    The paper's §3.1 literally: 49 windows x 512 tokens, every position scored (25,088
    targets, of which only a fraction of a percent are rare), 200 resamples.

Values come from the preset, then a TOML config file, then command-line flags.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from ..data.scoring import SCORING_MODES
from ..errors import ConfigError

#: The values of ``bos``: ``auto`` follows what the model needs (a BOS token for Gemma, or
#: where the model's tokenizer adds one; see :mod:`raretoken.models.bos`, which resolves it).
BOS_CHOICES: tuple[str, ...] = ("auto", "none", "prepend")

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "sampling": "until_rare",
        "n_rare": 600,
        "scoring": "rare+common",
        "max_common": 4096,
        "window_len": 512,
        "n_boot": 100,
        "n_random_groups": 100,
    },
    "paper": {
        "sampling": "until_rare",
        "n_rare": 2000,
        "scoring": "rare+common",
        "max_common": 8192,
        "window_len": 512,
        "n_boot": 200,
        "n_random_groups": 100,
    },
    "paper-windows": {
        "sampling": "windows",
        "n_windows": 49,
        "scoring": "all",
        "window_len": 512,
        "n_boot": 200,
        "n_random_groups": 100,
    },
}


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run (see ``raretoken run --help`` for each)."""

    preset: str = "demo"
    # model
    model: str = "embedded"
    revision: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    # corpora
    corpus: str = "embedded"
    text_field: str = "text"
    freq_corpus: str | None = None
    heldout_fraction: float = 0.1
    max_count_tokens: int | None = None
    # token statistics
    percentile: float = 15.0
    # contexts
    sampling: str = "until_rare"
    n_windows: int = 16
    window_len: int = 512
    n_rare: int = 600
    scoring: str = "rare+common"
    max_common: int = 8192
    score_percentile: float = 25.0
    max_stream_tokens: int = 10_000_000
    reference_windows: int = 8
    bos: str = "auto"
    seed: int = 0
    # ablation
    method: str = "fast"
    tol: float = 1e-5
    batch_size: int = 4
    # fits
    n_boot: int = 100
    n_random_groups: int = 100

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if not 0 < self.percentile < 100:
            raise ConfigError(f"percentile must be in (0, 100), got {self.percentile}")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.sampling not in ("windows", "until_rare"):
            raise ConfigError("sampling must be 'windows' or 'until_rare'")
        if self.scoring not in SCORING_MODES:
            raise ConfigError(f"scoring must be one of {', '.join(SCORING_MODES)}")
        if not 0 < self.score_percentile < 100:
            raise ConfigError(f"score_percentile must be in (0, 100), got {self.score_percentile}")
        if self.scoring == "rare+common" and self.score_percentile < self.percentile:
            raise ConfigError(
                f"score_percentile ({self.score_percentile}) must be at least the split's "
                f"percentile ({self.percentile}): every rare target of the split is scored"
            )
        if self.bos not in BOS_CHOICES:
            raise ConfigError(
                f"bos must be 'auto' (what the model needs), 'none' or 'prepend', got {self.bos!r}"
            )
        if self.method not in ("fast", "exact", "naive"):
            raise ConfigError("method must be 'fast', 'exact' or 'naive'")
        if self.dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ConfigError(f"unsupported dtype {self.dtype!r}")
        for name in (
            "n_windows",
            "window_len",
            "n_rare",
            "max_common",
            "reference_windows",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_boot < 0 or self.n_random_groups < 0:
            raise ConfigError("n_boot and n_random_groups must be >= 0")
        if self.tol <= 0:
            raise ConfigError("tol must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# TOML's names for the Python types ``tomllib`` produces (checked in this order: ``bool`` is an
# ``int`` and ``datetime`` a ``date``).
_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
    (datetime.datetime, "datetime"),
    (datetime.date, "date"),
    (datetime.time, "time"),
)
_EXPECTED = {int: "an integer", float: "a number", str: "a string"}


def _field_types() -> dict[str, tuple[type, bool]]:
    """``{name: (base type, accepts None)}`` of every :class:`RunConfig` field.

    The annotations are strings (``from __future__ import annotations``): ``"int"``,
    ``"float | None"``, ...
    """
    base_types = {"int": int, "float": float, "str": str}
    out: dict[str, tuple[type, bool]] = {}
    for f in fields(RunConfig):
        parts = [p.strip() for p in str(f.type).split("|")]
        optional = "None" in parts
        names = [p for p in parts if p != "None"]
        if len(names) != 1 or names[0] not in base_types:
            raise TypeError(f"RunConfig.{f.name}: unsupported annotation {f.type!r}")
        out[f.name] = (base_types[names[0]], optional)
    return out


_FIELD_TYPES = _field_types()


def _type_name(value: Any, origin: str) -> str:
    """``"TOML float"`` / ``"Python float"``: the kind of value, in the words of its origin."""
    if origin == "TOML":
        for cls, name in _TOML_TYPES:
            if isinstance(value, cls):
                return f"TOML {name}"
    return f"Python {type(value).__name__}"


def _coerce(name: str, value: Any, origin: str = "Python") -> Any:
    """``value`` as the type of setting ``name``, refusing values of another type.

    ``int`` settings take integers only (no floats, not even ``4.0``, and no booleans);
    ``float`` settings take integers and floats (no booleans); ``str`` settings take strings;
    ``None`` only where the field allows it. ``origin`` ("TOML" or "Python") words the error.
    """
    if name not in _FIELD_TYPES:
        raise ConfigError(f"unknown setting {name!r}; known settings: {', '.join(_FIELD_TYPES)}")
    base, optional = _FIELD_TYPES[name]
    if value is None and optional:
        return None
    ok = False
    if base is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    elif base is str:
        ok = isinstance(value, str)
    if ok:
        try:
            return base(value)
        except OverflowError:
            raise ConfigError(f"setting {name!r}: {value!r} is too large") from None
    expected = _EXPECTED[base] + (" (or unset)" if optional else "")
    hint = ""
    if (
        base is int
        and isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and float(value).is_integer()
    ):
        hint = f"; write {int(float(value))}"
    elif base is int and isinstance(value, str):
        hint = "; write the number without quotes"
    raise ConfigError(
        f"setting {name!r} must be {expected}, got {value!r} ({_type_name(value, origin)}){hint}"
    )


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The parsed TOML file ``path``; a missing file, a directory or invalid TOML is a one-line
    :class:`ConfigError` naming ``what`` (e.g. ``"config file"``) and the path."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML config file, type-checked (see :func:`_coerce`).

    Settings may sit at the top level or in a ``[run]`` table (not both for one setting); any
    other top-level key is refused with :class:`ConfigError`.
    """
    data = read_toml(path, "config file")
    run_table = data.get("run", {})
    if not isinstance(run_table, dict):
        raise ConfigError(
            f"config file {path}: 'run' must be a table ([run]), got {run_table!r} "
            f"({_type_name(run_table, 'TOML')})"
        )
    top = {k: v for k, v in data.items() if k != "run"}
    flat: dict[str, Any] = {}
    for where, table in (("[run]", run_table), ("top level", top)):
        for key, value in table.items():
            if key not in _FIELD_TYPES:
                raise ConfigError(
                    f"config file {path}: unknown setting {key!r} ({where}); known settings: "
                    f"{', '.join(_FIELD_TYPES)}"
                )
            if key in flat:
                raise ConfigError(
                    f"config file {path}: setting {key!r} is given both in [run] and at the top "
                    "level"
                )
            try:
                flat[key] = _coerce(key, value, origin="TOML")
            except ConfigError as exc:
                raise ConfigError(f"config file {path}: {exc}") from None
    return flat


def make_config(
    preset: str | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Preset, then config file, then ``overrides`` (``None`` values are ignored).

    Values of the wrong type are refused with :class:`ConfigError`, not converted: an ``int``
    setting takes only integers, a ``float`` setting integers or floats, a ``str`` setting
    strings (booleans are neither integers nor floats here).
    """
    typed_overrides = {
        k: _coerce(k, v, origin="Python") for k, v in (overrides or {}).items() if v is not None
    }
    file_values = read_config_file(config_file) if config_file else {}
    chosen = preset or file_values.get("preset") or "demo"
    if not isinstance(chosen, str) or chosen not in PRESETS:
        raise ConfigError(f"unknown preset {chosen!r}; choose one of {sorted(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[chosen])
    values.update(file_values)
    values.update(typed_overrides)
    values["preset"] = chosen
    cfg = RunConfig(**{k: _coerce(k, v) for k, v in values.items()})
    cfg.validate()
    return cfg
