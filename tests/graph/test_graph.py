"""InteractionGraph: construction and validation, queries, NetworkX/GraphML/JSON views, Parquet storage."""
import json
import re
import math
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import networkx as nx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings

from jfig.errors import FormatError, JfigError
from jfig.graph import (EDGE_SCHEMA, ESTIMATORS, KINDS, NODE_SCHEMA, POSITIONS, InteractionGraph, gate_id,
                        load_graph, read_node_link_json)

SITES = {"blocks.0.hook_resid_post": 0, "blocks.1.hook_resid_post": 1, "blocks.2.hook_resid_post": 2}
S0, S1, S2 = SITES


def _nodes():
    feats = [(S0, 3), (S0, 7), (S0, 11), (S1, 0), (S1, 5), (S1, 9), (S1, 12), (S2, 2), (S2, 4), (S2, 8)]
    return {
        "site": [s for s, _ in feats], "feature": [f for _, f in feats], "layer": [SITES[s] for s, _ in feats],
        "firing_rate": [0.01 * (i + 1) if i != 4 else None for i in range(10)],
        "label": [f"feature {i}" if i % 3 else None for i in range(10)],
        "top_contexts": [json.dumps([{"text": "the cat", "activation": 1.5}]) if i < 5 else None for i in range(10)],
    }


def _edge(src, tgt, kind, weight, mod=None, estimator="clamp", positions="same", p=0.001):
    return {"source_site": src[0], "source": src[1], "target_site": tgt[0], "target": tgt[1], "kind": kind,
            "weight": weight, "p_value": p, "p_bonferroni": min(1.0, p * 20), "q_value": min(1.0, p * 5),
            "variance": abs(weight) / 10, "n": 64, "estimator": estimator, "positions": positions,
            "source_layer": SITES[src[0]], "target_layer": SITES[tgt[0]],
            "modulator_site": mod[0] if mod else None, "modulator": mod[1] if mod else None}


def _edges():
    rows = [
        _edge((S0, 3), (S1, 0), "excitatory", 0.8),
        _edge((S0, 3), (S1, 5), "inhibitory", -1.2, estimator="jacobian"),
        _edge((S0, 7), (S1, 5), "excitatory", 0.3, positions="later"),
        _edge((S0, 11), (S2, 2), "excitatory", 2.5, estimator="ablate"),
        _edge((S1, 9), (S2, 4), "inhibitory", -0.4),
        _edge((S1, 12), (S2, 8), "excitatory", 0.05, p=0.04),
        _edge((S0, 3), (S1, 0), "excitatory", 0.7, estimator="jacobian"),   # parallel edge: a multigraph
        _edge((S0, 7), (S2, 4), "gating", 0.9, mod=(S1, 12), estimator="factorial"),
        _edge((S1, 5), (S2, 8), "gating", -0.6, mod=(S0, 11), estimator="mixed", positions="all"),
    ]
    return {k: [r[k] for r in rows] for k in rows[0]}


MANIFEST = {"model": "tiny", "saes": [{"site": s, "d_sae": 16, "architecture": "topk"} for s in SITES],
            "corpus_hash": "abc123", "options": {"seed": 0, "tau": 0.01}}


def make_graph(**edits) -> InteractionGraph:
    edges = {**_edges(), **edits}
    return InteractionGraph.from_tables(_nodes(), edges, MANIFEST)


# ---- construction and validation ------------------------------------------------------------------

def test_tables_conform_to_schema_and_manifest_is_filled():
    g = make_graph()
    assert g.edges.schema == EDGE_SCHEMA and g.nodes.schema == NODE_SCHEMA
    assert (g.n_nodes, g.n_edges) == (10, 9)
    assert set(g.manifest["library_versions"]) == {"jfig", "jax", "numpy", "pyarrow", "networkx"}
    assert g.manifest["created"] and g.manifest["model"] == "tiny"


def test_lossless_casts_are_applied_and_lossy_ones_refused():
    nodes = pa.table(_nodes())
    nodes = nodes.set_column(1, "feature", nodes["feature"].cast(pa.int32()))
    edges = pa.table(_edges())
    edges = edges.set_column(5, "weight", edges["weight"].cast(pa.float32()))
    g = InteractionGraph.from_tables(nodes, edges, MANIFEST)
    assert g.nodes.schema == NODE_SCHEMA and g.edges.schema == EDGE_SCHEMA
    with pytest.raises(JfigError, match="'n'.*int64"):
        make_graph(n=[1.5] * 9)
    with pytest.raises(JfigError, match="'source'.*string"):
        make_graph(source=[str(x) for x in _edges()["source"]])


def test_endpoint_missing_from_nodes():
    src = _edges()["source"]
    with pytest.raises(JfigError, match=r"source 'blocks.0.hook_resid_post:15' is not in the nodes"):
        make_graph(source=[15] + src[1:])
    mods = _edges()["modulator"]
    with pytest.raises(JfigError, match="modulator .* is not in the nodes"):
        make_graph(modulator=mods[:-1] + [13])


def test_missing_column_is_named():
    edges = _edges()
    del edges["q_value"]
    with pytest.raises(JfigError, match=r"edges table lacks column\(s\) \['q_value'\]"):
        InteractionGraph.from_tables(_nodes(), edges, MANIFEST)
    nodes = _nodes()
    del nodes["layer"]
    with pytest.raises(JfigError, match=r"nodes table lacks column\(s\) \['layer'\]"):
        InteractionGraph.from_tables(nodes, _edges(), MANIFEST)


def test_unknown_kind_estimator_and_modulator_rules():
    kinds = _edges()["kind"]
    with pytest.raises(JfigError, match=r"'kind' has unknown value\(s\) \['modulatory'\]"):
        make_graph(kind=["modulatory"] + kinds[1:])
    with pytest.raises(JfigError, match="'estimator' has unknown"):
        make_graph(estimator=["finite_difference"] * 9)
    with pytest.raises(JfigError, match="needs modulator"):
        make_graph(modulator=[None] * 9)
    with pytest.raises(JfigError, match="null unless gating"):
        make_graph(kind=kinds[:-1] + ["excitatory"])


def test_other_consistency_checks():
    with pytest.raises(JfigError, match="source_layer disagrees"):
        make_graph(source_layer=[5] * 9)
    with pytest.raises(JfigError, match=r"p_value outside \[0, 1\]"):
        make_graph(p_value=[2.0] * 9)
    nodes = _nodes()
    nodes["feature"][1] = 3
    with pytest.raises(JfigError, match="more than once"):
        InteractionGraph.from_tables(nodes, _edges(), MANIFEST)
    with pytest.raises(JfigError, match="d_sae 4"):
        InteractionGraph.from_tables(_nodes(), _edges(), {**MANIFEST, "saes": [
            {"site": s, "d_sae": 4} for s in SITES]})
    nodes = _nodes()
    nodes["top_contexts"][0] = "not json"
    with pytest.raises(JfigError, match="top_contexts"):
        InteractionGraph.from_tables(nodes, _edges(), MANIFEST)


# ---- queries --------------------------------------------------------------------------------------

def test_edges_by_kind_strongest_summary():
    g = make_graph()
    assert g.edges_by_kind() == {"excitatory": 5, "inhibitory": 2, "gating": 2}
    top = g.strongest(3)
    assert top["weight"].to_pylist() == [2.5, -1.2, 0.9]
    assert g.strongest(1, kind="inhibitory")["weight"].to_pylist() == [-1.2]
    assert g.strongest(100).num_rows == 9
    with pytest.raises(JfigError, match="unknown edge kind"):
        g.strongest(kind="excite")
    text = g.summary()
    assert "10 nodes on 3 sites, 9 edges" in text and "gating 2" in text
    assert "layer pairs: 0->1 4, 0->2 2, 1->2 3" in text
    assert repr(g) == text.splitlines()[0]


def test_subgraph():
    g = make_graph()
    sub = g.subgraph(sites=[S0, S1])
    assert sub.n_nodes == 7 and sub.edges_by_kind() == {"excitatory": 3, "inhibitory": 1, "gating": 0}
    assert sub.subgraph(kinds="inhibitory").n_edges == 1
    # a gating hyperedge survives only with its modulator
    keep = [(S0, 7), (S2, 4), (S1, 12)]
    assert make_graph().subgraph(features=iter(keep)).edges_by_kind()["gating"] == 1
    assert make_graph().subgraph(features=keep[:2]).n_edges == 0
    assert g.subgraph(kinds=["gating"]).n_nodes == 10
    assert sub.manifest["subgraph"]["sites"] == [S0, S1]
    with pytest.raises(JfigError, match="unknown edge kind"):
        g.subgraph(kinds="gate")


# ---- NetworkX and exports -------------------------------------------------------------------------

def test_to_networkx_represents_gating_as_gate_nodes():
    g = make_graph().to_networkx()
    assert isinstance(g, nx.MultiDiGraph)
    gates = [n for n, d in g.nodes(data=True) if d["kind"] == "gate"]
    assert g.number_of_nodes() == 10 + 2 and len(gates) == 2
    assert g.number_of_edges() == 7 + 3 * 2
    gate = gate_id(S0, 7, S1, 12, S2, 4)
    assert gate in gates and g.nodes[gate]["weight"] == 0.9 and g.nodes[gate]["estimator"] == "factorial"
    roles = {(u, v): d["role"] for u, v, d in g.edges(gate, data=True)} | \
        {(u, v): d["role"] for u, v, d in g.in_edges(gate, data=True)}
    assert roles == {(f"{S0}:7", gate): "input", (f"{S1}:12", gate): "modulator", (gate, f"{S2}:4"): "output"}
    assert len(g.get_edge_data(f"{S0}:3", f"{S1}:0")) == 2      # parallel edges stay apart
    e = g.get_edge_data(f"{S0}:3", f"{S1}:5")[0]
    assert (e["kind"], e["weight"], e["estimator"], e["n"]) == ("inhibitory", -1.2, "jacobian", 64)
    node = g.nodes[f"{S1}:5"]
    assert (node["site"], node["feature"], node["layer"], node["firing_rate"]) == (S1, 5, 1, None)
    assert g.graph["manifest"]["model"] == "tiny"


def test_repeated_gating_triples_get_distinct_gate_nodes():
    edges = _edges()
    for k in edges:
        edges[k].append(edges[k][-2])
    edges["estimator"][-1] = "mixed"
    g = InteractionGraph.from_tables(_nodes(), edges, MANIFEST).to_networkx()
    gate = gate_id(S0, 7, S1, 12, S2, 4)
    assert gate in g and f"{gate}#1" in g and g.nodes[f"{gate}#1"]["estimator"] == "mixed"


def test_graphml_round_trip(tmp_path):
    graph = make_graph()
    graph.to_graphml(tmp_path / "g.graphml")
    g = nx.read_graphml(tmp_path / "g.graphml", force_multigraph=True)
    ref = graph.to_networkx()
    assert (g.number_of_nodes(), g.number_of_edges()) == (ref.number_of_nodes(), ref.number_of_edges())
    assert g.nodes[f"{S1}:5"]["label"] == "feature 4" and math.isnan(g.nodes[f"{S1}:5"]["firing_rate"])
    assert g.nodes[f"{S0}:3"]["label"] == ""                    # null string -> ""
    assert g.nodes[f"{S0}:3"]["feature"] == 3 and g.nodes[f"{S0}:3"]["layer"] == 0
    gate = gate_id(S1, 5, S0, 11, S2, 8)
    assert g.nodes[gate]["kind"] == "gate" and g.nodes[gate]["weight"] == -0.6
    assert sorted(d["role"] for _, _, d in g.in_edges(gate, data=True)) == ["input", "modulator"]
    assert json.loads(g.graph["manifest"])["corpus_hash"] == "abc123"


def test_node_link_json_round_trip(tmp_path):
    graph = make_graph()
    graph.to_node_link_json(tmp_path / "g.json")
    data = json.loads((tmp_path / "g.json").read_text())
    assert len(data["edges"]) == 13 and len(data["nodes"]) == 12
    link = data["edges"][0]
    assert {"from", "to", "key", "source", "target", "kind"} <= set(link)
    g = nx.node_link_graph(data, directed=True, multigraph=True, edges="edges", source="from", target="to")
    for h in (g, read_node_link_json(tmp_path / "g.json")):
        assert nx.utils.graphs_equal(h, graph.to_networkx())


def test_exports_survive_control_characters_and_non_finite_numbers(tmp_path):
    nodes = _nodes()
    nodes["label"][0] = "tab\there, bell\x07"
    weights = _edges()["weight"]
    graph = InteractionGraph.from_tables(nodes, {**_edges(), "weight": [math.inf] + weights[1:]}, MANIFEST)
    graph.to_graphml(tmp_path / "g.graphml")
    g = nx.read_graphml(tmp_path / "g.graphml", force_multigraph=True)
    assert g.nodes[f"{S0}:3"]["label"] == "tab\there, bell\ufffd"
    graph.to_node_link_json(tmp_path / "g.json")
    h = read_node_link_json(tmp_path / "g.json")
    assert h.get_edge_data(f"{S0}:3", f"{S1}:0")[0]["weight"] is None
    assert h.nodes[f"{S0}:3"]["label"] == "tab\there, bell\x07"


# ---- storage --------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    g = make_graph()
    g.save(tmp_path / "graph")
    assert sorted(p.name for p in (tmp_path / "graph").iterdir()) == ["edges.parquet", "manifest.json",
                                                                     "nodes.parquet"]
    assert [p.name for p in tmp_path.iterdir()] == ["graph"]      # no temp folder left behind
    h = load_graph(tmp_path / "graph")
    assert h.nodes.equals(g.nodes) and h.edges.equals(g.edges) and h.manifest == g.manifest
    assert h == g
    m = json.loads((tmp_path / "graph" / "manifest.json").read_text())
    assert (m["format"], m["format_version"], m["n_nodes"], m["n_edges"]) == ("jfig-graph", 1, 10, 9)


def test_save_replaces_a_graph_folder_but_not_other_folders(tmp_path):
    make_graph().save(tmp_path / "g")
    sub = make_graph().subgraph(kinds="excitatory")
    sub.save(tmp_path / "g")
    assert load_graph(tmp_path / "g").n_edges == 5
    (tmp_path / "empty").mkdir()
    sub.save(tmp_path / "empty")
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(JfigError, match="not a jfig graph folder"):
        sub.save(other)
    (other / "manifest.json").write_text(json.dumps({"format": "jfig-atlas"}))
    with pytest.raises(JfigError, match="refusing to replace"):
        sub.save(other)
    assert (other / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(JfigError, match="not a folder"):
        sub.save(tmp_path / "file")


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        load_graph(tmp_path / "nowhere")
    d = tmp_path / "g"
    make_graph().save(d)
    (d / "edges.parquet").unlink()
    with pytest.raises(FormatError, match="edges.parquet is missing"):
        load_graph(d)

    make_graph().save(d)
    data = (d / "edges.parquet").read_bytes()
    (d / "edges.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="edges.parquet is not a readable Parquet"):
        load_graph(d)

    make_graph().save(d)
    pq.write_table(pq.read_table(d / "nodes.parquet").slice(0, 9), d / "nodes.parquet")
    with pytest.raises(FormatError, match="nodes.parquet has 9 rows but manifest.json records n_nodes=10"):
        load_graph(d)

    def broken_manifest(**change):
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        make_graph().save(folder)
        m = json.loads((folder / "manifest.json").read_text())
        m.update(change)
        for k in [k for k, v in change.items() if v is None]:
            del m[k]
        (folder / "manifest.json").write_text(json.dumps(m))
        return folder

    with pytest.raises(FormatError, match=r"lacks key\(s\) \['saes'\]"):
        load_graph(broken_manifest(saes=None))
    with pytest.raises(FormatError, match="format is 'jfig-atlas'"):
        load_graph(broken_manifest(format="jfig-atlas"))
    with pytest.raises(FormatError, match="newer jfig"):
        load_graph(broken_manifest(format_version=2))
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match="manifest.json is not valid JSON"):
        load_graph(d)


def test_load_reports_schema_errors_as_format_errors(tmp_path):
    d = tmp_path / "g"
    make_graph().save(d)
    pq.write_table(pq.read_table(d / "edges.parquet").drop_columns(["variance"]), d / "edges.parquet")
    with pytest.raises(FormatError, match=r"lacks column\(s\) \['variance'\]"):
        load_graph(d)


# ---- property: any valid table round-trips exactly ------------------------------------------------

_floats = st.floats(allow_nan=False, width=64)
_probs = st.one_of(st.none(), st.floats(0.0, 1.0))


@st.composite
def graphs(draw):
    sites = draw(st.lists(st.text(st.characters(codec="utf-8", exclude_characters=":"), min_size=1, max_size=8),
                          min_size=1, max_size=3, unique=True))
    layers = {s: draw(st.integers(-2, 40)) for s in sites}
    feats = draw(st.lists(st.tuples(st.sampled_from(sites), st.integers(0, 2**62)), min_size=1, max_size=12,
                          unique=True))
    nodes = {"site": [s for s, _ in feats], "feature": [f for _, f in feats],
             "layer": [layers[s] for s, _ in feats],
             "firing_rate": draw(st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=len(feats),
                                          max_size=len(feats))),
             "label": draw(st.lists(st.one_of(st.none(), st.text(max_size=10)), min_size=len(feats),
                                    max_size=len(feats))),
             "top_contexts": [json.dumps([{"text": t, "activation": a}]) if t is not None else None
                              for t, a in draw(st.lists(st.tuples(st.one_of(st.none(), st.text(max_size=6)),
                                                                  _floats), min_size=len(feats),
                                                        max_size=len(feats)))]}
    rows = []
    for _ in range(draw(st.integers(0, 15))):
        (ss, s), (ts, t), (ms, m) = (draw(st.sampled_from(feats)) for _ in range(3))
        kind = draw(st.sampled_from(KINDS))
        gating = kind == "gating"
        rows.append({"source_site": ss, "source": s, "target_site": ts, "target": t, "kind": kind,
                     "weight": draw(_floats), "p_value": draw(_probs), "p_bonferroni": draw(_probs),
                     "q_value": draw(_probs), "variance": draw(st.one_of(st.none(), st.floats(0, 1e300))),
                     "n": draw(st.integers(0, 2**40)), "estimator": draw(st.sampled_from(ESTIMATORS)),
                     "positions": draw(st.sampled_from(POSITIONS)), "source_layer": layers[ss],
                     "target_layer": layers[ts], "modulator_site": ms if gating else None,
                     "modulator": m if gating else None})
    edges = pa.Table.from_pylist(rows, schema=EDGE_SCHEMA)
    manifest = {"model": draw(st.text(max_size=5)), "saes": [{"site": s, "d_sae": 2**62 + 1} for s in sites],
                "corpus_hash": None, "options": {"x": draw(st.integers())}}
    return InteractionGraph.from_tables(nodes, edges, manifest)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_save_load_round_trip_is_exact(g):
    with tempfile.TemporaryDirectory() as tmp:
        g.save(Path(tmp) / "graph")
        h = load_graph(Path(tmp) / "graph")
    assert h.nodes.equals(g.nodes) and h.edges.equals(g.edges) and h.manifest == g.manifest
    assert h.edges.to_pylist() == g.edges.to_pylist()
    assert h.to_networkx().number_of_edges() == g.n_edges + 2 * g.edges_by_kind()["gating"]


def test_format_doc_example_runs(tmp_path):
    doc = Path(__file__).resolve().parents[2] / "docs" / "graph_format.md"
    (code,) = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    make_graph().save(tmp_path / "graph")
    ns: dict = {}
    exec(compile(code.replace('"out/graph"', repr(str(tmp_path / "graph"))), str(doc), "exec"), ns)
    assert ns["top"].num_rows == 5 and ns["gates"].num_rows == 2 and ns["early"].n_edges == 3
    assert ns["hubs"]["target_count"].to_pylist()[0] == 3
