"""Candidate selection: the report is monotone, every kept pair passes its filters, importance's
ablation effect equals a naive loop of model.run with Ablate, alignment and low co-activation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.atlas import Atlas, build_atlas
from jfig.atlas import AtlasAccumulator
from jfig.candidates import select_candidates, select_sources, window_targets
from jfig.measure import ablation_effects, alignment_applies, decoder_alignment, feature_importance
from jfig.edits import Ablate
from jfig.models.config import llama_config
from jfig.models.forward import init_params

S0, S1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup():
    cfg = llama_config(n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=50,
                       max_seq_len=32)
    model = jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.3))
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(1), 16, 32, S0, "topk", k=4),
            jfig.SAE.init_random(jax.random.PRNGKey(2), 16, 24, S1, "topk", k=4)]
    tokens = np.random.default_rng(0).integers(0, 50, (16, 10))
    atlas = build_atlas(model, saes, tokens, batch_size=8, progress=False)
    return model, saes, tokens, atlas


@pytest.fixture(scope="module")
def cands(setup):
    model, saes, tokens, atlas = setup
    effects = {sae.site: feature_importance(atlas, sae, model, tokens[:6], kind="loss", pool=48, batch_size=4)
               for sae in saes}
    return select_candidates(atlas, saes, effects=effects, importance="loss", top_k=12, min_coact=0.2,
                             alignment_window=None, min_alignment=0.1)


def test_report_is_monotone_and_printable(cands):
    rows = cands.report.rows
    assert [r["step"].split(" ")[0] for r in rows] == ["all", "layer", "importance", "co-activation", "decoder"]
    afters = [r["after"] for r in rows]
    assert all(b >= a for b, a in zip(afters, afters[1:]))
    assert all(r["after"] <= r["before"] for r in rows)
    assert all(r["before"] == prev["after"] for prev, r in zip(rows, rows[1:]) if prev is not rows[0])
    assert rows[0]["after"] == 32 * 24 and rows[2]["after"] == 12 * 12 and afters[-1] == len(cands)
    text = str(cands.report)
    assert "importance" in text and f"{len(cands):,d}" in text
    assert cands.report.as_table().num_rows == len(rows)


def test_kept_pairs_pass_every_filter(setup, cands):
    model, saes, tokens, atlas = setup
    assert len(cands) > 0
    t = cands.pairs.to_pydict()
    assert set(t["source_site"]) == {S0} and set(t["target_site"]) == {S1}
    f = cands.features.to_pydict()
    chosen = {s: {x for site, x, sel in zip(f["site"], f["feature"], f["selected"]) if site == s and sel}
              for s in (S0, S1)}
    dot, cos = decoder_alignment(saes[0], saes[1])
    p_cond = atlas.conditional_probability(S0, S1)
    for i, j, low, a in zip(t["source"], t["target"], t["low_coactivation"], t["alignment"]):
        assert i in chosen[S0] and j in chosen[S1]
        assert low or p_cond[i, j] >= 0.2
        assert abs(cos[i, j]) >= 0.1 and a == pytest.approx(dot[i, j])
    assert np.array_equal(cands.source, np.asarray(t["source"])) and len(cands.target_site) == len(cands)


def test_importance_is_rate_times_effect_of_the_top_features(setup, cands):
    _, _, _, atlas = setup
    f = cands.features.to_pydict()
    for site in (S0, S1):
        rows = [k for k, s in enumerate(f["site"]) if s == site]
        imp = np.array([f["importance"][k] for k in rows])
        rate = np.array([f["firing_rate"][k] for k in rows])
        eff = np.array([f["effect"][k] for k in rows])
        np.testing.assert_allclose(rate, atlas.firing_rate(site)[atlas.features[site]])
        np.testing.assert_allclose(imp, rate * eff, equal_nan=True)
        sel = np.array([f["selected"][k] for k in rows])
        score = np.nan_to_num(imp, nan=-np.inf)
        assert sel.sum() == 12 and score[sel].min() >= score[~sel].max()


@pytest.mark.parametrize("kind", ["loss", "kl"])
def test_ablation_effect_equals_a_naive_loop(setup, kind):
    model, saes, tokens, _ = setup
    sae, toks = saes[1], jnp.asarray(tokens[:6], jnp.int32)
    feats = np.arange(8)
    effect, n_active = ablation_effects(model, sae, toks, feats, kind=kind, batch_size=4, chunk=3)
    base = jax.nn.log_softmax(model.run(toks).logits, -1)
    f_src = sae.encode(model.run(toks, capture=(sae.site,)).cache[sae.site])
    for f in feats:
        mask = f_src[..., f] > 0
        logp = jax.nn.log_softmax(model.run(toks, edits=(Ablate(sae, int(f), positions=mask),)).logits, -1)
        if kind == "loss":
            nll = lambda lp: -jnp.take_along_axis(lp[:, :-1], toks[:, 1:, None], -1)[..., 0]  # noqa: E731
            total = jnp.abs(nll(logp) - nll(base)).sum()
        else:
            total = jnp.sum(jnp.exp(base) * (base - logp))
        assert n_active[f] == int(mask.sum())
        if n_active[f]:
            assert effect[f] == pytest.approx(float(total) / int(mask.sum()), rel=1e-4, abs=1e-7)
        else:
            assert np.isnan(effect[f])


def test_decoder_alignment_is_the_direct_dot_product():
    src = jfig.SAE.init_random(jax.random.PRNGKey(3), 8, 6, S0)
    tgt = jfig.SAE.init_random(jax.random.PRNGKey(4), 8, 5, S1)
    tgt = jfig.SAE(W_enc=tgt.W_enc * 3.0, b_enc=tgt.b_enc, W_dec=tgt.W_dec, b_dec=tgt.b_dec, site=S1)
    dot, cos = decoder_alignment(src, tgt, sources=[1, 4], targets=[0, 2, 3])
    ref = np.asarray(src.W_dec)[[1, 4]] @ np.asarray(tgt.W_enc)[:, [0, 2, 3]]
    np.testing.assert_allclose(dot, ref, rtol=1e-5)
    np.testing.assert_allclose(cos, ref / 3.0, rtol=1e-5)              # unit decoder rows, encoder columns of norm 3
    # the direct term: adding a * d_i at the source moves the target pre-activation by a * (e_j . d_i)
    x = jax.random.normal(jax.random.PRNGKey(5), (8,))
    moved = tgt.pre_activations(x + 0.7 * src.W_dec[1]) - tgt.pre_activations(x)
    np.testing.assert_allclose(moved[np.array([0, 2, 3])], 0.7 * ref[0], rtol=1e-4, atol=1e-6)
    assert alignment_applies("blocks.0.hook_mlp_out", "blocks.0.hook_resid_post")
    assert alignment_applies("blocks.0.hook_resid_post", "blocks.3.hook_resid_pre")
    assert not alignment_applies("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")
    assert not alignment_applies("blocks.2.hook_resid_post", "blocks.1.hook_resid_post")


def test_low_coactivation_pairs_are_kept_as_inhibition_candidates():
    """Source 2 at S0 and target 3 at S1 never fire together though each fires 40% of the time."""
    rng = np.random.default_rng(7)
    acc = AtlasAccumulator({S0: 6, S1: 5}, window=1)
    for _ in range(6):
        a0 = (rng.random((4, 8, 6)) < 0.3).astype(np.float32)
        a1 = (rng.random((4, 8, 5)) < 0.3).astype(np.float32)
        pick = rng.random((4, 8))
        a0[..., 2], a1[..., 3] = pick < 0.4, pick > 0.6
        acc.update({S0: a0, S1: a1})
    atlas = Atlas.from_accumulator(acc)
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(1), 8, 6, S0),
            jfig.SAE.init_random(jax.random.PRNGKey(2), 8, 5, S1)]
    kept = select_candidates(atlas, saes, top_k=10, min_coact=0.5, importance="rate", alignment_window=0, window=1)
    rows = [(r["source"], r["target"], r["low_coactivation"]) for r in kept.pairs.to_pylist()]
    assert (2, 3, True) in rows
    assert all(low or atlas.conditional_probability(S0, S1)[i, j] >= 0.5 for i, j, low in rows)
    dropped = select_candidates(atlas, saes, top_k=10, min_coact=0.5, importance="rate", keep_low_coact=False,
                                alignment_window=0, window=1)
    assert (2, 3) not in set(zip(dropped.source, dropped.target))
    assert len(dropped) < len(kept)
    assert "low co-activation" in str(kept.report)
    with pytest.raises(jfig.JfigError, match="window"):
        select_candidates(atlas, saes, window=3, importance="rate")


def test_dense_selection_ranks_sources_like_the_candidates_and_targets_every_feature(setup, cands):
    """select_sources keeps the same top_k features per source site as select_candidates (most
    important first), targets every feature of the later sites in the window, and reports real counts."""
    model, saes, tokens, atlas = setup
    effects = {sae.site: feature_importance(atlas, sae, model, tokens[:6], kind="loss", pool=48, batch_size=4)
               for sae in saes}
    dense = select_sources(atlas, saes, effects=effects, importance="loss", top_k=12)
    f = cands.features.to_pydict()
    chosen = {x for site, x, sel in zip(f["site"], f["feature"], f["selected"]) if site == S0 and sel}
    assert set(dense.sources) == {S0} and set(dense.sources[S0].tolist()) == chosen
    rank = {x: r for site, x, r in zip(f["site"], f["feature"], f["rank"]) if site == S0}
    assert [rank[x] for x in dense.sources[S0]] == sorted(rank[x] for x in chosen)
    assert dense.target_sites == {S0: (S1,)} and dense.n_pairs == 12 * 24
    assert [r["after"] for r in dense.report.rows] == [32 * 24, 32 * 24, 12 * 24]
    assert dense.to_json()["sources"][S0] == [int(x) for x in dense.sources[S0]]
    assert window_targets(("blocks.0.hook_resid_post", "blocks.2.hook_resid_post", "blocks.9.hook_resid_post"),
                          5) == {"blocks.0.hook_resid_post": ("blocks.2.hook_resid_post",)}
