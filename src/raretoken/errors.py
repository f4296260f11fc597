"""User-facing errors.

Every error a user can cause by bad input is a :class:`RareTokenError`. The CLI prints
``error: <message>`` on one line and exits with :attr:`RareTokenError.exit_code`; the
traceback is shown only with ``--debug``.
"""

from __future__ import annotations


class RareTokenError(Exception):
    """Base class of all errors caused by the user's input or environment."""

    exit_code: int = 2


class ConfigError(RareTokenError):
    """An invalid configuration value (percentile out of range, window too long...)."""


class ModelLoadError(RareTokenError):
    """A model or tokenizer that cannot be loaded (missing, offline, corrupt)."""


class UnsupportedArchitectureError(RareTokenError):
    """A model whose architecture has no adapter."""


class TokenizerMismatchError(RareTokenError):
    """A tokenizer whose vocabulary does not fit the model's embedding."""


class CorpusError(RareTokenError):
    """An empty, missing or unreadable corpus."""


class InsufficientDataError(RareTokenError):
    """Too few positions, tokens or neurons for the requested analysis."""


class NumericalError(RareTokenError):
    """NaN or infinite values where finite numbers are required."""


class RunDirectoryError(RareTokenError):
    """A run directory that holds a different run, or an older schema."""


class StorageError(RareTokenError):
    """A place raretoken must write (run directory, cache) that is not writable."""
