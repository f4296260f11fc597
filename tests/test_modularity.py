from __future__ import annotations

import json
import math

import networkx as nx
import numpy as np
import pytest

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats.modularity import (
    ModularityResult,
    louvain_modularity,
    mi_graph,
    modularity_q,
)
from raretoken.stats.mutual_info import mutual_information_matrix


def planted_weights(
    sizes: list[int], w_in: float, w_out: float, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    p = truth.size
    w = np.where(truth[:, None] == truth[None, :], w_in, w_out) + noise * rng.random((p, p))
    w = np.triu(w, 1)
    return w + w.T, truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a renaming of the communities."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_modularity_q_known_values() -> None:
    # two disjoint triangles: Q = 2 * [3/6 - (6/12)^2] = 0.5 for the natural split
    tri = np.ones((3, 3)) - np.eye(3)
    a = np.block([[tri, np.zeros((3, 3))], [np.zeros((3, 3)), tri]])
    assert modularity_q(a, [0, 0, 0, 1, 1, 1]) == pytest.approx(0.5)
    assert modularity_q(a, [0] * 6) == pytest.approx(0.0)
    # every node alone: Q = -sum (k_i / 2m)^2 = -6 * (2/12)^2
    assert modularity_q(a, list(range(6))) == pytest.approx(-1.0 / 6.0)


def test_modularity_q_matches_networkx_and_python_louvain() -> None:
    rng = np.random.default_rng(0)
    w = rng.random((20, 20))
    w = np.triu(w, 1)
    w = w + w.T
    labels = rng.integers(0, 4, size=20)
    g = mi_graph(w)
    comms = [set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]
    ref_nx = nx.community.modularity(g, comms, weight="weight")
    assert modularity_q(w, labels) == pytest.approx(ref_nx, abs=1e-12)
    community_louvain = pytest.importorskip("community")
    ref_pl = community_louvain.modularity(
        {i: int(labels[i]) for i in range(20)}, g, weight="weight"
    )
    assert modularity_q(w, labels) == pytest.approx(ref_pl, abs=1e-12)


def test_planted_partition_is_recovered() -> None:
    w, truth = planted_weights([15, 15, 12, 18], w_in=1.0, w_out=0.05, noise=0.1, seed=1)
    res = louvain_modularity(w, seed=0, neuron_ids=np.arange(100, 160))
    assert res.n_communities == 4
    assert same_partition(res.labels, truth)
    assert res.q == pytest.approx(modularity_q(w, truth), abs=1e-12)
    assert res.q > 0.45  # well above dense random graphs (< 0.04, below)
    np.testing.assert_array_equal(res.community_sizes, [18, 15, 15, 12])
    assert res.mean_community_size == pytest.approx(15.0)
    # labels are canonical: community 0 is the largest (the 18 neurons of block 3)
    np.testing.assert_array_equal(res.communities()[0], np.arange(142, 160))
    assert res.n_edges == 60 * 59 // 2


def test_planted_partition_matches_python_louvain() -> None:
    community_louvain = pytest.importorskip("community")
    w, truth = planted_weights([10, 20, 10], w_in=0.8, w_out=0.1, noise=0.2, seed=2)
    res = louvain_modularity(w, seed=3)
    g = mi_graph(w)
    part = community_louvain.best_partition(g, weight="weight", random_state=3)
    ref_labels = np.array([part[i] for i in range(40)])
    assert same_partition(ref_labels, truth) and same_partition(res.labels, truth)
    assert res.q == pytest.approx(community_louvain.modularity(part, g, weight="weight"))


def test_activations_with_latent_modules_give_high_q() -> None:
    # three groups of neurons, each driven by its own latent factor
    rng = np.random.default_rng(4)
    n = 4000
    latent = rng.normal(size=(n, 3))
    truth = np.repeat([0, 1, 2], 8)
    acts = latent[:, truth] + 0.5 * rng.normal(size=(n, 24))
    mi = mutual_information_matrix(acts)
    res = louvain_modularity(mi, seed=0)
    assert same_partition(res.labels, truth)
    assert res.q > 0.6


def test_dense_erdos_renyi_has_small_q() -> None:
    qs = []
    for s in range(3):
        a = nx.to_numpy_array(nx.gnp_random_graph(60, 0.9, seed=s))
        qs.append(louvain_modularity(a, seed=s).q)
    assert max(qs) < 0.04
    # uniform random weights on the complete graph: also close to 0
    rng = np.random.default_rng(5)
    w = np.triu(rng.random((60, 60)), 1)
    assert louvain_modularity(w + w.T, seed=0).q < 0.08


def test_louvain_q_never_below_planted_and_seed_reproducible() -> None:
    w, truth = planted_weights([8, 8, 8, 8], w_in=0.3, w_out=0.1, noise=0.4, seed=6)
    a = louvain_modularity(w, seed=11, n_restarts=3)
    b = louvain_modularity(w, seed=11, n_restarts=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.q == b.q and a.louvain_seed == b.louvain_seed
    assert a.q >= modularity_q(w, truth) - 1e-12  # at least as good as the planted split
    assert a.q == pytest.approx(modularity_q(w, a.labels), abs=1e-12)


def test_negative_mi_is_clipped_and_diagonal_ignored() -> None:
    w, _ = planted_weights([5, 5], w_in=1.0, w_out=0.0, noise=0.0, seed=0)
    w_neg = w.copy()
    w_neg[w == 0.0] = -0.01
    np.fill_diagonal(w_neg, 99.0)
    res = louvain_modularity(w_neg, seed=0)
    assert res.q == pytest.approx(0.5)
    g = mi_graph(w_neg)
    assert g.number_of_edges() == 2 * 10 and nx.number_of_selfloops(g) == 0


def test_knn_and_threshold_sparsification() -> None:
    rng = np.random.default_rng(7)
    w = np.triu(rng.random((30, 30)), 1)
    w = w + w.T
    g = mi_graph(w, sparsify="knn", knn_k=3)
    assert min(d for _, d in g.degree()) >= 3
    for i in range(30):  # each node's 3 heaviest edges are kept
        for j in np.argsort(-w[i] + np.eye(30)[i] * 9)[:3]:
            assert g.has_edge(i, int(j))
    # every kept edge is among the top 3 of at least one end
    for i, j in g.edges():
        top_i = set(np.argsort(-(w[i] - np.eye(30)[i] * 9))[:3].tolist())
        top_j = set(np.argsort(-(w[j] - np.eye(30)[j] * 9))[:3].tolist())
        assert j in top_i or i in top_j
    gt = mi_graph(w, sparsify="threshold", threshold=0.8)
    assert gt.number_of_edges() == int(np.sum(np.triu(w, 1) > 0.8))
    res = louvain_modularity(w, seed=0, sparsify="knn", knn_k=3)
    assert res.knn_k == 3 and res.threshold is None and res.sparsify == "knn"
    assert res.n_edges == g.number_of_edges()


def test_mutual_info_matrix_input_keeps_ids() -> None:
    rng = np.random.default_rng(8)
    acts = rng.normal(size=(500, 5))
    acts[:, 1] += acts[:, 0]
    mi = mutual_information_matrix(acts, neuron_ids=[50, 51, 52, 53, 54])
    res = louvain_modularity(mi, seed=1)
    np.testing.assert_array_equal(res.neuron_ids, [50, 51, 52, 53, 54])
    assert res.labels[0] == res.labels[1]
    assert math.isclose(res.mean_community_size * res.n_communities, 5)


def test_errors() -> None:
    rng = np.random.default_rng(9)
    w = rng.random((5, 5))
    with pytest.raises(ConfigError):
        louvain_modularity(w, seed=0)  # not symmetric
    with pytest.raises(ConfigError):
        louvain_modularity(np.ones((4, 5)), seed=0)
    with pytest.raises(InsufficientDataError):
        louvain_modularity(np.ones((1, 1)), seed=0)
    with pytest.raises(NumericalError):
        louvain_modularity(np.zeros((4, 4)), seed=0)
    bad = np.ones((4, 4))
    bad[0, 1] = bad[1, 0] = np.nan
    with pytest.raises(NumericalError):
        louvain_modularity(bad, seed=0)
    with pytest.raises(ConfigError):
        louvain_modularity(np.ones((4, 4)), seed=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        louvain_modularity(np.ones((4, 4)), seed=0, sparsify="mst")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        louvain_modularity(np.ones((4, 4)), seed=0, neuron_ids=[1, 1, 2, 3])
    with pytest.raises(NumericalError):
        modularity_q(np.zeros((3, 3)), [0, 1, 2])


def test_round_trip_json() -> None:
    w, _ = planted_weights([6, 6], w_in=1.0, w_out=0.1, noise=0.1, seed=10)
    res = louvain_modularity(w, seed=2, sparsify="threshold", threshold=0.05)
    back = ModularityResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.to_dict() == res.to_dict()
