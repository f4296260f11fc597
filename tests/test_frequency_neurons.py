"""Frequency-neuron check: unigram-direction mediation of mean-ablation effects.

Known answers: the unigram direction of hand-made counts; a hand-built model where one neuron
writes exactly along the unigram direction (mediated fraction 1) and one orthogonal to it
(fraction 0); synthetic effects with planted fractions (verdicts). Independent implementation:
full hooked forward passes of tiny models with the logits' unigram component reset by hand.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raretoken.ablation.exact import delta_loss_exact
from raretoken.ablation.frequency import frequency_effects, mediated_fraction, unigram_direction
from raretoken.ablation.inputs import AblationInputs, inputs_from_adapter, logits_of
from raretoken.analyses.claims import Claim
from raretoken.analyses.frequency import (
    DISTINCT,
    INCONCLUSIVE,
    NOT_DISTINCT,
    FrequencyNeuronResult,
    frequency_analysis,
    frequency_claim,
    pooled_fraction,
    sample_positions,
    summarize_frequency,
)
from raretoken.errors import ConfigError, InsufficientDataError
from raretoken.models.adapters import NormSpec, adapter_for
from raretoken.models.hooks import capture_input, replace_input
from tiny import FAMILIES, tiny_model

# ------------------------------------------------------------------------------ helpers


def _ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z, -1) - z.gather(-1, y[:, None]).squeeze(-1)


def _tiny(family: str, seed: int = 0):
    """A float64 tiny model, its adapter, input ids, captured arrays, mean acts and counts."""
    model = tiny_model(family, seed=seed, dtype=torch.float64)
    adapter = adapter_for(model)
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(3, 300, size=(3, 17))).long()
    with (
        capture_input(adapter.final_norm_module()) as rs,
        capture_input(adapter.mlp_out_proj(-1)) as ac,
        torch.no_grad(),
    ):
        model(input_ids=ids)
    resid = rs[-1][:, :-1].reshape(-1, rs[-1].shape[-1])
    acts = ac[-1][:, :-1].reshape(-1, ac[-1].shape[-1])
    targets = ids[:, 1:].reshape(-1)
    mean = acts.mean(0) * 0.5 + 0.01
    counts = rng.integers(0, 5000, size=model.config.vocab_size)
    return model, adapter, ids, resid, acts, targets, mean, counts


def _brute_hooked(model, adapter, ids, mean, neurons, f):
    """``(Δ, Δ_held)`` by full forward passes, the neuron hooked to its mean."""
    with torch.no_grad():
        z = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
    y = ids[:, 1:].reshape(-1)
    base = _ce(z, y)
    tot, held = [], []
    for i in neurons:

        def set_mean(a: torch.Tensor, i: int = int(i)) -> torch.Tensor:
            a = a.clone()
            a[..., i] = mean[i]
            return a

        with replace_input(adapter.mlp_out_proj(-1), set_mean), torch.no_grad():
            za = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
        zh = za - ((za - z) @ f)[:, None] * f[None, :]  # reset the component along f
        tot.append(_ce(za, y) - base)
        held.append(_ce(zh, y) - base)
    return torch.stack(tot, 1).numpy(), torch.stack(held, 1).numpy()


def _brute_recompute(inputs: AblationInputs, f: torch.Tensor):
    """``(Δ, Δ_held)`` of every neuron by recomputing the final norm and the unembedding."""
    z = logits_of(inputs.resid, inputs)
    base = _ce(z, inputs.targets)
    tot, held = [], []
    for i in range(inputs.n_neurons):
        delta = (inputs.mean_acts[i] - inputs.acts[:, i])[:, None] * inputs.w_out[i]
        za = logits_of(inputs.resid + delta, inputs)
        zh = za - ((za - z) @ f)[:, None] * f[None, :]
        tot.append(_ce(za, inputs.targets) - base)
        held.append(_ce(zh, inputs.targets) - base)
    return torch.stack(tot, 1).numpy(), torch.stack(held, 1).numpy()


# ------------------------------------------------------------------------------ direction


def test_unigram_direction_known_answer() -> None:
    e = math.e
    counts = np.array([0.0, e - 1.0, e**2 - 1.0])  # log(count + 1) = 0, 1, 2
    f = unigram_direction(counts, 3).numpy()
    assert np.allclose(f, np.array([-1.0, 0.0, 1.0]) / math.sqrt(2.0), atol=1e-12)
    # padded rows (vocab > len(counts)) get count 0, i.e. log(1) = 0
    f4 = unigram_direction(counts, 4).numpy()
    ell = np.array([0.0, 1.0, 2.0, 0.0])
    want = (ell - ell.mean()) / np.linalg.norm(ell - ell.mean())
    assert np.allclose(f4, want, atol=1e-12)
    assert abs(f4.sum()) < 1e-12 and abs(np.linalg.norm(f4) - 1) < 1e-12


@pytest.mark.parametrize(
    ("counts", "vocab", "kw", "err"),
    [
        (np.full(5, 7), 5, {}, InsufficientDataError),  # uniform counts: zero norm
        (np.zeros(5), 5, {}, InsufficientDataError),
        (np.arange(6), 5, {}, ConfigError),  # longer than the vocabulary
        (np.array([1, -1, 2]), 3, {}, ConfigError),
        (np.array([1, 2, 3]), 3, {"pseudo_count": 0.0}, ConfigError),
        (np.ones((2, 2)), 4, {}, ConfigError),
    ],
)
def test_unigram_direction_bad_inputs(counts, vocab, kw, err) -> None:
    with pytest.raises(err):
        unigram_direction(counts, vocab, **kw)


# ------------------------------------------------------------------------------ effects


@pytest.mark.parametrize("family", FAMILIES)
def test_effects_match_hooked_forward(family: str) -> None:
    model, adapter, ids, resid, acts, targets, mean, counts = _tiny(family)
    f = unigram_direction(counts, model.config.vocab_size)
    inputs = inputs_from_adapter(adapter, resid, acts, targets, mean)
    neurons = [0, 7, 31, 63]
    want_t, want_h = _brute_hooked(model, adapter, ids, mean, neurons, f)
    assert np.abs(want_t - want_h).max() > 1e-4  # the reset changes something
    for series in (True, False):
        eff = frequency_effects(inputs, f, neurons, series=series)
        # Llama's HF RMSNorm computes in float32 even for float64 models
        assert np.abs(eff.total - want_t).max() < 1e-5
        assert np.abs(eff.held - want_h).max() < 1e-5
        assert np.allclose(eff.mediated, eff.total - eff.held)
    # all neurons: the total effect is the exact ablation of the package
    full = frequency_effects(inputs, f)
    assert np.abs(full.total - delta_loss_exact(inputs).numpy()).max() < 1e-10


def test_blocks_and_float32_do_not_change_results() -> None:
    _, adapter, _, resid, acts, targets, mean, counts = _tiny("gpt2", seed=3)
    inputs = inputs_from_adapter(adapter, resid, acts, targets, mean)
    f = unigram_direction(counts, inputs.w_u.shape[0])
    ref = frequency_effects(inputs, f)
    small = frequency_effects(inputs, f, neuron_block=9, chunk_elements=5000)
    assert np.abs(small.total - ref.total).max() < 1e-12
    # the number of series terms follows each block's largest |s f| (truncation <= 1e-10)
    assert np.abs(small.held - ref.held).max() < 1e-9
    f32 = frequency_effects(inputs.to("cpu", torch.float32), f)
    assert np.abs(f32.total - ref.total).max() < 1e-5
    assert np.abs(f32.held - ref.held).max() < 1e-5


def _planted(delta_scale: float = 1.0, x_norm: float = 1e4) -> tuple[AblationInputs, torch.Tensor]:
    """RMSNorm model: neuron 0 writes exactly along f in logit space, neuron 1 orthogonally.

    The residual is large in the directions the neurons do not write to, so the norm's
    rescaling (the only other path) is second order (``A ~ δ² / |x|²``).
    """
    gen = torch.Generator().manual_seed(0)
    vocab, d = 8, 6
    f = unigram_direction(2 ** np.arange(vocab) - 1, vocab)  # log(count + 1) = k log 2
    g = torch.randn(vocab, generator=gen, dtype=torch.float64)
    g = g - g.mean()
    g = g - (g @ f) * f
    g = g / g.norm()
    w_u = torch.randn(vocab, d, generator=gen, dtype=torch.float64)
    w_u[:, 0], w_u[:, 1] = f, g  # W_U e_0 = f, W_U e_1 = g ⊥ f
    n_pos = 12
    resid = torch.randn(n_pos, d, generator=gen, dtype=torch.float64) * x_norm / 2
    resid[:, :2] = 0.0
    acts = torch.randn(n_pos, 2, generator=gen, dtype=torch.float64) * delta_scale
    inputs = AblationInputs(
        resid=resid, acts=acts, targets=torch.randint(0, vocab, (n_pos,), generator=gen),
        w_out=torch.eye(d, dtype=torch.float64)[:2], mean_acts=torch.zeros(2, dtype=torch.float64),
        norm=NormSpec(kind="rmsnorm", weight=torch.ones(d, dtype=torch.float64), bias=None,
                      eps=1e-6),
        w_u=w_u, b_u=None,
    )  # fmt: skip
    return inputs, f


def test_planted_along_and_orthogonal_to_the_direction() -> None:
    inputs, f = _planted()
    eff = frequency_effects(inputs, f)
    frac = eff.mediated_fraction()
    assert np.abs(eff.total).mean(0).min() > 1e-6  # both neurons do something
    assert frac[0] > 0.999  # its whole effect passes through f
    assert abs(frac[1]) < 1e-3  # none of it does


@pytest.mark.parametrize("scale", [3e2, 3e3, 1e4, 3e4, 1e6])
def test_series_and_overflow_paths_match_recompute(scale: float) -> None:
    """Large ablations (series with many terms, two-pass, logsumexp paths) stay exact."""
    inputs, f = _planted(delta_scale=scale, x_norm=10.0)
    eff = frequency_effects(inputs, f)
    two = frequency_effects(inputs, f, series=False)
    want_t, want_h = _brute_recompute(inputs, f)
    assert np.abs(eff.total - want_t).max() < 1e-8
    assert np.abs(eff.held - want_h).max() < 1e-8
    assert np.abs(eff.held - two.held).max() < 1e-8


def test_effects_bad_inputs() -> None:
    inputs, f = _planted()
    empty = AblationInputs(**{**inputs.__dict__, "resid": inputs.resid[:0],
                              "acts": inputs.acts[:0], "targets": inputs.targets[:0]})  # fmt: skip
    with pytest.raises(InsufficientDataError):
        frequency_effects(empty, f)
    with pytest.raises(InsufficientDataError):
        frequency_effects(inputs, torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ConfigError):
        frequency_effects(inputs, 2 * f)  # not unit norm
    with pytest.raises(ConfigError):
        frequency_effects(inputs, f[:5])
    with pytest.raises(ConfigError):
        frequency_effects(inputs, f, [0, 2])  # neuron 2 does not exist
    with pytest.raises(InsufficientDataError):
        frequency_effects(inputs, f, np.zeros(0, dtype=np.int64))


def test_mediated_fraction_definition() -> None:
    got = mediated_fraction(np.array([2.0, 1.0, 0.0, 1.0]), np.array([0.5, 1.0, 0.0, 1.5]))
    assert np.allclose(got[[0, 1, 3]], [0.75, 0.0, -0.5]) and math.isnan(got[2])
    assert pooled_fraction(np.array([1.0, 3.0, 5.0]), np.array([1.0, 0.0, 5.0]), [0, 1]) == 0.75


# ------------------------------------------------------------------------------ analysis


def _synthetic(frac: np.ndarray, scale: np.ndarray, n_pos: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    total = rng.standard_normal((n_pos, frac.size)) * scale
    return total, total * (1.0 - frac)  # mean|held| = (1 - frac) mean|total| exactly


def _summary(frac, scale, group, n_random=99, seed=0) -> FrequencyNeuronResult:
    total, held = _synthetic(frac, scale)
    n = total.shape[0]
    rows = {"all": np.arange(n), "rare": np.arange(n // 2), "common": np.arange(n // 2, n)}
    return summarize_frequency(total, held, rows, group, n_random=n_random, seed=seed)


def test_planted_fractions_and_verdicts() -> None:
    rng = np.random.default_rng(1)
    n, group = 200, np.arange(10)
    scale = np.exp(rng.normal(0, 0.3, n))
    frac = np.full(n, 0.1)
    frac[group] = 0.9
    res = _summary(frac, scale, group)
    assert np.allclose(res.mediated_fraction[res.row("all")], frac)  # the known answer
    assert np.allclose(res.mediated_fraction[res.row("rare")], frac)
    assert res.fraction_vs_random.observed == pytest.approx(0.9)
    assert res.fraction_vs_random.random_mean == pytest.approx(0.1)
    assert res.overlap["overlap"] == 10 and res.verdict == NOT_DISTINCT

    frac2 = rng.uniform(0.1, 0.6, n)
    frac2[group] = 0.05
    res2 = _summary(frac2, scale, group)
    assert res2.verdict == DISTINCT and res2.overlap["overlap"] == 0
    assert res2.fraction_vs_random.observed == pytest.approx(0.05)

    # high fraction but negligible effects: no overlap with the strongest -> mixed evidence
    tiny_scale = scale.copy()
    tiny_scale[group] = 1e-3
    assert _summary(frac, tiny_scale, group).verdict == INCONCLUSIVE
    # too few random groups to resolve α = 0.05
    assert _summary(frac, scale, group, n_random=10).verdict == INCONCLUSIVE


def test_summary_bad_inputs() -> None:
    frac, scale = np.full(20, 0.2), np.ones(20)
    with pytest.raises(ConfigError, match="larger than the layer"):
        _summary(frac, scale, np.arange(21))
    with pytest.raises(InsufficientDataError):
        _summary(frac, scale, np.arange(11))  # too few neurons left for random groups
    with pytest.raises(ConfigError):
        _summary(frac, scale, np.array([3, 3]))
    total, held = _synthetic(frac, scale)
    with pytest.raises(InsufficientDataError):
        summarize_frequency(total, held, {"all": np.zeros(0)}, np.arange(3), n_random=20, seed=0)
    with pytest.raises(InsufficientDataError):
        sample_positions(np.zeros(0), np.zeros(0), 10, 0)
    with pytest.raises(ConfigError):
        sample_positions(np.arange(5), np.arange(5, 9), 0, 0)


def test_sample_positions_caps_and_seed() -> None:
    rare, common = np.arange(0, 500, 2), np.arange(1, 41, 2)
    a = sample_positions(rare, common, 32, 7)
    b = sample_positions(rare, common, 32, 7)
    assert a[0].size == 32 and a[1].size == 20  # capped / all kept
    assert np.isin(a[0], rare).all() and np.unique(a[0]).size == 32
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], sample_positions(rare, common, 32, 8)[0])


def test_frequency_analysis_on_tiny_model() -> None:
    model, adapter, _, resid, acts, targets, mean, counts = _tiny("neox", seed=2)
    n = resid.shape[0]
    rare, common = np.arange(0, n, 3), np.setdiff1d(np.arange(n), np.arange(0, n, 3))
    group = np.array([1, 4, 9, 16, 25])
    ref = delta_loss_exact(inputs_from_adapter(adapter, resid, acts, targets, mean)).numpy()
    kw = dict(n_random=30, seed=5, max_positions=None, dtype=torch.float64)
    res = frequency_analysis(adapter, mean.numpy(), resid.numpy(), acts.numpy(),
                             targets.numpy(), rare, common, counts, group,
                             reference_delta=ref, **kw)  # fmt: skip
    assert res.n_positions == (n, rare.size, common.size)
    assert res.settings["max_abs_diff_vs_reference"] < 1e-10
    f = unigram_direction(counts, model.config.vocab_size)
    t, h = _brute_recompute(inputs_from_adapter(adapter, resid, acts, targets, mean), f)
    for name, rows in (("all", np.arange(n)), ("rare", rare), ("common", common)):
        r = res.row(name)
        assert np.abs(res.mean_abs_total[r] - np.abs(t[rows]).mean(0)).max() < 1e-10
        assert np.abs(res.mean_abs_held[r] - np.abs(h[rows]).mean(0)).max() < 1e-10
    again = frequency_analysis(adapter, mean.numpy(), resid.numpy(), acts.numpy(),
                               targets.numpy(), rare, common, counts, group, **kw)  # fmt: skip
    assert again.fraction_vs_random == res.fraction_vs_random
    capped = frequency_analysis(adapter, mean.numpy(), resid.numpy(), acts.numpy(),
                                targets.numpy(), rare, common, counts, group,
                                **{**kw, "max_positions": 4})  # fmt: skip
    assert capped.n_positions == (8, 4, 4)


def test_result_round_trip_table_plot_and_claim() -> None:
    rng = np.random.default_rng(2)
    n, group = 120, np.arange(6)
    frac = np.full(n, 0.1)
    frac[group] = 0.8
    frac[50] = math.nan  # a dead neuron below
    scale = np.exp(rng.normal(0, 0.3, n))
    scale[50] = 0.0
    total, held = _synthetic(np.nan_to_num(frac), scale)
    rows = {"all": np.arange(40), "rare": np.arange(20), "common": np.zeros(0)}
    res = summarize_frequency(total, held, rows, group, n_random=40, seed=1,
                              settings={"seed": 1})  # fmt: skip
    assert math.isnan(res.mediated_fraction[0, 50]) and np.isnan(res.mean_abs_total[2]).all()
    d = json.loads(json.dumps(res.to_dict()))
    back = FrequencyNeuronResult.from_dict(d)
    assert back.to_dict() == res.to_dict()
    assert back.axes == ("subset", "neuron") and back.subsets == ("all", "rare", "common")
    md = res.to_markdown()
    assert res.verdict in md and "| check |" in md
    import matplotlib

    matplotlib.use("Agg")
    ax = res.plot()
    assert ax.get_xscale() == "log" and len(ax.collections) == 3
    row = frequency_claim(res)
    as_claim = Claim.from_dict(row).to_dict()
    assert set(row) <= set(as_claim) and all(as_claim[k] == v for k, v in row.items())
    assert row["verdict"] == {DISTINCT: "supported", NOT_DISTINCT: "not supported"}.get(
        res.verdict, "inconclusive"
    )
    assert row["verdict"] == "not supported"
    with pytest.raises(ConfigError):
        res.row("middle")
