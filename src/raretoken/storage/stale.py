"""Names of temporary files and directories that record their owner, so that what a killed
process left behind can be told from what a live one is still writing."""

from __future__ import annotations

import os
import socket
import uuid


def owner_tag() -> str:
    """``<host>-<pid>-<random>``: unique, and tells which process made the name."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(tag: str) -> bool:
    """Whether the owner of ``tag`` (:func:`owner_tag`) was a process of this host that is gone.

    Names of other hosts (a cache on a shared file system) are never called stale.
    """
    parts = tag.split("-")
    try:
        pid = int(parts[-2])
    except (IndexError, ValueError):
        return False
    return "-".join(parts[:-2]) == socket.gethostname() and not pid_alive(pid)
