"""Command-line interface: a thin shell over :mod:`raretoken.run`.

``raretoken run`` with no arguments analyses the embedded default (SmolLM2-135M-Instruct on
the embedded English corpus) with the ``demo`` preset.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RareTokenError

if TYPE_CHECKING:
    from .run import AnalysisOptions
    from .run.config import RunConfig

log = logging.getLogger("raretoken")

_HELP = {
    "preset": "scale preset: demo (default: 600 rare targets, ~10 min on a 2-core CPU), paper "
    "(2,000 rare targets) or paper-windows (the paper's literal 49x512 windows, all scored)",
    "model": "'embedded' (SmolLM2-135M GGUF), a Hugging Face id, a local directory or a .gguf file",
    "revision": "hub revision (branch, tag or commit; e.g. Pythia 'step143000')",
    "gguf_file": "GGUF file name inside a model directory",
    "dtype": "float32 (default), float64, bfloat16 or float16",
    "device": "cpu (default), cuda or auto",
    "corpus": "context corpus: 'embedded', 'embedded:sotu', 'embedded:wiki', a .txt/.jsonl/"
    ".parquet file or directory, or a Hugging Face dataset id (streamed)",
    "text_field": "text column of .jsonl/.parquet/HF corpora",
    "freq_corpus": "separate corpus for token frequencies (default: the context corpus, "
    "split by document into counting and held-out parts)",
    "heldout_fraction": "fraction of documents held out for contexts when one corpus serves both",
    "max_count_tokens": "stop counting frequencies after this many tokens",
    "percentile": "rare = below this percentile of retained token-type counts (0-100)",
    "sampling": "'windows' (n_windows x window_len, the paper's 49x512) or 'until_rare'",
    "n_windows": "number of context windows (mode 'windows')",
    "window_len": "scored tokens per window",
    "n_rare": "rare-target positions to collect (mode 'until_rare')",
    "scoring": "'rare+common' (every rare target and a uniform sample holding max_common "
    "common targets; default) or 'all' (every position of the windows)",
    "max_common": "common-target positions scored (scoring 'rare+common')",
    "score_percentile": "every target rare at this percentile is scored (>= percentile; "
    "the robustness sweep's percentiles above it are skipped)",
    "max_stream_tokens": "most corpus tokens read while sampling",
    "reference_windows": "windows (disjoint from the scored ones) for the mean activations n̄",
    "bos": "'auto' (default: what the model needs: a BOS token for Gemma, or wherever the "
    "model's own tokenizer adds one), 'none', or 'prepend' the tokenizer's BOS token to every "
    "window",
    "seed": "seed of every random choice",
    "method": "ablation method: fast (default), exact or naive",
    "tol": "error bound per (position, neuron) pair of the fast method",
    "batch_size": "windows per forward pass",
    "n_boot": "bootstrap resamples of the regime fit",
    "n_random_groups": "size-matched random groups for the analyses",
}


def _add_setting_args(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, skip: tuple[str, ...] = ()
) -> None:
    """One ``--flag`` per run setting (:class:`~raretoken.run.RunConfig` field) not in ``skip``."""
    from .run.config import RunConfig

    for f in fields(RunConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        t = str(f.type)
        kind = int if t.startswith("int") else float if t.startswith("float") else str
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=_HELP.get(f.name))


def _setting_overrides(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The run settings given as flags (``None``: not given)."""
    from .run.config import RunConfig

    return {f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name not in skip}


#: Settings a sweep file gives per task (``[[models]]`` and ``revisions``), not as flags.
_SWEEP_OWN = ("model", "revision")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_setting_args(p)
    p.add_argument("--config", type=Path, help="TOML file with settings (flags win)")
    p.add_argument(
        "--out", type=Path, help="run directory (default raretoken-runs/<model>-<preset>)"
    )
    p.add_argument("--cache-dir", type=Path, help="cache directory (default ~/.cache/raretoken)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a run directory holding another run"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}") from exc


def _words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _add_analysis_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("analyses (§4.2–4.5)")
    g.add_argument(
        "--robustness",
        action="store_true",
        help="also rerun every analysis across rare percentiles and group definitions",
    )
    g.add_argument(
        "--percentiles",
        type=_floats,
        default=(5.0, 10.0, 15.0, 20.0, 25.0),
        help="percentiles of the robustness sweep (comma-separated; default 5,10,15,20,25)",
    )
    g.add_argument(
        "--definitions",
        type=_words,
        default=("plateau", "topk", "selective"),
        help="group definitions of the robustness sweep (default plateau,topk,selective)",
    )
    g.add_argument(
        "--no-routing", action="store_true", help="skip attention routing (needs the model)"
    )
    g.add_argument(
        "--weights",
        default="out",
        choices=("out", "in", "up", "gate"),
        help="final-MLP weights of the spectral analysis (default out: the neurons' w_out rows)",
    )
    g.add_argument(
        "--coordination-positions",
        default="all",
        choices=("all", "rare"),
        help="positions whose activations enter d_eff and MI (default all scored positions)",
    )
    g.add_argument(
        "--impact-positions",
        default="all",
        choices=("all", "rare"),
        help="positions over which head-ablation impact is measured (default all)",
    )
    g.add_argument(
        "--topk", type=int, default=None, help="group size when no plateau is found (top-k)"
    )
    g.add_argument(
        "--tau",
        type=float,
        default=0.95,
        help="explained-variance threshold of the effective dimension d_eff (eq. 4; default 0.95)",
    )
    g.add_argument(
        "--mi-bins",
        type=int,
        default=None,
        help="equal-frequency bins of the mutual-information estimator (default: its rule)",
    )


def _analysis_options(args: argparse.Namespace, **extra: object) -> AnalysisOptions:
    from .run import AnalysisOptions

    return AnalysisOptions(
        routing=not args.no_routing,
        weight_name=args.weights,
        coordination_positions=args.coordination_positions,
        impact_positions=args.impact_positions,
        fallback_k=args.topk,
        tau=args.tau,
        mi_bins=args.mi_bins,
        robustness=args.robustness,
        percentiles=args.percentiles,
        definitions=args.definitions,
        **extra,  # type: ignore[arg-type]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raretoken",
        description="Find and characterise rare-token neurons in causal language models.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="identify rare-token neurons and run the analyses")
    _add_run_args(run)
    run.add_argument(
        "--skip-analyses", action="store_true", help="identification only (no §4.2–4.5 analyses)"
    )
    _add_analysis_args(run)
    run.add_argument(
        "--layers",
        help="also identify rare-token neurons in these MLP layers: 'all' or a comma list "
        "(e.g. 0,5,-1); a linear screen of every neuron plus exact ablations of the top ones",
    )
    run.add_argument(
        "--layer-top-k", type=int, default=100,
        help="neurons per layer ablated exactly after the screen (>= d_mlp: all; default 100)",
    )  # fmt: skip
    run.add_argument(
        "--layer-random-exact", type=int, default=100,
        help="further neurons per layer, drawn at random (seeded), ablated exactly to check "
        "the screen beyond its top (default 100)",
    )  # fmt: skip
    run.add_argument(
        "--no-layer-analyses",
        action="store_true",
        help="per-layer stage without the four analyses of each layer's group",
    )
    run.add_argument(
        "--layer-n-random",
        type=int,
        default=None,
        help="random groups per per-layer analysis baseline (default: the run's)",
    )
    run.add_argument(
        "--layer-routing",
        action="store_true",
        help="also run attention routing per layer (costly on a CPU: about 1.4 "
        "forward passes of --layer-routing-windows windows per layer)",
    )
    run.add_argument("--layer-routing-windows", type=int, default=8,
                     help="windows the per-layer routing re-runs (seeded; default 8)")  # fmt: skip
    ana = sub.add_parser("analyze", help="run the analyses on an existing run directory")
    ana.add_argument("run_dir", type=Path, help="directory written by `raretoken run`")
    ana.add_argument("--n-random", type=int, help="random groups per baseline (default: the run's)")
    ana.add_argument("--seed", type=int, help="seed of the random groups (default: the run's)")
    ana.add_argument("--cache-dir", type=Path, help="cache directory (default ~/.cache/raretoken)")
    ana.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    ana.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_analysis_args(ana)
    iv = sub.add_parser(
        "intervene", help="scale a run's neuron group: rare/common loss against random groups"
    )
    iv.add_argument("run_dir", type=Path, help="directory written by `raretoken run`")
    iv.add_argument("--factors", default="0,0.5,1.5,2", help="scale factors, comma-separated")
    iv.add_argument(
        "--neurons", help="final-layer neuron ids, comma-separated (default: the analyses' group)"
    )
    iv.add_argument("--n-random", type=int, default=20, help="random groups (default 20)")
    iv.add_argument(
        "--random", choices=("size", "matched"), default="size",
        help="random groups matched on size, or also on weight norm and activation",
    )  # fmt: skip
    iv.add_argument(
        "--null-space", choices=("spectrum", "frequent"), default="spectrum",
        help="near-null space of the unembedding: its bottom singular directions (spectrum) or "
        "the complement of the frequent tokens' directions (frequent, the authors' definition)",
    )  # fmt: skip
    iv.add_argument("--null-fraction", type=float, default=0.05,
                    help="share of d_model in the null space (default 0.05)")  # fmt: skip
    iv.add_argument("--seed", type=int, default=0, help="seed of the random groups")
    iv.add_argument("--cache-dir", type=Path, help="cache directory (default ~/.cache/raretoken)")
    iv.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sw = sub.add_parser("sweep", help="run identification + analyses for models x revisions")
    sw.add_argument("sweep_file", type=Path, help="sweep.toml: [[models]], revisions, settings")
    sw.add_argument("--out", type=Path, help="sweep directory (default raretoken-sweeps/<file>)")
    sw.add_argument("--cache-dir", type=Path, help="cache directory (default ~/.cache/raretoken)")
    sw.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    sw.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sw.add_argument(
        "--overwrite", action="store_true", help="run into a directory holding another sweep"
    )
    ex = sw.add_argument_group("executor")
    ex.add_argument(
        "--executor",
        default="local",
        choices=("local", "ray"),
        help="local: one task after another in this process (default); ray: Ray Core tasks "
        "(pip install 'raretoken[ray]')",
    )
    ex.add_argument(
        "--address",
        help="Ray cluster to join ('auto', HOST:PORT or ray://HOST:PORT); "
        "default: start a local one for this sweep",
    )
    ex.add_argument(
        "--max-parallel", type=int, help="most tasks in flight under Ray (default: all that fit)"
    )
    ex.add_argument(
        "--cpus-per-task", type=float, default=1.0, help="CPUs each Ray task asks for (default 1)"
    )
    ex.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="retries of a Ray task whose worker died (default 2; a task raising is not retried)",
    )
    ex.add_argument(
        "--cluster-cpus", type=int, help="CPUs of the local Ray cluster (default: all cores)"
    )
    _add_setting_args(
        sw.add_argument_group("run settings (win over the sweep file's, for every task)"),
        skip=_SWEEP_OWN,
    )
    rep = sub.add_parser(
        "sweep-report",
        help="rebuild sweep.parquet, tables/, figures/, notes.md and report.html of a sweep",
    )
    rep.add_argument("sweep_dir", type=Path, help="directory written by `raretoken sweep`")
    page = sub.add_parser("report", help="write report.html of a run or a sweep directory")
    page.add_argument("directory", type=Path, help="run directory or sweep directory")
    return parser


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import format_table, load_sweep, run_sweep, sweep_table

    overrides = {k: v for k, v in _setting_overrides(args, _SWEEP_OWN).items() if v is not None}
    spec = load_sweep(args.sweep_file, overrides=overrides or None)
    out = args.out or Path("raretoken-sweeps") / args.sweep_file.stem
    res = run_sweep(
        spec,
        out,
        executor=args.executor,
        address=args.address,
        max_parallel=args.max_parallel,
        cpus_per_task=args.cpus_per_task,
        max_retries=args.max_retries,
        num_cpus=args.cluster_cpus,
        overwrite=args.overwrite,
        cache_dir=args.cache_dir,
        no_cache=args.no_cache,
        progress=not args.no_progress,
    )
    sys.stdout.write(format_table(sweep_table(out)))
    done = {s: res.count(s) for s in ("complete", "reused", "failed")}
    log.info("sweep directory: %s (%s)", out, ", ".join(f"{n} {s}" for s, n in done.items()))
    if not res.ok:
        sys.stderr.write(
            f"error: {done['failed']} of {len(res.tasks)} tasks failed; tracebacks in "
            f"{out}/tasks/<name>/traceback.txt; rerun to retry them\n"
        )
        return 1
    return 0


def _cmd_sweep_report(args: argparse.Namespace) -> int:
    from .sweep import format_table, sweep_table
    from .sweep.tasks import write_outputs

    written = write_outputs(args.sweep_dir)
    sys.stdout.write(format_table(sweep_table(args.sweep_dir)))
    log.info("wrote %d files in %s (report: %s)", len(written), args.sweep_dir,
             written["report.html"])  # fmt: skip
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .errors import RunDirectoryError

    d = args.directory
    if (d / "sweep_manifest.json").exists() or (
        (d / "tasks").is_dir() and not (d / "manifest.json").exists()
    ):
        from .report import write_sweep_report
        from .sweep.outputs import ABOUT

        path = write_sweep_report(d, run_reports=True, captions=ABOUT)
    elif (d / "manifest.json").exists():
        from .report import write_run_report

        path = write_run_report(d)
    else:
        raise RunDirectoryError(
            f"{d} is neither a raretoken run directory (no manifest.json) nor a sweep directory"
        )
    sys.stdout.write(f"{path}\n")
    return 0


def _cmd_intervene(args: argparse.Namespace) -> int:
    from .intervene import intervene, parse_factors, parse_neurons

    intervene(
        args.run_dir,
        factors=parse_factors(args.factors),
        neurons=None if args.neurons is None else parse_neurons(args.neurons),
        n_random=args.n_random,
        random=args.random,
        null_space=args.null_space,
        null_fraction=args.null_fraction,
        seed=args.seed,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    _write_run_report(args.run_dir)
    sys.stdout.write((args.run_dir / "interventions" / "interventions.md").read_text())
    return 0


def _write_run_report(run_dir: Path) -> None:
    from .report import write_run_report

    log.info("report: %s", write_run_report(run_dir))


def _layer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The per-layer stage's options from the ``run`` flags."""
    return {"top_k": args.layer_top_k, "n_random": args.layer_random_exact,
            "analyses": not args.no_layer_analyses,
            "n_random_groups": args.layer_n_random, "layer_routing": args.layer_routing,
            "routing_windows": args.layer_routing_windows}  # fmt: skip


def _check_layers(cfg: RunConfig, args: argparse.Namespace) -> None:
    """``--layers`` and ``--layer-top-k`` against the model's number of layers, before any
    model work (the sizes come from the model's config, no weights are read)."""
    from .errors import ConfigError
    from .run.layers import check_layer_options
    from .run.layers_results import parse_layers
    from .run.stages import Stages, open_cache

    for flag, v in (("--layer-top-k", args.layer_top_k),
                    ("--layer-random-exact", args.layer_random_exact)):  # fmt: skip
        if v < 0:
            raise ConfigError(f"{flag} must be >= 0, got {v}")
    cfg.validate()
    opts = _layer_options(args)
    opts.pop("layer_routing")
    check_layer_options(cfg, **opts)
    st = Stages(cfg, open_cache(args.cache_dir, args.no_cache), progress=False)
    st.check_inputs()
    parse_layers(args.layers, int(st.dims["n_layers"]))


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import identify, make_config

    overrides = _setting_overrides(args)
    preset = overrides.pop("preset")
    cfg = make_config(preset=preset, config_file=args.config, overrides=overrides)
    if args.layers:
        _check_layers(cfg, args)
    res = identify(
        cfg,
        args.out,
        cache_dir=args.cache_dir,
        no_cache=args.no_cache,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if not args.skip_analyses:
        from .run import analyze

        analyze(
            res,
            _analysis_options(args),
            cache_dir=args.cache_dir,
            no_cache=args.no_cache,
            progress=not args.no_progress,
        )
    if args.layers:
        from .run.layers import identify_layers

        identify_layers(res.run_dir, args.layers, **_layer_options(args),
                        cache_dir=args.cache_dir, no_cache=args.no_cache,
                        progress=not args.no_progress, stages=res.stages)  # fmt: skip
    _write_run_report(res.run_dir)
    log.info("run directory: %s", res.run_dir)
    sys.stdout.write((res.run_dir / "summary.md").read_text())
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .run import analyze_run_dir

    analyze_run_dir(
        args.run_dir,
        _analysis_options(args, n_random=args.n_random, seed=args.seed),
        cache_dir=args.cache_dir,
        no_cache=args.no_cache,
        progress=not args.no_progress,
    )
    _write_run_report(args.run_dir)
    sys.stdout.write((args.run_dir / "summary.md").read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "analyze":
            return _cmd_analyze(args)
        if args.command == "sweep":
            return _cmd_sweep(args)
        if args.command == "sweep-report":
            return _cmd_sweep_report(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "intervene":
            return _cmd_intervene(args)
    except RareTokenError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    except OSError as exc:  # a file system refusal we did not foresee: one line, no traceback
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"error: {where}{exc.strerror or exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(
            "interrupted: finished stages are cached; rerun the same command to resume\n"
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
