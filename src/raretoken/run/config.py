"""Run configuration: one flat, frozen record of every setting, with presets.

Presets
-------
``paper``
    The paper's scale taken literally: 49 windows x 512 tokens (25,088 scored targets), the
    15th percentile split, 200 bootstrap resamples.
``demo`` (the default)
    The same method at a scale that finishes on a 2-core CPU within about 10 minutes on the
    embedded SmolLM2 model: 16 windows x 512 tokens (8,192 targets) and 100 resamples.

Values come from the preset, then a TOML config file, then command-line flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from ..errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"n_windows": 49, "window_len": 512, "n_boot": 200, "n_random_groups": 100},
    "demo": {"n_windows": 16, "window_len": 512, "n_boot": 100, "n_random_groups": 100},
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
    sampling: str = "windows"
    n_windows: int = 16
    window_len: int = 512
    n_rare: int = 1000
    max_stream_tokens: int = 10_000_000
    reference_windows: int = 8
    bos: str = "none"
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
        if self.bos not in ("none", "prepend"):
            raise ConfigError("bos must be 'none' or 'prepend'")
        if self.method not in ("fast", "exact", "naive"):
            raise ConfigError("method must be 'fast', 'exact' or 'naive'")
        if self.dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ConfigError(f"unsupported dtype {self.dtype!r}")
        for name in ("n_windows", "window_len", "n_rare", "reference_windows", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_boot < 0 or self.n_random_groups < 0:
            raise ConfigError("n_boot and n_random_groups must be >= 0")
        if self.tol <= 0:
            raise ConfigError("tol must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any) -> Any:
    types = {f.name: f.type for f in fields(RunConfig)}
    if name not in types:
        raise ConfigError(f"unknown setting {name!r}")
    t = str(types[name])
    if value is None:
        return None
    try:
        if t.startswith("int"):
            return int(value)
        if t.startswith("float"):
            return float(value)
        return str(value) if t.startswith("str") else value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: cannot read {value!r} ({exc})") from None


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    flat = dict(data.get("run", {}), **{k: v for k, v in data.items() if k != "run"})
    return flat


def make_config(
    preset: str | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Preset, then config file, then ``overrides`` (``None`` values are ignored)."""
    values: dict[str, Any] = {}
    file_values = read_config_file(config_file) if config_file else {}
    chosen = preset or file_values.get("preset") or "demo"
    if chosen not in PRESETS:
        raise ConfigError(f"unknown preset {chosen!r}; choose one of {sorted(PRESETS)}")
    values.update(PRESETS[chosen])
    values["preset"] = chosen
    values.update(file_values)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values["preset"] = chosen
    cfg = RunConfig(**{k: _coerce(k, v) for k, v in values.items()})
    cfg.validate()
    return cfg
