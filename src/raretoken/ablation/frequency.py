"""How much of a neuron's mean-ablation loss effect passes through the unigram direction.

After Stolfo et al. (2024, *Confidence regulation neurons in language models*, §5 "token
frequency neurons"; their code: ``ablations/run_and_store_unigram_results.py`` and
``load_results_unigram.py`` of bpwu1/confidence-regulation-neurons).

Unigram direction (:func:`unigram_direction`)
---------------------------------------------
``f = ℓ - mean_v(ℓ)``, normalised to unit length, with ``ℓ_v = log(n_v + α)`` the smoothed
log-count of token ``v`` in the counted corpus (:class:`raretoken.data.counting.TokenCounts`)
and ``α = 1`` (add-one smoothing, as the authors' ``get_pile_unigram_distribution``); counts
shorter than the vocabulary (padded unembedding rows) are padded with zeros, so unseen, special
and padded tokens get ``log α``. ``f`` lives in logit space (one entry per vocabulary id). The
normalisation of the counts into probabilities and the log base only shift or scale ``ℓ`` and
drop out. Because ``f`` sums to zero, ``z·f`` ignores any constant added to all logits, so the
LM-head bias and the mean row of ``W_U`` need no centring. (The ``unigram_cosine`` covariate of
:mod:`raretoken.stats.covariates` uses the same centred log-frequency but leaves unseen tokens
out instead of smoothing them; it computes the direction inline, so there is nothing to reuse.)

Total and frequency-held effects (:func:`frequency_effects`)
------------------------------------------------------------
Mean ablation of final-layer neuron ``i`` adds ``(n̄_i - n_i) w_i`` to the final residual, giving
ablated logits ``z̃`` (the final norm is *recomputed*, as in the authors' unigram script; the
frozen-norm-scale "direct effect" of their entropy-neuron analysis is a different question).
Per position and neuron:

* total effect ``Δ = CE(z̃) - CE(z)``;
* frequency-held effect ``Δ_held = CE(z̃_held) - CE(z)`` with
  ``z̃_held = z̃ - ((z̃ - z)·f) f``: the ablated logits with their component along ``f`` reset to
  its original value (the authors' ``adjust_vectors_3dim``);
* the mediated part ``Δ - Δ_held``.

Computation: with ``z̃ - z = A h + B u_i`` (:mod:`.scales`), ``z̃_held - z = A h + B u_i - s f``
with the scalar ``s = A (h·f) + B (u_i·f)``, so both losses are exact closed forms
``log Σ_v p_v e^{g_v} - g_y`` over the vocabulary (``p`` the base softmax). ``g`` is first
shifted by its mean ``E_p g`` (a per-pair constant, which cancels) so that ``Σ p e^g >= 1``;
then ``Δ = log1p(Σ_v p_v expm1(g_v)) - g_y``, elementwise over blocks of (positions × neurons ×
vocabulary) in the inputs' dtype, with the sums over the vocabulary accumulated in float64 over
blocks of :data:`VOCAB_BLOCK` tokens and the scalars ``A``, ``B``, ``s``, ``g_y`` in float64.
The held sum needs no second pass over the vocabulary: with ``φ = f / max|f|`` and
``m = |s| max|f|``, ``Σ p e^{g - s f} = Σ p e^g + Σ_{j>=1} (-s max|f|)^j / j! Σ_v p_v e^{g_v} φ_v^j``,
the moments coming from the same pass (one batched product with the ``J + 1`` columns
``φ^j``); ``J`` is the fewest terms whose Lagrange remainder bounds the error of the log by
:data:`SERIES_TOL` (:func:`_series_terms`). Pairs with ``m >`` :data:`SERIES_MAX` take a
second exact pass, and blocks whose exponents could overflow take ``logsumexp``. In float32 on
SmolLM2-135M the result is within ~3e-6 nats of the float64 one (the package's exact method in
float32: ~1.4e-5).

Families with a post-MLP norm (Gemma 2/3, OLMo 2) or soft-capped logits (Gemma 2): ``g`` is the
change of the model's final logits from :mod:`.postnorm`'s closed form (``A h + C q + B u``,
then the soft-capping), ``s = g·f``, and both sums are taken over the vocabulary in two exact
passes (:func:`raretoken.ablation.postnorm_group.frequency_effects_general`).

Mediated fraction (:func:`mediated_fraction`)
---------------------------------------------
``1 - mean_t |Δ_held| / mean_t |Δ|`` over the positions ``t``: Stolfo et al.'s
``1 - DE_freq / TE`` with absolute loss differences averaged per neuron (their
``load_results_unigram.py``). Absolute values, because an ablation can raise the loss at some
positions and lower it at others; the ratio of means, because a per-position ratio explodes
where ``Δ ≈ 0``. 1: the whole effect passes through ``f``; 0: none; negative: holding the
frequency component makes the effect larger. NaN where ``mean |Δ| = 0`` (a constant neuron).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..data.counting import TokenCounts
from ..errors import ConfigError, InsufficientDataError, NumericalError
from .inputs import AblationInputs, centered, logits_of
from .postnorm_group import frequency_effects_general
from .scales import ablation_scalars, logit_offset

log = logging.getLogger(__name__)

__all__ = [
    "FrequencyEffects",
    "frequency_effects",
    "mediated_fraction",
    "unigram_direction",
]

#: Default values per elementwise block (positions × neurons × vocabulary).
CHUNK_ELEMENTS = 1 << 24


def unigram_direction(
    counts: TokenCounts | np.ndarray | Sequence[int],
    vocab_size: int,
    *,
    pseudo_count: float = 1.0,
) -> torch.Tensor:
    """The unit, centred, smoothed log-frequency direction ``f`` ``(vocab_size,)`` float64.

    Parameters
    ----------
    counts:
        Token counts (a :class:`TokenCounts` or a 1-D array of non-negative counts per id);
        shorter than ``vocab_size`` means padded unembedding rows (count 0).
    vocab_size:
        Rows of the unembedding.
    pseudo_count:
        ``α`` added to every count before the log (> 0; default 1, add-one smoothing).

    Raises
    ------
    ConfigError
        Counts longer than the vocabulary, negative or non-finite counts, ``α <= 0``.
    InsufficientDataError
        A direction of zero norm (every smoothed count equal, e.g. uniform counts).
    """
    raw = counts.counts if isinstance(counts, TokenCounts) else counts
    n = np.asarray(raw, dtype=np.float64)
    if n.ndim != 1:
        raise ConfigError(f"counts must be 1-D (one count per token id), got shape {n.shape}")
    if vocab_size < 2 or n.size > vocab_size:
        raise ConfigError(f"{n.size} counts do not fit a vocabulary of {vocab_size} tokens")
    if not np.isfinite(n).all() or (n < 0).any():
        raise ConfigError("counts must be finite and non-negative")
    if not (np.isfinite(pseudo_count) and pseudo_count > 0.0):
        raise ConfigError(f"pseudo_count must be > 0, got {pseudo_count}")
    full = np.zeros(vocab_size)
    full[: n.size] = n
    ell = np.log(full + pseudo_count)
    u = ell - ell.mean()
    norm = float(np.linalg.norm(u))
    if not norm > 1e-12 * max(1.0, float(np.abs(ell).max())):
        raise InsufficientDataError(
            "the unigram direction has zero norm: every token has the same (smoothed) count"
        )
    return torch.from_numpy(u / norm)


def mediated_fraction(mean_abs_total: np.ndarray, mean_abs_held: np.ndarray) -> np.ndarray:
    """``1 - mean|Δ_held| / mean|Δ|`` elementwise (NaN where ``mean|Δ| = 0``)."""
    t = np.asarray(mean_abs_total, dtype=np.float64)
    h = np.asarray(mean_abs_held, dtype=np.float64)
    ok = t > 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, 1.0 - h / np.where(ok, t, 1.0), np.nan)


@dataclass(frozen=True, eq=False)
class FrequencyEffects:
    """Per-(position, neuron) total and frequency-held loss changes (float64 numpy).

    Attributes
    ----------
    total, held:
        ``(n_positions, n_selected)`` signed ``Δ`` and ``Δ_held`` (see the module docstring).
    neuron_ids:
        ``(n_selected,)`` the neuron of each column.
    """

    total: np.ndarray
    held: np.ndarray
    neuron_ids: np.ndarray

    @property
    def mediated(self) -> np.ndarray:
        """``Δ - Δ_held``: the part of the effect that passes through ``f``."""
        return self.total - self.held

    def mean_abs(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(mean|Δ|, mean|Δ_held|)`` per neuron over ``rows`` (default all positions)."""
        t = self.total if rows is None else self.total[np.asarray(rows, dtype=np.int64)]
        h = self.held if rows is None else self.held[np.asarray(rows, dtype=np.int64)]
        if t.shape[0] == 0:
            raise InsufficientDataError("no positions to average the effects over")
        return np.abs(t).mean(axis=0), np.abs(h).mean(axis=0)

    def mediated_fraction(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Per-neuron ``1 - mean|Δ_held| / mean|Δ|`` over ``rows``."""
        return mediated_fraction(*self.mean_abs(rows))


def _check_direction(direction: torch.Tensor | np.ndarray, vocab: int) -> torch.Tensor:
    f = torch.as_tensor(np.asarray(direction, dtype=np.float64))
    if f.shape != (vocab,):
        raise ConfigError(f"direction must have shape ({vocab},), got {tuple(f.shape)}")
    if not bool(torch.isfinite(f).all()):
        raise NumericalError("direction has NaN or infinite values")
    norm = float(f.norm())
    if norm == 0.0:
        raise InsufficientDataError("the direction has zero norm")
    if abs(norm - 1.0) > 1e-6:
        raise ConfigError(f"direction must have unit norm, got {norm:.6g}")
    return f


def _check_neurons(neurons: Sequence[int] | np.ndarray | torch.Tensor | None, n: int) -> np.ndarray:
    if neurons is None:
        return np.arange(n, dtype=np.int64)
    idx = np.asarray(neurons)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ConfigError("neurons must be a 1-D sequence of integer neuron ids")
    if idx.size == 0:
        raise InsufficientDataError("no neurons selected")
    if idx.min() < 0 or idx.max() >= n:
        raise ConfigError(f"neuron ids must lie in [0, {n}), got {idx.min()}..{idx.max()}")
    return idx.astype(np.int64)


#: Largest ``max_v |s f_v|`` for which the frequency-held sum uses the power series.
SERIES_MAX = 1.0
#: Bound on the series' truncation error of the log (see :func:`_series_terms`).
SERIES_TOL = 1e-10
#: Most series terms (``m = SERIES_MAX`` needs 14).
SERIES_TERMS = 16
#: Exponents above this use ``logsumexp`` (``expm1`` would overflow in float32 near 88).
SAFE_EXPONENT = 60.0
#: Vocabulary entries per partial sum (accumulated in float64; keeps float32 sums accurate).
VOCAB_BLOCK = 2048


def _series_terms(m: float) -> int:
    """Fewest terms ``J`` with ``m^(J+1) / (J+1)! · e^(2m) <= SERIES_TOL``.

    With ``x_v = -s f_v``, ``|x_v| <= m``: Lagrange's remainder of ``e^x`` after ``J`` terms is
    at most ``m^(J+1)/(J+1)! e^m``, so the ``p e^g``-weighted sum is off by at most that
    fraction of ``Σ p e^g``, while the true sum is at least ``e^-m Σ p e^g``.
    """
    bound = math.exp(2.0 * m)
    for j in range(1, SERIES_TERMS + 1):
        bound *= m / (j + 1) if j > 1 else m * m / 2.0
        if bound <= SERIES_TOL:
            return j
    return SERIES_TERMS


def _vocab_dot(weights_t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Σ_v weights_t[q, j, v] w[q, k, v]`` as ``(Q, K, J)`` float64.

    Summed over blocks of :data:`VOCAB_BLOCK` tokens whose partial sums are added in float64
    (a float32 product over the whole vocabulary loses ~1e-4 of relative precision).
    """
    out = torch.zeros(w.shape[0], weights_t.shape[1], w.shape[1], dtype=torch.float64,
                      device=w.device)  # fmt: skip
    for v0 in range(0, w.shape[2], VOCAB_BLOCK):
        vs = slice(v0, v0 + VOCAB_BLOCK)
        out += torch.bmm(weights_t[:, :, vs], w[:, :, vs].transpose(1, 2)).double()
    return out.transpose(1, 2)


@dataclass(frozen=True)
class _Positions:
    """Per-position pieces of one block of positions (``dt``: the working dtype)."""

    h: torch.Tensor  # (P, V) h - E_p h with h = z - c, dt
    prob: torch.Tensor  # (P, V) softmax(z), dt (from float64)
    logp: torch.Tensor  # (P, V) log_softmax(z), dt
    e_h: torch.Tensor  # (P,) E_p h, float64
    h_f: torch.Tensor  # (P,) h·f, float64
    h_y: torch.Tensor  # (P,) h at the target, float64
    f_y: torch.Tensor  # (P,) f at the target, float64
    e_f: torch.Tensor  # (P,) E_p f, float64
    p_phi: torch.Tensor  # (P, J+1) E_p φ^j, float64
    h_abs: torch.Tensor  # (P,) max |h - E_p h|, float64
    p_t: torch.Tensor  # (P, 1, V) prob, dt (weights of the plain sums)


def _positions(
    inputs: AblationInputs, ps: slice, c: torch.Tensor, f64: torch.Tensor, phi: torch.Tensor
) -> _Positions:
    dt = inputs.resid.dtype
    z = logits_of(inputs.resid[ps], inputs)
    tgt = inputs.targets[ps]
    logp64 = torch.log_softmax(z.double(), dim=-1)
    p64 = logp64.exp()
    h64 = (z - c).double()
    e_h = (p64 * h64).sum(-1)
    hc = h64 - e_h[:, None]
    prob = p64.to(dt)
    return _Positions(
        h=hc.to(dt), prob=prob, logp=logp64.to(dt), e_h=e_h, h_f=h64 @ f64,
        h_y=h64.gather(1, tgt[:, None]).squeeze(1), f_y=f64[tgt], e_f=p64 @ f64,
        p_phi=p64 @ phi, h_abs=hc.abs().amax(dim=1), p_t=prob[:, None, :],
    )  # fmt: skip


def frequency_effects(
    inputs: AblationInputs,
    direction: torch.Tensor | np.ndarray,
    neurons: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    *,
    neuron_block: int = 128,
    chunk_elements: int = CHUNK_ELEMENTS,
    progress: Callable[[int], None] | None = None,
    series: bool = True,
) -> FrequencyEffects:
    """Total and frequency-held loss change of mean-ablating each of ``neurons``.

    Parameters
    ----------
    inputs:
        Positions (``resid``, ``acts``, ``targets``) and model pieces; the elementwise work
        over the vocabulary runs in ``inputs.resid``'s dtype on its device, the per-pair and
        per-position scalars and all sums over the vocabulary are accumulated in float64.
    direction:
        ``(vocab,)`` unit direction in logit space (:func:`unigram_direction`).
    neurons:
        Neuron ids (default all).
    neuron_block, chunk_elements:
        Neurons per logit-direction block and values per elementwise block (memory knobs;
        results do not depend on them beyond round-off).
    progress:
        Called with the number of neurons finished after each neuron block of each block of
        positions.
    series:
        Evaluate the frequency-held sum by the power series in ``s`` (default; see the module
        docstring); ``False`` computes it by a second pass over the vocabulary (the
        reference the series is tested against).

    Raises
    ------
    InsufficientDataError
        No positions, no neurons, a direction of zero norm.
    ConfigError
        Bad neuron ids, a direction of the wrong shape or not of unit norm, bad block sizes.
    """
    if neuron_block < 1 or chunk_elements < 1:
        raise ConfigError("neuron_block and chunk_elements must be >= 1")
    inputs.validate()
    vocab = int(inputs.w_u.shape[0])
    f64 = _check_direction(direction, vocab)
    idx = _check_neurons(neurons, inputs.n_neurons)
    if not inputs.is_affine:  # post-MLP norm / soft-capped logits: exact two-pass form
        total_g, held_g = frequency_effects_general(
            inputs, f64, idx, neuron_block=neuron_block, chunk_elements=chunk_elements,
            progress=progress,
        )  # fmt: skip
        if not (np.isfinite(total_g).all() and np.isfinite(held_g).all()):
            raise NumericalError("non-finite loss changes (overflow in the ablated logits?)")
        return FrequencyEffects(total=total_g, held=held_g, neuron_ids=idx)
    dev, dt = inputs.resid.device, inputs.resid.dtype
    f64 = f64.to(dev)
    f_max = float(f64.abs().max())
    powers = torch.arange(SERIES_TERMS + 1, dtype=torch.float64, device=dev)
    phi = (f64 / f_max)[:, None] ** powers[None, :]  # (V, J+1) float64: φ_v^j, φ = f/max|f|
    phi_t = phi.T.to(dt).contiguous()
    wp = centered(inputs.w_out, inputs.norm)
    c = logit_offset(inputs)
    n_pos, n_sel = inputs.n_positions, int(idx.size)
    total = np.empty((n_pos, n_sel))
    held = np.empty((n_pos, n_sel))
    pos_block = max(1, chunk_elements // vocab)
    for p0 in range(0, n_pos, pos_block):
        ps = slice(p0, min(n_pos, p0 + pos_block))
        pos = _positions(inputs, ps, c, f64, phi)
        for k0 in range(0, n_sel, neuron_block):
            kt = torch.from_numpy(idx[k0 : k0 + neuron_block]).to(dev)
            u_t = ((wp[kt] * inputs.norm.weight) @ inputs.w_u.T).contiguous()  # (K, V)
            a, b = ablation_scalars(inputs.resid[ps], inputs.acts[ps][:, kt],
                                    inputs.mean_acts[kt], wp[kt], inputs.norm)  # fmt: skip
            tot, hld = _neuron_block(pos, u_t, a.to(dev), b.to(dev), inputs.targets[ps],
                                     f64, phi_t, f_max, chunk_elements, series)  # fmt: skip
            total[ps, k0 : k0 + len(kt)] = tot
            held[ps, k0 : k0 + len(kt)] = hld
            if progress is not None:
                progress(len(kt))
    if not (np.isfinite(total).all() and np.isfinite(held).all()):
        raise NumericalError("non-finite loss changes (overflow in the ablated logits?)")
    log.debug("frequency effects of %d neurons at %d positions", n_sel, n_pos)
    return FrequencyEffects(total=total, held=held, neuron_ids=idx)


def _neuron_block(
    pos: _Positions,
    u_t: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    tgt: torch.Tensor,
    f64: torch.Tensor,
    phi_t: torch.Tensor,
    f_max: float,
    chunk_elements: int,
    series: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(total, held)`` ``(P, K)`` for one block of positions and neurons.

    The logit change ``g = A h + B u`` is shifted by its mean ``E_p g`` (any per-pair constant
    cancels in ``log Σ p e^g - g_y``), so ``Σ p e^g >= 1`` and the sum's rounding stays
    relative to 1 rather than to a possibly tiny ``Σ p e^g``.
    """
    dt = u_t.dtype
    n_p, n_k, vocab = pos.h.shape[0], u_t.shape[0], u_t.shape[1]
    f = f64.to(dt)
    e_u = (pos.prob @ u_t.T).double()  # (P, K) E_p u (any error cancels: it is a shift)
    shift = a * pos.e_h[:, None] + b * e_u  # E_p g
    u_f = torch.zeros(n_k, dtype=torch.float64, device=u_t.device)
    for v0 in range(0, vocab, VOCAB_BLOCK):  # float64 partial sums, as in _vocab_dot
        u_f += (u_t[:, v0 : v0 + VOCAB_BLOCK] @ f[v0 : v0 + VOCAB_BLOCK]).double()
    s = a * pos.h_f[:, None] + b * u_f[None, :]  # (P, K): Δz·f
    gy = a * pos.h_y[:, None] + b * u_t[:, tgt].T.double() - shift
    gy_held = gy - s * pos.f_y[:, None]
    u_abs = torch.maximum(u_t.amax(1), -u_t.amin(1)).double()[None, :]
    g_max = a.abs() * pos.h_abs[:, None] + b.abs() * (u_abs + e_u.abs())  # bound on |g|
    m_all = s.abs() * f_max  # bound on |s f_v|
    # g = [A, -B E_p u] @ [h - E_p h; 1] + B u: a rank-2 product, then one fused pass
    lhs = torch.stack([a, -b * e_u], dim=-1).to(dt)  # (P, K, 2)
    b_w, s_w = b.to(dt), s.to(dt)
    total = np.empty((n_p, n_k))
    held = np.empty((n_p, n_k))
    sub = max(1, min(n_p, chunk_elements // (n_k * vocab)))
    buf = torch.empty(sub, n_k, vocab, dtype=dt, device=u_t.device)
    buf_held: torch.Tensor | None = None
    for q0 in range(0, n_p, sub):
        qs = slice(q0, min(n_p, q0 + sub))
        nq = qs.stop - qs.start
        rhs = torch.stack([pos.h[qs], torch.ones_like(pos.h[qs])], dim=1)  # (Q, 2, V)
        g = torch.bmm(lhs[qs], rhs, out=buf[:nq])
        g.addcmul_(b_w[qs, :, None], u_t[None, :, :])
        m = float(m_all[qs].max())
        if float(g_max[qs].max()) + m >= SAFE_EXPONENT:
            lp = pos.logp[qs, None, :]
            tot = torch.logsumexp(g + lp, dim=-1).double() - gy[qs]
            g.addcmul_(s_w[qs, :, None], f[None, None, :], value=-1.0)
            hld = torch.logsumexp(g + lp, dim=-1).double() - gy_held[qs]
        elif m > SERIES_MAX or not series:
            if buf_held is None:
                buf_held = torch.empty_like(buf)
            g_held = torch.addcmul(g, s_w[qs, :, None], f[None, None, :], value=-1.0,
                                   out=buf_held[:nq])  # fmt: skip
            p_t = pos.p_t[qs]
            tot = torch.log1p(_vocab_dot(p_t, torch.expm1(g, out=g))[..., 0]) - gy[qs]
            hld = torch.log1p(_vocab_dot(p_t, torch.expm1(g_held, out=g_held))[..., 0])
            hld = hld - gy_held[qs]
        else:
            n_terms = _series_terms(m)
            # raw[q, k, j] = Σ_v p_v expm1(g_v) φ_v^j; Σ p e^g φ^j = raw + E_p φ^j
            weights_t = pos.prob[qs, None, :] * phi_t[None, : n_terms + 1, :]
            raw = _vocab_dot(weights_t, torch.expm1(g, out=g))
            base = raw[..., 0]  # Σ p expm1(g)
            sums = raw + pos.p_phi[qs, None, : n_terms + 1]
            coef = torch.ones_like(base)
            extra = torch.zeros_like(base)
            for j in range(1, n_terms + 1):  # Σ p e^g (e^{-s f} - 1) = Σ_j (-s f_max)^j/j! ...
                coef = coef * (-s[qs] * f_max) / j
                extra += coef * sums[..., j]
            tot = torch.log1p(base) - gy[qs]
            hld = torch.log1p(base + extra) - gy_held[qs]
        total[qs] = tot.cpu().numpy()
        held[qs] = hld.cpu().numpy()
    return total, held
