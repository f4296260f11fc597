"""Interventions on a finished run's neuron group: ``raretoken intervene RUN_DIR``.

Sits above :mod:`raretoken.run`: it reads a run directory and reloads the model and the scored
windows through the run's (cached) stages. See :func:`intervene`.
"""

from .core import (
    Condition,
    ConditionRow,
    InterventionResult,
    check_factors,
    intervene,
    parse_factors,
    parse_neurons,
)
from .hooks import (
    frequent_null_projector,
    null_space_projector,
    scale_group,
    scale_group_null,
    scored_metrics,
)
from .loading import read_run
from .outputs import write_interventions

__all__ = [
    "Condition",
    "ConditionRow",
    "InterventionResult",
    "check_factors",
    "frequent_null_projector",
    "intervene",
    "null_space_projector",
    "parse_factors",
    "parse_neurons",
    "read_run",
    "scale_group",
    "scale_group_null",
    "scored_metrics",
    "write_interventions",
]
