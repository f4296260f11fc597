"""Per-layer mean ablation on the embedded SmolLM2 model: exact batched pass and linear screen.

For each layer in ``--layers`` and the same windows, times

* ``hooked``: one whole forward pass per neuron with a hook setting the neuron to its mean
  (:func:`raretoken.ablation.layer_exact.layer_delta_forward`; the LM head runs at the scored
  positions only, which flatters this baseline; its time is divided by the number of passes,
  the base-loss pass included);
* ``exact``: the batched pass from the layer's cached output on
  (:func:`raretoken.ablation.layer_exact.exact_layer_delta`, capture forward included);
* ``screen``: the linear screen of the whole layer for two target sets (rare, common)
  (:func:`raretoken.ablation.layer_screen.screen_layers`), in forward-pass equivalents: its
  time over that of one plain forward pass of the same windows (decoder + LM head at the
  scored positions, no gradients);

and prints seconds per neuron of ``hooked`` and ``exact`` (``--neurons`` of them, the capture
forward included) and their ratio (target >= 10); the *marginal* seconds per neuron of
``exact`` (``--neurons`` minus one neuron's run, over ``--neurons - 1``: the cost once the
capture is amortised over many neurons) and that ratio; the ratio the arithmetic allows
(FLOPs of a whole forward over FLOPs of the blocks after the layer plus the LM head at the
scored positions); the largest difference between the two methods (float32); and the screen's
cost (target <= 3). The screen of all the listed layers in one pass is timed too.
With ``--quality``, :func:`raretoken.ablation.layer.layer_ablation` runs on the last three
layers and the screen's quality (Spearman, recall of the exact top-k in the screen's top-2k)
is reported (not asserted). Rare targets: the bottom ``--percentile`` % of the frequency split
(:func:`raretoken.data.token_stats.split_rare_common`) of up to ``--count-tokens`` tokens of
the embedded corpus.

Every timing is the fastest of ``--repeats`` runs, in process CPU time by default (``--clock``;
a shared machine's load makes wall time swing), with ``--threads`` torch threads (default 1).

    python benchmarks/bench_layer.py --tiny
    python benchmarks/bench_layer.py --windows 4 --window-len 256 --layers 0,15,-3,-2,-1
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from raretoken.ablation.layer import layer_ablation
from raretoken.ablation.layer_exact import exact_layer_delta, layer_delta_forward
from raretoken.ablation.layer_inputs import decoder_forward, layer_mean_acts, scored_losses
from raretoken.ablation.layer_screen import screen_layers
from raretoken.data.corpus import CorpusSpec, iter_documents
from raretoken.data.sampling import sample_windows
from raretoken.data.token_stats import count_tokens, split_rare_common
from raretoken.models.adapters import ModelAdapter
from raretoken.models.loading import ModelSpec, load_model

#: The clock timings read: process CPU time (default; robust to other processes' load on a
#: shared machine) or wall time.
CLOCK: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = CLOCK["cpu"]


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = _clock()
        out = fn()
        best = min(best, _clock() - t)
    return best, out


def _forward(adapter: ModelAdapter, ids: np.ndarray, mask: np.ndarray, batch: int) -> None:
    """One plain forward pass over the windows: decoder, LM head at the scored positions."""
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch):
            x = torch.from_numpy(ids[s : s + batch])
            m = torch.from_numpy(mask[s : s + batch])
            hidden = decoder_forward(adapter, x)[:, :-1][m]
            scored_losses(adapter, hidden, x[:, 1:][m])


def _flops_ratio(adapter: ModelAdapter, layer: int, seq: int, scored_frac: float) -> float:
    """Whole forward over (blocks after ``layer`` + LM head at the scored positions), per
    token, counting matrix products and attention scores."""
    d = adapter.dims
    kv = d.n_kv_heads * d.head_dim
    q = d.n_heads * d.head_dim
    n_mlp = 3 if "up" in adapter.mlp_in_weights(0) else 2
    block = 2 * (d.d_model * (2 * q + 2 * kv) + n_mlp * d.d_model * d.d_mlp) + 2 * q * seq
    head = 2 * d.d_model * d.vocab_size * scored_frac
    full = d.n_layers * block + head
    return full / ((d.n_layers - layer - 1) * block + head)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="a quick run: 2 short windows, few neurons")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--ref-windows", type=int, default=2, help="windows for the mean n̄")
    ap.add_argument("--layers", default="0,15,-3,-2,-1", help="comma-separated layer indices")
    ap.add_argument("--neurons", type=int, default=32, help="neurons run by the batched pass")
    ap.add_argument("--hooked-neurons", type=int, default=4, help="neurons run by full forwards")
    ap.add_argument("--max-rows", type=int, default=32, help="rows per batched pass")
    ap.add_argument("--batch-windows", type=int, default=4)
    ap.add_argument("--scored-fraction", type=float, default=1.0,
                    help="fraction of positions scored (rare+common scoring scores a subset)")  # fmt: skip
    ap.add_argument("--quality", action="store_true", help="screen quality on the last 3 layers")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--n-random", type=int, default=100)
    ap.add_argument("--quality-k", type=int, default=50)
    ap.add_argument("--percentile", type=float, default=15.0)
    ap.add_argument("--count-tokens", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCK),
        default="cpu",
        help="process CPU time (robust to a shared machine's load) or wall time",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tiny:
        args.windows, args.window_len, args.ref_windows = 2, 64, 1
        args.layers, args.neurons, args.hooked_neurons = "0,-3,-1", 8, 2
        args.top_k, args.n_random, args.quality_k, args.repeats = 10, 10, 5, 1
        args.count_tokens = 300_000
    logging.basicConfig(level=logging.WARNING)
    global _clock
    _clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    lm = load_model(ModelSpec(device=args.device))
    adapter = lm.adapter
    dims = adapter.dims
    sample = sample_windows(
        iter_documents(CorpusSpec(source="embedded:wiki")), lm.tokenizer,
        n_windows=args.windows + args.ref_windows, window_len=args.window_len, seed=args.seed,
        progress=False,
    )  # fmt: skip
    r = args.ref_windows
    ref_ids, ref_mask = sample.input_ids[:r], sample.target_mask[:r]
    ids, mask = sample.input_ids[r:], sample.target_mask[r:].copy()
    if args.scored_fraction < 1:
        mask &= rng.random(mask.shape) < args.scored_fraction
    counts = count_tokens(
        iter_documents(CorpusSpec(source="embedded:wiki")), lm.tokenizer,
        vocab_size=dims.vocab_size, progress=False, max_tokens=args.count_tokens,
    )  # fmt: skip
    rare_tok, common_tok = split_rare_common(
        counts, percentile=args.percentile, check=False
    ).masks()
    targets = ids[:, 1:][mask]
    rare = np.flatnonzero(rare_tok[targets])
    common = np.flatnonzero(common_tok[targets])
    layers = [adapter.layer_index(int(x)) for x in args.layers.split(",")]
    means = layer_mean_acts(adapter, ref_ids, ref_mask, layers)
    frac = float(mask.mean())
    print(f"model: {dims.n_layers} layers, d_mlp {dims.d_mlp}, vocab {dims.vocab_size}; "
          f"{ids.shape[0]} windows x {ids.shape[1]} tokens, {int(mask.sum())} scored "
          f"({len(rare)} rare, {len(common)} common); torch threads {torch.get_num_threads()}")  # fmt: skip

    bw = args.batch_windows
    t_fwd, _ = _best(lambda: _forward(adapter, ids, mask, bw), args.repeats)
    print(f"plain forward of the windows: {t_fwd:.2f} s ({args.clock} time)")
    sets = {"rare": rare if len(rare) else np.arange(1), "common": common}
    print(f"{'layer':>5} {'hooked s/n':>10} {'exact s/n':>10} {'ratio':>6} {'marg s/n':>9} "
          f"{'ratio':>6} {'flops':>6} {'max|diff|':>9} {'screen s':>8} {'fwd eq':>6}")  # fmt: skip
    for layer in layers:
        neurons = np.sort(rng.choice(dims.d_mlp, args.neurons, replace=False))
        t_ex, exact = _best(
            partial(exact_layer_delta, adapter, ids, mask, layer, means[layer], neurons,
                    batch_windows=bw, max_rows=args.max_rows),
            args.repeats,
        )  # fmt: skip
        # one neuron: the capture forward and the base loss plus one neuron's pass
        t_one, _ = _best(
            partial(exact_layer_delta, adapter, ids, mask, layer, means[layer], neurons[:1],
                    batch_windows=bw, max_rows=args.max_rows),
            args.repeats,
        )  # fmt: skip
        hn = neurons[: args.hooked_neurons]
        t_hk, hooked = _best(
            partial(layer_delta_forward, adapter, ids, mask, layer, means[layer], hn,
                    batch_windows=bw),
            args.repeats,
        )  # fmt: skip
        diff = float(np.abs(exact[:, : len(hn)] - hooked).max())
        t_sc, _ = _best(
            partial(screen_layers, adapter, ids, mask, {layer: means[layer]}, sets,
                    batch_windows=bw),
            args.repeats,
        )  # fmt: skip
        # the hooked run makes len(hn) + 1 whole forward passes (one for the base loss)
        per_ex, per_hk = t_ex / len(neurons), t_hk / (len(hn) + 1)
        marg = max(t_ex - t_one, 1e-9) / max(1, len(neurons) - 1)
        ceiling = _flops_ratio(adapter, layer, ids.shape[1], frac)
        print(f"{layer:>5} {per_hk:>10.3f} {per_ex:>10.3f} {per_hk / per_ex:>6.1f} {marg:>9.3f} "
              f"{per_hk / marg:>6.1f} {ceiling:>6.1f} {diff:>9.1e} {t_sc:>8.2f} "
              f"{t_sc / t_fwd:>6.2f}")  # fmt: skip
    t_all, _ = _best(
        lambda: screen_layers(adapter, ids, mask, means, sets, batch_windows=bw), args.repeats
    )
    print(
        f"screen of layers {layers} in one pass: {t_all:.2f} s = {t_all / t_fwd:.2f} forward passes"
    )

    if args.quality:
        print(f"screen quality (top_k {args.top_k}, n_random {args.n_random}, k {args.quality_k}):")
        last = [dims.n_layers - 3, dims.n_layers - 2, dims.n_layers - 1]
        qmeans = layer_mean_acts(adapter, ref_ids, ref_mask, last)
        for layer in last:
            t = _clock()
            res = layer_ablation(
                adapter, ids, mask, layer, qmeans[layer], rare_rows=sets["rare"],
                common_rows=common, top_k=args.top_k, n_random=args.n_random, seed=args.seed,
                quality_k=args.quality_k, batch_windows=bw, max_rows=args.max_rows,
            )  # fmt: skip
            for name, q in (("rare", res.quality_rare), ("common", res.quality_common)):
                print(f"  layer {layer} {name:>6}: spearman {q.spearman:.3f} "
                      f"(random sample {q.spearman_random:.3f}), recall top-{q.k} in "
                      f"screen top-{2 * q.k}: {q.recall:.2f}, est. missed {q.est_missed:.1f}")  # fmt: skip
            print(f"  layer {layer}: {_clock() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
