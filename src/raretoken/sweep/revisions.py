"""Revision schedules of a sweep file: which checkpoints of a model become tasks.

A ``revisions`` entry of a sweep file is one of

``"step1000"``, ``"main"``, ...
    A revision passed to the run as it is (a hub branch, tag or commit); for a local
    directory, its sub-directory of that name (a checkpoint).
``"checkpoint-*"``, ``"step*"``, ...
    A glob of sub-directories of a local model directory: each match is a task.
``"pythia-log"``
    Pythia's public checkpoint schedule: ``step0``, the log-spaced ``step1``, ``step2``,
    ``step4``, ..., ``step512``, then every 1,000 steps ``step1000`` ... ``step143000`` —
    154 checkpoints (:func:`pythia_steps`). On a hub id these are hub revisions; on a local
    directory, its checkpoint sub-directories with these steps (all must be there).
``"pythia-log:K"``
    ``K`` of them, log-spaced in the step, always with the first and the last
    (:func:`thin_log`); 154 runs is a lot.
``"every:N"``
    Every checkpoint whose step is a multiple of ``N``, and the last one. On a local
    directory the checkpoints are its sub-directories with a step in their name
    (``step1000``, ``checkpoint-1000``, ``step-1000``, ``ckpt_1000``, ``global_step1000``,
    :func:`parse_step`); on a Pythia hub id (``EleutherAI/pythia-*``) the checkpoints of
    Pythia's schedule; on any other hub id the final step is unknown, so write
``"every:N:LAST"``
    As ``every:N`` up to step ``LAST``; on a hub id other than Pythia the revisions
    ``step0``, ``stepN``, ``step2N``, ... and ``stepLAST`` (Pythia's naming of hub revisions).

Sources of the Pythia schedule: the model cards of EleutherAI's Pythia models and their
PolyPythias checkpoint repositories ("154 checkpoints are available as branches: ``step0`` —
initialization; ``step{1,2,4,8,16,32,64,128,256,512}`` — log-spaced early checkpoints;
``step1000`` through ``step143000`` — every 1,000 steps"; Biderman et al. 2023, "Pythia: A
Suite for Analyzing Large Language Models Across Training and Scaling", which provides "154
checkpoints for each one of the 16 models"), and the paper authors' code,
``Jing-L97/target_neuron_ablation`` (``src/neuron_analyzer/model_util.py``,
``StepConfig.generate_pythia_checkpoints``: ``[0] + [2**i for i in range(10)] +
range(1000, 143001, 1000)``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

PYTHIA_FINAL_STEP = 143_000
"""The last step of Pythia's training (hub revision ``step143000``, the same as ``main``)."""

SCHEDULE_FORMS = '"pythia-log", "pythia-log:K", "every:N" or "every:N:LAST"'
GLOB_CHARS = re.compile(r"[*?\[]")
_STEP_NAME = re.compile(
    r"(?:^|[^A-Za-z0-9])(?:global[-_]?step|step|checkpoint|ckpt|iter|iteration)[-_]?(\d+)$",
    flags=re.IGNORECASE,
)
_PYTHIA_ID = re.compile(r"^EleutherAI/pythia-[^/]+$", flags=re.IGNORECASE)


@dataclass(frozen=True)
class Revision:
    """One task's checkpoint: model path, label (task name suffix), revision for the run, step.

    ``path`` is the model passed to the run (the checkpoint directory for local checkpoints),
    ``label`` the revision's name in the task name and tables, ``revision`` the hub revision
    passed to the run (``None`` for local checkpoints) and ``step`` the training step (``None``
    when the label names no step, e.g. ``main``).
    """

    path: str
    label: str | None
    revision: str | None
    step: int | None


def pythia_steps() -> tuple[int, ...]:
    """The 154 training steps of Pythia's public checkpoints, ascending (module docstring)."""
    return (0, *(2**i for i in range(10)), *range(1000, PYTHIA_FINAL_STEP + 1, 1000))


def parse_step(name: str | None) -> int | None:
    """The training step named by a revision or checkpoint directory, else ``None``.

    ``step1000``, ``step-1000``, ``checkpoint-1000``, ``checkpoint_1000``, ``ckpt1000``,
    ``iter_1000``, ``global_step1000`` and ``run1-step1000`` (any case; the step word at the
    start or after a character other than a letter or digit) name step 1000; ``main``,
    ``v1.0`` or ``mystep1000`` name none.
    """
    if not name:
        return None
    match = _STEP_NAME.search(name.strip())
    return int(match.group(1)) if match else None


def is_pythia(model: str) -> bool:
    """Whether ``model`` is a hub id of EleutherAI's Pythia suite (``EleutherAI/pythia-*``)."""
    return bool(_PYTHIA_ID.match(model))


def is_schedule(revision: str) -> bool:
    """Whether a ``revisions`` entry names a schedule rather than one revision or a glob.

    ``"pythia-log"`` and anything with a colon (git refs cannot hold one), so that a
    misspelt schedule (``"evry:5"``) is refused rather than taken for a revision.
    """
    return revision == "pythia-log" or ":" in revision


def _nearest_in_log(steps: list[int], target: float) -> int:
    """Index of the positive step nearest to ``target`` on a log scale (the smaller on ties)."""
    dist = [abs(math.log(s) - math.log(target)) for s in steps]
    return min(range(len(steps)), key=lambda i: (dist[i], i))


def thin_log(steps: list[int] | tuple[int, ...], k: int) -> list[int]:
    """``k`` of the ascending, distinct ``steps``, log-spaced in the step.

    The first and the last step are always kept. Step 0, which has no logarithm, is kept as
    the first when present; the positive steps chosen are those nearest (on a log scale) to
    log-spaced targets from the first positive step to the last (``numpy.geomspace``, one
    target per step to choose), snapped in order so that they stay distinct: each takes the
    nearest step after the one chosen before, leaving room for the ones still to choose.
    ``k`` at least ``len(steps)`` keeps all.

    Raises
    ------
    ConfigError
        ``k < 2``.
    """
    steps = list(steps)
    if k < 2:
        raise ConfigError(f"a thinned schedule keeps at least 2 checkpoints, got {k}")
    if k >= len(steps):
        return steps
    head = [steps[0]] if steps[0] <= 0 else []
    pos = steps[len(head) :]  # positive steps
    m = k - len(head)  # how many positive steps to choose (>= 1)
    if m == 1:
        return [*head, pos[-1]]
    lo, hi = math.log(pos[0]), math.log(pos[-1])
    chosen: list[int] = []
    for j in range(m):
        target = math.exp(lo + (hi - lo) * j / (m - 1))
        first = chosen[-1] + 1 if chosen else 0
        last = len(pos) - (m - j)  # leave room for the m - j - 1 still to choose
        chosen.append(min(max(_nearest_in_log(pos, target), first), last))
    return [*head, *(pos[i] for i in chosen)]


def _positive_int(text: str, what: str, form: str, where: str, least: int = 1) -> int:
    if not text.isdigit() or int(text) < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ConfigError(f"{where}: revisions {form!r}: {what} must be {kind}, got {text!r}")
    return int(text)


def _local_checkpoints(root: Path, where: str, form: str) -> dict[int, Path]:
    """``{step: sub-directory}`` of the checkpoint directories in ``root``."""
    found: dict[int, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        step = parse_step(sub.name)
        if step is None:
            continue
        if step in found:
            raise ConfigError(
                f"{where}: revisions {form!r}: {found[step].name} and {sub.name} in {root} "
                f"both hold step {step}"
            )
        found[step] = sub
    if not found:
        raise ConfigError(
            f"{where}: revisions {form!r}: {root} has no checkpoint directories named like "
            "step1000 or checkpoint-1000"
        )
    return dict(sorted(found.items()))


def _every(available: list[int], n: int, last: int | None) -> list[int]:
    """The steps of ``available`` that are multiples of ``n`` (up to ``last``), and the last."""
    kept = [s for s in available if last is None or s <= last]
    if not kept:
        return []
    return [s for s in kept if s % n == 0 or s == kept[-1]]


def _hub(model: str, steps: list[int]) -> list[Revision]:
    return [Revision(model, f"step{s}", f"step{s}", s) for s in steps]


def _local(ckpts: dict[int, Path], steps: list[int]) -> list[Revision]:
    return [Revision(str(ckpts[s]), ckpts[s].name, None, s) for s in steps]


def expand_schedule(model: str, form: str, where: str) -> list[Revision]:
    """The checkpoints of ``model`` that schedule ``form`` names (see the module docstring).

    ``model`` is a local directory (its checkpoint sub-directories) or a hub id.

    Raises
    ------
    ConfigError
        An unknown schedule, a malformed number, ``every:N`` on a hub id other than Pythia,
        a local directory without (or with missing) checkpoint directories, a GGUF file.
    """
    root = Path(model)
    local = root.is_dir()
    if not local and (root.suffix == ".gguf" or root.exists()):
        raise ConfigError(
            f"{where}: revisions {form!r} need a hub id or a directory of checkpoint "
            f"directories, and {model!r} is neither"
        )
    name, _, rest = form.partition(":")
    if name == "pythia-log":
        steps = list(pythia_steps())
        if form != "pythia-log":
            steps = thin_log(steps, _positive_int(rest, "K", form, where, least=2))
        if not local:
            return _hub(model, steps)
        ckpts = _local_checkpoints(root, where, form)
        missing = [s for s in steps if s not in ckpts]
        if missing:
            shown = ", ".join(f"step{s}" for s in missing[:3]) + (
                ", ..." if len(missing) > 3 else ""
            )
            raise ConfigError(
                f"{where}: revisions {form!r}: {len(missing)} of the {len(steps)} Pythia "
                f"checkpoints are not in {model} ({shown})"
            )
        return _local(ckpts, steps)
    if name == "every":
        parts = rest.split(":") if rest else []
        if not 1 <= len(parts) <= 2:
            raise ConfigError(f'{where}: revisions {form!r}: write "every:N" or "every:N:LAST"')
        n = _positive_int(parts[0], "N", form, where)
        last = _positive_int(parts[1], "LAST", form, where) if len(parts) == 2 else None
        if local:
            ckpts = _local_checkpoints(root, where, form)
            steps = _every(list(ckpts), n, last)
            if not steps:
                raise ConfigError(f"{where}: revisions {form!r}: no checkpoint in {model}")
            return _local(ckpts, steps)
        if is_pythia(model):
            return _hub(model, _every(list(pythia_steps()), n, last))
        if last is None:
            raise ConfigError(
                f"{where}: revisions {form!r}: the final step of {model!r} is unknown; "
                f'write "every:{n}:LAST" with its last step'
            )
        return _hub(model, _every(sorted({*range(0, last + 1, n), last}), n, last))
    raise ConfigError(f"{where}: unknown revision schedule {form!r}; use {SCHEDULE_FORMS}")


def expand_glob(model: str, pattern: str, where: str) -> list[Revision]:
    """The sub-directories of local directory ``model`` matching ``pattern``, in natural order."""
    root = Path(model)
    if not root.is_dir():
        raise ConfigError(
            f"{where}: revision glob {pattern!r} needs a local model directory, and {model!r} "
            "is not"
        )
    matches = sorted((p for p in root.glob(pattern) if p.is_dir()), key=lambda p: _natural(p.name))
    if not matches:
        raise ConfigError(f"{where}: revision glob {pattern!r} matches no directory in {model}")
    return [Revision(str(p), p.name, None, parse_step(p.name)) for p in matches]


def _natural(name: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def expand_revisions(model: str, revisions: list[str] | None, where: str) -> list[Revision]:
    """Every task's :class:`Revision` of ``model`` for a model's ``revisions`` entries.

    ``None`` is the model as it is (one task; its step parsed from a local directory's
    name). A plain revision passes through to a hub id and names a sub-directory of a local
    directory, a glob takes local sub-directories, a schedule expands
    (:func:`expand_schedule`).
    """
    if revisions is None:
        step = parse_step(Path(model).name) if Path(model).is_dir() else None
        return [Revision(model, None, None, step)]
    out: list[Revision] = []
    for rev in revisions:
        if is_schedule(rev):
            out.extend(expand_schedule(model, rev, where))
        elif GLOB_CHARS.search(rev):
            out.extend(expand_glob(model, rev, where))
        elif Path(model).is_dir():
            out.append(_local_revision(model, rev, where))
        else:
            out.append(Revision(model, rev, rev, parse_step(rev)))
    return out


def _local_revision(model: str, rev: str, where: str) -> Revision:
    """A named checkpoint sub-directory of a local model directory."""
    sub = Path(model) / rev
    if not sub.is_dir() or Path(rev).is_absolute() or ".." in Path(rev).parts:
        raise ConfigError(
            f"{where}: revision {rev!r}: {model} has no sub-directory {rev!r} (the revisions of "
            "a local directory are its checkpoint sub-directories)"
        )
    return Revision(str(sub), sub.name, None, parse_step(sub.name))
