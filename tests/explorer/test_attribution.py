"""One prompt's slice of a graph as attribution-graph JSON: the fields circuit-tracer's and Neuronpedia's
viewers read, link weights from the model's own activations, and the direct path into the logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.explorer import attribution_json
from jfig.attribution import cantor
from jfig.explorer.attribution import site_layers
from jfig.models.layers import norm
from tests.support.graphs import graph_from_edges

PROMPT = "the sequence of words alpha"
NODE_FIELDS = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
               "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}


@pytest.fixture(scope="module")
def sliced(tiny):
    return attribution_json(tiny["model"], tiny["saes"], tiny["graph"], PROMPT, slug="toy", n_logits=3)


def test_the_files_fields(sliced, tiny):
    d = sliced
    assert set(d) == {"metadata", "qParams", "nodes", "links"}
    m = d["metadata"]
    assert m["slug"] == "toy" and m["prompt"] == PROMPT and m["schema_version"] == 1 and m["transcoder_list"] == []
    tok = tiny["model"].tokenizer
    ids = [tok.bos_id] + tok.encode(PROMPT, add_bos=False)
    assert m["prompt_tokens"] == [tok.decode([t]) for t in ids]
    assert d["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    assert all(set(n) == NODE_FIELDS for n in d["nodes"])
    ids_seen = [n["node_id"] for n in d["nodes"]]
    assert len(ids_seen) == len(set(ids_seen))
    emb = [n for n in d["nodes"] if n["feature_type"] == "embedding"]
    assert [(n["node_id"], n["jsNodeId"], n["feature"]) for n in emb] == \
        [(f"E_{t}_{p}", f"E_{t}-{p}", p) for p, t in enumerate(ids)]
    logits = [n for n in d["nodes"] if n["feature_type"] == "logit"]
    n_layers = tiny["model"].config.n_layers
    assert len(logits) == 3 and [n["is_target_logit"] for n in logits] == [True, False, False]
    assert all(n["layer"] == str(n_layers + 1) and n["ctx_idx"] == len(ids) - 1 for n in logits)
    assert logits[0]["token_prob"] >= logits[1]["token_prob"] >= logits[2]["token_prob"]
    assert logits[0]["clerp"].startswith("Output \"") and "(p=" in logits[0]["clerp"]
    feats = [n for n in d["nodes"] if n["feature_type"] == "cross layer transcoder"]
    for n in feats:
        layer, f, pos = (int(x) for x in n["node_id"].split("_"))
        assert n["feature"] == cantor(layer, f) == (layer + f) * (layer + f + 1) // 2 + f
        assert n["layer"] == str(layer) and n["ctx_idx"] == pos and n["jsNodeId"] == f"{layer}_{f}-0"
    known = set(ids_seen)
    assert all(l["source"] in known and l["target"] in known for l in d["links"])
    assert {n["node_id"] for n in feats} <= {x for l in d["links"] for x in (l["source"], l["target"])}


def test_link_weights_are_slope_times_activation(sliced, tiny):
    model, graph = tiny["model"], tiny["graph"]
    saes = {s.site: s for s in tiny["saes"]}
    tok = model.tokenizer
    tokens = np.asarray([[tok.bos_id] + tok.encode(PROMPT, add_bos=False)], np.int32)
    out = model.run(tokens, capture=tuple(saes))
    acts = {s: np.asarray(saes[s].encode(out.cache[s]))[0] for s in saes}
    layer = {s: jfig.sites.parse_site(s).layer for s in saes}
    want = {}
    for r in graph.edges.to_pylist():
        if r["kind"] == "gating":
            continue
        a, b = acts[r["source_site"]][:, r["source"]], acts[r["target_site"]][:, r["target"]]
        for p in np.flatnonzero((a > 0) & (b > 0)):
            want[(f"{layer[r['source_site']]}_{r['source']}_{p}", f"{layer[r['target_site']]}_{r['target']}_{p}")] = \
                r["weight"] * a[p]
    got = {(l["source"], l["target"]): l["weight"] for l in sliced["links"] if not l["target"].startswith(
        f"{model.config.n_layers + 1}_")}
    assert got.keys() == want.keys() and len(got) > 5
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6)
    assert any("later positions or gating" in x for x in sliced["metadata"]["info"]["left out"])


def test_logit_links_are_the_direct_path_with_the_norm_scale_frozen(sliced, tiny):
    model = tiny["model"]
    saes = {s.site: s for s in tiny["saes"]}
    cfg, params = model.config, model.params
    tok = model.tokenizer
    tokens = np.asarray([[tok.bos_id] + tok.encode(PROMPT, add_bos=False)], np.int32)
    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    out = model.run(tokens, capture=tuple(saes) + (last,))
    x = jnp.asarray(out.cache[last][0, -1])
    w_u = params["unembed"] if "unembed" in params else params["embed"].T
    links = [l for l in sliced["links"] if l["target"].startswith(f"{cfg.n_layers + 1}_")]
    assert links
    for l in links[:12]:
        lay, f, pos = (int(v) for v in l["source"].split("_"))
        site = next(s for s in saes if jfig.sites.parse_site(s).layer == lay)
        vocab = int(l["target"].split("_")[1])
        d = jnp.asarray(saes[site].W_dec[f])
        # the logit's derivative along the decoder direction, the final norm's scale held fixed
        _, slope = jax.jvp(lambda v: norm(cfg, v, params["ln_f_w"], params.get("ln_f_b"), freeze=True) @ w_u[:, vocab],
                           (x,), (d,))
        a = float(saes[site].encode(out.cache[site])[0, pos, f])
        assert l["weight"] == pytest.approx(a * float(slope), rel=1e-3, abs=1e-6)


def test_sites_sharing_a_block_get_ranks():
    layers, note = site_layers(["blocks.2.hook_resid_mid", "blocks.2.hook_resid_post", "blocks.4.hook_resid_post"])
    assert layers == {"blocks.2.hook_resid_mid": 0, "blocks.2.hook_resid_post": 1, "blocks.4.hook_resid_post": 2}
    assert "1 = blocks.2.hook_resid_post" in note
    assert site_layers(["blocks.2.hook_resid_post", "blocks.4.hook_resid_post"]) == (
        {"blocks.2.hook_resid_post": 2, "blocks.4.hook_resid_post": 4}, None)


def test_circuit_tracers_own_models_accept_it(sliced):
    graph_models = pytest.importorskip("circuit_tracer.frontend.graph_models",
                                       reason="circuit-tracer is not installed (pip install --no-deps circuit-tracer)")
    graph_models.Model(**sliced)


def test_errors(tiny):
    model, saes = tiny["model"], tiny["saes"]
    with pytest.raises(jfig.JfigError, match="prompt is empty"):
        attribution_json(model, saes, tiny["graph"], "")
    with pytest.raises(jfig.JfigError, match="no SAE was given there"):
        attribution_json(model, saes[:1], tiny["graph"], PROMPT)
    with pytest.raises(jfig.JfigError, match="n_logits"):
        attribution_json(model, saes, tiny["graph"], PROMPT, n_logits=0)
    g = graph_from_edges(["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"], [0], [1], [1], [2], [1],
                         n_features=16)
    sites = ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post")

    def apply(p, t, hook):
        x = hook(sites[0], jnp.ones(t.shape + (32,)))
        return hook(sites[1], x)[..., :8]
    fn = jfig.Model.from_function(apply, {}, sites=sites, vocab_size=8, site_widths=dict.fromkeys(sites, 32))
    with pytest.raises(jfig.JfigError, match="needs a built-in model"):
        attribution_json(fn, saes, g, PROMPT)
