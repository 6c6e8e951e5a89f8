"""Feature manifolds: a planted ring of decoder rows is one low-dimensional group, a planted blob is a
group but not a manifold, random features form no group; the estimators against known dimensions;
edges among a group's members against random groups; the co-activation clustering from an atlas."""
import jax
import numpy as np
import pytest
from scipy.spatial import procrustes

import jfig
from jfig.analysis import (decoder_clusters, feature_manifolds, group_manifold, manifold_table, participation_ratio,
                           plot_manifolds, two_nn_dimension)
from jfig.analysis.manifolds import principal_coordinates
from jfig.atlas import build_atlas
from jfig.errors import OptionError, ShapeError
from jfig.testing.models import tiny_model
from tests.support.graphs import graph_from_edges

D = 32
SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted_rows(seed=0, n_ring=16, n_blob=10, n_random=40):
    """(rows [n, D], ring ids, blob ids, the ring's angles in id order): a ring (a shared direction plus
    a circle in a 2-D subspace, as days of the week), a blob (a shared direction plus isotropic noise) and random rows, shuffled."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((D, D)))[0].T
    theta = rng.uniform(0, 2 * np.pi, n_ring)      # irregular: an evenly spaced ring has r1 = r2 everywhere,
                                                   # which no nearest-neighbour estimator can read
    ring = 0.8 * q[0] + 0.6 * (np.cos(theta)[:, None] * q[1] + np.sin(theta)[:, None] * q[2])
    ring += 0.01 * rng.standard_normal(ring.shape)
    blob = q[3] + 0.75 * unit(rng.standard_normal((n_blob, D)))
    rows = unit(np.concatenate([ring, blob, rng.standard_normal((n_random, D))]))
    order = rng.permutation(len(rows))
    where = np.argsort(order)                       # original row r sits at position where[r]
    ring_ids = where[:n_ring]
    return rows[order], np.sort(ring_ids), np.sort(where[n_ring:n_ring + n_blob]), theta[np.argsort(ring_ids)]


def sae_with(rows, site=SITES[0]):
    return jfig.SAE(W_enc=rows.T, b_enc=np.zeros(len(rows)), W_dec=rows, b_dec=np.zeros(D), site=site)


def test_estimators_on_known_shapes():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 2 * np.pi, 400)
    circle = np.stack([np.cos(t), np.sin(t)], 1) @ rng.standard_normal((2, 10))
    line = np.outer(rng.standard_normal(50), rng.standard_normal(10))
    cloud = rng.standard_normal((2000, 5))
    assert two_nn_dimension(circle) == pytest.approx(1.0, abs=0.2)
    assert two_nn_dimension(cloud) == pytest.approx(5.0, abs=0.6)
    assert participation_ratio(line) == pytest.approx(1.0, abs=1e-6)
    assert participation_ratio(cloud) == pytest.approx(5.0, abs=0.2)
    assert participation_ratio(np.stack([np.cos(t), np.sin(t)], 1)) == pytest.approx(2.0, abs=0.1)
    xy = principal_coordinates(circle, 2)
    np.testing.assert_allclose(np.linalg.norm(xy, axis=1).std() / np.linalg.norm(xy, axis=1).mean(), 0, atol=0.5)
    assert np.isnan(participation_ratio(np.ones((1, 4)))) and np.isnan(two_nn_dimension(np.ones((2, 4))))


def test_planted_ring_is_the_one_manifold_and_random_features_are_not_grouped():
    rows, ring, blob, theta = planted_rows()
    sae = sae_with(rows)
    labels = {(SITES[0], int(f)): f"day{k}" for k, f in enumerate(ring)}
    groups = feature_manifolds(sae, labels=labels, min_size=6, null_samples=30)
    found = {frozenset(f for _, f in g.members): g for g in groups}
    assert frozenset(ring.tolist()) in found and len(groups) == 2      # random rows form no group of 6
    r = found[frozenset(ring.tolist())]
    b = next(g for g in groups if g is not r)
    # the blob, which one random row close to its shared direction may join (cosine 0.5 to it)
    assert set(blob.tolist()) <= {f for _, f in b.members} and b.size <= len(blob) + 1
    assert r.is_manifold and not b.is_manifold
    assert 1.0 < r.participation_ratio < 2.5 and 0.5 < r.two_nn < 2.0
    assert b.participation_ratio > 5 and r.dimension_null > 8
    assert r.explained[:2].sum() > 0.99 and r.embedding.shape == (16, 2)
    assert sorted(r.labels) == sorted(labels.values()) and r.edges == -1 and np.isnan(r.density)
    # the ring's embedding is its circle, up to rotation, reflection and scale
    assert procrustes(r.embedding, np.stack([np.cos(theta), np.sin(theta)], 1))[2] < 0.01
    assert procrustes(r.embedding, np.stack([np.cos(theta), np.sin(theta)], 1)[::-1])[2] > 0.1
    t = manifold_table(groups)
    assert t.num_rows == 2 and set(t["is_manifold"].to_pylist()) == {True, False}
    # a stricter cut splits the ring into arcs: the threshold is what it says
    arcs = decoder_clusters(sae, min_cosine=0.95, min_size=2)
    assert all(len(g) < 16 for g in arcs)


def test_random_features_only_give_no_manifold():
    rows = unit(np.random.default_rng(5).standard_normal((80, D)))
    assert feature_manifolds(sae_with(rows), min_size=6, null_samples=0) == []


def test_edges_among_members_against_random_groups(tmp_path):
    rows, ring, _, _ = planted_rows(seed=1, n_random=54)          # 80 features per site
    saes = [sae_with(rows, SITES[0]), sae_with(rows, SITES[1])]
    half = ring[:8]
    members = [(SITES[0], int(f)) for f in half] + [(SITES[1], int(f)) for f in ring[8:]]
    rng = np.random.default_rng(2)
    src, tgt = rng.choice(half, 12), rng.choice(ring[8:], 12)
    pairs = {(int(a), int(b)) for a, b in zip(src, tgt)}
    sign = [1] * (len(pairs) - 4) + [-1] * 4
    noise = {(int(a), int(b)) for a, b in rng.integers(0, 80, (200, 2))} - pairs
    edges = sorted(pairs) + sorted(noise)
    a, b = np.asarray(edges).T
    s = np.asarray(sign + [1] * len(noise))
    graph = graph_from_edges(SITES, np.zeros(len(a), int), a, np.ones(len(a), int), b, s, n_features=80)
    inside = sum(1 for x, y in noise if x in set(half.tolist()) and y in set(ring[8:].tolist()))
    g = group_manifold(saes, members, graph=graph, null_samples=200)
    assert g.edges == len(pairs) + inside and g.inhibitory == 4 and g.excitatory == len(pairs) - 4 + inside
    assert g.density == pytest.approx(g.edges / (16 * 15))
    assert g.null_density < g.density / 3 and g.null_p < 0.02
    assert g.sites == SITES
    # a random group of the same composition is not denser than its null
    other = [(SITES[0], int(f)) for f in rng.choice(80, 8, replace=False)] + \
            [(SITES[1], int(f)) for f in rng.choice(80, 8, replace=False)]
    assert group_manifold(saes, other, graph=graph, null_samples=200).null_p > 0.01
    path = plot_manifolds([g], tmp_path / "m.png")
    assert path.stat().st_size > 5000


def test_coactivation_groups_come_from_the_atlas():
    model = tiny_model(n_layers=2, d_model=16)
    sae = jfig.SAE.init_random(jax.random.PRNGKey(0), 16, 24, "blocks.0.hook_resid_post")
    toks = np.random.default_rng(0).integers(0, 64, (16, 16))
    atlas = build_atlas(model, [sae], toks, batch_size=8, progress=False)
    groups = feature_manifolds(sae, atlas=atlas, clusterings="coactivation", min_size=3, min_count=2, null_samples=5)
    comms = [c for c in atlas.communities(min_count=2, method="leiden", min_size=3)]
    assert groups and {frozenset(g.members) for g in groups} == {frozenset(c) for c in comms}
    assert all(g.source == "coactivation" for g in groups)


def test_bad_input():
    rows, ring, _, _ = planted_rows()
    sae = sae_with(rows)
    with pytest.raises(OptionError, match="at least 2 members"):
        group_manifold(sae, [])
    with pytest.raises(OptionError, match="not among the features"):
        group_manifold(sae, [(SITES[0], 1), (SITES[0], 999)])
    other_width = jfig.SAE.init_random(jax.random.PRNGKey(0), 16, 8, SITES[1])
    with pytest.raises(ShapeError, match="different widths"):
        feature_manifolds([sae, other_width])
    with pytest.raises(OptionError, match="needs atlas"):
        feature_manifolds(sae, clusterings="coactivation")
    with pytest.raises(OptionError, match="clusterings"):
        feature_manifolds(sae, clusterings=("kmeans",))
    with pytest.raises(OptionError, match="min_size"):
        feature_manifolds(sae, min_size=2)
    with pytest.raises(OptionError, match="selects no feature"):
        feature_manifolds(sae, features={SITES[0]: []})
    with pytest.raises(OptionError, match="no SAE here"):
        feature_manifolds(sae, features={SITES[1]: [0]})
    with pytest.raises(OptionError, match="no SAEs"):
        decoder_clusters([])
