"""Community structure of a neuron group's MI graph (paper §3.2, eq. 6, Table 3).

Method
------
1. **Graph.** Every neuron is a node; the edge ``(i, j)`` carries the weight
   ``A_ij = max(MI(a_i, a_j), 0)`` from :mod:`raretoken.stats.mutual_info`. Negative values
   (possible after the Miller–Madow correction for nearly independent neurons) are clipped to
   0 because modularity needs non-negative weights; the diagonal (a neuron's entropy) is
   dropped: the graph has no self-loops.
2. **Sparsification (choice).** The paper builds the graph "with edge weights given by the
   mutual information" and names no threshold, so the default is the **full weighted graph**
   (``sparsify="none"``: every pair with positive weight is an edge). Options:
   ``"knn"`` keeps, for every node, its ``knn_k`` heaviest edges (an edge survives when
   either end keeps it, so the graph stays undirected and every node has degree
   ``>= min(knn_k, N-1)``), and ``"threshold"`` keeps edges with weight ``> threshold``.
   Sparsifying removes the many weak MI values, which in a dense graph pull Q towards 0.
3. **Louvain.** :func:`networkx.community.louvain_communities` (weighted, resolution
   ``γ``, default 1) with a seed drawn from the caller's seed/Generator; with
   ``n_restarts > 1`` the partition of highest Q among independent runs is kept (Louvain is
   a randomised greedy heuristic).
4. **Modularity.** Q of the found partition by eq. 6,
   ``Q = 1/(2m) Σ_ij [A_ij - k_i k_j / (2m)] δ(c_i, c_j)`` with ``k_i = Σ_j A_ij`` and
   ``2m = Σ_ij A_ij``, always at ``γ = 1`` (eq. 6) even when ``resolution`` steered the
   search. Table 3's "Comm." is the mean community size, ``N / n_communities``.

Communities are labelled ``0, 1, ...`` by decreasing size (ties: smallest member index first).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import networkx as nx
import numpy as np

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import frozen, require_seed
from raretoken.stats.mutual_info import MutualInfoMatrix

logger = logging.getLogger(__name__)

Sparsify = Literal["none", "knn", "threshold"]

__all__ = ["ModularityResult", "louvain_modularity", "mi_graph", "modularity_q"]


@dataclass(frozen=True, eq=False)
class ModularityResult:
    """Louvain communities of one neuron group and their modularity.

    Attributes
    ----------
    q:
        Modularity of the partition (eq. 6, ``γ = 1``).
    n_communities:
        Number of communities found (isolated nodes count as singletons).
    mean_community_size:
        ``N / n_communities`` (Table 3 "Comm.").
    neuron_ids:
        Neuron id per node (axis of :attr:`labels`).
    labels:
        Community label per neuron, ``0`` = largest community.
    community_sizes:
        Size of community ``0, 1, ...``.
    n_edges, total_weight:
        Edges of the graph after sparsification and their summed weight ``m``.
    sparsify, knn_k, threshold, resolution, n_restarts:
        Graph and search settings.
    louvain_seed:
        Integer seed passed to networkx for the kept run.
    """

    q: float
    n_communities: int
    mean_community_size: float
    neuron_ids: np.ndarray
    labels: np.ndarray
    community_sizes: np.ndarray
    n_edges: int
    total_weight: float
    sparsify: str
    knn_k: int | None
    threshold: float | None
    resolution: float
    n_restarts: int
    louvain_seed: int

    @property
    def n_neurons(self) -> int:
        return int(self.neuron_ids.size)

    def communities(self) -> list[np.ndarray]:
        """Neuron ids of each community, largest first."""
        return [self.neuron_ids[self.labels == c] for c in range(self.n_communities)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "q": self.q,
            "n_communities": self.n_communities,
            "mean_community_size": self.mean_community_size,
            "neuron_ids": self.neuron_ids.tolist(),
            "labels": self.labels.tolist(),
            "community_sizes": self.community_sizes.tolist(),
            "n_edges": self.n_edges,
            "total_weight": self.total_weight,
            "sparsify": self.sparsify,
            "knn_k": self.knn_k,
            "threshold": self.threshold,
            "resolution": self.resolution,
            "n_restarts": self.n_restarts,
            "louvain_seed": self.louvain_seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModularityResult:
        return cls(
            q=float(d["q"]),
            n_communities=int(d["n_communities"]),
            mean_community_size=float(d["mean_community_size"]),
            neuron_ids=frozen(np.asarray(d["neuron_ids"], dtype=np.int64)),
            labels=frozen(np.asarray(d["labels"], dtype=np.int64)),
            community_sizes=frozen(np.asarray(d["community_sizes"], dtype=np.int64)),
            n_edges=int(d["n_edges"]),
            total_weight=float(d["total_weight"]),
            sparsify=str(d["sparsify"]),
            knn_k=None if d["knn_k"] is None else int(d["knn_k"]),
            threshold=None if d["threshold"] is None else float(d["threshold"]),
            resolution=float(d["resolution"]),
            n_restarts=int(d["n_restarts"]),
            louvain_seed=int(d["louvain_seed"]),
        )


def _weights_and_ids(
    mi: np.ndarray | MutualInfoMatrix, neuron_ids: Sequence[int] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(mi, MutualInfoMatrix):
        w = np.array(mi.mi, dtype=np.float64)
        ids = mi.neuron_ids if neuron_ids is None else np.asarray(neuron_ids)
    else:
        w = np.array(mi, dtype=np.float64)
        ids = np.arange(w.shape[0]) if neuron_ids is None else np.asarray(neuron_ids)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ConfigError(f"MI matrix must be square, got shape {w.shape}")
    p = w.shape[0]
    if p < 2:
        raise InsufficientDataError(f"a neuron graph needs >= 2 neurons, got {p}")
    if ids.shape != (p,) or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"neuron_ids must be {p} integers, got shape {ids.shape}")
    if np.unique(ids).size != p:
        raise ConfigError("neuron_ids must be unique")
    np.fill_diagonal(w, 0.0)  # the diagonal (entropy, or NaN for KSG) is not an edge
    if not np.isfinite(w).all():
        raise NumericalError("MI matrix contains NaN or infinite off-diagonal values")
    if not np.allclose(w, w.T, rtol=1e-10, atol=1e-12):
        raise ConfigError("MI matrix must be symmetric")
    w = np.maximum((w + w.T) / 2.0, 0.0)
    return w, ids.astype(np.int64)


def _sparsified(w: np.ndarray, sparsify: Sparsify, knn_k: int, threshold: float) -> np.ndarray:
    if sparsify == "none":
        return w
    if sparsify == "knn":
        p = w.shape[0]
        if knn_k < 1:
            raise ConfigError(f"knn_k must be >= 1, got {knn_k}")
        k = min(knn_k, p - 1)
        masked = w.copy()
        np.fill_diagonal(masked, -np.inf)
        # stable argsort of -w: ties keep the lower index
        top = np.argsort(-masked, axis=1, kind="stable")[:, :k]
        keep = np.zeros_like(w, dtype=bool)
        keep[np.arange(p)[:, None], top] = True
        keep |= keep.T
        return np.where(keep, w, 0.0)
    if sparsify == "threshold":
        if not math.isfinite(threshold):
            raise ConfigError(f"threshold must be finite, got {threshold}")
        return np.where(w > threshold, w, 0.0)
    raise ConfigError(f"unknown sparsify {sparsify!r}; expected 'none', 'knn' or 'threshold'")


def mi_graph(
    mi: np.ndarray | MutualInfoMatrix,
    *,
    neuron_ids: Sequence[int] | np.ndarray | None = None,
    sparsify: Sparsify = "none",
    knn_k: int = 10,
    threshold: float = 0.0,
) -> nx.Graph:
    """Weighted undirected neuron graph of an MI matrix.

    Nodes are ``0..N-1`` (column positions) with the attribute ``neuron_id``; edges carry
    ``weight``. Pairs of zero weight are not edges. See the module docstring for the
    sparsification options.
    """
    w, ids = _weights_and_ids(mi, neuron_ids)
    w = _sparsified(w, sparsify, knn_k, threshold)
    g = nx.Graph()
    for i, nid in enumerate(ids.tolist()):
        g.add_node(i, neuron_id=nid)
    iu, ju = np.nonzero(np.triu(w, k=1))
    g.add_weighted_edges_from(zip(iu.tolist(), ju.tolist(), w[iu, ju].tolist(), strict=True))
    return g


def modularity_q(weights: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Eq. 6 computed directly: ``Q = 1/(2m) Σ_ij [A_ij - k_i k_j / 2m] δ(c_i, c_j)``.

    ``weights`` is a symmetric non-negative matrix whose diagonal is ignored (no
    self-loops); ``labels`` gives each node's community.
    """
    a = np.array(weights, dtype=np.float64)
    np.fill_diagonal(a, 0.0)
    lab = np.asarray(labels)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or lab.shape != (a.shape[0],):
        raise ConfigError("weights must be (N, N) and labels (N,)")
    two_m = float(a.sum())
    if not two_m > 0.0:
        raise NumericalError("graph has zero total edge weight; modularity is undefined")
    k = a.sum(axis=1)
    same = lab[:, None] == lab[None, :]
    return float(np.sum((a - np.outer(k, k) / two_m)[same]) / two_m)


def _canonical_labels(communities: Sequence[set[int]], p: int) -> np.ndarray:
    ordered = sorted((sorted(c) for c in communities), key=lambda c: (-len(c), c[0]))
    labels = np.full(p, -1, dtype=np.int64)
    for lab, members in enumerate(ordered):
        labels[members] = lab
    return labels


def louvain_modularity(
    mi: np.ndarray | MutualInfoMatrix,
    *,
    seed: int | np.random.Generator,
    neuron_ids: Sequence[int] | np.ndarray | None = None,
    sparsify: Sparsify = "none",
    knn_k: int = 10,
    threshold: float = 0.0,
    resolution: float = 1.0,
    n_restarts: int = 1,
) -> ModularityResult:
    """Louvain communities of the MI graph of a neuron group and their modularity (eq. 6).

    Parameters
    ----------
    mi:
        Symmetric MI matrix ``(N, N)`` or a :class:`MutualInfoMatrix` (whose neuron ids are
        used unless ``neuron_ids`` is given).
    seed:
        Seed or Generator; each Louvain run gets an integer seed drawn from it.
    neuron_ids:
        Labels of the nodes (default: from ``mi`` or ``0..N-1``).
    sparsify, knn_k, threshold:
        Graph construction (default: full weighted graph), see :func:`mi_graph`.
    resolution:
        Louvain resolution ``γ`` used in the search (Q is reported at ``γ = 1``).
    n_restarts:
        Independent Louvain runs; the partition with the highest Q is kept.

    Returns
    -------
    ModularityResult
    """
    if n_restarts < 1:
        raise ConfigError(f"n_restarts must be >= 1, got {n_restarts}")
    if not (math.isfinite(resolution) and resolution > 0.0):
        raise ConfigError(f"resolution must be a positive number, got {resolution}")
    rng = require_seed(seed, "louvain_modularity")
    w, ids = _weights_and_ids(mi, neuron_ids)
    w = _sparsified(w, sparsify, knn_k, threshold)
    p = w.shape[0]
    if not float(w.sum()) > 0.0:
        raise NumericalError("MI graph has zero total edge weight; modularity is undefined")
    g = mi_graph(w, sparsify="none")
    best: tuple[float, np.ndarray, int] | None = None
    for _ in range(n_restarts):
        run_seed = int(rng.integers(0, 2**31 - 1))
        comms = nx.community.louvain_communities(
            g, weight="weight", resolution=resolution, seed=run_seed
        )
        labels = _canonical_labels(comms, p)
        q = modularity_q(w, labels)
        if best is None or q > best[0]:
            best = (q, labels, run_seed)
    assert best is not None
    q, labels, run_seed = best
    sizes = np.bincount(labels)
    n_comm = int(sizes.size)
    logger.debug("Louvain: %d neurons -> %d communities, Q=%.4f", p, n_comm, q)
    return ModularityResult(
        q=q,
        n_communities=n_comm,
        mean_community_size=p / n_comm,
        neuron_ids=frozen(ids),
        labels=frozen(labels),
        community_sizes=frozen(sizes),
        n_edges=int(g.number_of_edges()),
        total_weight=float(np.triu(w, k=1).sum()),
        sparsify=sparsify,
        knn_k=int(knn_k) if sparsify == "knn" else None,
        threshold=float(threshold) if sparsify == "threshold" else None,
        resolution=float(resolution),
        n_restarts=int(n_restarts),
        louvain_seed=run_seed,
    )
