"""Runs: configuration, cache, manifest and the identification pipeline (the Python API)."""

from __future__ import annotations

from .analysis_stage import AnalysisOptions, analyze, analyze_run_dir
from .config import PRESETS, RunConfig, make_config
from .identification import Identification, NeuronTable, identify
from .layers import LayersResult, identify_layers

__all__ = [
    "PRESETS",
    "AnalysisOptions",
    "Identification",
    "LayersResult",
    "NeuronTable",
    "RunConfig",
    "analyze",
    "analyze_run_dir",
    "identify",
    "identify_layers",
    "make_config",
]
