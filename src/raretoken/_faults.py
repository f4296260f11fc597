"""Named pause points for the fault-injection tests (inactive unless the tests enable them).

``checkpoint(name)`` does nothing unless the environment variable ``RARETOKEN_PAUSE_AT``
equals ``name``. Then it writes this process's id to the file named by
``RARETOKEN_PAUSE_FILE`` and waits, so that a test can kill the process (``kill -9``) at a
known point of a run and check what the run directory and the cache hold afterwards.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV_AT = "RARETOKEN_PAUSE_AT"
ENV_FILE = "RARETOKEN_PAUSE_FILE"


def checkpoint(name: str) -> None:
    if os.environ.get(ENV_AT) != name:
        return
    marker = os.environ.get(ENV_FILE)
    if marker:
        Path(marker).write_text(f"{os.getpid()}\n")
    while True:  # pragma: no cover - ended by the test's kill
        time.sleep(0.2)
