"""Co-activation atlas: the streaming accumulator against dense numpy, planted structure, position
windows, quantiles, contexts, and build/save/load/merge/extend on a tiny random model."""
import copy
import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats as sps

import jfig
from jfig.atlas import Atlas, build_atlas, extend_atlas, token_batches
from jfig.atlas import AtlasAccumulator
from jfig.errors import FormatError, JfigError, SiteError
from jfig.models.config import llama_config
from jfig.models.forward import init_params

A, B = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
SITES = {A: 12, B: 10}
SHAPE = (3, 8)  # [batch, seq] of every accumulator test batch (one compile per setting)


def sparse_acts(rng, density, shape=SHAPE):
    return {s: ((rng.random(shape + (d,)) < density) * rng.uniform(0.01, 5.0, shape + (d,))).astype(np.float32)
            for s, d in SITES.items()}


def windowed(F, w):
    """g[b, p, j] = max over q in p..p+w of F[b, q, j]."""
    G = F.copy()
    for o in range(1, w + 1):
        G[:, :-o] = np.maximum(G[:, :-o], F[:, o:])
    return G


def reference(batches, src, tgt, w):
    """Dense numpy statistics of a pair over a list of activation dicts."""
    Fa = np.concatenate([b[src] for b in batches]).reshape(-1, SITES[src])
    G = np.concatenate([windowed(b[tgt], w) for b in batches]).reshape(-1, SITES[tgt])
    N = len(Fa)
    Ai, Gj = (Fa > 0).astype(np.int64), (G > 0).astype(np.int64)
    co, n, m = Ai.T @ Gj, Ai.sum(0), Gj.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return dict(co=co, n=n, m=m, N=N, p_cond=co / n[:, None], pmi=np.log(co * N / np.outer(n, m)),
                    cond_mean=(Ai.T @ G) / n[:, None], target_mean=G.mean(0),
                    p_low=sps.hypergeom.cdf(co, N, m[None, :], n[:, None]))


def accumulate(batches, **kw):
    acc = AtlasAccumulator(SITES, **{"window": 1, **kw})
    for b in batches:
        acc.update(b)
    return acc, Atlas.from_accumulator(acc)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.05, 0.7), n_batches=st.integers(1, 3),
       method=st.sampled_from(["sparse", "dense"]), w=st.sampled_from([0, 1]))
def test_pair_statistics_equal_dense_numpy(seed, density, n_batches, method, w):
    rng = np.random.default_rng(seed)
    batches = [sparse_acts(rng, density) for _ in range(n_batches)]
    _, atlas = accumulate(batches, position_window=w, method=method)
    assert atlas.n_tokens == n_batches * SHAPE[0] * SHAPE[1]
    assert atlas.pairs == ((A, A), (A, B), (B, B))
    for src, tgt in atlas.pairs:
        ref = reference(batches, src, tgt, w)
        np.testing.assert_array_equal(atlas.coactivation(src, tgt), ref["co"])
        np.testing.assert_array_equal(atlas.source_count(src), ref["n"])
        np.testing.assert_array_equal(atlas.target_count(tgt), ref["m"])
        np.testing.assert_allclose(atlas.conditional_probability(src, tgt), ref["p_cond"], rtol=1e-12)
        np.testing.assert_allclose(atlas.pmi(src, tgt), ref["pmi"], rtol=1e-12)
        np.testing.assert_allclose(atlas.conditional_mean(src, tgt), ref["cond_mean"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(atlas.target_mean(tgt), ref["target_mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(atlas.low_coactivation_pvalue(src, tgt), ref["p_low"], rtol=1e-9)
    F = np.concatenate([b[A] for b in batches]).reshape(-1, SITES[A])
    np.testing.assert_array_equal(atlas.firing_count(A), (F > 0).sum(0))
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(atlas.mean_activation(A), F.sum(0) / (F > 0).sum(0), rtol=1e-5)


def test_streaming_equals_one_pass_and_memory_is_fixed():
    rng = np.random.default_rng(1)
    batches = [sparse_acts(rng, 0.3) for _ in range(3)]
    tokens = [rng.integers(0, 100, SHAPE) for _ in range(3)]
    acc = AtlasAccumulator(SITES, window=1)
    fresh = acc.nbytes()
    sizes = []
    for b, t in zip(batches, tokens):
        acc.update(b, tokens=t)
        sizes.append(acc.nbytes())
    assert sizes == [fresh] * 3
    one = AtlasAccumulator(SITES, window=1)
    one.update({s: np.concatenate([b[s] for b in batches]) for s in SITES}, tokens=np.concatenate(tokens))
    assert one.nbytes() == fresh
    streamed, whole = Atlas.from_accumulator(acc), Atlas.from_accumulator(one)
    assert_atlases_equal(streamed, whole)


def test_no_retrace_across_batches(count_traces):
    rng = np.random.default_rng(2)
    acc = AtlasAccumulator(SITES, window=1)
    acc.update(sparse_acts(rng, 0.3))
    batches = [sparse_acts(rng, 0.3) for _ in range(3)]
    with count_traces() as traces:
        for b in batches:
            acc.update(b, n_valid_rows=2)
    assert traces.count == 0


def planted_batches(rng, n):
    """Features 0 and 1 of A always fire together (10%); 2 and 3 never together (40% each)."""
    out = []
    for _ in range(n):
        acts = sparse_acts(rng, 0.05)
        a = acts[A]
        a[..., :4] = 0
        both = rng.random(SHAPE) < 0.1
        a[..., 0] = a[..., 1] = np.where(both, 1.0, 0.0)
        pick = rng.random(SHAPE)
        a[..., 2] = np.where(pick < 0.4, 2.0, 0.0)
        a[..., 3] = np.where(pick > 0.6, 2.0, 0.0)
        acts[B][..., 5] = np.where(both, 3.0, 0.0)    # B's feature 5 fires exactly with A's 0
        out.append(acts)
    return out


def test_planted_coactivation_and_exclusion():
    atlas = accumulate(planted_batches(np.random.default_rng(3), 12))[1]
    pmi, p_low = atlas.pmi(A, A), atlas.low_coactivation_pvalue(A, A)
    top = np.log(atlas.n_tokens / atlas.firing_count(A)[0])       # the largest PMI their rates allow
    assert pmi[0, 1] > 1.5 and pmi[0, 1] == pytest.approx(top)
    assert atlas.conditional_probability(A, B)[0, 5] == 1.0
    assert atlas.pmi(A, B)[0, 5] == pytest.approx(top)
    assert atlas.coactivation(A, A)[2, 3] == 0
    assert p_low[2, 3] < 1e-6 and p_low[3, 2] < 1e-6
    assert p_low[0, 1] > 0.5
    table = atlas.pair_table(A, A, min_count=0).to_pylist()
    row = next(r for r in table if (r["source"], r["target"]) == (2, 3))
    assert row["count"] == 0 and row["p_low"] < 1e-6 and row["expected"] > 10
    comms = atlas.communities(min_count=3, min_pmi=1.0)
    assert any({(A, 0), (A, 1), (B, 5)} <= c for c in comms)
    assert any({(A, 0), (A, 1), (B, 5)} <= c for c in atlas.communities(min_count=3, min_pmi=1.0, method="leiden"))
    only = atlas.communities(min_count=3, min_pmi=1.0, features={A: [0, 1], B: [5]}, method="leiden")
    assert only == [{(A, 0), (A, 1), (B, 5)}]
    with pytest.raises(JfigError, match="unknown community method"):
        atlas.communities(method="girvan")


def test_position_window_counts_a_pair_offset_by_one():
    acts = {s: np.zeros(SHAPE + (d,), np.float32) for s, d in SITES.items()}
    acts[A][0, 2, 4] = 1.0   # source at position 2
    acts[B][0, 3, 7] = 1.0   # target at position 3
    acts[B][1, 5, 7] = 1.0   # target elsewhere, before a source
    acts[A][1, 6, 4] = 1.0
    for method in ("sparse", "dense"):
        same = accumulate([acts], position_window=0, method=method)[1]
        shifted = accumulate([acts], position_window=1, method=method)[1]
        assert same.coactivation(A, B)[4, 7] == 0
        assert shifted.coactivation(A, B)[4, 7] == 1          # (0, 2) -> (0, 3) only; attention acts forward
        assert shifted.target_count(B)[7] == 4                # positions 2, 3 of row 0 and 4, 5 of row 1
        assert same.target_count(B)[7] == 2


def test_quantiles_exact_when_few_and_histogram_when_many():
    rng = np.random.default_rng(4)
    batches = [sparse_acts(rng, 0.3) for _ in range(4)]
    vals = np.concatenate([b[A] for b in batches]).reshape(-1, SITES[A])
    few = accumulate(batches, exact_values=64)[1]
    many = accumulate(batches, exact_values=4)[1]
    q = (0.1, 0.5, 0.9)
    for f in range(SITES[A]):
        nz = vals[:, f][vals[:, f] > 0]
        np.testing.assert_allclose(few.quantiles(A, q)[f], np.quantile(nz, q), rtol=1e-6)
        srt, r = np.sort(nz), np.asarray(q) * (len(nz) - 1)        # histogram: within one bin of the true rank
        step = (1e4 / 1e-4) ** (1 / 256)
        assert (many.quantiles(A, q)[f] >= srt[np.floor(r).astype(int)] / step - 1e-9).all()
        assert (many.quantiles(A, q)[f] <= srt[np.ceil(r).astype(int)] * step + 1e-9).all()
    np.testing.assert_array_equal(few.alpha_levels(A), few.quantiles(A, q))
    assert np.isnan(few.quantiles(B, q)[few.firing_count(B) == 0]).all()


def test_contexts_hold_the_strongest_activations_and_their_windows():
    rng = np.random.default_rng(5)
    batches = [sparse_acts(rng, 0.2) for _ in range(2)]
    tokens = [rng.integers(0, 100, SHAPE) for _ in range(2)]
    acc = AtlasAccumulator(SITES, window=1)                     # 8 contexts, 12 tokens before and 4 after
    for b, t in zip(batches, tokens):
        acc.update(b, tokens=t)
    atlas = Atlas.from_accumulator(acc)
    F, T = np.concatenate([b[A] for b in batches]), np.concatenate(tokens)
    for f in range(SITES[A]):
        n = min(8, int((F[..., f] > 0).sum()))
        seq, pos = np.unravel_index(np.argsort(-F[..., f], axis=None, kind="stable")[:n], F.shape[:2])
        ctx = atlas.contexts(A, f)
        assert [(c["sequence"], c["position"]) for c in ctx] == [(int(s), int(p)) for s, p in zip(seq, pos)]
        for c in ctx:
            s, p = c["sequence"], c["position"]
            want = [int(T[s, q]) if 0 <= q < SHAPE[1] else -1 for q in range(p - 12, p + 5)]
            assert c["tokens"] == want and c["activation"] == pytest.approx(F[s, p, f])


# ---------------------------------------------------------------------------------- with a model

def assert_atlases_equal(x: Atlas, y: Atlas, sums_rtol=1e-5):
    assert x.sites == y.sites and x.pairs == y.pairs and x.n_tokens == y.n_tokens
    assert x.n_sequences == y.n_sequences
    for s in x.sites:
        np.testing.assert_array_equal(x.features[s], y.features[s])
        for k, v in x.stats(s).items():
            if k in ("sum", "wsum", "ctx_val", "exact", "vmin", "vmax"):
                np.testing.assert_allclose(v, y.stats(s)[k], rtol=sums_rtol, atol=1e-6, err_msg=f"{s} {k}")
            else:
                np.testing.assert_array_equal(v, y.stats(s)[k], err_msg=f"{s} {k}")
    for p in x.pairs:
        np.testing.assert_array_equal(x.coactivation(*p), y.coactivation(*p))
        np.testing.assert_allclose(x._p(*p)["fsum"], y._p(*p)["fsum"], rtol=sums_rtol, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    cfg = llama_config(n_layers=3, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=50,
                       max_seq_len=32)
    model = jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.2))
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(1), 16, 32, "blocks.0.hook_resid_post", "topk", k=4),
            jfig.SAE.init_random(jax.random.PRNGKey(2), 16, 40, "blocks.2.hook_resid_post", "topk", k=4)]
    tokens = np.random.default_rng(0).integers(0, 50, (18, 10))
    return model, saes, tokens


BUILD = dict(batch_size=4, progress=False, position_window=1)


@pytest.fixture(scope="module")
def whole(tiny):
    model, saes, tokens = tiny
    return build_atlas(model, saes, tokens, corpus_hash="abc", **BUILD)


def test_build_atlas_matches_the_accumulator_fed_directly(tiny, whole):
    model, saes, tokens = tiny
    acc = AtlasAccumulator({s.site: s.d_sae for s in saes}, window=5, position_window=1,
                           max_active={s.site: 4 for s in saes})
    for toks, rows in token_batches(tokens, 4):
        cache = model.run(toks, capture=tuple(s.site for s in saes)).cache
        acc.update({s.site: s.encode(cache[s.site]) for s in saes}, tokens=toks, n_valid_rows=rows)
    assert_atlases_equal(whole, Atlas.from_accumulator(acc))
    assert whole.n_tokens == tokens.size and whole.n_sequences == len(tokens)
    assert (whole.firing_count(saes[0].site).sum() == 4 * tokens.size)        # topk: exactly k per token


def test_no_retrace_across_batches_of_a_build(tiny, whole, count_traces):
    model, saes, tokens = tiny
    build_atlas(model, saes, [tokens[:7], tokens[7:]], **BUILD)
    with count_traces() as traces:                    # a second build reuses every compiled step
        again = build_atlas(model, saes, [tokens[:7], tokens[7:]], **BUILD)   # iterable input, regrouped
    assert traces.count == 0
    assert_atlases_equal(again, whole)


def test_large_saes_track_their_most_frequent_features(tiny, whole):
    model, saes, tokens = tiny
    sub = build_atlas(model, saes, tokens, max_tracked=16, selection_batches=100, **BUILD)
    pos = {}
    for s in sub.sites:
        want = np.sort(np.argsort(-whole.firing_count(s), kind="stable")[:16])
        np.testing.assert_array_equal(sub.features[s], want)
        np.testing.assert_array_equal(sub.firing_count(s), whole.firing_count(s))
        pos[s] = whole.tracked_index(s, want)
    for a, b in sub.pairs:
        np.testing.assert_array_equal(sub.coactivation(a, b), whole.coactivation(a, b)[np.ix_(pos[a], pos[b])])


def test_save_load_round_trip(tiny, whole, tmp_path):
    path = tmp_path / "atlas"
    whole.save(path)
    whole.save(path)                                                           # overwrite in place
    loaded = Atlas.load(path)
    assert_atlases_equal(loaded, whole, sums_rtol=0)
    assert loaded.corpus_hash == "abc" and loaded.settings == whole.settings
    manifest = json.loads((path / "manifest.json").read_text())
    assert [s["d_sae"] for s in manifest["sites"]] == [32, 40]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas"]           # no temp dirs left
    (path / "pair_0_count.npz").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="corrupt"):
        Atlas.load(path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(JfigError, match="not an atlas"):
        whole.save(tmp_path / "other")
    with pytest.raises(FormatError, match="manifest"):
        Atlas.load(tmp_path / "other")


def test_merge_and_extend_equal_the_whole(tiny, whole):
    model, saes, tokens = tiny
    first = build_atlas(model, saes, tokens[:8], **BUILD)
    second = build_atlas(model, saes, tokens[8:], **BUILD)
    assert_atlases_equal(Atlas.merge(first, second), whole)
    assert_atlases_equal(extend_atlas(first, model, saes, tokens[8:], batch_size=4), whole)
    other = copy.copy(second)
    other.settings = {**second.settings, "position_window": 0}
    with pytest.raises(JfigError, match="settings"):
        Atlas.merge(first, other)


def test_errors_name_the_problem(tiny, whole):
    model, saes, tokens = tiny
    with pytest.raises(SiteError, match="no statistics"):
        whole.coactivation(saes[1].site, saes[0].site)
    with pytest.raises(JfigError, match="two SAEs"):
        build_atlas(model, [saes[0], saes[0]], tokens, **BUILD)
    with pytest.raises(jfig.ShapeError, match="vocabulary"):
        build_atlas(model, saes, tokens + 100, **BUILD)
