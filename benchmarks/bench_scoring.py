"""Scoring every rare target plus a capped common sample vs scoring every window position.

Target (issue 10): the ablation for 2,000 rare targets on the embedded model at least 20x
cheaper than scoring all positions of the same windows.

1. Draws the windows ``raretoken run --preset paper`` would draw (``--n-rare`` rare targets,
   the run's corpus, split and seed) and narrows them as the run does
   (:mod:`raretoken.data.scoring`): every target rare at ``--score-percentile`` plus a uniform
   sample holding ``--max-common`` common targets. This needs the tokenizer only.
2. Captures the first windows with every position scored, as many as hold ``--rows`` scored
   positions, and times the fast all-neuron ablation side by side in one process on calls of
   ``--rows`` positions (the run's chunk size): (a) all positions of the first windows,
   (b) the scored positions; the two take turns within each of ``--repeats`` repeats and the
   fastest run of each counts.
3. Prints the per-position cost of each, and the ablation time of the whole sample each way:
   per-position cost x positions (the fast method is chunked over positions, so its cost is
   linear in them), and their ratio.

    python benchmarks/bench_scoring.py --n-rare 2000 --max-common 8192 --rows 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time

import numpy as np
import torch

from raretoken.ablation.capture import capture_sample
from raretoken.ablation.fast import delta_loss_fast
from raretoken.ablation.inputs import inputs_from_adapter
from raretoken.data.token_stats import split_rare_common
from raretoken.run.config import make_config
from raretoken.run.stages import Stages
from raretoken.storage import ArrayCache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n-rare", type=int, default=2000)
    ap.add_argument("--max-common", type=int, default=8192)
    ap.add_argument("--score-percentile", type=float, default=25.0)
    ap.add_argument(
        "--rows", type=int, default=4096, help="positions per timed call (the run's chunk size)"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-stream-tokens", type=int, default=10_000_000)
    ap.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.3,
        help="share of the embedded corpus held out for contexts (0.1 holds ~2,000 rare "
        "targets only just)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    cfg = make_config(
        preset="paper",
        overrides={
            "n_rare": args.n_rare,
            "max_common": args.max_common,
            "score_percentile": args.score_percentile,
            "max_stream_tokens": args.max_stream_tokens,
            "heldout_fraction": args.heldout_fraction,
        },
    )
    st = Stages(cfg, ArrayCache(None), progress=False)
    counts, _ = st.token_counts()
    split = split_rare_common(counts, percentile=cfg.percentile)
    always = split_rare_common(counts, percentile=cfg.score_percentile, check=False)
    narrowed, _, _, _ = st.samples(split, always)
    n_all = int(narrowed.window_mask().sum())
    n_scored = narrowed.n_positions
    rare_m = split.masks()[0]
    n_rare = int(rare_m[narrowed.target_ids[narrowed.target_mask]].sum())

    # Windows in order, every position scored, until they hold --rows scored positions: both
    # ways are then timed on calls of --rows positions (the run ablates in chunks of that
    # size, which amortises the method's per-call work over the positions alike).
    per_window = narrowed.target_mask.sum(1)
    k = int(np.searchsorted(np.cumsum(per_window), args.rows)) + 1
    k = min(max(k, 1), narrowed.n_windows)
    sub = dataclasses.replace(
        narrowed,
        input_ids=narrowed.input_ids[:k],
        target_ids=narrowed.target_ids[:k],
        target_mask=narrowed.window_mask()[:k],
        uniform_mask=None,
        scoring="all",
        doc_ids=narrowed.doc_ids[:k],
        offsets=narrowed.offsets[:k],
    )
    lm = st.loaded
    cap = capture_sample(lm.model, lm.adapter, sub, batch_size=cfg.batch_size)
    keep = narrowed.target_mask[:k][sub.target_mask]
    mean_acts = torch.from_numpy(np.asarray(cap.acts).mean(0))

    def inputs(rows: np.ndarray):  # type: ignore[no-untyped-def]
        return inputs_from_adapter(
            lm.adapter,
            torch.from_numpy(np.asarray(cap.resid)[rows]),
            torch.from_numpy(np.asarray(cap.acts)[rows]),
            torch.from_numpy(np.asarray(cap.targets)[rows]),
            mean_acts,
        )

    all_rows = np.arange(min(args.rows, keep.size))
    kept_rows = np.flatnonzero(keep)[: args.rows]
    best = {"all": math.inf, "scored": math.inf}
    for _ in range(args.repeats):
        for name, rows in (("all", all_rows), ("scored", kept_rows)):
            x = inputs(rows)
            t = time.perf_counter()
            delta_loss_fast(x, tol=cfg.tol)
            best[name] = min(best[name], (time.perf_counter() - t) / rows.size)

    t_all = best["all"] * n_all
    t_scored = best["scored"] * n_scored
    out = sys.stdout
    out.write(
        f"windows drawn for {args.n_rare} rare targets: {narrowed.n_windows} x "
        f"{narrowed.window_len} = {n_all:,} positions; {n_rare:,} rare targets "
        f"(percentile {cfg.percentile:g})\n"
        f"scored (rare+common): {n_scored:,} positions ({n_all / n_scored:.1f}x fewer)\n"
        f"timed on calls of {all_rows.size:,} positions (all positions of the first windows) and "
        f"{kept_rows.size:,} (the scored ones of the first {k} windows), fastest of "
        f"{args.repeats}, torch threads {torch.get_num_threads()}\n"
        f"fast ablation per position: all {best['all'] * 1e3:.2f} ms, scored subset "
        f"{best['scored'] * 1e3:.2f} ms\n"
        f"ablation of the whole sample: every position {t_all:,.0f} s, rare+common "
        f"{t_scored:,.0f} s; ratio {t_all / t_scored:.1f}x (target >= 20x)\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
