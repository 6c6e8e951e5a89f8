"""Adversarial pairs: the ranking on a hand-built atlas, the gradient-guided search (linear scores, monotone
objective, a planted pair it must find, one trace per shape) and the output effects against hand runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jfig
from jfig import Ablate, JfigError, Patch
from jfig.cli import main
from jfig.atlas import Atlas
from jfig.data import tokens_from
from jfig.data.files import fingerprint
from jfig.interactions import adversarial, adversarial_pairs, output_effects, search_pair
from jfig.interactions.adversarial import embedding_matrix, linear_scores, pair_margins, pair_objective
from jfig.testing import tiny_model
from tests.support.graphs import graph_from_edges
from tests.support.tiny_project import SAE_SITES, make_project

S0, S1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


# ------------------------------------------------------------------------------------------- ranking

def hand_atlas(n_tokens=1000) -> Atlas:
    """Two sites, 6 features each (all tracked), same-position counts. Firing counts: 300 for features
    0..3, 5 for 4 and 5. Co-activation S0 -> S1: (0, 0): 0, (1, 1): 200, (2, 2): 0, (3, 3): 90."""
    counts = np.array([300, 300, 300, 300, 5, 5])
    co = np.zeros((6, 6), np.int64)
    co[1, 1], co[3, 3] = 200, 90
    site = {s: {"count": counts.copy()} for s in (S0, S1)}
    return Atlas(sites=(S0, S1), d_sae={S0: 6, S1: 6}, features={S0: np.arange(6), S1: np.arange(6)},
                 settings={"window": 1, "position_window": 0}, site_stats=site,
                 pair_stats={(S0, S1): {"co": co, "fsum": np.zeros((6, 6))},
                             (S0, S0): {"co": np.zeros((6, 6), np.int64), "fsum": np.zeros((6, 6))},
                             (S1, S1): {"co": np.zeros((6, 6), np.int64), "fsum": np.zeros((6, 6))}},
                 n_tokens=n_tokens, n_sequences=10)


def edge_table(rows) -> pa.Table:
    keys = ("source_site", "source", "target_site", "target", "weight", "kind")
    return pa.table({k: [r[i] for r in rows] for i, k in enumerate(keys)})


EDGES = [
    (S0, 1, S1, 1, 2.0, "excitatory"),       # strong, co-occurs often (200 > 90 expected)
    (S0, 0, S1, 0, 2.0, "excitatory"),       # strong, never co-occurs (90 expected)
    (S0, 2, S1, 2, -1.0, "inhibitory"),      # half as strong, never co-occurs
    (S0, 3, S1, 3, 0.1, "excitatory"),       # weak, at independence
    (S0, 4, S1, 5, 3.0, "gating"),           # gating: not a first-order edge
    (S0, 5, "blocks.7.hook_resid_post", 1, 5.0, "excitatory"),   # no atlas statistics
    (S0, 1, S1, 4, float("nan"), "excitatory"),
]


def test_ranking_puts_the_never_co_occurring_strong_pair_first():
    t = adversarial_pairs(hand_atlas(), edge_table(EDGES))
    got = list(zip(t["source"].to_pylist(), t["target"].to_pylist()))
    assert got == [(0, 0), (2, 2), (1, 1), (3, 3)]
    r = t.to_pylist()
    first = r[0]
    assert first["count"] == 0 and first["expected"] == pytest.approx(90.0)
    assert first["rate_source"] == pytest.approx(0.3) and first["rate_target"] == pytest.approx(0.3)
    assert first["score"] == pytest.approx(2.0 * -np.log(0.5 / 1001))
    assert r[1]["weight"] == -1.0 and r[1]["score"] == pytest.approx(1.0 * -np.log(0.5 / 1001))
    assert r[2]["count"] == 200 and r[2]["ratio"] == pytest.approx(200.5 / 90.5)
    assert [x["rank"] for x in r] == [1, 2, 3, 4]
    assert np.isfinite(t["score"].to_numpy()).all()


def test_ranking_filters_and_checks():
    atlas, edges = hand_atlas(), edge_table(EDGES)
    under = adversarial_pairs(atlas, edges, max_ratio=1.0)
    assert (1, 1) not in set(zip(under["source"].to_pylist(), under["target"].to_pylist()))
    assert under.num_rows == 3
    assert adversarial_pairs(atlas, edges, kinds="gating")["source"].to_pylist() == [4]
    assert adversarial_pairs(atlas, edges, min_firing=301).num_rows == 0
    assert adversarial_pairs(atlas, edges, top=1)["source"].to_pylist() == [0]
    with pytest.raises(JfigError, match="lacks column"):
        adversarial_pairs(atlas, edges.drop_columns(["weight"]))
    with pytest.raises(JfigError, match="max_ratio"):
        adversarial_pairs(atlas, edges, max_ratio=0)


# ------------------------------------------------------------------------------------------- search

def random_setup():
    model = tiny_model("llama", seed=3, scale=0.4)
    sa = jfig.SAE.init_random(jax.random.key(1), 16, 32, S0)
    sb = jfig.SAE.init_random(jax.random.key(2), 16, 32, S1)
    tokens = np.random.default_rng(0).integers(1, 64, (2, 9))
    tokens[:, 0] = 0
    return model, sa, sb, tokens


def test_linear_scores_are_the_one_hot_gradient_and_first_order_in_the_swap():
    model, sa, sb, tokens = random_setup()
    pos, scales, temp = jnp.array([8, 6]), jnp.array([1.0, 2.0]), jnp.asarray(0.5)
    toks = jnp.asarray(tokens, jnp.int32)
    (_, _, _), g = adversarial._objective_and_grad(model, sa, jnp.int32(3), sb, jnp.int32(5), toks, pos, scales, temp)
    score = np.asarray(linear_scores(model, toks, g))                            # [n, S, V]
    E = embedding_matrix(model)

    @jax.jit
    def objective_of_onehot(onehot):                                           # [n, S, V] -> [n]
        m, _ = _margins_with_embedding(model, sa, sb, toks, pos, jnp.einsum("nsv,vd->nsd", onehot, E))
        return pair_objective(m, scales, temp)

    onehot = jax.nn.one_hot(toks, 64)
    G = np.asarray(jax.grad(lambda o: objective_of_onehot(o).sum())(onehot))
    cur = np.take_along_axis(G, tokens[..., None], -1)
    np.testing.assert_allclose(score, G - cur, rtol=1e-4, atol=1e-5)
    assert np.abs(score).max() > 1e-2
    assert (score[np.arange(2)[:, None], np.arange(9)[None], tokens] == 0).all()
    # first order: moving row 0's embedding at t a fraction h of the way to token v changes the
    # objective by h * score (central difference)
    h = 1e-2
    for t, v in ((8, 17), (3, 40), (5, 2)):
        step = (jax.nn.one_hot(v, 64) - onehot[0, t]) * h
        up, down = onehot.at[0, t].add(step), onehot.at[0, t].add(-step)
        fd = (float(objective_of_onehot(up)[0]) - float(objective_of_onehot(down)[0])) / (2 * h)
        assert fd == pytest.approx(score[0, t, v], rel=2e-2, abs=1e-4)


def _margins_with_embedding(model, sa, sb, toks, pos, x):
    """pair_margins with the embedding residual replaced by x [n, S, d] (a Patch at hook_embed)."""
    cache = model.run(toks, edits=Patch("hook_embed", x), capture=(S0, S1), stop_at=S1, logits=False).cache
    rows = jnp.arange(toks.shape[0])
    m = []
    for sae, f in ((sa, 3), (sb, 5)):
        m.append(sae.pre_activations(cache[sae.site][rows, pos])[:, f])               # relu: margin = pre
    return jnp.stack(m, -1), None


def planted_pair_model():
    """One Llama layer with uniform causal attention (W_q = W_k = 0) and no MLP. Every embedding has
    RMS 1: token A = 4·e_0, token B = 4·e_1, the others random in coordinates 3..15. Head 0 copies
    coordinate 1 into coordinate 2, so at position p, resid_post[2] = 4·(#B in 0..p)/(p + 1).
    SAE a at hook_resid_pre 0 fires only on A (pre 4·[token = A] − 2); SAE b at hook_resid_post 0 fires
    only when a B came at or before p (pre 8·(#B)/(p + 1) − 0.5 for p = 7)."""
    base = tiny_model("llama", n_layers=1, seed=0)
    rng = np.random.default_rng(0)
    V, d = 64, 16
    E = np.zeros((V, d), np.float32)
    noise = rng.normal(size=(V, d - 3))
    E[:, 3:] = 4 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    A, B = 10, 20
    E[A], E[B] = 0, 0
    E[A, 0], E[B, 1] = 4.0, 4.0
    blocks = {k: np.zeros_like(np.asarray(v)) for k, v in base.params["blocks"].items()}
    blocks["ln1_w"][:] = 1.0
    blocks["ln2_w"][:] = 1.0
    blocks["W_v"][0, 1, 0] = 1.0                 # coordinate 1 -> key/value head 0, component 0 (query heads 0, 1)
    blocks["W_o"][0, 0, 2] = 1.0                 # query head 0, component 0 -> coordinate 2
    params = dict(base.params, embed=jnp.asarray(E), blocks={k: jnp.asarray(v) for k, v in blocks.items()})
    model = jfig.Model.from_config(base.config, params)
    W_a, W_b = np.zeros((d, 4), np.float32), np.zeros((d, 4), np.float32)
    W_a[0, 0], W_b[2, 1] = 1.0, 2.0
    W_a[3:, 1:] = W_b[3:, [0, 2, 3]] = rng.normal(size=(d - 3, 3)) / 4
    sae_a = jfig.SAE(W_enc=jnp.asarray(W_a), b_enc=jnp.array([-2.0, 0, 0, 0]), W_dec=jnp.asarray(W_a.T),
                     b_dec=jnp.zeros(d), site="blocks.0.hook_resid_pre")
    sae_b = jfig.SAE(W_enc=jnp.asarray(W_b), b_enc=jnp.array([0, -0.5, 0, 0]), W_dec=jnp.asarray(W_b.T),
                     b_dec=jnp.zeros(d), site="blocks.0.hook_resid_post")
    return model, sae_a, sae_b, A, B


def test_search_finds_the_planted_pair_and_never_lowers_the_objective():
    model, sae_a, sae_b, A, B = planted_pair_model()
    rng = np.random.default_rng(1)
    tokens = rng.choice([t for t in range(1, 64) if t not in (A, B)], (3, 8))
    tokens[:, 0] = 0                                                    # the "sequence-start" token
    res = search_pair(model, sae_a, 0, sae_b, 1, tokens, 7, steps=4, top_k=6, n_candidates=6, exclude_tokens=[0, 5])
    assert not res.success_before.any() and (res.acts_before == 0).all()
    assert res.success.all()
    assert (res.tokens_after[:, 7] == A).all()
    assert ((res.tokens_after[:, 1:7] == B).any(axis=1)).all()
    assert (res.tokens_after[:, 0] == 0).all()                          # position 0 (excluded token) untouched
    assert not (res.tokens_after == 5).any()                            # excluded ids never written
    assert (np.diff(res.objective, axis=0) >= -1e-6).all()
    assert (res.objective[-1] > res.objective[0] + 1).all()
    np.testing.assert_allclose(res.acts_after[:, 0], 2.0, rtol=1e-5)
    # the activations reported are the SAE's own on the tokens found
    cache = model.run(res.tokens_after, capture=(sae_a.site, sae_b.site)).cache
    np.testing.assert_allclose(sae_a.encode(cache[sae_a.site])[:, 7, 0], res.acts_after[:, 0], rtol=1e-5)
    np.testing.assert_allclose(sae_b.encode(cache[sae_b.site])[:, 7, 1], res.acts_after[:, 1], rtol=1e-5)

    # at a local maximum (every editable position holds a B; any swap lowers b's margin) nothing changes
    best = np.tile([0, B, B, B, B, B, B, A], (3, 1))
    frozen = np.ones(8, bool)
    frozen[3] = False
    stay = search_pair(model, sae_a, 0, sae_b, 1, best, 7, steps=2, top_k=6, n_candidates=6, exclude_tokens=[0, 5],
                       frozen=frozen)                    # the same compiled step; 6 real swaps, each worse than none
    np.testing.assert_array_equal(stay.tokens_after, best)
    np.testing.assert_allclose(stay.objective, np.broadcast_to(stay.objective[:1], stay.objective.shape), rtol=1e-6)


def test_search_leaves_positions_after_p_and_frozen_positions_alone():
    model, sa, sb, tokens = random_setup()
    frozen = np.zeros(9, bool)
    frozen[2] = True
    res = search_pair(model, sa, 3, sb, 5, tokens, [5, 4], steps=3, top_k=3, n_candidates=4, exclude_tokens=[0],
                      frozen=frozen)
    np.testing.assert_array_equal(res.tokens_after[0, 6:], tokens[0, 6:])
    np.testing.assert_array_equal(res.tokens_after[1, 5:], tokens[1, 5:])
    np.testing.assert_array_equal(res.tokens_after[:, :1], tokens[:, :1])
    np.testing.assert_array_equal(res.tokens_after[:, 2], tokens[:, 2])
    assert (np.diff(res.objective, axis=0) >= -1e-6).all()


def test_one_trace_serves_every_step(monkeypatch):
    model, sa, sb, tokens = random_setup()
    calls = []
    original = adversarial.pair_margins

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(adversarial, "pair_margins", counting)
    search_pair(model, sa, 3, sb, 5, tokens[:, :7], steps=2, top_k=3, n_candidates=5)      # shapes new to this file
    per_trace = len(calls)
    assert per_trace > 0
    search_pair(model, sa, 1, sb, 2, tokens[:, :7], steps=7, top_k=3, n_candidates=5, seed=4)   # other pair, more steps
    assert len(calls) == per_trace


def test_search_checks_its_inputs():
    model, sa, sb, tokens = random_setup()
    with pytest.raises(JfigError, match="feature_b must be an int in"):
        search_pair(model, sa, 3, sb, 32, tokens)
    with pytest.raises(JfigError, match="same feature"):
        search_pair(model, sa, 3, sa, 3, tokens)
    with pytest.raises(JfigError, match="positions must lie"):
        search_pair(model, sa, 3, sb, 5, tokens, 9)
    with pytest.raises(JfigError, match="steps must be"):
        search_pair(model, sa, 3, sb, 5, tokens, steps=0)
    wrapped = jfig.Model.from_function(lambda p, t, hook: hook(S0, p["E"][t]) @ p["E"].T, {"E": jnp.ones((64, 16))},
                                       sites=(S0,), vocab_size=64)
    with pytest.raises(JfigError, match="built-in model"):
        search_pair(wrapped, sa, 3, sa, 5, tokens)


# ------------------------------------------------------------------------------------------- output effect

def test_output_effects_equal_hand_runs_with_ablate_edits():
    model, sa, sb, tokens = random_setup()
    pos = np.array([8, 5])
    rows = np.arange(2)
    cache = model.run(tokens, capture=(S0, S1)).cache
    fa = int(np.argmax(np.asarray(sa.encode(cache[S0])[rows, pos]).min(0)))          # active at p in both rows
    fb = int(np.argmax(np.asarray(sb.encode(cache[S1])[rows, pos]).min(0)))
    assert (np.asarray(sa.encode(cache[S0])[rows, pos, fa]) > 0).all()
    assert (np.asarray(sb.encode(cache[S1])[rows, pos, fb]) > 0).all()
    eff = output_effects(model, sa, fa, sb, fb, tokens, pos, top=4)

    out = []
    for r in rows:                                        # one row at a time, ablating at its own position
        one = tokens[r:r + 1]
        p = int(pos[r])
        runs = [(), (Ablate(sa, fa, positions=[p]),), (Ablate(sb, fb, positions=[p]),),
                (Ablate(sa, fa, positions=[p]), Ablate(sb, fb, positions=[p]))]
        out.append([np.asarray(model.run(one, edits=e).logits, np.float64)[0, p] for e in runs])
    lp = np.asarray(out).transpose(1, 0, 2)                                     # [4, n, V] logits
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    np.testing.assert_allclose(eff.logprobs, lp, atol=2e-5)
    p0 = np.exp(lp[0])
    for c in range(3):
        np.testing.assert_allclose(eff.kl[c], (p0 * (lp[0] - lp[c + 1])).sum(-1), rtol=1e-3, atol=1e-7)
    inter = (lp[3] - lp[0]) - (lp[1] - lp[0]) - (lp[2] - lp[0])
    np.testing.assert_allclose(eff.interaction, np.linalg.norm(inter, axis=-1), rtol=1e-3, atol=1e-6)
    assert (eff.interaction > 1e-4).all() and (eff.kl[2] > 1e-6).all()
    np.testing.assert_array_equal(eff.top_down[:, 0], np.argmin(lp[3] - lp[0], -1))
    np.testing.assert_array_equal(eff.top_up[:, 0], np.argmax(lp[3] - lp[0], -1))


# ------------------------------------------------------------------------------------------- command

@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    """The tiny project (tests/support/tiny_project.py) with a graph of every (l0, l2) feature pair as an edge
    in OUT/graph, its atlas in OUT/atlas, and the corpus options and fingerprint in the manifest."""
    root, model = make_project(tmp_path_factory.mktemp("adv_proj"))
    out = tmp_path_factory.mktemp("adv") / "out"
    saes = [jfig.load_sae(root / "saes" / "l0"), jfig.load_sae(root / "saes" / "l2")]
    tokens = tokens_from(str(root / "texts"), model, 16, seed=0, max_tokens=16 * 16)[:16]
    jfig.build_atlas(model, saes, tokens, window=2, progress=False).save(out / "atlas")
    i, j = np.divmod(np.arange(256), 16)
    rng = np.random.default_rng(0)
    g = graph_from_edges(list(SAE_SITES), [0] * 256, i, [1] * 256, j, rng.choice([-1, 1], 256),
                         rng.uniform(0.1, 2, 256), n_features=16)
    manifest = {**g.manifest, "saes": [{"site": s, "d_sae": 16} for s in SAE_SITES], "corpus_hash":
                fingerprint(tokens.tobytes()), "options": {"seq_len": 16, "max_sequences": 16, "seed": 0}}
    jfig.InteractionGraph.from_tables(g.nodes, g.edges, manifest).save(out / "graph")
    return root, out


def adv_args(root, out, *extra):
    return ["adversarial", "--graph", str(out / "graph"), "--model", str(root / "model"), "--sae",
            str(root / "saes" / "l0"), "--sae", str(root / "saes" / "l2"), "--corpus", str(root / "texts"), *extra]


def test_command_writes_the_report_and_the_examples(tiny_graph, tmp_path, capsys):
    root, out = tiny_graph
    dest = tmp_path / "adv"
    assert main(adv_args(root, out, "--out", str(dest), "--pairs", "2", "--steps", "2", "--starts", "2", "--window",
                         "8", "--candidates", "4", "--top-k", "3", "--max-ratio", "0")) == 0
    assert "windows after the search" in capsys.readouterr().out
    pairs, ex = pq.read_table(dest / "pairs.parquet"), pq.read_table(dest / "examples.parquet")
    assert pairs.num_rows == 2 and pairs["rank"].to_pylist() == [1, 2]
    assert len(set(pairs["source"].to_pylist())) == 2 and len(set(pairs["target"].to_pylist())) == 2   # one pair each
    assert ex.num_rows == 4 and set(ex["pair"].to_pylist()) == {1, 2}
    assert ((np.asarray(ex["objective_after"]) >= np.asarray(ex["objective_before"]) - 1e-6)).all()
    assert (dest / "examples.csv").stat().st_size > 0
    report = (dest / "report.md").read_text()
    assert report.startswith("# Adversarial pairs of") and "| 1 |" in report and "## 2." in report


@pytest.mark.parametrize("extra, message", [
    (("--max-ratio", "1e-9"), "no pairs to search"),
    (("--pair", "blocks.1.hook_resid_post:3,blocks.2.hook_resid_post:4"), "has no SAE in this graph"),
    (("--pair", "blocks.0.hook_resid_post:16,blocks.2.hook_resid_post:4"), "out of range"),
    (("--pair", "blocks.2.hook_resid_post:4,blocks.0.hook_resid_post:3"), "is not a"),
    (("--pair", "blocks.0.hook_resid_post:3"), "expected SOURCE_SITE:FEATURE,TARGET_SITE:FEATURE"),
    (("--steps", "0"), "--steps must be"),
])
def test_command_errors_come_before_the_model_loads(tiny_graph, capsys, extra, message):
    root, out = tiny_graph
    args = adv_args(root, out, *extra)
    args[args.index("--model") + 1] = str(root / "no-such-model")      # loading it would fail differently
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_command_needs_an_atlas(tiny_graph, tmp_path, capsys):
    root, out = tiny_graph
    lone = tmp_path / "lone"
    jfig.load_graph(out / "graph").save(lone / "graph")
    args = adv_args(root, lone)
    assert main(args) == 2
    assert "no atlas beside the graph" in capsys.readouterr().err
