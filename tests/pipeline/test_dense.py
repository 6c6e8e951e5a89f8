"""Dense builds (`targets="all"`): every selected source against every feature of every later site in the
window, significance streamed over the block files."""
import json

import jax
import numpy as np
import pytest

import jfig
from jfig.pipeline import build_graph
from jfig.pipeline.dense import DENSE_KEYS, dense_significance, null_sample
from jfig.pipeline.options import BuildOptions
from jfig.stats import decide, pair_thresholds
from tests.support.planted_graph import EXCITATORY, FAR, INHIBITORY, MID, SRC, TGT, recovery_model, two_scale_model
from tests.support.tiny_models import tiny_model

OPTIONS = dict(seq_len=8, top_k=24, progress=False, inputs_per_source=32, block_size=4)


def planted_tokens():
    return np.random.default_rng(0).integers(0, 64, size=(128, 8))


def test_dense_build_equals_the_candidate_build_over_every_pair():
    """With min_coact = 0 every pair is a candidate, so both builds test the same family: same edges,
    same numbers, same nodes (every measured source is a node, edge or not) and the same statistics."""
    model, saes = recovery_model()
    dense = build_graph(model, saes, planted_tokens(), targets="all", **OPTIONS)
    cand = build_graph(model, saes, planted_tokens(), min_coact=0.0, **OPTIONS)
    a, b = dense.edges.to_pydict(), cand.edges.to_pydict()
    for k in ("source_site", "source", "target_site", "target", "kind", "n", "weight", "p_value", "p_bonferroni",
              "weight_sd", "cv"):
        assert a[k] == b[k], k
    np.testing.assert_allclose(a["q_value"], b["q_value"], rtol=1e-12)     # BH by scipy vs streamed: round-off
    assert {(s, t) for s, t, k in zip(a["source"], a["target"], a["kind"]) if k != "gating"} == \
        set(EXCITATORY) | set(INHIBITORY)
    assert dense.nodes.to_pydict()["feature"] == cand.nodes.to_pydict()["feature"]
    sa, sb = dense.manifest["statistics"], cand.manifest["statistics"]
    for k in ("tau", "n_tested", "n_null", "n_cannot_inhibit", "min_attainable_p", "n_gating_tested"):
        assert sa[k] == sb[k], k
    assert sa["n_tested"] == 24 * 24


def test_dense_candidates_are_stored_compactly_and_resume(tmp_path):
    model, saes = recovery_model()
    calls = []

    def stop_after_two(i):
        calls.append(i)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_graph(model, saes, planted_tokens(), targets="all", out_dir=tmp_path, on_block=stop_after_two,
                    **OPTIONS)
    saved = json.loads((tmp_path / "candidates.json").read_text())
    assert set(saved["pairs"]) == {"dense"}
    assert saved["pairs"]["dense"]["target_sites"] == {SRC: [TGT]}
    assert sorted(saved["pairs"]["dense"]["sources"][SRC]) == list(range(24))
    assert saved["report"][-1]["after"] == 24 * 24
    blocks = sorted(p.name for p in (tmp_path / "blocks").glob("*.npz"))
    assert blocks == ["block_00000.npz", "block_00001.npz"]
    with np.load(tmp_path / "blocks" / blocks[0]) as z:
        assert set(z.files) == set(DENSE_KEYS)
        assert z["mean"].dtype == np.float32 and z["target_site"].dtype == np.int16
    calls.clear()
    resumed = build_graph(model, saes, planted_tokens(), targets="all", out_dir=tmp_path, on_block=calls.append,
                          **OPTIONS)
    whole = build_graph(model, saes, planted_tokens(), targets="all", **OPTIONS)
    assert calls == [0, 1, 2, 3, 4, 5]
    assert resumed.edges.to_pydict()["weight"] == whole.edges.to_pydict()["weight"]
    assert resumed.n_edges >= 10


def synthetic_blocks(rng, n_blocks=5, rows=400, sites=2):
    out = []
    for b in range(n_blocks):
        p = np.where(rng.random(rows) < 0.1, rng.uniform(0, 1e-5, rows), rng.random(rows))
        p[rng.random(rows) < 0.02] = np.nan
        null = rng.normal(0, 0.3, rows).astype(np.float32) if b % 2 == 0 else np.full(rows, np.nan, np.float32)
        out.append(dict(source_site=np.zeros(rows, np.int16), source=np.full(rows, b, np.int32),
                        target_site=rng.integers(1, sites, rows).astype(np.int16),
                        target=np.arange(rows, dtype=np.int32), mean=rng.normal(0, 1, rows).astype(np.float32),
                        var=np.ones(rows, np.float32), n=np.full(rows, 32, np.float32), p_value=p, null_mean=null,
                        target_active=np.ones(rows, np.float32)))
    return out


@pytest.mark.parametrize("correction", ["bonferroni", "bh", "none"])
def test_streamed_significance_is_decide_over_the_whole_family(correction):
    """Two passes over the blocks give exactly `decide` over all rows at once (tau from the same null
    values), and the blocks are read twice, one at a time."""
    rng = np.random.default_rng(7)
    blocks = synthetic_blocks(rng, sites=3)
    sites = ("s0", "s1", "s2")
    opts = BuildOptions.from_dict(dict(alpha=0.05, correction=correction))
    reads = []

    def read():
        reads.append(1)
        return iter(blocks)

    res = dense_significance(read, sites, opts)
    assert len(reads) == 2
    cat = {k: np.concatenate([b[k] for b in blocks]) for k in DENSE_KEYS}
    tsite = np.asarray(sites)[cat["target_site"]]
    ssite = np.asarray(sites)[cat["source_site"]]
    ok = np.isfinite(cat["null_mean"])
    taus = pair_thresholds(cat["null_mean"][ok], ssite[ok], tsite[ok], opts.tau_quantile)
    assert set(taus) == {("s0", "s1"), ("s0", "s2")} and res.taus == pytest.approx(taus)
    d = decide(cat["mean"], cat["p_value"], alpha=0.05, correction=correction,
               tau=np.asarray([taus[(a, b)] for a, b in zip(ssite, tsite)]))
    assert d.keep.sum() >= 10
    np.testing.assert_array_equal(res.kept["p_value"], cat["p_value"][d.keep])
    np.testing.assert_array_equal(res.kept["target_site"], tsite[d.keep])
    np.testing.assert_allclose(res.decision.q_value, d.q_value[d.keep])
    np.testing.assert_allclose(res.decision.p_bonferroni, d.p_bonferroni[d.keep])
    assert res.n_tested == d.n_tested and res.decision.n_tested == d.n_tested
    assert res.sources == [("s0", b) for b in range(5)]


def test_null_sample_is_bounded_and_evenly_spaced():
    rec = dict(null_mean=np.arange(100, dtype=np.float32), target_site=np.repeat([1, 2], 50).astype(np.int16),
               source_site=np.zeros(100, np.int16))
    rec["null_mean"][3] = np.nan
    got = null_sample(rec, size=5)
    assert set(got) == {(0, 1), (0, 2)} and all(len(v) == 5 for v in got.values())
    assert got[(0, 2)].tolist() == [50, 62, 74, 86, 99] and not np.isnan(got[(0, 1)]).any()
    assert len(null_sample(rec, size=1000)[(0, 1)]) == 49


@pytest.mark.parametrize("method", ["clamp", "jacobian"])
def test_dense_build_on_a_transformer(method):
    """A built-in model (position-sparse suffix, shared clean prefix): every feature of every later site
    in the window is tested, and the dense graph equals the candidate graph over every pair."""
    model = tiny_model("llama", n_layers=3, d_model=16, vocab_size=50)
    sites = [f"blocks.{l}.hook_resid_post" for l in range(3)]
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(i), 16, 32, s) for i, s in enumerate(sites)]
    toks = np.random.default_rng(1).integers(0, 50, size=(48, 12))
    opts = dict(seq_len=12, top_k=32, importance="rate", progress=False, seed=1, inputs_per_source=16,
                correction="bh", alpha=0.05, method=method, window=1, gating=False)
    dense = build_graph(model, saes, toks, targets="all", **opts)
    cand = build_graph(model, saes, toks, min_coact=0.0, keep_low_coact=False, **opts)
    st = dense.manifest["statistics"]
    assert st["n_tested"] == cand.manifest["statistics"]["n_tested"] == 2 * 32 * 32   # window 1: 0->1, 1->2
    assert st["n_tested_by_site_pair"] == cand.manifest["statistics"]["n_tested_by_site_pair"] == {
        f"{sites[0]} -> {sites[1]}": 32 * 32, f"{sites[1]} -> {sites[2]}": 32 * 32}
    a, b = dense.edges.to_pydict(), cand.edges.to_pydict()
    assert len(a["source"]) >= 3
    for k in ("source_site", "source", "target_site", "target", "kind", "weight", "p_value"):
        assert a[k] == b[k], k
    np.testing.assert_allclose(a["q_value"], b["q_value"], rtol=1e-12)     # BH by scipy vs streamed: round-off


@pytest.mark.parametrize("targets", ["all", "candidates"])
def test_tau_is_per_source_site_and_target_site(targets):
    """Sources at two sites differ in scale: blocks.0 moves every target through a dense map, blocks.1
    only through its planted ±2 weights. Each site pair gets its own tau, so blocks.1's planted edges
    (|effect| 2) pass although blocks.0's null sits far above 2 (a tau pooled per target site would
    drop them all)."""
    model, saes = two_scale_model()
    g = build_graph(model, saes, planted_tokens(), targets=targets, min_coact=0.0, read="pre", window=2,
                    gating=False, **OPTIONS)
    st = g.manifest["statistics"]
    pair = st["tau_by_site_pair"]
    assert pair[f"{SRC} -> {FAR}"] > 4.0 > 2.0 > pair[f"{MID} -> {FAR}"] > 0
    assert st["tau"][FAR] == pair[f"{MID} -> {FAR}"]            # the smallest bar into the site
    e = g.edges.to_pydict()
    mid = {(s, t) for ss, s, t in zip(e["source_site"], e["source"], e["target"]) if ss == MID}
    assert mid == set(EXCITATORY) | set(INHIBITORY)


def test_within_layer_site_pairs():
    """Sites inside one layer (hook_resid_mid -> hook_resid_post: the MLP alone) are a site pair like any
    other: measured, counted, equal in dense and candidate builds, and their edges have source_layer ==
    target_layer."""
    model = tiny_model("llama", n_layers=2, d_model=16, vocab_size=50)
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(i), 16, 32, s) for i, s in enumerate(sites)]
    toks = np.random.default_rng(2).integers(0, 50, size=(48, 12))
    opts = dict(seq_len=12, top_k=32, importance="rate", progress=False, seed=1, inputs_per_source=16,
                correction="bh", alpha=0.05, window=1, gating=False)
    dense = build_graph(model, saes, toks, targets="all", **opts)
    cand = build_graph(model, saes, toks, min_coact=0.0, keep_low_coact=False, **opts)
    by_pair = dense.manifest["statistics"]["n_tested_by_site_pair"]
    assert by_pair == cand.manifest["statistics"]["n_tested_by_site_pair"]
    assert by_pair[f"{sites[1]} -> {sites[2]}"] == 32 * 32 and len(by_pair) == 3
    e = dense.edges.to_pydict()
    within = [i for i, (a, b) in enumerate(zip(e["source_site"], e["target_site"])) if (a, b) == (sites[1], sites[2])]
    assert within and all(e["source_layer"][i] == e["target_layer"][i] == 1 for i in within)
    c = cand.edges.to_pydict()
    for k in ("source_site", "source", "target_site", "target", "kind", "weight"):
        assert e[k] == c[k], k
