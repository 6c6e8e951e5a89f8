"""`jfig attribute`: one prompt's attribution graph through circuit-tracer transcoders of the tiny model
folder, written as the viewers' JSON, linked to a corpus graph, and its errors."""
import json

import numpy as np
import pytest

from jfig.cli import main
from tests.attribution.files import write_transcoders
from tests.support.graphs import graph_from_edges

SITES = [f"blocks.{l}.hook_resid_mid" for l in range(3)]


@pytest.fixture(scope="module")
def files(project, tmp_path_factory):
    root, model = project
    where = tmp_path_factory.mktemp("attribute")
    write_transcoders(where / "tc", 3, 32, 24, skip=True)
    rng = np.random.default_rng(0)
    graph_from_edges(SITES, [0] * 30, rng.integers(0, 24, 30), [1] * 30, rng.integers(0, 24, 30), [1] * 30,
                     n_features=24).save(where / "graph")
    return root, where


def test_attribute_writes_the_viewer_json(files, tmp_path, capsys):
    root, where = files
    out = tmp_path / "alpha.json"
    assert main(["attribute", "--prompt", "alpha beta gamma", "--transcoders", str(where / "tc"), "--model",
                 str(root / "model"), "--out", str(out), "--max-logits", "3"]) == 0
    text = capsys.readouterr().out
    assert "replacement score" in text and f"written to {out}" in text
    data = json.loads(out.read_text())
    assert data["metadata"]["slug"] == "alpha"
    # this tokenizer's BOS is id 0, which circuit-tracer passes over: EOS goes in front
    assert data["metadata"]["prompt_tokens"][0] == "</s>"
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("logit") <= 3 and "cross layer transcoder" in kinds and data["links"]
    graph_models = pytest.importorskip("circuit_tracer.frontend.graph_models",
                                       reason="circuit-tracer is not installed (pip install --no-deps circuit-tracer)")
    graph_models.Model(**data)


def test_attribute_links_a_corpus_graph(files, tmp_path, capsys):
    root, where = files
    out = tmp_path / "linked.json"
    assert main(["attribute", "--prompt", "alpha beta", "--transcoders", str(where / "tc"), "--model",
                 str(root / "model"), "--graph", str(where / "graph"), "--out", str(out)]) == 0
    assert "corpus graph: of" in capsys.readouterr().out and out.exists()


def test_attribute_errors(files, tmp_path, capsys):
    root, where = files
    base = ["attribute", "--prompt", "alpha", "--model", str(root / "model")]
    for extra, match in ((["--transcoders", str(tmp_path / "none"), "--out", str(tmp_path / "a.json")], "do not exist"),
                         (["--transcoders", str(where / "tc"), "--out", str(tmp_path / "no" / "a.json")], "folder of --out"),
                         (["--transcoders", str(where / "tc"), "--out", str(tmp_path / "a.txt")], "should be a .json"),
                         (["--transcoders", str(where / "tc"), "--out", str(tmp_path / "a.json"), "--graph",
                           str(tmp_path)], "not a graph folder"),
                         (["--transcoders", str(where / "tc"), "--out", str(tmp_path / "a.json"), "--max-logits", "0"],
                          "max_n_logits")):
        assert main(base + extra) == 2
        assert match in capsys.readouterr().err
