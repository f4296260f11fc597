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

from .errors import RareTokenError

log = logging.getLogger("raretoken")

_HELP = {
    "preset": "scale preset: demo (default, ~10 min on a 2-core CPU) or paper (49x512 tokens)",
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
    "max_stream_tokens": "most corpus tokens read while sampling",
    "reference_windows": "windows (disjoint from the scored ones) for the mean activations n̄",
    "bos": "'none' or 'prepend' a BOS token to every window",
    "seed": "seed of every random choice",
    "method": "ablation method: fast (default), exact or naive",
    "tol": "error bound per (position, neuron) pair of the fast method",
    "batch_size": "windows per forward pass",
    "n_boot": "bootstrap resamples of the regime fit",
    "n_random_groups": "size-matched random groups for the analyses",
}


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from .run.config import RunConfig

    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        t = str(f.type)
        kind = int if t.startswith("int") else float if t.startswith("float") else str
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=_HELP.get(f.name))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raretoken",
        description="Find and characterise rare-token neurons in causal language models.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="identify rare-token neurons (and run the analyses)")
    _add_run_args(run)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import identify, make_config
    from .run.config import RunConfig

    overrides = {f.name: getattr(args, f.name) for f in fields(RunConfig)}
    preset = overrides.pop("preset")
    cfg = make_config(preset=preset, config_file=args.config, overrides=overrides)
    res = identify(
        cfg,
        args.out,
        cache_dir=args.cache_dir,
        no_cache=args.no_cache,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    log.info("run directory: %s", res.run_dir)
    sys.stdout.write((res.run_dir / "summary.md").read_text())
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
    except RareTokenError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(
            "interrupted: finished stages are cached; rerun the same command to resume\n"
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
