"""Joint ablation of neuron groups: closed form vs hooked forward passes, known answers,
additivity, the analysis result and its bad inputs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from raretoken.ablation.exact import delta_loss_exact
from raretoken.ablation.group import (
    delta_loss_group,
    delta_loss_group_recompute,
    row_inputs,
    select_rows,
)
from raretoken.ablation.inputs import AblationInputs, inputs_from_adapter
from raretoken.analyses._tables import jsonable
from raretoken.analyses.claims import Claim
from raretoken.analyses.group_ablation import (
    GroupAblationResult,
    _ratio_interval,
    additivity_verdict,
    group_ablation_analysis,
    group_ablation_claim,
)
from raretoken.errors import ConfigError, InsufficientDataError
from raretoken.models.adapters import NormSpec, adapter_for
from raretoken.models.hooks import capture_input, replace_input
from raretoken.stats.baselines import BaselineComparison
from tiny import D_MLP, tiny_model

GROUPS = [np.array([0, 5, 17]), np.array([3, 31, 40, 63, 8]), np.array([12])]


def _ce(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z, -1) - z.gather(-1, targets[..., None]).squeeze(-1)


def _setup(family: str, seed: int = 0):
    """Tiny float64 model, random windows and the captured final-layer inputs."""
    model = tiny_model(family, seed=seed)
    adapter = adapter_for(model)
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, 300, (3, 33)))
    with torch.no_grad(), capture_input(adapter.final_norm_module()) as rs, \
            capture_input(adapter.mlp_out_proj(-1)) as ac:  # fmt: skip
        model(input_ids=ids)
    resid = rs[-1][:, :-1].reshape(-1, rs[-1].shape[-1])
    acts = ac[-1][:, :-1].reshape(-1, D_MLP)
    mean = acts.mean(0) * 0.5 + 0.01  # any reference value works for the identity
    inputs = inputs_from_adapter(adapter, resid, acts, ids[:, 1:].reshape(-1), mean)
    return model, adapter, ids, inputs


def _hooked(model, adapter, ids: torch.Tensor, mean: torch.Tensor, group: np.ndarray):
    """Independent truth: full forward pass with the group's neurons set to their means."""
    targets = ids[:, 1:]

    def losses() -> torch.Tensor:
        with torch.no_grad():
            return _ce(model(input_ids=ids).logits[:, :-1], targets).reshape(-1)

    base = losses()
    g = torch.from_numpy(group)

    def set_mean(a: torch.Tensor) -> torch.Tensor:
        a = a.clone()
        a[..., g] = mean[g].to(a.dtype)
        return a

    with replace_input(adapter.mlp_out_proj(-1), set_mean):
        return (losses() - base).double()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_joint_ablation_matches_hooked_forward(family: str) -> None:
    model, adapter, ids, inputs = _setup(family)
    truth = torch.stack([_hooked(model, adapter, ids, inputs.mean_acts, g) for g in GROUPS], 1)
    assert truth.abs().max() > 1e-3  # the ablations do change the loss
    # Llama's HF RMSNorm computes in float32 even for float64 models; allow for that.
    fast = delta_loss_group(inputs, GROUPS, chunk_positions=7, chunk_elements=500)
    assert (fast - truth).abs().max() <= 1e-5
    assert (delta_loss_group_recompute(inputs, GROUPS) - truth).abs().max() <= 1e-5
    f32 = delta_loss_group(inputs.to("cpu", torch.float32), GROUPS)
    assert (f32 - truth).abs().max() <= 2e-5


def test_large_ablations_take_the_overflow_safe_path() -> None:
    _, _, _, inputs = _setup("llama", seed=2)
    for scale in (30.0, 300.0):
        big = dataclasses.replace(inputs, acts=inputs.acts * scale)
        a = delta_loss_group(big, GROUPS)
        assert a.abs().max() > 1.0
        assert (a - delta_loss_group_recompute(big, GROUPS)).abs().max() <= 1e-9


def test_group_of_one_equals_single_neuron_delta() -> None:
    _, _, _, inputs = _setup("gpt2", seed=1)
    singles = delta_loss_group(inputs, np.arange(D_MLP)[:, None])
    assert (singles - delta_loss_exact(inputs)).abs().max() <= 1e-10


def test_padding_of_ragged_groups_changes_nothing() -> None:
    _, _, _, inputs = _setup("neox", seed=3)
    ragged = delta_loss_group(inputs, GROUPS)
    for j, g in enumerate(GROUPS):
        alone = delta_loss_group(inputs, g[None, :])
        assert (ragged[:, j] - alone[:, 0]).abs().max() <= 1e-12


def test_groups_the_unembedding_cannot_see_change_nothing() -> None:
    # zeroed output weights (Llama) and, under LayerNorm (GPT-2), weights along the all-ones
    # direction, which the norm's centring removes: both leave every loss unchanged
    g = np.array([2, 9, 30])
    for family, fill in (("llama", 0.0), ("gpt2", 0.7)):
        _, _, _, inputs = _setup(family)
        w = inputs.w_out.clone()
        w[torch.from_numpy(g)] = fill
        blind = dataclasses.replace(inputs, w_out=w)
        out = delta_loss_group(blind, [g, GROUPS[1]])
        assert out[:, 0].abs().max() <= 1e-12
        assert out[:, 1].abs().max() > 1e-3


def test_tiny_ablations_are_additive() -> None:
    _, _, _, inputs = _setup("llama", seed=4)
    eps = 1e-3
    tiny = dataclasses.replace(
        inputs, acts=inputs.mean_acts + eps * (inputs.acts - inputs.mean_acts)
    )
    joint = delta_loss_group(tiny, GROUPS[:2])
    singles = delta_loss_exact(tiny)
    for j, g in enumerate(GROUPS[:2]):
        s = singles[:, torch.from_numpy(g)].sum(1)
        # interactions are second order in eps, the effects themselves first order
        assert (joint[:, j] - s).abs().max() <= 1e-3 * s.abs().max()


# ---------------------------------------------------------------------- synthetic planted cases
def _synthetic(seed: int = 0, n_pos: int = 120, n_neu: int = 40, vocab: int = 50, d: int = 16):
    """RMSNorm inputs whose residual has a fixed large component (200) along a direction the
    unembedding does not read: the norm's scale is then nearly constant and the logits are
    nearly linear in the residual. Targets: 0 on the first half of the positions ("rare",
    where the residual leans towards ``W_U[0]``), spread over the vocabulary on the second."""
    g = torch.Generator().manual_seed(seed)
    w_u = 50.0 * torch.randn(vocab, d, generator=g, dtype=torch.float64) / d**0.5
    w_u[:, -1] = 0.0
    v = w_u[0] / w_u[0].norm()
    resid = torch.randn(n_pos, d, generator=g, dtype=torch.float64)
    resid[:, -1] = 200.0
    resid[: n_pos // 2] += 3.0 * v
    targets = torch.randint(1, vocab, (n_pos,), generator=g)
    targets[: n_pos // 2] = 0
    w_out = 0.2 * torch.randn(n_neu, d, generator=g, dtype=torch.float64)
    mean = torch.zeros(n_neu, dtype=torch.float64)
    acts = 0.5 * torch.randn(n_pos, n_neu, generator=g, dtype=torch.float64)
    norm = NormSpec(kind="rmsnorm", weight=torch.ones(d, dtype=torch.float64), bias=None,
                    eps=1e-6)  # fmt: skip
    inputs = AblationInputs(resid, acts, targets, w_out, mean, norm, w_u, None)
    rare, common = np.arange(n_pos // 2), np.arange(n_pos // 2, n_pos)
    return inputs, rare, common


def _plant(inputs: AblationInputs, ids: list[int], signs: list[float], size: float):
    """Neurons ``ids`` write ``sign * size * (unit vector along W_U[0])`` and sit at activation
    1 (mean 0): ablating them moves the residual by ``-sign * size`` along ``W_U[0]``, so the
    logits by a fixed vector times ``sign * size`` (up to the norm's tiny rescaling)."""
    v = inputs.w_u[0] / inputs.w_u[0].norm()
    w, acts = inputs.w_out.clone(), inputs.acts.clone()
    for i, s in zip(ids, signs, strict=True):
        w[i] = s * size * v
        acts[:, i] = 1.0
    return dataclasses.replace(inputs, w_out=w, acts=acts)


def _analysis(inputs: AblationInputs, group, rare, common, **kw):
    delta = delta_loss_exact(inputs).numpy()
    kw = {"n_random": 39, "seed": 0, "n_boot": 500, **kw}
    return group_ablation_analysis(inputs, delta, np.asarray(group), rare, common, **kw)


def test_planted_duplicate_neurons_are_super_additive_and_beat_random() -> None:
    inputs, rare, common = _synthetic()
    planted = _plant(inputs, [0, 1], [1.0, 1.0], size=4.0)
    res = _analysis(planted, [0, 1], rare, common)
    # The same logit shift twice: the loss is convex in the logits (log-sum-exp) and 0 at 0,
    # so f(2t) >= 2 f(t) position by position
    assert res.rare.ratio > 1.1 and res.rare.verdict == "super-additive"
    assert res.rare.ratio_lo > 1.0
    assert res.rare.vs_random.p_value == pytest.approx(1 / 40)
    row = group_ablation_claim(res)
    assert Claim.from_dict(row).to_dict() == row
    assert row["p_value"] == pytest.approx(1 / 40) and row["key"] == "group_ablation"
    # the joint value is the mean of an independent recompute at the same rows
    sub = select_rows(planted, np.asarray(rare))
    ref = delta_loss_group_recompute(sub, [np.array([0, 1])])
    assert res.rare.joint == pytest.approx(float(ref.mean()), abs=1e-10)


def test_planted_cancelling_neurons_are_sub_additive() -> None:
    inputs, rare, common = _synthetic(seed=1)
    planted = _plant(inputs, [3, 4], [1.0, -1.0], size=2.0)
    res = _analysis(planted, [3, 4], rare, common)
    # opposite writes cancel: the joint ablation changes nothing, while each single one
    # does, and f(t) + f(-t) >= 0 by convexity
    assert abs(res.rare.joint) < 1e-12 and res.rare.single_sum > 0.1
    assert res.rare.verdict == "sub-additive" and res.rare.ratio_hi < 1.0


def test_tiny_effects_are_judged_additive() -> None:
    inputs, rare, common = _synthetic(seed=2)
    planted = _plant(inputs, [5, 6, 7], [1.0, 1.0, 1.0], size=0.1)
    res = _analysis(planted, [5, 6, 7], rare, common)
    # interactions are second order in the size, the effects first order
    assert res.rare.ratio == pytest.approx(1.0, abs=0.05) and res.rare.ratio != 1.0
    assert res.rare.verdict == "additive"


def test_cluster_bootstrap_known_answers() -> None:
    inputs, rare, common = _synthetic(seed=3)
    planted = _plant(inputs, [0, 1], [1.0, 1.0], size=4.0)
    by_pos = _analysis(planted, [0, 1], rare, common)
    # one window per position: the window bootstrap is the position bootstrap
    single = _analysis(planted, [0, 1], rare, common, clusters=np.arange(120) + 7)
    assert single.bootstrap_unit == "window"
    assert (single.rare.ratio_lo, single.rare.ratio_hi) == (by_pos.rare.ratio_lo,
                                                            by_pos.rare.ratio_hi)  # fmt: skip
    # one window in all: no resampling unit to speak of, so no verdict
    one = _analysis(planted, [0, 1], rare, common, clusters=np.zeros(120, dtype=int))
    assert one.rare.n_units == 1 and one.rare.verdict == "inconclusive"
    assert one.rare.ratio == pytest.approx(by_pos.rare.ratio)


def test_ratio_interval_matches_naive_resampling() -> None:
    rng = np.random.default_rng(5)
    num, den = rng.normal(2, 1, 30), rng.uniform(1, 2, 30)
    units = np.repeat(np.arange(10), 3)
    lo, hi = _ratio_interval(num, den, units, 200, 0.9, np.random.default_rng(9))
    draws = np.random.default_rng(9).integers(0, 10, size=(200, 10))
    ratios = [
        np.concatenate([num[units == u] for u in row]).sum()
        / np.concatenate([den[units == u] for u in row]).sum()
        for row in draws
    ]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(ratios, [0.05, 0.95])))


def test_additivity_verdict_rule() -> None:
    assert additivity_verdict(0.97, 1.04, 0.05) == "additive"
    assert additivity_verdict(1.01, 1.3, 0.05) == "super-additive"
    assert additivity_verdict(0.5, 0.99, 0.05) == "sub-additive"
    assert additivity_verdict(0.8, 1.2, 0.05) == "inconclusive"
    assert additivity_verdict(float("nan"), 1.0, 0.05) == "inconclusive"


def test_claim_rule_on_constructed_comparisons() -> None:
    inputs, rare, common = _synthetic(seed=4)
    res = _analysis(_plant(inputs, [0, 1], [1.0, 1.0], 4.0), [0, 1], rare, common)

    def cmp(observed: float, p: float, n: int = 39) -> BaselineComparison:
        return BaselineComparison(observed, 0.1, 0.05, n, p, "greater", 0.0, 0.5)

    def verdict(rare: BaselineComparison, sel: BaselineComparison | None = None) -> str:
        r = dataclasses.replace(res, rare=dataclasses.replace(res.rare, vs_random=rare),
                                selectivity=sel)  # fmt: skip
        return str(group_ablation_claim(r)["verdict"])

    assert verdict(cmp(0.05, 0.9)) == "not supported"
    assert verdict(cmp(0.2, 0.2)) == "inconclusive"
    assert verdict(cmp(0.9, 0.025)) == "supported"
    assert verdict(cmp(0.9, 0.2, n=9)) == "inconclusive"
    # with the rare/common ratio assessed, it must exceed the random groups' too
    assert verdict(cmp(0.9, 0.025), cmp(0.9, 0.025)) == "supported"
    assert verdict(cmp(0.9, 0.025), cmp(0.3, 0.2)) == "inconclusive"
    assert verdict(cmp(0.9, 0.025), cmp(0.05, 0.9)) == "not supported"


def test_result_round_trip_markdown_and_plot() -> None:
    from raretoken.plotting.analyses import new_axes

    inputs, rare, common = _synthetic(seed=5)
    res = _analysis(_plant(inputs, [0, 1], [1.0, 1.0], 4.0), [0, 1], rare, common,
                    max_positions_per_class=40)  # fmt: skip
    assert res.rare.n_positions == 40 and res.n_rare_total == 60
    back = GroupAblationResult.from_dict(json.loads(json.dumps(jsonable(res.to_dict()))))
    assert back.to_dict() == res.to_dict()
    md = res.to_markdown()
    assert "super-additive" in md and "rare / common" in md
    ax = res.plot(new_axes())
    assert len(ax.collections) == 6  # random, group, sum for each kind of target


def test_row_source_gives_the_same_analysis() -> None:
    _, adapter, _, inputs = _setup("gpt2")
    src = row_inputs(adapter, inputs.resid.numpy(), inputs.acts.numpy(), inputs.targets.numpy(),
                     inputs.mean_acts.numpy(), dtype=torch.float64)  # fmt: skip
    rows = np.array([1, 4, 50])
    a, b = src(rows), select_rows(inputs, rows)
    for name in ("resid", "acts", "targets", "w_out", "mean_acts", "w_u"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    delta = delta_loss_exact(inputs).numpy()
    kw = {"n_random": 9, "seed": 3, "n_boot": 100, "max_positions_per_class": 20}
    ra = group_ablation_analysis(src, delta, GROUPS[1], np.arange(40), np.arange(40, 96), **kw)
    rb = group_ablation_analysis(inputs, delta, GROUPS[1], np.arange(40), np.arange(40, 96),
                                 **kw)  # fmt: skip
    assert ra.to_dict() == rb.to_dict()


# ---------------------------------------------------------------------- bad input
def test_bad_groups_are_refused() -> None:
    _, _, _, inputs = _setup("gpt2")
    cases = [
        ([np.array([], dtype=np.int64)], InsufficientDataError, "empty"),
        ([], InsufficientDataError, "no neuron group"),
        ([np.array([1, 2, 1])], ConfigError, "repeats"),
        ([np.array([1, D_MLP])], ConfigError, r"\[0, 64\)"),
        ([np.array([-1, 3])], ConfigError, r"\[0, 64\)"),
        ([np.arange(D_MLP + 1)], ConfigError, "only 64"),
        ([np.array([1.0, 2.0])], ConfigError, "integer"),
    ]
    for groups, err, msg in cases:
        with pytest.raises(err, match=msg):
            delta_loss_group(inputs, groups)
    empty = select_rows(inputs, np.array([], dtype=np.int64))
    with pytest.raises(InsufficientDataError, match="no positions"):
        delta_loss_group(empty, GROUPS)


def test_bad_analysis_inputs_are_refused() -> None:
    inputs, rare, common = _synthetic(seed=6)
    delta = delta_loss_exact(inputs).numpy()

    def run(group=(0, 1), r=rare, c=common, d=delta, **kw):
        kw = {"n_random": 9, "seed": 0, "n_boot": 50, **kw}
        return group_ablation_analysis(inputs, d, np.asarray(group), r, c, **kw)

    with pytest.raises(InsufficientDataError, match=">= 2 neurons"):
        run(group=np.array([], dtype=np.int64))
    with pytest.raises(ConfigError, match="repeat"):
        run(group=(3, 3))
    with pytest.raises(ConfigError, match=r"\[0, 40\)"):
        run(group=(3, 40))
    with pytest.raises(ConfigError, match="layer has 40"):
        run(group=np.arange(41))
    with pytest.raises(InsufficientDataError, match="rare-target"):
        run(r=np.array([], dtype=np.int64))
    with pytest.raises(InsufficientDataError, match="no positions"):
        group_ablation_analysis(lambda rows: inputs, delta[:0], np.array([0, 1]), rare, common,
                                n_random=9, seed=0)  # fmt: skip
    with pytest.raises(ConfigError, match="do not match"):
        run(d=delta[:10])
    with pytest.raises(ConfigError, match="one window id per position"):
        run(clusters=np.zeros(5))
    with pytest.raises(ConfigError, match="random groups"):
        run(n_random=1)
    with pytest.raises(ConfigError, match=r"\[0, 120\)"):
        run(c=np.array([5, 500]))
