"""Executors of a sweep's tasks: ``local`` (in-process, one after another) and ``ray``.

Both run the same task function (:func:`raretoken.sweep.tasks.run_task`) and hand each
outcome to the driver as soon as the task finishes, which records it in
``sweep_manifest.json``; what finished is never lost to a Ctrl-C or a dead worker.

``ray`` submits one Ray Core task per sweep task (no scheduler of our own): a task asks for
``num_gpus=1`` when its configuration's ``device`` is ``"cuda"`` and ``cpus_per_task`` CPUs
(default 1); at most ``max_parallel`` tasks are in flight; a task whose worker dies is retried
up to ``max_retries`` times (an exception inside a task is a recorded failure, never retried).

Where Ray runs
    Without ``address`` a local cluster is started (``ray.init(num_cpus=...)``, no dashboard,
    a small object store) and shut down at the end; its workers use this interpreter, so they
    import the same raretoken. With ``address`` (``"auto"``, ``"HOST:PORT"`` or
    ``"ray://HOST:PORT"``, the latter needing ``ray[client]``) an existing cluster is used.
    Without ``address`` but with the environment variable ``RAY_ADDRESS`` set, Ray itself would
    join that cluster: the executor says so in the log, uses it as ``address`` (checked for
    reachability like one given) and records it in the sweep manifest.
    Every node must have the same raretoken installed and see the sweep directory (and the
    models and corpora) at the same paths: a shared file system. For example::

        ray start --head --num-cpus 8                     # on the head node
        ray start --address HEAD:6379                     # on every other node
        raretoken sweep sweep.toml --executor ray --address auto --out /shared/sweeps/pythia

    On SLURM, start the head in the first node of the allocation and the workers with
    ``srun --nodes=$((SLURM_JOB_NUM_NODES-1)) --exclude=$HEAD ray start --address $HEAD:6379
    --block &``, then run the sweep on the head with ``--address auto``. With ``--device cuda``
    each task holds one GPU; ``device = "auto"`` counts as a CPU task (Ray hides the GPUs of
    tasks that did not ask for one).
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from ..errors import ConfigError
from .records import TaskResult

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
RAY_HINT = "pip install 'raretoken[ray]'"
#: Object store of a local cluster: tasks exchange only small records.
OBJECT_STORE_BYTES = 256 << 20


@dataclass(frozen=True)
class Job:
    """One task to run: its position and name in the sweep, its device, and the keyword
    arguments of the task function."""

    index: int
    name: str
    device: str
    kwargs: dict[str, Any]


TaskFn = Callable[..., TaskResult]
OnResult = Callable[[Job, TaskResult], None]
OnError = Callable[[Job, BaseException, str], TaskResult]


class Executor(Protocol):
    name: str

    def settings(self) -> dict[str, Any]: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...

    def check(self, jobs: Sequence[Job]) -> None: ...

    def run(
        self, fn: TaskFn, jobs: Sequence[Job], on_result: OnResult, on_error: OnError
    ) -> None: ...


class LocalExecutor:
    """One task after another in this process (one model in memory at a time)."""

    name = "local"

    def settings(self) -> dict[str, Any]:
        return {"executor": self.name, "address": None, "max_parallel": 1,
                "cpus_per_task": None, "max_retries": 0}  # fmt: skip

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def check(self, jobs: Sequence[Job]) -> None:
        return None

    def run(self, fn: TaskFn, jobs: Sequence[Job], on_result: OnResult, on_error: OnError) -> None:
        for job in jobs:
            on_result(job, fn(**job.kwargs))


def import_ray() -> ModuleType:
    """The ``ray`` module, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"the ray executor needs Ray, which is not installed: {RAY_HINT}"
        ) from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse quickly an address nothing listens on (Ray itself would wait for minutes)."""
    target = _host_port(address)
    if address == "auto":
        try:  # the address 'auto' stands for (RAY_ADDRESS or the last started cluster)
            from ray._private.services import canonicalize_bootstrap_address

            found = canonicalize_bootstrap_address("auto")
        except Exception:  # a private API: leave the lookup to ray.init
            found = None
        target = _host_port(found) if isinstance(found, str) else None
    elif target is None:
        raise ConfigError(f"Ray address {address!r} is not 'auto', HOST:PORT or ray://HOST:PORT")
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address!r} ({target[0]}:{target[1]}: "
            f"{exc.strerror or exc}); start one with `ray start --head` or omit --address"
        ) from None


def _call(fn: TaskFn, kwargs: dict[str, Any]) -> TaskResult:
    """The body of a Ray task (runs in a worker)."""
    return fn(**kwargs)


class RayExecutor:
    """Ray Core tasks on a local or existing cluster (see the module's docstring)."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        max_parallel: int | None = None,
        cpus_per_task: float = 1.0,
        max_retries: int = 2,
        num_cpus: int | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        if max_parallel is not None and max_parallel < 1:
            raise ConfigError(f"max_parallel must be at least 1, got {max_parallel}")
        if not cpus_per_task > 0:
            raise ConfigError(f"cpus_per_task must be positive, got {cpus_per_task}")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be 0 or more, got {max_retries}")
        if num_cpus is not None and num_cpus < 1:
            raise ConfigError(
                f"num_cpus of the local Ray cluster must be at least 1, got {num_cpus}"
            )
        env = os.environ.get("RAY_ADDRESS", "").strip()
        #: where ``address`` came from: the caller, the RAY_ADDRESS variable, or none (local)
        self.address_source = (
            "argument" if address is not None else ("RAY_ADDRESS" if env else None)
        )
        self.address = address if address is not None else (env or None)
        self.max_parallel = max_parallel
        self.cpus_per_task = float(cpus_per_task)
        self.max_retries = max_retries
        self.num_cpus = num_cpus
        self.connect_timeout = connect_timeout
        self._ray: ModuleType | None = None
        self._started = False

    def settings(self) -> dict[str, Any]:
        return {"executor": self.name, "address": self.address,
                "address_source": self.address_source, "max_parallel": self.max_parallel,
                "cpus_per_task": self.cpus_per_task, "max_retries": self.max_retries}  # fmt: skip

    def resources(self, job: Job) -> dict[str, Any]:
        """Ray options of ``job``'s task: its CPUs and GPU, and retries on worker death only."""
        return {
            "num_cpus": self.cpus_per_task,
            "num_gpus": 1 if job.device == "cuda" else 0,
            "max_retries": self.max_retries,
            "retry_exceptions": False,
        }

    def __enter__(self) -> RayExecutor:
        ray = import_ray()
        self._ray = ray
        if self.address_source == "RAY_ADDRESS":
            log.info("ray: RAY_ADDRESS is set: joining the cluster at %r (unset it for a local one)",
                     self.address)  # fmt: skip
        if self.address is not None:
            try:
                check_reachable(self.address, self.connect_timeout)
            except ConfigError as exc:
                if self.address_source != "RAY_ADDRESS":
                    raise
                raise ConfigError(f"{exc} (the address comes from RAY_ADDRESS)") from None
        if ray.is_initialized():  # the caller's own connection: used, left running
            log.info("ray: using this process's Ray connection")
            return self
        if self.address is not None:
            kwargs: dict[str, Any] = {"address": self.address}
        else:
            kwargs = {"num_cpus": self.num_cpus or os.cpu_count() or 1,
                      "object_store_memory": OBJECT_STORE_BYTES}  # fmt: skip
        try:
            ray.init(**kwargs, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)  # fmt: skip
        except (ConnectionError, TimeoutError, RuntimeError, ValueError, SystemExit) as exc:
            where = f"at {self.address!r}" if self.address else "(local)"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"cannot start or join the Ray cluster {where}: {first}") from None
        self._started = True
        log.info("ray: %s cluster, resources %s", "joined" if self.address else "started a local",
                 ray.cluster_resources())  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started and self._ray is not None:
            self._ray.shutdown()
        self._started = False

    def check(self, jobs: Sequence[Job]) -> None:
        """Refuse a task the cluster can never run (it would wait forever): a one-line error."""
        if self._ray is None:
            raise RuntimeError("RayExecutor.check outside its `with` block")
        have = self._ray.cluster_resources()
        for job in jobs:
            need = self.resources(job)
            for key, res in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
                if need[key] > have.get(res, 0):
                    raise ConfigError(
                        f"task {job.name} asks for {need[key]:g} {res} but the Ray cluster has "
                        f"{have.get(res, 0):g} (device {job.device!r}, cpus_per_task "
                        f"{self.cpus_per_task:g})"
                    )

    def run(self, fn: TaskFn, jobs: Sequence[Job], on_result: OnResult, on_error: OnError) -> None:
        ray = self._ray
        if ray is None:
            raise RuntimeError("RayExecutor.run outside its `with` block")
        self.check(jobs)
        remote = ray.remote(_call)
        fn_ref = ray.put(fn)
        queue = list(jobs)
        pending: dict[Any, Job] = {}
        try:
            while queue or pending:
                while queue and (self.max_parallel is None or len(pending) < self.max_parallel):
                    job = queue.pop(0)
                    ref = remote.options(**self.resources(job)).remote(fn_ref, job.kwargs)
                    pending[ref] = job
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # worker died after its retries, cancelled, ...
                        result = on_error(job, exc, traceback.format_exc())
                    on_result(job, result)
        except BaseException:
            for ref in pending:  # Ctrl-C: stop what is running; what finished is recorded
                ray.cancel(ref, force=True)
            raise


def make_executor(
    name: str,
    *,
    address: str | None = None,
    max_parallel: int | None = None,
    cpus_per_task: float = 1.0,
    max_retries: int = 2,
    num_cpus: int | None = None,
) -> LocalExecutor | RayExecutor:
    """The executor called ``name`` (``local`` or ``ray``) with its options."""
    if name == "local":
        if address is not None:
            raise ConfigError("--address (address=) needs the ray executor (--executor ray)")
        if max_parallel not in (None, 1):
            log.warning("the local executor runs one task at a time; max_parallel ignored")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, max_parallel=max_parallel, cpus_per_task=cpus_per_task,
                           max_retries=max_retries, num_cpus=num_cpus)  # fmt: skip
    raise ConfigError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
