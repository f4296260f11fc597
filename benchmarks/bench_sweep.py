"""Sweep overhead, the Ray executor against the local one, overlap and memory, side by side.

Builds ``--n-tasks`` checkpoints of one small Llama-architecture model (random weights, seed =
checkpoint number, width ``--width``, the tiny test tokenizer; ``save_pretrained`` into
``checkpoint-<k>`` directories) and a synthetic corpus, or with ``--model embedded`` uses the
embedded SmolLM2 model on the embedded corpus with one task per seed. Every measurement runs
in a fresh subprocess with fresh run and cache directories, so each sweep does the same work.
Prints:

* ``local``: (torch limited to ``--local-threads`` threads, default 1 as in a 1-CPU Ray task,
  so that the executors, not the thread counts, are compared) the sweep's wall time, the tasks' own time (sum of each task's identify + analyze
  seconds), and the sweep overhead (wall - tasks) as % of the tasks' time (target < 5 %);
* ``ray``: the local cluster's start time; the same sweep under Ray with ``--workers`` tasks
  at once on cold workers (first use) and again on warm workers; the ratio of its wall time to
  the local one; the scheduling overhead per task (``max_parallel=1`` on warm workers:
  (wall - tasks) / n; target < 1 s); the largest overlap of two tasks' [start, end] intervals
  from ``sweep_manifest.json`` (two workers running at once);
* shared work (token statistics and windows computed / reused, distinct tokenizers);
* ``memory``: for N = ``--mem-n`` checkpoints (default 2 and 6), the peak RSS of the driver
  (local) and of the driver + Ray worker processes (sum, sampled every 50 ms from ``/proc``;
  shared library pages are counted once per process), and the largest single worker. A sweep
  holds at most one model per worker, so these should not grow with N.

    python benchmarks/bench_sweep.py                           # small checkpoints, ~5 min
    python benchmarks/bench_sweep.py --n-tasks 4 --width 512 --mem-n 2,6
    python benchmarks/bench_sweep.py --model embedded --n-tasks 3 --n-windows 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_MIB = 2**20


# -- processes and their memory (Linux /proc) -------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str, int]]:
    """``pid -> (ppid, name, rss bytes)`` of every readable process."""
    page = os.sysconf("SC_PAGE_SIZE")
    out: dict[int, tuple[int, str, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            rss = int(Path(f"/proc/{d}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        out[int(d)] = (ppid, name, rss)
    return out


class RssSampler(threading.Thread):
    """Peaks of this process + its Ray workers (``ray::*``) and of all its descendants."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_workers = 0  # driver + ray::* worker processes
        self.peak_all = 0  # driver + every descendant (raylet, gcs, workers, ...)
        self.peak_single = 0  # the largest single worker
        self._halt = threading.Event()

    def sample(self) -> None:
        table = _proc_table()
        me = os.getpid()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        tree, stack = [], [me]
        while stack:
            pid = stack.pop()
            tree.append(pid)
            stack.extend(children.get(pid, []))
        workers = [p for p in tree if p != me and table.get(p, (0, "", 0))[1].startswith("ray::")]
        own = table.get(me, (0, "", 0))[2]
        self.peak_workers = max(self.peak_workers, own + sum(table[p][2] for p in workers))
        self.peak_all = max(self.peak_all, sum(table[p][2] for p in tree if p in table))
        self.peak_single = max([self.peak_single, *(table[p][2] for p in workers)])

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


# -- the sweeps ---------------------------------------------------------------------------------


def make_inputs(root: Path, args: argparse.Namespace, n: int) -> Path:
    """A sweep file of ``n`` tasks (checkpoints, or seeds of the embedded model)."""
    sys.path.insert(0, str(ROOT / "tests"))
    lines = ["[analysis]", "routing = false", ""]
    if args.model == "embedded":
        shared = {"corpus": "embedded", "sampling": "windows", "n_windows": args.n_windows,
                  "window_len": args.window_len, "n_boot": 20, "n_random_groups": 10}  # fmt: skip
        for k in range(n):
            lines += ["[[models]]", 'model = "embedded"', f'name = "embedded-s{k}"', f"seed = {k}"]
    else:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        from pipeline_fixtures import tiny_overrides, write_corpus
        from tiny import tiny_tokenizer

        hf_logging.disable_progress_bar()
        write_corpus(root / "corpus.jsonl")
        shared = tiny_overrides(root, root / "corpus.jsonl")
        shared.update(n_windows=args.n_windows, window_len=args.window_len)
        del shared["model"]
        cfg = LlamaConfig(vocab_size=300, hidden_size=args.width, intermediate_size=4 * args.width,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                          max_position_embeddings=max(128, args.window_len + 1))  # fmt: skip
        ckpts = root / f"ckpts-{n}"  # the N checkpoints (links into one store)
        for k in range(n):
            path = root / "store" / f"checkpoint-{k}"
            if not path.exists():
                torch.manual_seed(k)
                LlamaForCausalLM(cfg).save_pretrained(path)
                tiny_tokenizer().save_pretrained(path)
            ckpts.mkdir(exist_ok=True)
            (ckpts / path.name).symlink_to(path, target_is_directory=True)
        lines += ["[[models]]", f'model = "{ckpts}"', 'revisions = ["checkpoint-*"]']
    head = [f"{k} = {json.dumps(v)}" for k, v in shared.items()]
    path = root / f"sweep-{n}.toml"
    path.write_text("\n".join([*head, "", *lines, ""]))
    return path


def _sweep(sweep_file: Path, work: Path, tag: str, **kw: Any) -> dict[str, Any]:
    from raretoken.sweep import load_sweep, run_sweep

    spec = load_sweep(sweep_file)
    t0 = time.perf_counter()
    res = run_sweep(spec, work / f"out-{tag}", cache_dir=work / f"cache-{tag}", **kw)
    wall = time.perf_counter() - t0
    sm = json.loads((work / f"out-{tag}" / "sweep_manifest.json").read_text())
    tasks = sm["tasks"]
    overlap = max(
        [min(a["ended_at"], b["ended_at"]) - max(a["started_at"], b["started_at"])
         for i, a in enumerate(tasks) for b in tasks[i + 1 :]] or [0.0]
    )  # fmt: skip
    assert res.ok, [t.error for t in res.tasks]
    return {"wall": wall, "tasks": sum(t.seconds for t in res.tasks), "n": len(res.tasks),
            "overlap": overlap, "shared": sm["shared_work"],
            "pids": sorted({t["pid"] for t in tasks})}  # fmt: skip


def child(mode: str, sweep_file: Path, work: Path, workers: int) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import raretoken.sweep  # noqa: F401 - imports before the clock starts
    from raretoken.sweep.executors import RayExecutor

    out: dict[str, Any] = {}
    sampler = RssSampler()
    if mode == "local":
        sampler.start()
        out["local"] = _sweep(sweep_file, work, "local")
    else:
        t0 = time.perf_counter()
        with RayExecutor(num_cpus=workers) as _:
            out["ray_start"] = time.perf_counter() - t0
            sampler.start()
            kw = {"executor": "ray", "max_parallel": workers}
            if mode == "ray":
                out["ray_cold"] = _sweep(sweep_file, work, "ray-cold", **kw)
                out["ray_warm"] = _sweep(sweep_file, work, "ray-warm", **kw)
                out["ray_serial"] = _sweep(sweep_file, work, "ray-serial", executor="ray",
                                           max_parallel=1)  # fmt: skip
            else:
                out["ray"] = _sweep(sweep_file, work, "ray-mem", **kw)
            sampler.stop()
    if sampler.is_alive():
        sampler.stop()
    out["rss"] = {"workers": sampler.peak_workers, "all": sampler.peak_all,
                  "single": sampler.peak_single}  # fmt: skip
    return out


def _run_child(args: argparse.Namespace, mode: str, sweep_file: Path, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--sweep-file", str(sweep_file), "--work",
           str(work), "--workers", str(args.workers)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    if mode == "local" and args.local_threads > 0:  # as Ray's 1-CPU tasks: OMP_NUM_THREADS=1
        env["OMP_NUM_THREADS"] = str(args.local_threads)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"{mode} measurement failed (exit {res.returncode})")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def _pct(over: float, base: float) -> str:
    return f"{100 * over / base:.1f} %" if base > 0 else "-"


def timing(args: argparse.Namespace, root: Path) -> None:
    """The local sweep, then the same sweep under Ray (cold, warm, serial); printed."""
    sweep_file = make_inputs(root, args, args.n_tasks)
    local = _run_child(args, "local", sweep_file, root / "local")["local"]
    ray = _run_child(args, "ray", sweep_file, root / "ray")
    over = local["wall"] - local["tasks"]
    print(f"local: wall {local['wall']:.2f} s, tasks {local['tasks']:.2f} s, "
          f"overhead {over:.2f} s = {_pct(over, local['tasks'])} of the tasks' time "
          f"({over / local['n']:.3f} s per task)")  # fmt: skip
    print(f"ray:   local cluster started in {ray['ray_start']:.2f} s")
    for key, label in (("ray_cold", "cold workers"), ("ray_warm", "warm workers")):
        r = ray[key]
        print(f"ray:   {label}, max_parallel {args.workers}: wall {r['wall']:.2f} s "
              f"(ray / local = {r['wall'] / local['wall']:.2f}), tasks {r['tasks']:.2f} s, "
              f"largest overlap of two tasks {r['overlap']:.2f} s, "
              f"{len(r['pids'])} worker pids")  # fmt: skip
    s = ray["ray_serial"]
    print(f"ray:   warm, max_parallel 1: wall {s['wall']:.2f} s (ray / local = "
          f"{s['wall'] / local['wall']:.2f}), tasks {s['tasks']:.2f} s, scheduling overhead "
          f"{(s['wall'] - s['tasks']) / s['n']:.3f} s per task (local: "
          f"{over / local['n']:.3f} s)")  # fmt: skip
    print(f"shared work: local {local['shared']}; ray {ray['ray_warm']['shared']}")


def memory(args: argparse.Namespace, root: Path) -> None:
    """Peak RSS of the local driver and of the Ray driver + workers for each N; printed."""
    for n in (int(x) for x in args.mem_n.split(",")):
        f = make_inputs(root, args, n)
        m_local = _run_child(args, "local", f, root / f"mem-local-{n}")["rss"]
        m_ray = _run_child(args, "ray-mem", f, root / f"mem-ray-{n}")["rss"]
        print(f"memory N={n}: local driver peak {m_local['workers'] / _MIB:.0f} MiB; ray "
              f"driver+workers peak {m_ray['workers'] / _MIB:.0f} MiB (largest worker "
              f"{m_ray['single'] / _MIB:.0f} MiB; with raylet/gcs "
              f"{m_ray['all'] / _MIB:.0f} MiB)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=("tiny", "embedded"))
    p.add_argument("--n-tasks", type=int, default=4, help="tasks of the timing sweeps")
    p.add_argument("--mem-n", default="2,6", help="checkpoint counts of the memory sweeps")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (local cluster CPUs)")
    p.add_argument("--width", type=int, default=256, help="d_model of the checkpoints (tiny)")
    p.add_argument("--n-windows", type=int, default=8)
    p.add_argument("--window-len", type=int, default=64)
    p.add_argument(
        "--local-threads",
        type=int,
        default=1,
        help="torch threads of the local sweep (default 1, as in a 1-CPU Ray task; 0: torch's)",
    )
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--sweep-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        res = child(args.child, args.sweep_file, args.work, args.workers)
        sys.stdout.write(json.dumps(res) + "\n")
        return
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        print(f"model {args.model}" + (f" (width {args.width})" if args.model == "tiny" else "")
              + f", {args.n_tasks} tasks, {args.n_windows}x{args.window_len} windows, "
              f"{args.workers} Ray workers, {os.cpu_count()} cores, local torch threads "
              f"{args.local_threads or 'default'}")  # fmt: skip
        if not args.skip_timing:
            timing(args, Path(tmp))
        if not args.skip_memory:
            memory(args, Path(tmp))


if __name__ == "__main__":
    main()
