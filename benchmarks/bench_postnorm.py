"""Fast all-neuron ablation through a post-MLP norm vs per-neuron recomputation, side by side.

For each post-norm family (Gemma 2 with soft-capped logits, Gemma 3, OLMo 2) a random model of
the family's class is built at ``--size full`` (d_model 512, d_mlp 2048, vocabulary 32,768) or
``--size small`` (128, 512, 8,192), with four blocks (so that the final MLP output is a modest
part of the residual stream, as in trained models: the per-pair Δloss then has SmolLM2-135M's
scale, median ~3e-3 nats, 99th percentile ~0.1). A forward pass over random tokens captures
the final residual and the final-layer neurons, and on the same positions this times

* ``fast``: :func:`raretoken.ablation.fast.delta_loss_fast` (it dispatches to
  :mod:`raretoken.ablation.postnorm_fast`) over every neuron, at each ``--tols`` value (its
  proven bound on every pair's error; pairs beyond it are recomputed exactly);
* ``naive``: :func:`raretoken.ablation.naive.delta_loss_recompute` — the post-MLP norm, the
  final norm, the unembedding (and the soft-capping) recomputed once per neuron — on
  ``--naive-neurons`` neurons (linear in the neurons, so the per-pair cost extrapolates);
* ``exact``: the per-pair closed form over the vocabulary
  (:func:`raretoken.ablation.exact.delta_loss_exact`, the fast method's fallback and the method
  ``--method exact`` runs) on every neuron at the first ``--exact-positions`` positions: its
  cost per pair (its per-position work is shared by all neurons, so it is timed on all).

Accuracy: every pair of the checked neurons against the exact closed form in float64 (target:
within 1e-4), and against the naive float32 recomputation. Target: naive / fast >= 50.
The methods take turns within each of ``--repeats`` repeats; the fastest run of each counts
(a shared machine's load hits all alike), on ``--threads`` threads (default 1). Models are float32 with random weights drawn with
``--init`` (0.13: logits of standard deviation ~3, so the softmax is peaked) and random norm
gains.

    python benchmarks/bench_postnorm.py --size small     # quick check
    python benchmarks/bench_postnorm.py                  # d_model 512, d_mlp 2048, vocab 32k
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Olmo2Config,
    Olmo2ForCausalLM,
)

from raretoken.ablation.exact import delta_loss_exact
from raretoken.ablation.fast import FastStats, delta_loss_fast
from raretoken.ablation.inputs import AblationInputs, inputs_from_adapter
from raretoken.ablation.naive import delta_loss_recompute
from raretoken.models.adapters import adapter_for
from raretoken.models.hooks import capture_input

SIZES = {"full": (512, 2048, 32768), "small": (128, 512, 8192)}


def build(
    fam: str, d_model: int, d_mlp: int, vocab: int, init: float, seed: int, n_layers: int = 4
) -> Any:
    kw: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        initializer_range=init, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if fam == "gemma2":
            model: Any = Gemma2ForCausalLM(Gemma2Config(**kw, head_dim=64))  # soft-cap 30
        elif fam == "gemma3":
            model = Gemma3ForCausalLM(Gemma3TextConfig(**kw, head_dim=64))
        else:
            model = Olmo2ForCausalLM(Olmo2Config(**kw))
        with torch.no_grad():
            for mod in model.modules():
                if "RMSNorm" in type(mod).__name__:
                    mod.weight.add_(0.2 * torch.randn_like(mod.weight))
    return model.eval().requires_grad_(False)


def capture(model: Any, n_pos: int, seed: int) -> AblationInputs:
    """Ablation inputs of ``n_pos`` positions (windows of 128 random tokens); the mean
    activations come from a second, independent batch."""
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(seed)
    vocab = adapter.dims.vocab_size

    def run(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.randint(3, vocab, (max(1, math.ceil(n / 127)), 128), generator=gen)
        with (
            torch.no_grad(),
            capture_input(adapter.final_norm_module()) as resid,
            capture_input(adapter.mlp_out_proj(-1)) as acts,
        ):
            adapter.hidden_states(ids)
        d = resid[0].shape[-1]
        return (resid[0][:, :-1].reshape(-1, d)[:n], acts[0][:, :-1].reshape(-1, acts[0].shape[-1])[:n],
                ids[:, 1:].reshape(-1)[:n])  # fmt: skip

    resid, acts, targets = run(n_pos)
    mean = run(2 * 127)[1].mean(0)
    return inputs_from_adapter(adapter, resid, acts, targets, mean).to("cpu", torch.float32)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    res = fn()
    return time.perf_counter() - t, res


def bench_family(fam: str, args: argparse.Namespace, out: Any) -> bool:
    d_model, d_mlp, vocab = SIZES[args.size]
    model = build(fam, d_model, d_mlp, vocab, args.init, args.seed)
    inputs = capture(model, args.positions, args.seed)
    del model
    n_pos, n_neu = inputs.n_positions, inputs.n_neurons
    neurons = np.linspace(0, n_neu - 1, args.naive_neurons).round().astype(int).tolist()
    sel = torch.tensor(neurons)
    rows = torch.arange(min(n_pos, args.exact_positions))
    few = dataclasses.replace(inputs, resid=inputs.resid[rows], acts=inputs.acts[rows],
                              targets=inputs.targets[rows])  # fmt: skip
    best = {tol: math.inf for tol in args.tols}
    fast_out: dict[float, tuple[torch.Tensor, FastStats]] = {}
    t_naive = t_exact = math.inf
    naive = None
    for _ in range(args.repeats):
        for tol in args.tols:
            t, fast_out[tol] = timed(lambda tol=tol: delta_loss_fast(
                inputs, tol=tol, chunk_positions=args.chunk_positions))  # fmt: skip
            best[tol] = min(best[tol], t)
        t, naive = timed(lambda: delta_loss_recompute(inputs, neurons))
        t_naive = min(t_naive, t)
        t, _ = timed(lambda: delta_loss_exact(few))
        t_exact = min(t_exact, t)
    assert naive is not None
    ref = delta_loss_exact(inputs.to("cpu", torch.float64), sel)  # the accuracy reference
    per_naive = t_naive / (n_pos * len(neurons))
    per_exact = t_exact / (len(rows) * n_neu)
    cap = inputs.softcap
    out.write(f"\n{fam}: d_model {d_model}, d_mlp {d_mlp}, vocab {vocab}, positions {n_pos}, "
              f"soft-cap {cap}; naive on {len(neurons)} neurons, exact on {len(rows)} positions\n")  # fmt: skip
    mag = fast_out[args.tols[0]][0].abs().flatten()
    out.write(f"  |ΔL| per pair: median {float(mag.median()):.1e}, 99th percentile "
              f"{float(mag[:: max(1, mag.numel() // 1_000_000)].quantile(0.99)):.1e}, "
              f"max {float(mag.max()):.2f} nats\n")  # fmt: skip
    out.write(f"  naive (post-norm + final norm + unembedding per neuron): {per_naive * 1e6:9.3f} "
              f"µs per pair; all neurons would take {per_naive * n_pos * n_neu:.0f} s\n")  # fmt: skip
    out.write(f"  exact closed form over the vocabulary:                    {per_exact * 1e6:9.3f} "
              f"µs per pair ({per_naive / per_exact:.1f}x faster than naive)\n")  # fmt: skip
    ok = True
    for tol in args.tols:
        fast, stats = fast_out[tol]
        per_fast = best[tol] / (n_pos * n_neu)
        sub = fast[:, neurons].double()
        err = float((sub - ref).abs().max())
        err_naive = float((sub - naive).abs().max())
        err_neuron = float((sub.abs().mean(0) - ref.abs().mean(0)).abs().max())
        ratio = per_naive / per_fast
        ok &= ratio >= 50 and err <= 1e-4
        out.write(f"  fast (tol {tol:.0e}): {best[tol]:7.2f} s all neurons, {per_fast * 1e6:8.3f} µs "
                  f"per pair, exact fallback {100 * stats.fallback_rate:.2f}% of pairs; "
                  f"naive / fast = {ratio:.1f}x (target >= 50)\n")  # fmt: skip
        out.write(f"    max |ΔL - exact (float64)| {err:.2e} (target <= 1e-4), vs naive float32 "
                  f"{err_naive:.2e}, per-neuron mean |ΔL| {err_neuron:.2e}\n")  # fmt: skip
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--families", default="gemma2,gemma3,olmo2")
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--naive-neurons", type=int, default=8)
    ap.add_argument("--exact-positions", type=int, default=16)
    ap.add_argument("--chunk-positions", type=int, default=256)
    ap.add_argument("--tols", type=lambda t: [float(x) for x in t.split(",")], default=[1e-5, 1e-4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--init", type=float, default=0.13)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared machine, multi-threaded small operations "
        "stall on descheduled threads, which distorts the fast method far more than the naive one)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = sys.stdout
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out.write(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, load average "
              f"{load:.1f} at start; times: fastest of {args.repeats} runs\n")  # fmt: skip
    ok = all([bench_family(f, args, out) for f in args.families.split(",")])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out.write(f"\npeak RSS {rss:.0f} MiB; load average {load:.1f} at the end; "
              f"targets {'met' if ok else 'NOT met'}\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
