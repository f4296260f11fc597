"""raretoken: find and characterise rare-token neurons in causal language models."""

from __future__ import annotations

__version__ = "0.1.0"
