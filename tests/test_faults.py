"""Fault injection: damaged caches, killed runs, overwritten and refused run directories.

Each test does to a tiny run what users do to real ones — flip bytes in the cache, kill -9
a run at each stage, overwrite a run, start a run with bad input, share a cache between two
runs — and checks that nothing wrong is published and that a rerun gives the same tables.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fault_fixtures import files, kill_at, manifest, run_args, start, tables
from pipeline_fixtures import tiny_setup
from raretoken.cli import main
from raretoken.run.manifest import read_status
from raretoken.storage import ArrayCache

IDENT_POINTS = ("token_statistics", "sampling", "forward", "ablation", "regimes", "publish")
ANALYSIS_POINTS = ("analyses", "analyses-written")
CACHE_STAGES = ("counts", "sample", "capture", "ablation", "analyses")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, a corpus, and one uninterrupted reference run with its own cache."""
    root = tmp_path_factory.mktemp("faults")
    model_dir, corpus = tiny_setup(root, "gpt2")
    ref = root / "reference"
    assert main(run_args(model_dir, corpus, ref, root / "ref-cache")) == 0
    return {"root": root, "model": model_dir, "corpus": corpus, "ref": ref,
            "ref_cache": root / "ref-cache"}  # fmt: skip


def _args(w: dict[str, Path], out: Path, cache: Path, *extra: str) -> list[str]:
    return run_args(w["model"], w["corpus"], out, cache, *extra)


def _entries(cache: Path, stage: str) -> list[Path]:
    return sorted(p for p in (cache / stage).iterdir() if not p.name.startswith("."))


def _all_entries_verify(cache: Path) -> None:
    c = ArrayCache(cache)
    for stage_dir in cache.iterdir():
        for entry in stage_dir.iterdir():
            if entry.name.startswith("."):  # temporary dirs of killed runs are never read
                continue
            c._verify(entry, stage_dir.name, entry.name)


# ---------------------------------------------------------------------------------- the cache


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage(entry: Path, how: str) -> None:
    payload = sorted(p for p in entry.iterdir() if p.name != "entry.json")
    target = max(payload, key=lambda p: p.stat().st_size)
    if how == "flip":
        _flip_byte(target)
    elif how == "truncate":
        _truncate(target)
    elif how == "no-checksums":
        (entry / "entry.json").unlink()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "truncate", "no-checksums"])
def test_damaged_cache_entries_are_discarded_and_recomputed(
    world: dict[str, Path], tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every kind of entry (counts, samples, captures, Δloss, analyses) damaged at once."""
    cache = tmp_path / "cache"
    shutil.copytree(world["ref_cache"], cache)
    damaged = [e for stage in CACHE_STAGES for e in _entries(cache, stage)]
    assert {e.parent.name for e in damaged} == set(CACHE_STAGES)
    for entry in damaged:
        _damage(entry, how)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="raretoken"):
        assert main(_args(world, out, cache)) == 0
    reports = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(reports) == len(damaged), reports  # each reported once, then recomputed
    assert tables(out) == tables(world["ref"])  # nothing of a damaged entry was published
    _all_entries_verify(cache)  # the recomputed entries replaced the damaged ones
    assert len([e for stage in CACHE_STAGES for e in _entries(cache, stage)]) == len(damaged)


def test_an_edited_number_in_the_cached_analyses_is_never_published(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """The reported case: one digit changed in the cached analyses JSON."""
    cache = tmp_path / "cache"
    shutil.copytree(world["ref_cache"], cache)
    (entry,) = _entries(cache, "analyses")
    payload = entry / "payload.json"
    data = json.loads(payload.read_text())
    edited = json.dumps(data).replace('"d_eff": ', '"d_eff": 9', 1)  # e.g. 8 -> 98
    assert edited != json.dumps(data)
    payload.write_text(edited)
    out = tmp_path / "run"
    assert main(_args(world, out, cache)) == 0
    assert tables(out) == tables(world["ref"])


def test_cache_unit_round_trip_and_verification(tmp_path: Path) -> None:
    cache = ArrayCache(tmp_path)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.save("s", "k1", {"a": a, "b": np.array([1, 2])})
    got = cache.load("s", "k1")
    assert got is not None and np.array_equal(got["a"], a) and got["b"].tolist() == [1, 2]
    mm = cache.load("s", "k1", mmap=True)
    assert mm is not None and isinstance(mm["a"], np.memmap)
    cache.save_json("j", "k2", {"x": [1.5, None]})
    assert cache.load_json("j", "k2") == {"x": [1.5, None]}
    # a damaged file: None, and the entry is gone so that the caller recomputes it
    _flip_byte(tmp_path / "s" / "k1" / "a.npy")
    assert cache.load("s", "k1") is None and not (tmp_path / "s" / "k1").exists()
    # an entry.json copied from another entry is refused too
    cache.save("s", "k3", {"a": a})
    cache.save("s", "k4", {"a": a + 1})
    shutil.copy(tmp_path / "s" / "k3" / "entry.json", tmp_path / "s" / "k4" / "entry.json")
    assert cache.load("s", "k4") is None
    # a writer that never commits leaves nothing that a reader would trust
    with cache.writing("s", "k5") as w:
        w.array("big", (10, 3), np.float32)[:] = 1.0
    assert cache.load("s", "k5") is None
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".tmp-")]
    # no cache: writers hold the arrays in memory
    mem = ArrayCache(None)
    with mem.writing("s", "k") as w:
        w.array("x", (2,), np.int64)[:] = 7
        assert w.commit()["x"].tolist() == [7, 7]
    assert mem.load("s", "k") is None


def test_a_killed_writer_leaves_a_temp_dir_that_the_next_writer_sweeps(tmp_path: Path) -> None:
    cache = ArrayCache(tmp_path)
    stale = tmp_path / "s" / f".tmp-abc-{os.uname().nodename}-999999999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "a.npy").write_bytes(b"half")
    cache.save("s", "k", {"a": np.zeros(2)})
    assert not stale.exists() and cache.load("s", "k") is not None


# ---------------------------------------------------------------------------- killed runs


@pytest.mark.parametrize("point", IDENT_POINTS)
def test_a_run_killed_during_identification_leaves_no_run_directory_and_resumes(
    world: dict[str, Path], tmp_path: Path, point: str
) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = _args(world, out, cache)
    kill_at(args, point, tmp_path)
    assert not out.exists(), "a run directory of a run that never finished"
    staging = [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.staging-")]
    assert len(staging) == (1 if point == "publish" else 0)  # killed while writing: staged only
    assert main(args) == 0  # rerun: resumes from what was cached
    assert manifest(out)["status"] == "complete"
    assert tables(out) == tables(world["ref"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # swept
    _all_entries_verify(cache)


@pytest.mark.parametrize("point", ANALYSIS_POINTS)
def test_a_run_killed_during_the_analyses_says_so(
    world: dict[str, Path], tmp_path: Path, point: str
) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = _args(world, out, cache)
    pid = kill_at(args, point, tmp_path)
    m = manifest(out)
    assert m["status"] == "running"
    assert m["running"]["stage"] == "analyses" and m["running"]["pid"] == pid  # type: ignore[index]
    assert "analyses" not in m["stages"]  # type: ignore[operator]
    assert {"token_statistics", "sampling", "forward", "ablation", "regimes"} <= set(
        m["stages"]  # type: ignore[arg-type]
    )
    assert read_status(out) == "interrupted"
    listed = {o["path"] for o in m["outputs"].values()}  # type: ignore[attr-defined]
    assert not any(p.startswith("analyses/") for p in listed)
    assert main(args) == 0
    assert manifest(out)["status"] == "complete" and read_status(out) == "complete"
    assert tables(out) == tables(world["ref"])


def test_a_run_killed_while_overwriting_leaves_the_earlier_run_whole(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(_args(world, out, cache)) == 0
    before = {rel: (out / rel).read_bytes() for rel in files(out)}
    kill_at(_args(world, out, cache, "--seed", "3", "--overwrite"), "publish", tmp_path)
    assert {rel: (out / rel).read_bytes() for rel in files(out)} == before
    assert read_status(out) == "complete"


def test_interrupt_and_failure_of_the_analyses_are_recorded(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import raretoken.analyses as analyses_pkg

    out, cache = tmp_path / "run", tmp_path / "cache"
    for exc, status, code in ((KeyboardInterrupt(), "interrupted", 130),
                              (RuntimeError("boom"), "failed", None)):  # fmt: skip

        def raise_(*a: object, _exc: BaseException = exc, **k: object) -> None:
            raise _exc

        monkeypatch.setattr(analyses_pkg, "run_analyses", raise_)
        if code is None:
            with pytest.raises(RuntimeError):
                main(_args(world, out, cache))
        else:
            assert main(_args(world, out, cache)) == code
        m = manifest(out)
        assert m["status"] == status, m["status"]
        assert m["error"]["stage"] == "analyses"  # type: ignore[index]
        assert "analyses" not in m["stages"]  # type: ignore[operator]
    monkeypatch.undo()
    assert main(_args(world, out, cache)) == 0
    assert manifest(out)["status"] == "complete" and "error" not in manifest(out)


# ------------------------------------------------------------------ run-directory contents


def test_an_overwritten_run_directory_holds_exactly_the_new_run(
    world: dict[str, Path], tmp_path: Path
) -> None:
    cache = world["ref_cache"]
    out = tmp_path / "run"
    assert main(_args(world, out, cache, "--robustness", "--percentiles", "10,20")) == 0
    assert "analyses/robustness.csv" in files(out)
    # another configuration, no routing, no robustness: exactly what a fresh run writes
    new = ("--n-windows", "12", "--no-routing", "--overwrite")
    assert main(_args(world, out, cache, *new)) == 0
    fresh = tmp_path / "fresh"
    assert main(_args(world, fresh, cache, *new[:-1])) == 0
    assert files(out) == files(fresh)
    assert not any("routing" in f or "robustness" in f for f in files(out))
    m = manifest(out)
    assert {o["path"] for o in m["outputs"].values()} <= files(out)  # type: ignore[attr-defined]


def test_analyze_without_routing_removes_the_earlier_routing_files(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(world["ref"], out)
    assert "analyses/routing.csv" in files(out)
    rc = main(["analyze", str(out), "--no-routing", "--no-progress",
               "--cache-dir", str(world["ref_cache"])])  # fmt: skip
    assert rc == 0
    assert not any("routing" in f for f in files(out))
    listed = {o["path"] for o in manifest(out)["outputs"].values()}  # type: ignore[attr-defined]
    assert listed <= files(out)


# ------------------------------------------------------------------------------ bad input


def _unwritable_dir(tmp_path: Path) -> Path | None:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        return d / "sub"
    probe = Path("/sys/raretoken-probe")
    try:
        probe.mkdir()
    except OSError:
        return probe
    probe.rmdir()
    return None


def _bad_inputs(w: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    a_file = tmp / "a-file"
    a_file.write_text("x")
    degenerate = tmp / "same.txt"
    degenerate.write_text("the cat sat on the mat.\n" * 2000)
    cases = {
        "missing model": (["--model", str(tmp / "no-model")], "no-model"),
        "missing corpus": (["--corpus", str(tmp / "no-corpus.txt")], "no-corpus"),
        "bad percentile": (["--percentile", "150"], "percentile"),
        "cache is a file": (["--cache-dir", str(a_file / "cache")], "a-file"),
        "degenerate corpus": (["--corpus", str(degenerate)], "corpus"),
    }
    ro = _unwritable_dir(tmp)
    if ro is not None:
        cases["unwritable cache"] = (["--cache-dir", str(ro)], str(ro))
    return cases


def test_bad_input_leaves_no_run_directory_and_the_corrected_command_runs(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    cache = world["ref_cache"]
    for name, (extra, needle) in _bad_inputs(world, tmp_path).items():
        rc = main([*_args(world, out, cache), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("error:")]
        assert rc != 0, name
        assert len(errors) == 1 and needle in errors[0], (name, err)
        assert not any("Traceback" in line for line in err), name
        assert not out.exists(), f"{name} left a run directory"
    assert main(_args(world, out, cache)) == 0  # the corrected command is not refused
    assert tables(out) == tables(world["ref"])


def test_an_unusable_output_place_is_a_one_line_error(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    places = {"out is a file": a_file, "out below a file": a_file / "run"}
    ro = _unwritable_dir(tmp_path)
    if ro is not None:
        places["unwritable out"] = ro
    for name, out in places.items():
        rc = main(_args(world, out, world["ref_cache"]))
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert rc != 0 and len(err) == 1, (name, err)
        assert "--out" in err[0], (name, err)
    assert a_file.read_text() == "x"


# ------------------------------------------------------------------------ concurrent runs


def test_two_runs_sharing_one_cache(world: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [
        start(_args(world, tmp_path / f"run{i}", cache), log=tmp_path / f"log{i}.txt")
        for i in range(2)
    ]
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"log{i}.txt").read_text()[-2000:]
    assert tables(tmp_path / "run0") == tables(tmp_path / "run1") == tables(world["ref"])
    _all_entries_verify(cache)
    assert main(_args(world, tmp_path / "run2", cache)) == 0  # and the cache serves a third
    assert tables(tmp_path / "run2") == tables(world["ref"])
