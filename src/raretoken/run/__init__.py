"""Runs: configuration, cache, manifest and the identification pipeline (the Python API)."""

from __future__ import annotations

from .config import PRESETS, RunConfig, make_config
from .identification import Identification, NeuronTable, identify

__all__ = ["PRESETS", "Identification", "NeuronTable", "RunConfig", "identify", "make_config"]
