"""Per-neuron covariates of one MLP layer.

A group of neurons (the rare-token plateau) can differ from uniform random groups of the same
layer simply because its members have, say, larger output weights or larger activations. This
module computes the per-neuron covariates that could explain a result on their own
(:func:`neuron_covariates`); :func:`raretoken.stats.matching.matched_random_groups` draws random
groups matched to the group on a chosen set of them, to be compared next to the uniform random
groups of :func:`raretoken.stats.baselines.random_groups`.

All functions are pure: the caller passes tensors or arrays (``numpy`` arrays, ``np.memmap``,
or CPU/GPU ``torch`` tensors of any float dtype), no model object. Everything is computed on the
CPU in float64.

Covariates (:func:`neuron_covariates`)
--------------------------------------
Notation: ``w_i`` is row ``i`` of ``w_out`` (the vector neuron ``i`` writes into the residual
stream, ``(d_model,)``), ``γ`` the final norm's weight (ones when ``None``), ``W_U`` the
unembedding ``(V, d_model)`` (rows are tokens), ``a_i`` column ``i`` of the activations over
``n`` positions. ``C`` is the centring over ``d_model`` (``x - mean(x)``) for a final
**LayerNorm** (``norm_kind="layernorm"``) and the identity otherwise (RMSNorm, or no norm).

* ``w_out_norm`` = ``‖w_i‖₂`` (raw, not centred, not scaled by ``γ``).
* ``w_in_norm[name]`` = ``‖row i of w_in[name]‖₂`` for every input projection (``"in"``, or
  ``"up"`` and ``"gate"`` for a gated MLP); column ``w_in_norm_<name>``.
* ``act_mean`` = ``mean(a_i)``; ``act_abs_mean`` = ``mean(|a_i|)``; ``act_var`` =
  population variance ``mean((a_i - mean(a_i))²)`` (``ddof=0``, as :func:`numpy.var`);
  ``act_frac_positive`` = fraction of positions with ``a_i > 0`` (strictly). Computed in row
  chunks (Chan et al.'s pairwise update of mean and sum of squares), so a ``np.memmap`` is
  never loaded whole.
* **Vocabulary projection** (the direct logit effect of the neuron, up to the norm's
  per-position scale): ``p_i = W_U (γ ⊙ C w_i)`` ``(V,)``, **centred over the vocabulary**
  (``d_i = p_i - mean_v(p_i)``; softmax is shift-invariant, and TransformerLens'
  ``center_unembed``, used by Gurnee et al. 2024 and Stolfo et al. 2024, centres ``W_U``
  the same way). With population moments ``m_k = mean_v(d_i^k)``:

  - ``vocab_skew`` = ``m_3 / m_2^{3/2}`` (positive: a few tokens strongly promoted);
  - ``vocab_kurtosis`` = ``m_4 / m_2²``, **Pearson (not excess) kurtosis**: 3 for a Gaussian.

  These are the ``vocab_skew``/``vocab_kurt`` of wesg52/universal-neurons
  (``utils.vector_moments``: population moments of the z-scored vector, kurtosis not excess),
  equal to ``scipy.stats.skew(d)`` and ``scipy.stats.kurtosis(d, fisher=False)``. One
  difference: universal-neurons takes the *cosine* with each token's unembedding (every token
  column of ``W_U`` normalised to unit norm); here the raw logit contributions are used, so
  tokens with larger unembedding norms weigh more, as they do in the logits. Both are
  invariant to the scale of ``w_i``. The moments are accumulated over vocabulary chunks: the
  ``d_mlp × V`` projection matrix is never held whole (for SmolLM2, ~87 GFLOP in float64).
  NaN when ``m_2 = 0`` (e.g. ``w_i = 0``).
* ``unigram_cosine``: cosine between the centred projection and the **unigram direction**
  ``u = ℓ - mean(ℓ)``, ``ℓ`` the log-frequency of each token in the counted corpus (any log
  base: the cosine is invariant to it), both restricted to the *seen* tokens ``S`` and
  centred over ``S``; i.e. the Pearson correlation over ``S`` between ``p_i`` and ``ℓ``.
  **Unseen tokens** are those whose ``unigram_log_freq`` is ``-inf`` (``log 0``); they are
  left out of the cosine (no pseudo-count is invented; pass smoothed log-frequencies instead
  to include them). NaN or ``+inf`` entries are refused. Padded vocabulary rows of ``W_U`` must
  be given ``-inf``. After Stolfo et al. 2024 (token frequency neurons, whose logit effect is
  proportional to the log frequency); ``None`` when no frequencies are given.
* ``null_space_fraction`` = ``‖P w̄_i‖² / ‖w̄_i‖²`` with ``w̄_i = C w_i`` and ``P`` the
  orthogonal projector onto the span of the ``k`` right-singular vectors with the smallest
  singular values of the effective unembedding ``W_eff = (W_U - 1 μᵀ) diag(γ)`` (``μ`` the
  mean token row: centred over the vocabulary, final norm's weight folded in, as
  TransformerLens' ``fold_ln`` + ``center_unembed`` do for Stolfo et al.). For a LayerNorm
  the residual's mean component never reaches the logits, so ``W_eff`` is restricted to the
  ``d_model - 1`` directions orthogonal to the all-ones vector (TransformerLens'
  centred ``W_U`` has the all-ones vector as an exact, trivial null direction, which is not
  counted among the ``k``). Default ``k = max(1, floor(0.01 · d_model))``: Stolfo et al. 2024
  (Fig. 2) compute their ρ with ``k = 40 ≈ 0.01 · d_model`` for Llama-2 7B. Note Stolfo et
  al.'s ρ is the *norm* fraction ``‖P w‖ / ‖w‖`` = ``sqrt(null_space_fraction)``. The
  singular vectors come from the eigen-decomposition of the ``d × d`` Gram matrix
  ``W_effᵀ W_eff`` accumulated over vocabulary chunks in float64 (``σ² =`` eigenvalues); the
  full spectrum is kept in ``unembed_singular_values``. NaN when ``w̄_i = 0``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import from_nan_list, frozen, nan_list

logger = logging.getLogger(__name__)

NormKind = Literal["layernorm", "rmsnorm"]

__all__ = [
    "NeuronCovariates",
    "default_null_space_k",
    "neuron_covariates",
    "unembedding_null_space",
]

_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4 Mi float64 values (32 MiB) per chunk array


# --------------------------------------------------------------------------- input helpers


def _shape(x: Any, what: str) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ConfigError(f"{what} must be an array or tensor, got {type(x).__name__}")
    return tuple(int(s) for s in shape)


def _rows(x: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of an array, memmap or torch tensor as a float64 numpy array."""
    part = x[start:stop]
    if hasattr(part, "detach"):  # torch.Tensor on any device, any float dtype (bf16 too)
        part = part.detach().cpu().double().numpy()
    return np.asarray(part, dtype=np.float64)


def _whole(x: Any) -> np.ndarray:
    return _rows(x, 0, _shape(x, "input")[0])


def _finite(a: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(a).all():
        raise NumericalError(f"{what} has NaN or infinite values")
    return a


def _chunk_rows(n_cols: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, n_cols))


def default_null_space_k(d_model: int) -> int:
    """``max(1, floor(0.01 · d_model))`` (Stolfo et al. 2024: ``k = 40`` for ``d_model`` 4096)."""
    return max(1, math.floor(0.01 * d_model))


def _centre_rows(w: np.ndarray) -> np.ndarray:
    return w - w.mean(axis=1, keepdims=True)


def _check_norm_kind(norm_kind: str | None) -> None:
    if norm_kind not in (None, "layernorm", "rmsnorm"):
        raise ConfigError(f"norm_kind must be 'layernorm', 'rmsnorm' or None, got {norm_kind!r}")


def _ones_complement(d: int) -> np.ndarray:
    """Orthonormal basis ``(d, d-1)`` of the vectors with zero mean."""
    centring = np.eye(d) - np.full((d, d), 1.0 / d)
    _, vecs = np.linalg.eigh(centring)  # eigenvalues 0 (all-ones) then 1 (d - 1 times)
    return vecs[:, 1:]


def _null_space_from_gram(
    gram: np.ndarray, k: int, layernorm: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(basis (d, k), singular values descending)`` from ``W_effᵀ W_eff``."""
    d = gram.shape[0]
    q = _ones_complement(d) if layernorm else np.eye(d)
    reduced = q.T @ gram @ q
    reduced = (reduced + reduced.T) / 2.0
    lam, vecs = np.linalg.eigh(reduced)  # ascending
    d_eff = q.shape[1]
    if not 1 <= k < d_eff:
        raise ConfigError(
            f"null_fraction_k must be in [1, {d_eff - 1}] (d_model={d}"
            f"{', minus the mean direction of a LayerNorm' if layernorm else ''}), got {k}"
        )
    basis = q @ vecs[:, :k]
    sv = np.sqrt(np.clip(lam, 0.0, None))[::-1].copy()
    return basis, sv


def _gamma(norm_weight: Any, d_model: int) -> np.ndarray:
    if norm_weight is None:
        return np.ones(d_model)
    if _shape(norm_weight, "norm_weight") != (d_model,):
        raise ConfigError(
            f"norm_weight must have shape ({d_model},), got {_shape(norm_weight, 'norm_weight')}"
        )
    return _finite(_whole(norm_weight), "norm_weight")


class _Unembedding:
    """Chunked passes over ``W_U``: mean row, centred Gram matrix, vocabulary moments."""

    def __init__(self, w_u: Any, d_model: int, chunk_elements: int) -> None:
        shape = _shape(w_u, "W_U")
        if len(shape) != 2 or shape[1] != d_model:
            raise ConfigError(f"W_U must have shape (vocab, {d_model}), got {shape}")
        if shape[0] < 2:
            raise InsufficientDataError(f"W_U needs >= 2 token rows, got {shape[0]}")
        self.w_u = w_u
        self.n_vocab = shape[0]
        self.chunk_elements = chunk_elements
        total = np.zeros(d_model)
        for start, stop in self.chunks(d_model):
            total += _finite(_rows(w_u, start, stop), "W_U").sum(axis=0)
        self.mean = total / self.n_vocab

    def chunks(self, n_cols: int) -> list[tuple[int, int]]:
        step = _chunk_rows(n_cols, self.chunk_elements)
        return [(s, min(s + step, self.n_vocab)) for s in range(0, self.n_vocab, step)]


def unembedding_null_space(
    w_u: Any,
    norm_weight: Any = None,
    *,
    k: int | None = None,
    norm_kind: NormKind | None = None,
    chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """The unembedding's near-null space used by ``null_space_fraction``.

    Returns
    -------
    tuple
        ``(basis, singular_values)``: ``basis`` ``(d_model, k)`` orthonormal columns spanning
        the ``k`` right-singular directions of ``W_eff`` with the smallest singular values
        (see the module docstring); ``singular_values`` all singular values of ``W_eff``
        (restricted to the mean-zero subspace for a LayerNorm), descending.
    """
    _check_norm_kind(norm_kind)
    shape = _shape(w_u, "W_U")
    if len(shape) != 2:
        raise ConfigError(f"W_U must be 2-D (vocab, d_model), got shape {shape}")
    d_model = shape[1]
    gamma = _gamma(norm_weight, d_model)
    unemb = _Unembedding(w_u, d_model, chunk_elements)
    gram = np.zeros((d_model, d_model))
    for start, stop in unemb.chunks(d_model):
        x = _rows(w_u, start, stop) - unemb.mean
        gram += x.T @ x
    gram *= np.outer(gamma, gamma)
    kk = default_null_space_k(d_model) if k is None else int(k)
    return _null_space_from_gram(gram, kk, norm_kind == "layernorm")


# --------------------------------------------------------------------------- covariates


#: The per-neuron (and spectrum) array fields of :class:`NeuronCovariates` in its JSON form.
_ARRAY_FIELDS: tuple[str, ...] = (
    "w_out_norm",
    "act_mean",
    "act_abs_mean",
    "act_var",
    "act_frac_positive",
    "vocab_kurtosis",
    "vocab_skew",
    "null_space_fraction",
    "unembed_singular_values",
)


@dataclass(frozen=True, eq=False)
class NeuronCovariates:
    """Per-neuron covariates of one MLP layer (definitions in the module docstring).

    Every array is read-only ``float64`` of shape ``(d_mlp,)``.

    Attributes
    ----------
    w_out_norm, w_in_norm:
        Output weight norms; input weight norms per input projection name.
    act_mean, act_abs_mean, act_var, act_frac_positive:
        Activation moments over ``n_positions`` positions.
    vocab_kurtosis, vocab_skew:
        Pearson kurtosis (3 for a Gaussian) and skewness of the vocabulary-centred projection.
    unigram_cosine:
        Cosine with the centred log-frequency direction over the seen tokens, or ``None``.
    null_space_fraction:
        ``‖P w̄‖² / ‖w̄‖²`` in the ``null_space_k`` smallest singular directions.
    null_space_k, n_positions, n_unigram_tokens, norm_kind:
        Settings and sizes used (``n_unigram_tokens``: seen tokens, ``None`` without
        frequencies).
    unembed_singular_values:
        All singular values of the effective unembedding, descending.
    """

    w_out_norm: np.ndarray
    w_in_norm: Mapping[str, np.ndarray]
    act_mean: np.ndarray
    act_abs_mean: np.ndarray
    act_var: np.ndarray
    act_frac_positive: np.ndarray
    vocab_kurtosis: np.ndarray
    vocab_skew: np.ndarray
    unigram_cosine: np.ndarray | None
    null_space_fraction: np.ndarray
    null_space_k: int
    n_positions: int
    n_unigram_tokens: int | None
    norm_kind: str | None
    unembed_singular_values: np.ndarray

    @property
    def n_neurons(self) -> int:
        return int(self.w_out_norm.shape[0])

    def columns(self) -> dict[str, np.ndarray]:
        """Flat columns for a table (``w_in_norm_<name>`` per input; no ``unigram_cosine``
        when it was not computed)."""
        cols: dict[str, np.ndarray] = {"w_out_norm": self.w_out_norm}
        for name, arr in self.w_in_norm.items():
            cols[f"w_in_norm_{name}"] = arr
        cols.update(
            act_mean=self.act_mean,
            act_abs_mean=self.act_abs_mean,
            act_var=self.act_var,
            act_frac_positive=self.act_frac_positive,
            vocab_kurtosis=self.vocab_kurtosis,
            vocab_skew=self.vocab_skew,
        )
        if self.unigram_cosine is not None:
            cols["unigram_cosine"] = self.unigram_cosine
        cols["null_space_fraction"] = self.null_space_fraction
        return cols

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite values as ``null``)."""
        out: dict[str, Any] = {name: nan_list(getattr(self, name)) for name in _ARRAY_FIELDS}
        out["w_in_norm"] = {k: nan_list(v) for k, v in self.w_in_norm.items()}
        out["unigram_cosine"] = (
            None if self.unigram_cosine is None else nan_list(self.unigram_cosine)
        )
        out.update(
            null_space_k=self.null_space_k,
            n_positions=self.n_positions,
            n_unigram_tokens=self.n_unigram_tokens,
            norm_kind=self.norm_kind,
        )
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NeuronCovariates:
        kw: dict[str, Any] = {name: from_nan_list(d[name]) for name in _ARRAY_FIELDS}
        uc = d.get("unigram_cosine")
        nu = d.get("n_unigram_tokens")
        nk = d.get("norm_kind")
        return cls(
            w_in_norm={str(k): from_nan_list(v) for k, v in dict(d["w_in_norm"]).items()},
            unigram_cosine=None if uc is None else from_nan_list(uc),
            null_space_k=int(d["null_space_k"]),
            n_positions=int(d["n_positions"]),
            n_unigram_tokens=None if nu is None else int(nu),
            norm_kind=None if nk is None else str(nk),
            **kw,
        )


def _activation_moments(
    acts: Any, d_mlp: int, chunk_elements: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    shape = _shape(acts, "acts")
    if len(shape) != 2 or shape[1] != d_mlp:
        raise ConfigError(f"acts must have shape (n_positions, {d_mlp}), got {shape}")
    n_total = shape[0]
    if n_total < 1:
        raise InsufficientDataError("acts has no positions")
    n = 0
    mean = np.zeros(d_mlp)
    m2 = np.zeros(d_mlp)
    abs_sum = np.zeros(d_mlp)
    n_pos = np.zeros(d_mlp, dtype=np.int64)
    step = _chunk_rows(d_mlp, chunk_elements)
    for start in range(0, n_total, step):
        x = _finite(_rows(acts, start, min(start + step, n_total)), "acts")
        nb = x.shape[0]
        mb = x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        delta = mb - mean
        tot = n + nb
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta**2 * (n * nb / tot)
        n = tot
        abs_sum += np.abs(x).sum(axis=0)
        n_pos += np.count_nonzero(x > 0.0, axis=0)
    return mean, abs_sum / n, m2 / n, n_pos / n, n


def neuron_covariates(
    w_out: Any,
    w_in: Mapping[str, Any],
    norm_weight: Any,
    W_U: Any,
    acts: Any,
    unigram_log_freq: Any = None,
    null_fraction_k: int | None = None,
    *,
    norm_kind: NormKind | None = None,
    chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS,
) -> NeuronCovariates:
    """Per-neuron covariates of one MLP layer (definitions in the module docstring).

    Parameters
    ----------
    w_out:
        ``(d_mlp, d_model)``: row ``i`` is neuron ``i``'s output vector
        (``ModelAdapter.w_out(layer)``).
    w_in:
        Input projections, each ``(d_mlp, d_model)`` (``ModelAdapter.mlp_in_weights(layer)``);
        names must be letters, digits or ``_`` (they become column names).
    norm_weight:
        ``(d_model,)`` weight of the final norm (``NormSpec.weight``), or ``None`` for ones.
    W_U:
        ``(vocab, d_model)`` unembedding (``ModelAdapter.unembedding()[0]``). The LM head's
        bias is not needed: it does not depend on the neuron.
    acts:
        ``(n_positions, d_mlp)`` activations of the layer's neurons; may be a ``np.memmap``
        (read in row chunks).
    unigram_log_freq:
        ``(vocab,)`` log-frequencies of the tokens in the counted corpus, ``-inf`` for unseen
        tokens (left out of ``unigram_cosine``), or ``None``.
    null_fraction_k:
        Number of smallest singular directions forming the near-null space; default
        :func:`default_null_space_k`.
    norm_kind:
        ``NormSpec.kind`` of the final norm: ``"layernorm"`` centres ``w_out`` over
        ``d_model`` (and removes the mean direction from the unembedding); ``"rmsnorm"`` or
        ``None`` does not.
    chunk_elements:
        Values per float64 chunk array (memory knob; results do not depend on it beyond
        round-off).

    Raises
    ------
    ConfigError
        Shapes that do not fit, a bad name, or ``null_fraction_k`` out of range.
    NumericalError
        NaN/inf in the weights or activations, NaN/``+inf`` in ``unigram_log_freq``.
    InsufficientDataError
        No positions, or fewer than 2 seen tokens / constant log-frequencies.
    """
    _check_norm_kind(norm_kind)
    if chunk_elements < 1:
        raise ConfigError(f"chunk_elements must be >= 1, got {chunk_elements}")
    shape = _shape(w_out, "w_out")
    if len(shape) != 2:
        raise ConfigError(f"w_out must be 2-D (d_mlp, d_model), got shape {shape}")
    d_mlp, d_model = shape
    if d_mlp < 1 or d_model < 2:
        raise ConfigError(f"w_out must have d_mlp >= 1 rows and d_model >= 2 columns: {shape}")
    layernorm = norm_kind == "layernorm"
    w = _finite(_whole(w_out), "w_out")
    w_out_norm = np.linalg.norm(w, axis=1)

    in_norms: dict[str, np.ndarray] = {}
    for name, mat in w_in.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"w_in names must match [A-Za-z0-9_]+, got {name!r}")
        s = _shape(mat, f"w_in[{name!r}]")
        if len(s) != 2 or s[0] != d_mlp:
            raise ConfigError(f"w_in[{name!r}] must have shape ({d_mlp}, ·), got {s}")
        in_norms[name] = frozen(np.linalg.norm(_finite(_whole(mat), f"w_in[{name!r}]"), axis=1))

    act_mean, act_abs, act_var, act_pos, n_positions = _activation_moments(
        acts, d_mlp, chunk_elements
    )

    gamma = _gamma(norm_weight, d_model)
    w_bar = _centre_rows(w) if layernorm else w  # C w_i
    w_eff_t = (w_bar * gamma).T  # (d_model, d_mlp): columns γ ⊙ C w_i

    unemb = _Unembedding(W_U, d_model, chunk_elements)
    n_vocab = unemb.n_vocab

    seen: np.ndarray | None = None
    u: np.ndarray | None = None
    if unigram_log_freq is not None:
        if _shape(unigram_log_freq, "unigram_log_freq") != (n_vocab,):
            raise ConfigError(
                f"unigram_log_freq must have shape ({n_vocab},) like W_U's rows, got "
                f"{_shape(unigram_log_freq, 'unigram_log_freq')} (give padded rows -inf)"
            )
        ell = _whole(unigram_log_freq)
        if np.isnan(ell).any() or np.isposinf(ell).any():
            raise NumericalError("unigram_log_freq has NaN or +inf (unseen tokens are -inf)")
        seen = np.isfinite(ell)
        n_seen = int(seen.sum())
        if n_seen < 2:
            raise InsufficientDataError(f"need >= 2 seen tokens for unigram_cosine, got {n_seen}")
        u = np.zeros(n_vocab)
        u[seen] = ell[seen] - ell[seen].mean()
        if not np.any(u[seen] != 0.0):
            raise InsufficientDataError("unigram_log_freq is constant over the seen tokens")

    gram = np.zeros((d_model, d_model))
    s2 = np.zeros(d_mlp)
    s3 = np.zeros(d_mlp)
    s4 = np.zeros(d_mlp)
    s1_seen = np.zeros(d_mlp)
    s2_seen = np.zeros(d_mlp)
    su_seen = np.zeros(d_mlp)
    for start, stop in unemb.chunks(max(d_mlp, d_model)):
        x = _rows(W_U, start, stop) - unemb.mean  # finite: checked by the mean pass
        gram += x.T @ x
        dev = x @ w_eff_t  # (chunk, d_mlp): centred vocabulary projections
        dev2 = dev * dev
        s2 += dev2.sum(axis=0)
        s3 += (dev2 * dev).sum(axis=0)
        s4 += (dev2 * dev2).sum(axis=0)
        if seen is not None and u is not None:
            m = seen[start:stop]
            ds = dev[m]
            s1_seen += ds.sum(axis=0)
            s2_seen += (ds * ds).sum(axis=0)
            su_seen += u[start:stop][m] @ ds
    m2 = s2 / n_vocab
    ok = m2 > 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.where(ok, (s3 / n_vocab) / np.where(ok, m2, 1.0) ** 1.5, np.nan)
        kurt = np.where(ok, (s4 / n_vocab) / np.where(ok, m2, 1.0) ** 2, np.nan)

    unigram_cos: np.ndarray | None = None
    n_unigram: int | None = None
    if seen is not None and u is not None:
        n_unigram = int(seen.sum())
        ss_p = s2_seen - s1_seen**2 / n_unigram  # Σ_S (d - mean_S d)²
        ss_u = float(u @ u)
        good = ss_p > 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            unigram_cos = np.where(
                good, su_seen / np.sqrt(np.where(good, ss_p, 1.0) * ss_u), np.nan
            )
        unigram_cos = frozen(np.clip(unigram_cos, -1.0, 1.0))

    gram *= np.outer(gamma, gamma)
    k = default_null_space_k(d_model) if null_fraction_k is None else int(null_fraction_k)
    basis, sv = _null_space_from_gram(gram, k, layernorm)
    proj = w_bar @ basis
    nrm2 = (w_bar * w_bar).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        null_frac = np.where(nrm2 > 0.0, (proj * proj).sum(axis=1) / nrm2, np.nan)

    logger.debug(
        "covariates of %d neurons: %d positions, vocab %d, null-space k=%d",
        d_mlp,
        n_positions,
        n_vocab,
        k,
    )
    return NeuronCovariates(
        w_out_norm=frozen(w_out_norm),
        w_in_norm=in_norms,
        act_mean=frozen(act_mean),
        act_abs_mean=frozen(act_abs),
        act_var=frozen(act_var),
        act_frac_positive=frozen(act_pos),
        vocab_kurtosis=frozen(kurt),
        vocab_skew=frozen(skew),
        unigram_cosine=unigram_cos,
        null_space_fraction=frozen(np.clip(null_frac, 0.0, 1.0)),
        null_space_k=k,
        n_positions=n_positions,
        n_unigram_tokens=n_unigram,
        norm_kind=norm_kind,
        unembed_singular_values=frozen(sv),
    )
