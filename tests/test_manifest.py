"""Provenance helpers of the manifest: the git commit is read without taking locks, and only
from raretoken's own checkout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

import raretoken.run.manifest as manifest_mod


def test_git_is_asked_without_optional_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], dict[str, str]]] = []
    real = subprocess.run

    def spy(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append((cmd, kw.get("env") or {}))
        return real(cmd, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(manifest_mod.subprocess, "run", spy)
    commit = manifest_mod.git_commit()
    assert calls, "git was not asked"
    for cmd, env in calls:
        assert cmd[:2] == ["git", "--no-optional-locks"], cmd
        assert env.get("GIT_OPTIONAL_LOCKS") == "0"
    assert any("status" in cmd for cmd, _ in calls) == (commit is not None)


def test_commit_of_this_checkout() -> None:
    here = Path(manifest_mod.__file__).resolve()
    if not (here.parents[3] / ".git").exists():
        pytest.skip("raretoken is not running from its checkout")
    commit = manifest_mod.git_commit()
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)


def test_an_installed_copy_inside_another_repository_reports_no_commit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """raretoken installed into a user's repository (e.g. its .venv) must not report the
    user's commit as its own."""
    asked: list[list[str]] = []

    def fake_git(args: list[str], cwd: Path) -> str | None:
        asked.append(args)
        return str(tmp_path) if args[0] == "rev-parse" and "--show-toplevel" in args else "x" * 40

    monkeypatch.setattr(manifest_mod, "_git", fake_git)
    assert manifest_mod.git_commit() is None
    assert asked == [["rev-parse", "--show-toplevel"]]  # HEAD and status were never asked
