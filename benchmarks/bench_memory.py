"""Peak memory of identification at 1×, 2× and 8× the scored positions, side by side.

Runs :func:`raretoken.run.identify` (by default on the embedded SmolLM2-135M model, the
embedded corpus, ``--n-boot 0``, no analyses) once per size, each in a fresh subprocess, and
prints per size:

* ``peak RSS``: the process's high-water mark (``getrusage`` ``ru_maxrss``, = ``VmHWM``). It
  counts the pages of memory-mapped files the run wrote or read (file-backed, reclaimable) as
  well as its own memory;
* ``outputs``: the bytes of the arrays the run produces (Δloss and the captured activations,
  residuals, block inputs and base losses), and ``peak RSS - outputs``, which should stay flat;
* ``peak anon``: the high-water mark of anonymous memory (``RssAnon`` of
  ``/proc/self/status``, sampled every 10 ms): what the run holds in RAM apart from
  memory-mapped files. With the cache (the default) the outputs live in memory-mapped cache
  entries, so this should stay flat by itself;

and the ratio of each to the smallest size. ``--modes`` chooses what is measured: ``stream``
(the default run: cache on, arrays streamed into memory-mapped entries) and ``no-cache``
(``no_cache=True``: the same chunked code, arrays held in memory). ``--baseline-src DIR`` adds
``baseline``: the same runs with the package imported from ``DIR`` (e.g. ``git archive`` of an
older commit's ``src``), to compare with code that held everything in memory.

Token counts are computed once, before the measured runs, and copied into each run's fresh
cache, so every measured run computes its capture and ablation.

    python benchmarks/bench_memory.py --n-windows 2,4,16            # 1×, 2×, 8× of 1,024 positions
    python benchmarks/bench_memory.py --n-windows 2,4,16 --modes stream,no-cache \\
        --baseline-src /tmp/raretoken-old/src
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_MIB = 2**20


def _status() -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` of this process in bytes (Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


class _Sampler(threading.Thread):
    """Peak of each ``/proc/self/status`` field, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.trace: list[tuple[float, int]] = []  # (wall time, RssAnon)
        self._halt = threading.Event()

    def sample(self) -> None:
        status = _status()
        for k, v in status.items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        self.trace.append((time.time(), status.get("RssAnon", 0)))

    def stage_peaks(self, stages: dict[str, Any]) -> dict[str, int]:
        """Peak RssAnon within each stage of the manifest (its ``finished`` time has
        one-second resolution), and ``write`` after the last stage."""
        import datetime as dt

        out: dict[str, int] = {}
        last = 0.0
        for name, info in stages.items():
            try:
                end = dt.datetime.fromisoformat(info["finished"]).timestamp() + 1.0
                start = end - float(info["seconds"]) - 1.0
            except (KeyError, TypeError, ValueError):
                continue
            out[name] = max((a for t, a in self.trace if start <= t <= end), default=0)
            last = max(last, end)
        if last:
            out["write"] = max((a for t, a in self.trace if t >= last), default=0)
        return out

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        self.sample()
        return self.peak


def _config(args: argparse.Namespace, n_windows: int) -> Any:
    from raretoken.run import make_config

    return make_config(
        overrides={
            "model": args.model,
            "corpus": args.corpus,
            "n_windows": n_windows,
            "window_len": args.window_len,
            "n_boot": args.n_boot,
            "percentile": args.percentile,
            "method": args.method,
            "device": "cpu",
        }
    )


def _child(args: argparse.Namespace) -> int:
    """One measured run (or the warm-up); prints one JSON line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    import raretoken.run.stages as stages_mod
    from raretoken.run import identify

    cfg = _config(args, args.child_windows)
    if args.warm:
        from raretoken.storage import ArrayCache

        stages_mod.Stages(cfg, ArrayCache(Path(args.cache_dir)), progress=False).token_counts()
        print(json.dumps({"warm": True}))
        return 0
    if args.chunk_positions and hasattr(stages_mod, "CHUNK_POSITIONS"):
        stages_mod.CHUNK_POSITIONS = args.chunk_positions
    sampler = _Sampler()
    base = _status()
    sampler.start()
    t = time.perf_counter()
    res = identify(
        cfg,
        args.out_dir,
        cache_dir=args.cache_dir,
        no_cache=args.no_cache,
        progress=False,
    )
    seconds = time.perf_counter() - t
    peak = sampler.stop()
    try:
        manifest = json.loads((Path(args.out_dir) / "manifest.json").read_text())
        stage_info = manifest.get("stages", {})
    except (OSError, ValueError):
        stage_info = {}
    stages = {k: v.get("seconds") for k, v in stage_info.items()}
    outputs = {
        name: int(getattr(res, name).nbytes)
        for name in ("delta", "acts", "resid", "base_loss", "block_input")
        if getattr(res, name) is not None
    }
    print(
        json.dumps(
            {
                "n_positions": int(res.delta.shape[0]),
                "outputs": outputs,
                "memmapped": sorted(
                    n for n in outputs if type(getattr(res, n)).__name__ == "memmap"
                ),
                "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak": peak,
                "before": base,
                "seconds": seconds,
                "stages": stages,
                "stage_peak_anon": sampler.stage_peaks(stage_info),
            }
        )
    )
    return 0


def _run_child(
    args: argparse.Namespace, n_windows: int, cache: Path, out: Path, extra: list[str],
    src: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    cmd = [
        sys.executable, __file__, "--child", "--child-windows", str(n_windows),
        "--cache-dir", str(cache), "--out-dir", str(out), "--model", args.model,
        "--corpus", args.corpus, "--window-len", str(args.window_len),
        "--n-boot", str(args.n_boot), "--percentile", str(args.percentile),
        "--method", args.method,
        "--chunk-positions", str(args.chunk_positions or 0), *extra,
    ]  # fmt: skip
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        # glibc otherwise raises its mmap threshold after large frees and keeps freed chunks in
        # its heap: the retained memory varies from run to run and blurs the comparison
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if src is not None:
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run with {n_windows} windows failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n-windows", default="2,4,16",
                    help="comma-separated window counts; the first is 1x (default 2,4,16)")  # fmt: skip
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--corpus", default="embedded")
    ap.add_argument("--n-boot", type=int, default=0)
    ap.add_argument("--percentile", type=float, default=50.0,
                    help="rare-token percentile (default 50: enough rare targets in 2 windows)")  # fmt: skip
    ap.add_argument("--method", default="fast")
    ap.add_argument("--chunk-positions", type=int, default=None,
                    help="positions per ablation chunk (default: the stage's default)")  # fmt: skip
    ap.add_argument("--modes", default="stream", help="comma-separated: stream, no-cache")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="fixed glibc mmap threshold for the runs (e.g. 1048576): freed "
                    "tensors go back to the system at once, so peaks show held data, not "
                    "what the allocator happened to retain")  # fmt: skip
    ap.add_argument("--baseline-src", default=None,
                    help="also measure the package imported from this src directory")  # fmt: skip
    ap.add_argument("--work-dir", default=None, help="where the caches go (default: a temp dir)")
    # internal: one measured run
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-windows", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)

    sizes = [int(x) for x in args.n_windows.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs: list[tuple[str, list[str], str | None]] = []
    for m in modes:
        if m not in ("stream", "no-cache"):
            ap.error(f"unknown mode {m!r}")
        runs.append((m, ["--no-cache"] if m == "no-cache" else [], None))
    if args.baseline_src:
        runs.append(("baseline", [], str(Path(args.baseline_src).resolve())))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raretoken-bench-mem-"))
    warm = work / "warm-cache"
    t0 = time.perf_counter()
    _run_child(args, sizes[0], warm, work / "unused", ["--warm"])
    results: dict[str, list[dict[str, Any]]] = {}
    for mode, extra, src in runs:
        for n in sizes:
            cache = work / f"cache-{mode}-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(warm, cache)
            out = work / f"run-{mode}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            r = _run_child(args, n, cache, out, extra, src)
            results.setdefault(mode, []).append(dict(r, n_windows=n))
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)

    w = sys.stdout.write
    w(f"model {args.model}, corpus {args.corpus}, window_len {args.window_len}, method "
      f"{args.method}, n_boot {args.n_boot}, percentile {args.percentile:g}, "
      f"{os.cpu_count()} CPUs, malloc mmap threshold {args.malloc_mmap_threshold or 'glibc default'}, "
      f"ablation chunk {args.chunk_positions or 'default'}; total {time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    w("peak RSS = getrusage ru_maxrss (counts touched pages of memory-mapped files); "
      "peak anon = high-water mark of RssAnon (memory not backed by files)\n\n")  # fmt: skip
    head = (f"{'mode':<9} {'windows':>7} {'positions':>9} {'outputs':>8} {'peak RSS':>9} "
            f"{'RSS-out':>8} {'ratio':>6} {'peak anon':>9} {'ratio':>6} {'anon-out':>8} "
            f"{'ratio':>6} {'time':>7}\n")  # fmt: skip
    w(head)
    w("-" * (len(head) - 1) + "\n")
    for mode, rows in results.items():
        first: dict[str, float] = {}
        for r in rows:
            outputs = sum(r["outputs"].values())
            rss = r["ru_maxrss"]
            anon = r["peak"].get("RssAnon", 0)
            vals = {"rss": rss - outputs, "anon": anon, "anon_out": anon - outputs}
            first = first or vals
            w(f"{mode:<9} {r['n_windows']:>7} {r['n_positions']:>9} {outputs / _MIB:>7.0f}M "
              f"{rss / _MIB:>8.0f}M {vals['rss'] / _MIB:>7.0f}M {vals['rss'] / first['rss']:>6.2f} "
              f"{anon / _MIB:>8.0f}M {vals['anon'] / first['anon']:>6.2f} "
              f"{vals['anon_out'] / _MIB:>7.0f}M {vals['anon_out'] / first['anon_out']:>6.2f} "
              f"{r['seconds']:>6.0f}s\n")  # fmt: skip
    for mode, rows in results.items():
        mm = ", ".join(rows[0]["memmapped"]) or "none"
        w(f"\n{mode}: memory-mapped outputs: {mm}")
        for r in rows:
            st = ", ".join(f"{k} {v:.0f}s" for k, v in r["stages"].items() if v is not None)
            pk = ", ".join(f"{k} {v / _MIB:.0f}M" for k, v in r["stage_peak_anon"].items())
            w(f"\n  {r['n_windows']} windows: {st}\n    peak anon by stage: {pk}")
    w("\n\nMiB; ratios are to the smallest size. outputs = Δloss + captured arrays "
      "(activations, residuals, block inputs, base losses).\n")  # fmt: skip
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
