"""Attribution graphs: edges against a hand-written float64 propagation through the prompt's linear
replacement model, the special token in front of a prompt, links to a corpus-wide graph, the
viewers' JSON, input checks, and no new traces for a second prompt of the same length."""
import json

import jax
import numpy as np
import pytest

import jfig
from jfig.attribution import prompt_ids, prune
from jfig.saes import Transcoder
from tests.support.graphs import graph_from_edges
from tests.support.tiny_models import tiny_model

LAYERS = (0, 1, 3)                       # layer 2 has no transcoder: its error nodes carry its whole MLP output
D_TC = 20
PROMPT = [3, 7, 11, 19, 23, 5, 41]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    d = model.config.d_model
    tcs = [Transcoder.init_random(jax.random.PRNGKey(10 + l), d, D_TC, f"blocks.{l}.mlp.hook_in",
                                  f"blocks.{l}.hook_mlp_out", skip=True) for l in LAYERS]
    graph = jfig.attribution_graph(model, tcs, PROMPT, max_n_logits=4, desired_logit_prob=0.99, batch_size=32)
    return model, tcs, graph


def rms(x, eps):
    return 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def hand_replacement(model, tcs, tokens):
    """The prompt's linear replacement written out in numpy float64 from a clean run's values: for an
    input added at the embedding or at an MLP output, the change of every transcoder's pre-activations
    and of the final norm's output at the last position. Also the clean activations (position 0
    zeroed) and error vectors (MLP output minus reconstruction, position 0 zeroed)."""
    cfg, L = model.config, model.config.n_layers
    H, G, e = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    sites = ["hook_embed", f"blocks.{L - 1}.hook_resid_post"] + [f"blocks.{l}.{k}" for l in range(L) for k in (
        "hook_resid_pre", "attn.hook_pattern", "hook_resid_mid", "hook_mlp_out")]
    c = {k: np.asarray(v[0], np.float64) for k, v in model.run(np.asarray([tokens]), capture=sites).cache.items()}
    B = {k: np.asarray(v, np.float64) for k, v in model.params["blocks"].items()}
    W = {t.site: {n: np.asarray(getattr(t, n), np.float64) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")}
         for t in tcs}
    tc_at = {int(t.site.split(".")[1]): W[t.site] for t in tcs}
    s, d = len(tokens), cfg.d_model
    acts, errors = {}, np.zeros((L, s, d))
    for l in range(L):
        recon = 0.0
        if l in tc_at:
            w = tc_at[l]
            x_in = c[f"blocks.{l}.hook_resid_mid"] * rms(c[f"blocks.{l}.hook_resid_mid"], cfg.norm_eps) * B["ln2_w"][l]
            a = np.maximum(x_in @ w["W_enc"] + w["b_enc"], 0.0)
            a[0] = 0.0
            acts[l] = a
            recon = a @ w["W_dec"] + w["b_dec"] + x_in @ w["W_skip"]
        errors[l] = c[f"blocks.{l}.hook_mlp_out"] - recon
        errors[l, 0] = 0.0

    def response(at, layer, pos, vec):
        x = np.zeros((s, d))
        if at == "embed":
            x[pos] += vec
        pre = {}
        for l in range(L):
            h = x * rms(c[f"blocks.{l}.hook_resid_pre"], cfg.norm_eps) * B["ln1_w"][l]
            v = (h @ B["W_v"][l]).reshape(s, G, e)
            pat = c[f"blocks.{l}.attn.hook_pattern"]
            z = np.stack([pat[i] @ v[:, i // (H // G)] for i in range(H)], axis=1)
            mid = x + z.reshape(s, H * e) @ B["W_o"][l]
            mlp = np.zeros((s, d))
            if at == "mlp" and layer == l:
                mlp[pos] += vec
            if l in tc_at:
                x_in = mid * rms(c[f"blocks.{l}.hook_resid_mid"], cfg.norm_eps) * B["ln2_w"][l]
                pre[l] = x_in @ tc_at[l]["W_enc"]
                mlp = mlp + x_in @ tc_at[l]["W_skip"]
            x = mid + mlp
        final = c[f"blocks.{L - 1}.hook_resid_post"][-1]
        return pre, x[-1] * rms(final, cfg.norm_eps) * np.asarray(model.params["ln_f_w"], np.float64)

    return c, acts, errors, tc_at, response


def test_edges_equal_a_hand_written_linear_replacement(setup):
    model, tcs, g = setup
    c, acts, errors, tc_at, response = hand_replacement(model, tcs, PROMPT)
    feats = g.feature_nodes
    assert g.n_features == sum(int((a != 0).sum()) for a in acts.values()) > 20
    np.testing.assert_array_equal(feats, np.argwhere(np.stack([acts.get(l, np.zeros((len(PROMPT), D_TC)))
                                                                for l in range(4)]) != 0))
    w_u = np.asarray(model.params["unembed"], np.float64)
    logit_vecs = (w_u[:, g.logit_tokens] - w_u.mean(1, keepdims=True)).T          # [n_logits, d]
    s, nf = len(PROMPT), g.n_features
    rng = np.random.default_rng(0)
    sources = [("feature", int(i)) for i in rng.choice(nf, 6, replace=False)]
    sources += [("error", (2, 4)), ("error", (1, 6)), ("error", (3, 1)), ("token", 0), ("token", 5)]
    nonzero = 0
    for kind, which in sources:
        if kind == "feature":
            layer, pos, f = feats[which]
            at, vec, col = "mlp", acts[layer][pos, f] * tc_at[layer]["W_dec"][f], which
        elif kind == "error":
            (layer, pos), at = which, "mlp"
            vec, col = errors[layer, pos], nf + layer * s + pos
        else:
            layer, pos, at = None, which, "embed"
            vec, col = c["hook_embed"][pos], nf + 4 * s + pos
        pre, h_last = response(at, layer, pos, vec)
        want = np.array([pre[l][p, f] for l, p, f in feats] + list(logit_vecs @ h_last))
        got = np.concatenate([g.adjacency_matrix[:nf, col], g.adjacency_matrix[-g.n_logits:, col]])
        np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max() + 1e-7, err_msg=f"{kind} {which}")
        nonzero += np.abs(want).max() > 1e-3
    assert nonzero >= 9
    # error and token rows are zero; no node feeds itself or an earlier layer's feature
    assert not g.adjacency_matrix[nf:g.n_nodes - g.n_logits].any()
    for i, (layer, pos, _) in enumerate(feats):
        later = (feats[:, 0] > layer) | ((feats[:, 0] == layer) & (feats[:, 1] >= pos))
        assert not g.adjacency_matrix[i, :nf][later].any()


def test_position_zero_and_logit_targets(setup):
    model, _, g = setup
    assert (g.active_features[:, 1] > 0).all()
    assert not g.adjacency_matrix[:, g.n_features:g.n_features + g.n_errors].reshape(-1, 4, len(PROMPT))[..., 0].any()
    logits = np.asarray(model.run(np.asarray([PROMPT])).logits[0, -1], np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:4]
    k = int(np.searchsorted(np.cumsum(p[top]), 0.99)) + 1
    assert g.logit_tokens.tolist() == top[:k].tolist()
    np.testing.assert_allclose(g.logit_probabilities, p[top[:k]], rtol=1e-5)
    assert g.prompt == " ".join(map(str, PROMPT)) and g.token_strings == tuple(map(str, PROMPT))


class FakeTokenizer:
    def __init__(self, bos, eos, pad=None, unk=None):
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos, eos, pad, unk

    def encode(self, text, add_bos=None):
        return [10 + ord(ch) % 20 for ch in text]


def test_special_token_in_front_as_circuit_tracer_puts_it():
    class M:
        vocab_size = 64

    m = M()
    m.tokenizer = FakeTokenizer(bos=1, eos=2)
    assert prompt_ids(m, "ab").tolist()[0] == 1
    assert prompt_ids(m, [5, 6]).tolist() == [1, 5, 6]                       # token ids get one too
    assert prompt_ids(m, np.asarray([[2, 5, 6]])).tolist() == [2, 5, 6]      # already starts with a special id
    m.tokenizer = FakeTokenizer(bos=0, eos=2)                                 # circuit-tracer skips an id of 0
    assert prompt_ids(m, [5, 6]).tolist() == [2, 5, 6]
    m.tokenizer = FakeTokenizer(bos=None, eos=None, pad=3)
    assert prompt_ids(m, [5]).tolist() == [3, 5]
    with pytest.raises(jfig.JfigError, match="prompt is empty"):
        prompt_ids(m, "  ")
    m.tokenizer = None
    assert prompt_ids(m, [5, 6]).tolist() == [5, 6]
    for bad, match in (([], "prompt is empty"), ([[1, 2], [3, 4]], "shape"), ([70], r"\[0, 64\)"),
                       ("text", "tokenizer")):
        with pytest.raises(jfig.JfigError, match=match):
            prompt_ids(m, bad)


def test_links_to_the_corpus_graph(setup):
    model, tcs, g = setup
    rows = g.links().to_pylist()
    nf = g.n_features
    assert len(rows) == int((g.adjacency_matrix[:nf, :nf] != 0).sum())
    assert all(r["corpus_kind"] is None and r["both_nodes"] is None for r in rows)
    assert [abs(r["weight"]) for r in rows] == sorted((abs(r["weight"]) for r in rows), reverse=True)
    sites = [t.site for t in tcs]
    n_nodes = 12                                         # features 12..19 are not nodes of the corpus graph
    inside = [r for r in rows if r["source_feature"] < n_nodes and r["target_feature"] < n_nodes]
    picked = inside[:5]
    corpus = graph_from_edges(sites, [sites.index(r["source_site"]) for r in picked], [r["source_feature"] for r in picked],
                              [sites.index(r["target_site"]) for r in picked], [r["target_feature"] for r in picked],
                              [1, -1, 1, -1, 1], [0.5, 0.25, 2.0, 1.0, 3.0], n_features=n_nodes)
    labelled = corpus.with_labels({(site, f): f"{site}#{f} named" for site in sites for f in range(n_nodes)})
    linked = jfig.attribution_graph(model, tcs, PROMPT, max_n_logits=4, desired_logit_prob=0.99, batch_size=32,
                                    graph=labelled)
    table = linked.links()
    assert table.schema == jfig.attribution.LINK_SCHEMA
    got = table.to_pylist()
    assert [r["weight"] for r in got] == [r["weight"] for r in rows]
    for r in got:
        assert r["both_nodes"] == (r["source_feature"] < n_nodes and r["target_feature"] < n_nodes)
    key = lambda r: (r["source_site"], r["source_feature"], r["target_site"], r["target_feature"])  # noqa: E731
    matched = {key(r): r for r in got if r["corpus_kind"] is not None}
    assert len(matched) >= len({key(r) for r in picked}) and set(map(key, picked)) <= set(matched)
    for r, sign, w in zip(picked, [1, -1, 1, -1, 1], [0.5, 0.25, 2.0, 1.0, 3.0]):
        m = matched[key(r)]
        assert (m["corpus_weight"], m["corpus_kind"], m["corpus_estimator"], m["corpus_positions"]) == \
            (sign * w, "excitatory" if sign > 0 else "inhibitory", "clamp", "same")
        assert m["corpus_p_value"] == pytest.approx(1e-8)
    kept = linked.links(pruned=True)
    assert 0 < kept.num_rows < table.num_rows
    data = linked.to_dict("with-labels")
    feature_nodes = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feature_nodes
    for n in feature_nodes:
        layer, f, _ = (int(v) for v in n["node_id"].split("_"))
        assert n["clerp"] == (f"blocks.{layer}.hook_resid_mid#{f} named" if f < n_nodes else "")


def test_viewer_json(setup, tmp_path):
    _, _, g = setup
    data = g.to_json(tmp_path / "prompt.json")
    assert json.loads((tmp_path / "prompt.json").read_text()) == data
    assert not (tmp_path / "graph-metadata.json").exists()
    meta = data["metadata"]
    assert meta["slug"] == "prompt" and meta["scan"] == "llama-transcoders" and meta["node_threshold"] == 0.8
    assert meta["prompt_tokens"] == list(map(str, PROMPT))
    pr = g.prune()
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("embedding") == len(PROMPT) and kinds.count("logit") == g.n_logits
    assert kinds.count("cross layer transcoder") <= int(pr.node_mask[:g.n_features].sum())
    assert len(data["links"]) <= int(pr.edge_mask.sum())
    known = set(ids)
    assert all(l["source"] in known and l["target"] in known for l in data["links"])
    logit = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert [n["node_id"] for n in logit] == [f"5_{t}_{len(PROMPT) - 1}" for t in g.logit_tokens]
    assert logit[0]["is_target_logit"] and not any(n["is_target_logit"] for n in logit[1:])
    graph_models = pytest.importorskip("circuit_tracer.frontend.graph_models",
                                       reason="circuit-tracer is not installed (pip install --no-deps circuit-tracer)")
    graph_models.Model(**data)


def test_prune_keeps_what_carries_the_influence():
    """A chain token -> f0 -> f1 -> logit, an error node and a weak side branch f2. Influences: token
    0.667, f0 and f1 0.666 each, error 0.333, f2 0.0007; 80 % of their sum is reached at f0, so the
    error node and f2 go (tokens and logits always stay)."""
    A = np.zeros((6, 6))          # nodes: f0, f1, f2, error, token, logit (one layer, one position)
    A[0, 4] = 2.0                 # token -> f0
    A[1, 0] = 3.0                 # f0 -> f1
    A[2, 4] = 0.01                # token -> f2
    A[5, 1] = 1.0                 # f1 -> logit
    A[5, 2] = 0.001               # f2 -> logit
    A[5, 3] = 0.5                 # error -> logit
    r = prune(A, [1.0], n_features=3, n_tokens=1)
    assert r.node_mask.tolist() == [True, True, False, False, True, True]
    assert r.edge_mask[1, 0] and r.edge_mask[5, 1] and r.edge_mask[0, 4]
    assert not r.edge_mask[5, 2] and not r.edge_mask[5, 3] and not r.edge_mask[2, 4]
    np.testing.assert_allclose(np.sort(r.cumulative_scores[:5]), np.cumsum([0.667, 0.666, 0.666, 0.333, 0.0007]) /
                               2.3327, atol=2e-3)
    with pytest.raises(jfig.JfigError, match="node_threshold"):
        prune(A, [1.0], 3, 1, node_threshold=1.5)


def test_bad_inputs_fail_before_any_work(setup):
    model, tcs, _ = setup
    d = model.config.d_model
    sae = jfig.SAE.init_random(jax.random.PRNGKey(0), d, 8, "blocks.1.hook_resid_post")
    resid_pre = Transcoder.init_random(jax.random.PRNGKey(1), d, 8, "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out")
    other_layer = Transcoder.init_random(jax.random.PRNGKey(1), d, 8, "blocks.1.hook_resid_mid", "blocks.2.hook_mlp_out")
    narrow = Transcoder.init_random(jax.random.PRNGKey(1), 8, 8, "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    wrapped = jfig.Model.from_function(lambda p, t, hook: hook("blocks.0.hook_resid_post", t[..., None] * 1.0), {},
                                       sites=("blocks.0.hook_resid_post",), vocab_size=8)
    for args, kw, match in (
            ((wrapped, tcs, PROMPT), {}, "built-in model"),
            ((model, [], PROMPT), {}, "no transcoders"),
            ((model, [sae], PROMPT), {}, "an SAE at blocks.1.hook_resid_post"),
            ((model, [resid_pre], PROMPT), {}, "read an MLP's input"),
            ((model, [other_layer], PROMPT), {}, "its own layer's MLP output"),
            ((model, [narrow], PROMPT), {}, "16 wide"),
            ((model, [tcs[0], tcs[0]], PROMPT), {}, "two transcoders"),
            ((model, tcs, []), {}, "prompt is empty"),
            ((model, tcs, "text"), {}, "tokenizer"),
            ((model, tcs, PROMPT), {"max_n_logits": 0}, "max_n_logits"),
            ((model, tcs, PROMPT), {"desired_logit_prob": 1.5}, "desired_logit_prob"),
            ((model, tcs, PROMPT), {"max_feature_nodes": -1}, "max_feature_nodes"),
            ((model, tcs, PROMPT), {"graph": "graph"}, "InteractionGraph"),
            ((model, tcs, PROMPT), {"graph": graph_from_edges(["blocks.1.hook_resid_post"], [0], [0], [0], [1], [1])},
             "the transcoders read")):
        with pytest.raises(jfig.JfigError, match=match):
            jfig.attribution_graph(*args, **kw)


def test_a_second_prompt_of_the_same_length_traces_nothing(setup, count_traces):
    model, tcs, _ = setup
    kw = dict(max_n_logits=4, desired_logit_prob=0.99, batch_size=32)
    with count_traces() as c:
        g = jfig.attribution_graph(model, tcs, [9, 8, 7, 6, 5, 4, 3], **kw)
    assert c.count == 0 and g.n_features > 0
    with count_traces() as c:                     # keeping only some features: the same shapes
        jfig.attribution_graph(model, tcs, [1, 2, 3, 4, 5, 6, 7], max_feature_nodes=10, **kw)
    assert c.count == 0
