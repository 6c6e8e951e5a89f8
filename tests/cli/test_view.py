"""`jfig view`, `jfig serve`, `jfig diff` and `jfig export-attribution` on the tiny model folder, and
their errors (a missing or corrupt graph folder, a model that is not the graph's, a bad labels file)."""
import csv
import json
import re
import shutil

import numpy as np
import pytest

import jfig
from jfig.cli import main
from jfig.data import tokens_from
from jfig.pipeline.view import ViewSources, prepare_server
from tests.support.graphs import graph_from_edges
from tests.support.tiny_project import SAE_SITES


@pytest.fixture(scope="module")
def built(project, tmp_path_factory):
    """A graph over the tiny project's SAE sites in OUT/graph, with an atlas in OUT/atlas."""
    root, model = project
    out = tmp_path_factory.mktemp("view") / "out"
    saes = [jfig.load_sae(root / "saes" / "l0"), jfig.load_sae(root / "saes" / "l2")]
    jfig.build_atlas(model, saes, tokens_from(str(root / "texts"), model, 16, max_tokens=16 * 16)).save(out / "atlas")
    rng = np.random.default_rng(2)
    pairs = rng.choice(256, 24, replace=False)
    g = graph_from_edges(list(SAE_SITES), [0] * 24, pairs // 16, [1] * 24, pairs % 16, rng.choice([-1, 1], 24),
                         n_features=16)
    g.save(out / "graph")
    return root, out


def page_payload(path) -> dict:
    html = path.read_text()
    return json.loads(re.search(r'<script id="jfig-data" type="application/json">(.*?)</script>', html, re.S).group(1))


def model_args(root):
    return ["--model", str(root / "model"), "--sae", str(root / "saes" / "l0"), "--sae", str(root / "saes" / "l2")]


def test_view_writes_one_page_with_cards(built, tmp_path, capsys):
    root, out = built
    labels = tmp_path / "labels.csv"
    labels.write_text(f"site,feature,label\n{SAE_SITES[0]},2,a label\n")
    page = tmp_path / "page.html"
    assert main(["view", str(out / "graph"), *model_args(root), "--labels", str(labels), "--out", str(page),
                 "--no-open"]) == 0
    assert f"explorer page written to {page}" in capsys.readouterr().out
    p = page_payload(page)
    assert p["mode"] == "static" and len(p["edges"]["source"]) == 24
    assert p["cards"]["contexts"][0] and p["cards"]["logit_top"][0] and p["cards"]["histogram"][0]
    assert "a label" in p["nodes"]["label"]
    # without the model: no token strings, no logit lens, and the page says so
    assert main(["view", str(out / "graph"), "--no-model", "--out", str(page), "--no-open"]) == 0
    p = page_payload(page)
    assert "logit_top" not in p["cards"] and any("logit lens" in n for n in p["notes"])
    # the default place: beside the graph folder
    assert main(["view", str(out / "graph"), "--no-model", "--no-open"]) == 0
    assert (out / "explorer.html").exists()


def test_view_errors(built, tmp_path, capsys):
    root, out = built
    assert main(["view", str(tmp_path / "nothing"), "--no-model", "--no-open"]) == 2
    assert "is not a graph folder (no manifest.json)" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(out / "graph", bad)
    (bad / "edges.parquet").write_bytes(b"garbage")
    page = tmp_path / "page.html"
    assert main(["view", str(bad), "--no-model", "--out", str(page), "--no-open"]) == 2
    assert "not a readable Parquet file" in capsys.readouterr().err and not page.exists()
    other = tmp_path / "other"
    g = jfig.load_graph(out / "graph")
    jfig.InteractionGraph.from_tables(g.nodes, g.edges, {**g.manifest, "model": {
        "name": "SmolLM2-135M", "n_layers": 30, "d_model": 576}}).save(other)
    assert main(["view", str(other), *model_args(root), "--out", str(page), "--no-open"]) == 2
    assert "the graph was built on SmolLM2-135M (30 layers, d_model 576)" in capsys.readouterr().err
    assert main(["view", str(out / "graph"), "--no-model", "--labels", str(tmp_path / "none.csv"), "--no-open"]) == 2
    assert "labels file" in capsys.readouterr().err
    assert main(["view", str(out / "graph"), "--no-model", "--behavior", str(tmp_path), "--no-open"]) == 2
    assert "holds no circuit.json" in capsys.readouterr().err
    assert main(["view", str(out / "graph"), "--no-model", "--out", str(tmp_path), "--no-open"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not page.exists()


def test_serve_prepares_a_live_page_and_checks_its_inputs(built, capsys):
    root, out = built
    src = ViewSources(graph=str(out / "graph"), model=str(root / "model"),
                      saes=(str(root / "saes" / "l0"), str(root / "saes" / "l2")))
    server = prepare_server(src, port=0)
    try:
        assert b'"mode":"live"' in server.page and set(server.api) == {"/api/steer", "/api/attribution"}
    finally:
        server.server_close()
    assert main(["serve", str(out / "graph"), "--model", str(root / "model"), "--port", "70000"]) == 2
    assert "--port must be 0..65535" in capsys.readouterr().err
    # the graph's SAEs are not in jfig's cache under this model: serve needs them, and says so
    assert main(["serve", str(out / "graph"), "--model", str(root / "model"), "--port", "0"]) == 2
    assert "the graph's manifest lists no SAEs" in capsys.readouterr().err


def test_diff_and_attribution_export(built, tmp_path, capsys):
    root, out = built
    g = jfig.load_graph(out / "graph")
    rows = g.edges.to_pylist()
    rows[0].update(kind="inhibitory" if rows[0]["kind"] == "excitatory" else "excitatory", weight=-rows[0]["weight"])
    b = tmp_path / "b"
    jfig.InteractionGraph.from_tables(g.nodes, jfig.graph.graph.pa.Table.from_pylist(rows[:-2]), g.manifest).save(b)
    table = tmp_path / "diff.csv"
    assert main(["diff", str(out / "graph"), str(b), "--out", str(table)]) == 0
    assert "21 same, 0 gained, 2 lost, 1 sign-flipped" in capsys.readouterr().out
    with open(table, newline="") as fh:
        t = list(csv.DictReader(fh))
    assert len(t) == 24 and [r["status"] for r in t].count("lost") == 2 and t[0]["status"] == "flipped"
    assert main(["diff", str(out / "graph"), str(tmp_path / "nothing")]) == 2
    # --untested reads the sources each build measured from the candidates.json beside its graph
    assert main(["diff", str(out / "graph"), str(b), "--untested"]) == 2
    assert "no candidates.json beside" in capsys.readouterr().err
    a = tmp_path / "a" / "build"
    g.save(a / "graph")
    every = {SAE_SITES[0]: list(range(16))}
    lost = {r["source"] for r in rows[-2:]}
    for folder, sources in ((a, every), (tmp_path, {SAE_SITES[0]: sorted(set(range(16)) - lost)})):
        (folder / "candidates.json").write_text(json.dumps({"pairs": {"dense": {
            "sources": sources, "target_sites": {SAE_SITES[0]: [SAE_SITES[1]]}, "d_sae": {}}}, "report": []}))
    assert main(["diff", str(a / "graph"), str(b), "--untested"]) == 0
    assert ("21 same, 0 gained, 0 lost, 1 sign-flipped, 2 whose source the other build did not measure"
            in capsys.readouterr().out)
    slice_file = tmp_path / "slice.json"
    assert main(["export-attribution", str(out / "graph"), *model_args(root), "--prompt", "alpha beta gamma",
                 "--out", str(slice_file)]) == 0
    assert "feature nodes and" in capsys.readouterr().out
    data = json.loads(slice_file.read_text())
    assert data["metadata"]["slug"] == "slice" and data["metadata"]["prompt"] == "alpha beta gamma"



def test_diff_through_matched_saes(built, tmp_path, capsys):
    """Graph B is graph A over permuted copies of its SAEs (one edge three times stronger): matched by
    decoder or by activation, every edge lines up again."""
    root, out = built
    g = jfig.load_graph(out / "graph")
    rng = np.random.default_rng(5)
    perms = {site: rng.permutation(16) for site in SAE_SITES}
    for i, site in enumerate(SAE_SITES):
        sae = jfig.load_sae(root / "saes" / f"l{2 * i}")
        order = np.argsort(perms[site])             # B feature perms[site][k] is A feature k
        jfig.save_sae(jfig.SAE(W_enc=sae.W_enc[:, order], b_enc=sae.b_enc[order], W_dec=sae.W_dec[order],
                               b_dec=sae.b_dec, site=site), tmp_path / f"p{i}")
    rows = g.edges.to_pylist()
    for r in rows:
        r["source"], r["target"] = int(perms[r["source_site"]][r["source"]]), int(perms[r["target_site"]][r["target"]])
    rows[5]["weight"] *= 3.0
    b = tmp_path / "b"
    jfig.InteractionGraph.from_tables(g.nodes, jfig.graph.graph.pa.Table.from_pylist(rows), g.manifest).save(b)
    saes = ["--sae-a", str(root / "saes" / "l0"), "--sae-a", str(root / "saes" / "l2"),
            "--sae-b", str(tmp_path / "p0"), "--sae-b", str(tmp_path / "p1")]
    table = tmp_path / "diff.csv"
    assert main(["diff", str(out / "graph"), str(b), "--match", "decoder", *saes, "--ratio", "2", "--out",
                 str(table)]) == 0
    text = capsys.readouterr().out
    assert ("23 same, 0 gained, 0 lost, 0 sign-flipped, 1 strengthened, 0 weakened (by more than x2), "
            "0 touching unmatched features") in text
    strongest = text.split("most changed interactions between features matched with similarity >= 0.9:\n")[1]
    r0 = g.edges.to_pylist()[5]
    assert strongest.startswith(f"  {r0['source_site']}#{r0['source']} -> {r0['target_site']}#{r0['target']} "
                                f"[B: #{rows[5]['source']} -> #{rows[5]['target']}]")
    with open(table, newline="") as fh:
        t = list(csv.DictReader(fh))
    assert len(t) == 24 and all(int(r["source_b"]) == perms[r["source_site"]][int(r["source"])] for r in t)
    assert main(["diff", str(out / "graph"), str(b), "--match", "activation", *saes, "--model", str(root / "model"),
                 "--corpus", str(root / "texts"), "--match-tokens", "512", "--seq-len", "16"]) == 0
    assert "24 same, 0 gained, 0 lost, 0 sign-flipped, 0 touching unmatched features" in capsys.readouterr().out
    # the SAEs come from --sae-a / --sae-b or from the cache by the manifest, which lists none here
    assert main(["diff", str(out / "graph"), str(b), "--sae-a", str(root / "saes" / "l0")]) == 2
    assert "pass --match too" in capsys.readouterr().err
    assert main(["diff", str(out / "graph"), str(b), "--match", "decoder", "--model", str(root / "model")]) == 2
    assert "graph A: the graph's manifest lists no SAEs" in capsys.readouterr().err