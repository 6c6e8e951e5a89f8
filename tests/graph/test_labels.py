"""Feature labels into the node table: from a CSV or a Neuronpedia explanation export."""
import json

import pytest

import jfig
from jfig.cli import main
from jfig.graph import load_labels
from tests.support.graphs import graph_from_edges

SITES = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]


@pytest.fixture
def graph():
    return graph_from_edges(SITES, [0, 0], [1, 2], [1, 1], [3, 4], [1, -1], n_features=6)


def labels_of(g):
    return {(s, f): lab for s, f, lab in zip(*(g.nodes[c].to_pylist() for c in ("site", "feature", "label"))) if lab}


def test_with_labels_from_csv_and_from_a_neuronpedia_export(graph, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text(f"site,feature,label\n{SITES[0]},1,\"commas, mostly\"\n{SITES[1]},9,not a node\n")
    g = graph.with_labels(load_labels(csv))
    assert labels_of(g) == {(SITES[0], 1): "commas, mostly"} and g.n_edges == graph.n_edges
    export = tmp_path / "np.json"
    export.write_text(json.dumps([{"modelId": "toy", "layer": "3-res", "index": "4", "description": "negation"}]))
    g = g.with_labels(load_labels(export, {"toy/3-res": SITES[1]}))
    assert labels_of(g) == {(SITES[0], 1): "commas, mostly", (SITES[1], 4): "negation"}
    g.save(tmp_path / "g")
    assert labels_of(jfig.load_graph(tmp_path / "g")) == labels_of(g)
    with pytest.raises(jfig.JfigError, match="none of the 1 labels names a node of this graph"):
        graph.with_labels({("blocks.9.hook_resid_post", 0): "x"})


def test_label_command(graph, tmp_path, capsys):
    graph.save(tmp_path / "g")
    export = tmp_path / "np.json"
    export.write_text(json.dumps([{"modelId": "toy", "layer": "1-res", "index": 2, "description": "dates"}]))
    assert main(["label", str(tmp_path / "g"), "--labels", str(export), "--source", f"toy/1-res={SITES[0]}"]) == 0
    assert "1 nodes labelled" in capsys.readouterr().out
    assert labels_of(jfig.load_graph(tmp_path / "g")) == {(SITES[0], 2): "dates"}
    assert main(["label", str(tmp_path / "g"), "--labels", str(export)]) == 2
    assert "none of the graph's SAEs" in capsys.readouterr().err
    assert main(["label", str(tmp_path / "g"), "--labels", str(export), "--source", "toy-1-res"]) == 2
    assert "expected NEURONPEDIA_ID=SITE" in capsys.readouterr().err
