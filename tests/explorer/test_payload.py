"""The explorer's data (explorer_payload) against the graph, the atlas and the model it comes from, and
the page it is embedded in (render_page)."""
import dataclasses
import json
import re

import numpy as np
import pytest

import jfig
from jfig.behaviors.metric import answer_logits
from jfig.explorer import explorer_payload, load_labels, render_page
from jfig.explorer.layout import barycentre_order
from tests.support.graphs import graph_from_edges
from tests.support.tiny_project import SAE_SITES

KINDS = ("excitatory", "inhibitory", "gating")


def decoded_edges(p) -> list[tuple]:
    """The payload's edges as graph-table tuples (source_site, source, target_site, target, kind, weight, modulator)."""
    sites, nodes, e = p["sites"], p["nodes"], p["edges"]
    key = lambda i: (sites[nodes["site"][i]]["name"], nodes["feature"][i])  # noqa: E731
    return [(*key(s), *key(t), KINDS[k], w, None if m < 0 else key(m))
            for s, t, k, w, m in zip(e["source"], e["target"], e["kind"], e["weight"], e["modulator"])]


def table_edges(graph) -> list[tuple]:
    rows = graph.edges.to_pylist()
    return [(r["source_site"], r["source"], r["target_site"], r["target"], r["kind"], r["weight"],
             None if r["modulator"] is None else (r["modulator_site"], r["modulator"])) for r in rows]


def test_nodes_and_edges_are_the_graphs(tiny):
    p = explorer_payload(tiny["graph"])
    assert sorted(decoded_edges(p), key=str) == sorted(table_edges(tiny["graph"]), key=str)
    w = np.abs(p["edges"]["weight"])
    assert np.all(np.diff(w) <= 0), "edges are drawn weakest first, so they come strongest first"
    assert [s["name"] for s in p["sites"]] == list(SAE_SITES) and [s["layer"] for s in p["sites"]] == [0, 2]
    n = len(p["nodes"]["feature"])
    assert n == tiny["graph"].n_nodes and all(len(v) == n for v in p["nodes"].values())
    degree = np.zeros(n, int)
    for col in ("source", "target", "modulator"):
        idx = np.asarray(p["edges"][col])
        np.add.at(degree, idx[idx >= 0], 1)
    assert p["nodes"]["degree"] == degree.tolist()
    assert all(0 < y < 1 for y in p["nodes"]["y"])
    assert p["estimators"] == ["clamp"] and p["compare"] is None and p["circuits"] == []


def test_layout_lines_up_a_permutation():
    """Column 1 is wired to column 0 by a permutation: the barycentre sweep puts every target level with
    its source, so no two edges cross."""
    n = 9
    perm = np.random.default_rng(1).permutation(n)
    column = np.r_[np.zeros(n, int), np.ones(n, int)]
    y = barycentre_order(column, np.arange(n), n + perm)
    np.testing.assert_allclose(y[n + perm], y[:n])
    assert sorted(np.round(y[n:], 6)) == sorted(np.round(y[:n], 6))


def test_cards_from_the_atlas_mark_the_activating_token(tiny):
    model, atlas, graph = tiny["model"], tiny["atlas"], tiny["graph"]
    p = explorer_payload(graph, atlas=atlas, model=model, saes=tiny["saes"], max_contexts=3)
    tokens = jfig.data.tokens_from(str(tiny["root"] / "texts"), model, 16, max_tokens=16 * 24)
    sae = {s.site: s for s in tiny["saes"]}
    checked = 0
    for i, (s, f) in enumerate(zip(p["nodes"]["site"], p["nodes"]["feature"])):
        site = p["sites"][s]["name"]
        ctxs = p["cards"]["contexts"][i]
        assert ctxs is not None and len(ctxs) <= 3
        want = atlas.contexts(site, f)[:3]
        for c, w in zip(ctxs, want):
            # the marked token is the one at the context's corpus position, and it has that activation
            assert c["tokens"][c["at"]] == tokens[w["sequence"], w["position"]]
            acts = np.asarray(sae[site].encode(model.run(tokens[w["sequence"]][None], capture=(site,)).cache[site]))
            assert acts[0, w["position"], f] == pytest.approx(c["activation"], rel=1e-4, abs=1e-4)
            checked += 1
        h = p["cards"]["histogram"][i]
        assert sum(h["counts"]) == atlas.firing_count(site)[f] and np.all(np.diff(h["edges"]) > 0)
        assert len(h["edges"]) == len(h["counts"]) + 1
    assert checked > 20
    used = {t for c in p["cards"]["contexts"] for x in c or () for t in x["tokens"] if t >= 0}
    assert used <= {int(k) for k in p["vocab"]}
    assert p["vocab"][str(int(tokens[0, 1]))] == model.tokenizer.decode([int(tokens[0, 1])])


def test_logit_lens_is_the_decoder_direction_through_the_final_norm_and_unembedding(tiny):
    model, graph = tiny["model"], tiny["graph"]
    p = explorer_payload(graph, model=model, saes=tiny["saes"], top_logits=4)
    sae = {s.site: s for s in tiny["saes"]}
    vocab = model.config.vocab_size
    for i in (0, 5, 20):
        site, f = p["sites"][p["nodes"]["site"][i]]["name"], p["nodes"]["feature"][i]
        d = np.asarray(sae[site].W_dec[f], np.float64)
        # the model's own final norm and unembedding on the direction itself, times its RMS (the lens
        # leaves the norm's scale out)
        rms = np.sqrt(np.mean(d * d) + model.config.norm_eps)
        full = np.asarray(answer_logits(model.config, model.params, np.tile(d, (vocab, 1)).astype(np.float32),
                                        np.arange(vocab))) * rms
        top = [t for t, _ in p["cards"]["logit_top"][i]]
        bottom = [t for t, _ in p["cards"]["logit_bottom"][i]]
        assert top == np.argsort(-full)[:4].tolist() and bottom == np.argsort(full)[:4].tolist()
        np.testing.assert_allclose([v for _, v in p["cards"]["logit_top"][i]], full[top], rtol=1e-3, atol=1e-4)


def test_labels_from_csv_and_graph_text_contexts(tiny, tmp_path):
    site = SAE_SITES[0]
    csv = tmp_path / "labels.csv"
    csv.write_text(f"feature,label\n{site}#3,commas\n{site}#99,not a node\n")
    p = explorer_payload(tiny["graph"], labels=csv)
    i = p["nodes"]["feature"].index(3)
    assert p["nodes"]["label"][i] == "commas" and sum(lab is not None for lab in p["nodes"]["label"]) == 1
    assert any("not nodes of this graph" in n for n in p["notes"])
    # no atlas: the graph's own text snippets, no token marked, no histograms
    assert p["cards"]["contexts"][i][0]["text"] == f"context of {site}:3" and "histogram" not in p["cards"]
    csv.write_text("site,feature,label\nblocks.0.hook_resid_post,three,x\n")
    with pytest.raises(jfig.FormatError, match="line 2"):
        load_labels(csv)
    csv.write_text("name,label\na,b\n")
    with pytest.raises(jfig.FormatError, match="must name columns feature and label"):
        load_labels(csv)


def test_circuits_and_compare(tiny, tmp_path):
    graph = tiny["graph"]
    e = graph.edges.filter(jfig.graph.graph.pc.equal(graph.edges["kind"], "excitatory")).to_pylist()[0]
    members = [(e["source_site"], e["source"]), (e["target_site"], e["target"]), ("blocks.1.hook_resid_post", 0)]
    circuit = {"behavior": "toy", "k": 1, "baseline": {"accuracy": 1.0, "logit_diff": 2.0},
               "seeds": [{"site": e["source_site"], "feature": e["source"]}],
               "subgraph": {"nodes": [{"site": s, "feature": f, "hop": 0} for s, f in members]},
               "circuit_test": {"size": 3, "sufficiency": 0.4, "necessity": 0.7, "random_sufficiency": [0.1, 0.3]}}
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "circuit.json").write_text(json.dumps(circuit))
    p = explorer_payload(graph, circuits=[tmp_path / "toy"])
    (c,) = p["circuits"]
    keys = [(p["sites"][p["nodes"]["site"][i]]["name"], p["nodes"]["feature"][i]) for i in c["nodes"]]
    assert sorted(keys) == sorted(members[:2]) and any("1 of its 3 features are not nodes" in n for n in p["notes"])
    assert c["numbers"]["sufficiency"] == 0.4 and c["numbers"]["matched sets: mean sufficiency"] == pytest.approx(0.2)
    inside = [decoded_edges(p)[k] for k in c["edges"]]
    assert inside == [x for x in decoded_edges(p) if (x[0], x[1]) in keys and (x[2], x[3]) in keys]
    with pytest.raises(jfig.JfigError, match="holds no circuit.json"):
        explorer_payload(graph, circuits=[tmp_path])

    # B: drop two edges, flip one, add one
    rows = graph.edges.to_pylist()
    first = [r for r in rows if r["kind"] != "gating"]
    lost, flipped = first[:2], first[2]
    keep = [r for r in rows if r not in lost]
    for r in keep:
        if r is flipped:
            r.update(kind="inhibitory" if r["kind"] == "excitatory" else "excitatory", weight=-r["weight"])
    new = dict(first[3], target=(first[3]["target"] + 1) % 16)
    assert (new["source"], new["target"]) not in {(r["source"], r["target"]) for r in rows}
    b = jfig.InteractionGraph.from_tables(graph.nodes, jfig.graph.graph.pa.Table.from_pylist(keep + [new]),
                                          graph.manifest)
    p = explorer_payload(graph, compare=b)
    assert p["compare"]["counts"] == {"same": len(rows) - 3, "gained": 1, "lost": 2, "flipped": 1}
    status = dict(zip([(x[0], x[1], x[2], x[3], x[6]) for x in decoded_edges(p)], p["edges"]["status"]))
    assert status[(new["source_site"], new["source"], new["target_site"], new["target"], None)] == 1
    assert [status[(r["source_site"], r["source"], r["target_site"], r["target"], None)] for r in lost] == [2, 2]
    assert status[(flipped["source_site"], flipped["source"], flipped["target_site"], flipped["target"], None)] == 3


def test_page_embeds_the_payload_safely(tiny):
    hostile = "</script><script>window.pwned = 1</script><!--"
    p = explorer_payload(tiny["graph"], labels={(SAE_SITES[0], 0): hostile}, title="t")
    html = render_page(p)
    m = re.search(r'<script id="jfig-data" type="application/json">(.*?)</script>', html, re.S)
    assert m is not None and json.loads(m.group(1)) == json.loads(json.dumps(p))
    assert html.count("window.pwned") == 1 and "http://" not in html.split("jfig-data")[0].lower()
    assert not re.search(r'<(script|link|img)[^>]+(src|href)=["\']https?:', html), "the page must fetch nothing"


def test_bad_inputs_are_named_before_any_work(tiny):
    graph, model, saes = tiny["graph"], tiny["model"], tiny["saes"]
    with pytest.raises(jfig.JfigError, match="needs an InteractionGraph"):
        explorer_payload("graph/")
    with pytest.raises(jfig.OptionError, match="unknown mode"):
        explorer_payload(graph, mode="dynamic")
    wide = jfig.InteractionGraph.from_tables(graph.nodes, graph.edges, {
        **graph.manifest, "saes": [{"site": SAE_SITES[0], "d_sae": 64}, {"site": SAE_SITES[1], "d_sae": 64}]})
    with pytest.raises(jfig.JfigError, match="has 16 features but the graph was built with 64"):
        explorer_payload(wide, saes=saes)
    other = jfig.InteractionGraph.from_tables(graph.nodes, graph.edges, {**graph.manifest, "model": {"d_model": 576}})
    with pytest.raises(jfig.JfigError, match="d_model 576"):
        explorer_payload(other, model=model)
    elsewhere = graph_from_edges(["blocks.5.hook_resid_post", "blocks.6.hook_resid_post"], [0], [0], [1], [1], [1])
    with pytest.raises(jfig.JfigError, match="none of the graph's"):
        explorer_payload(elsewhere, atlas=tiny["atlas"])
    with pytest.raises(jfig.JfigError, match="a circuit must be"):
        explorer_payload(graph, circuits=[3])


def test_compare_with_a_site_only_in_one_graph():
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]

    def graph(n_sites, src, tgt):
        g = graph_from_edges(sites[:n_sites], [0] * len(src), src, [n_sites - 1] * len(tgt), tgt, [1] * len(src),
                             n_features=4)
        return jfig.InteractionGraph.from_tables(g.nodes, g.edges, {
            **g.manifest, "saes": [{"site": s, "d_sae": 4} for s in sites[:n_sites]]})
    a, b = graph(2, [1], [2]), graph(3, [1, 3], [2, 0])
    p = explorer_payload(a, compare=b, compare_names=("base", "tuned"))
    assert [s["name"] for s in p["sites"]] == sites and len(p["nodes"]["feature"]) == 12
    assert p["compare"]["a"] == "base" and p["compare"]["counts"] == {"same": 0, "gained": 2, "lost": 1, "flipped": 0}
    assert any("sites only in graph B" in n for n in p["compare"]["notes"])


def test_neuronpedia_ids_link_cards_and_their_exports_label_features(tiny, tmp_path):
    saes = [dataclasses.replace(s, metadata={**s.meta, "neuronpedia_id": f"toy/{i}-res"})
            for i, s in enumerate(tiny["saes"])]
    export = tmp_path / "explanations.json"
    export.write_text(json.dumps([
        {"modelId": "toy", "layer": "1-res", "index": "4", "description": "commas", "typeName": "oai_token-act-pair"},
        {"modelId": "toy", "layer": "0-res", "index": "7", "description": "the word alpha"},
        {"modelId": "toy", "layer": "0-res", "index": "7", "description": "a second explanation"}]))
    p = explorer_payload(tiny["graph"], saes=saes, labels=export)
    assert [s["neuronpedia"] for s in p["sites"]] == ["toy/0-res", "toy/1-res"]
    label = {(p["sites"][s]["name"], f): lab for s, f, lab in
             zip(p["nodes"]["site"], p["nodes"]["feature"], p["nodes"]["label"]) if lab}
    assert label == {(SAE_SITES[1], 4): "commas", (SAE_SITES[0], 7): "the word alpha"}
    # without the SAEs' ids the export cannot be placed
    with pytest.raises(jfig.JfigError, match="Neuronpedia SAE 'toy/1-res', which none of the graph's SAEs is"):
        explorer_payload(tiny["graph"], saes=tiny["saes"], labels=export)
    export.write_text(json.dumps([{"modelId": "toy", "layer": "0-res", "index": "x", "description": "d"}]))
    with pytest.raises(jfig.FormatError, match="item 0: index 'x' is not an integer"):
        explorer_payload(tiny["graph"], saes=saes, labels=export)
    export.write_text(json.dumps({"explanations": []}))
    with pytest.raises(jfig.FormatError, match="a JSON list of explanations"):
        explorer_payload(tiny["graph"], saes=saes, labels=export)
