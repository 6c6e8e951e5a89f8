"""jfig's attribution graphs against circuit-tracer 0.5.0's own `attribute`, `prune_graph`,
`compute_graph_scores` and `create_graph_files`, on tiny random HF checkpoints (Llama, GPT-2, Gemma-2)
with the same transcoder files read by both: per-layer skip transcoders, JumpReLU transcoders, a
cross-layer transcoder, and a graph keeping only the most influential features."""
import json
from pathlib import Path

import numpy as np
import pytest

import jfig
from tests.attribution.files import write_clt, write_model, write_transcoders
from tests.support.reference_env import run_reference

SCRIPT = (Path(__file__).parent / "reference_script.py").read_text()
LOGITS = dict(max_n_logits=5, desired_logit_prob=0.9, batch_size=16)


def cases(root):
    """The cases (as the reference script reads them), with their files written under root."""
    out = []
    for fam in ("llama", "gpt2", "gemma2"):
        folder = root / f"m_{fam[:2]}"
        cfg = write_model(folder / "model", fam)
        d = cfg.get("hidden_size") or cfg["n_embd"]
        n = cfg.get("num_hidden_layers") or cfg["n_layer"]
        base = dict(family=fam, model=str(folder / "model"), n_layers=n, kind="set")
        if fam == "llama":
            write_transcoders(folder / "tc", n, d, 24, skip=True)
            out.append(dict(base, name="llama_skip", transcoders=str(folder / "tc"), input_hook="mlp.hook_in",
                            output_hook="mlp.hook_out", prompt="hello world", kwargs=LOGITS, json=True))
            out.append(dict(out[-1], name="llama_top", json=False,
                            kwargs=dict(LOGITS, max_feature_nodes=50, update_interval=2)))
            write_clt(folder / "clt", n, d, 16)
            out.append(dict(base, name="llama_clt", kind="clt", transcoders=str(folder / "clt"),
                            input_hook="hook_resid_mid", output_hook="hook_mlp_out", prompt=[1, 40, 50, 60, 70, 80, 41],
                            kwargs=dict(max_n_logits=4, desired_logit_prob=0.5, batch_size=32)))
        else:                       # GPT-2 reads ln2.hook_normalized (before the norm's weight and bias)
            hook = "ln2.hook_normalized" if fam == "gpt2" else "mlp.hook_in"
            write_transcoders(folder / "tc", n, d, 24, jumprelu=True, hooks=(hook, "hook_mlp_out"))
            out.append(dict(base, name=fam, transcoders=str(folder / "tc"), input_hook=hook,
                            output_hook="hook_mlp_out", prompt="a cat sat on",
                            kwargs=dict(max_n_logits=6, desired_logit_prob=0.95, batch_size=64)))
    return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """{name: (case, jfig's AttributionGraph, circuit-tracer's arrays)}."""
    root = tmp_path_factory.mktemp("ref")
    specs = cases(root)
    (root / "spec.json").write_text(json.dumps(specs))
    (root / "out").mkdir()
    run_reference(SCRIPT, str(root / "spec.json"), str(root / "out"))
    got = {}
    for case in specs:
        model = jfig.load_model(case["model"])
        tcs = jfig.load_transcoders(case["transcoders"], model=model)
        graph = jfig.attribution_graph(model, tcs, case["prompt"], **case["kwargs"])
        got[case["name"]] = (case, graph, dict(np.load(root / "out" / f"{case['name']}.npz")), root / "out")
    return got


NAMES = ("llama_skip", "llama_top", "llama_clt", "gpt2", "gemma2")


@pytest.mark.parametrize("name", NAMES)
def test_same_nodes_and_edge_weights(compared, name):
    case, g, ref, _ = compared[name]
    assert g.tokens.tolist() == ref["tokens"].tolist()               # BOS put in front of text and of ids
    assert g.tokens[0] == 1 and (isinstance(case["prompt"], str) or g.tokens.tolist() == case["prompt"])
    assert g.logit_tokens.tolist() == ref["logit_tokens"].tolist()
    np.testing.assert_allclose(g.logit_probabilities, ref["logit_probabilities"], rtol=1e-5)
    np.testing.assert_array_equal(g.active_features, ref["active"])
    np.testing.assert_allclose(g.activation_values, ref["values"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g.selected_features, ref["selected"])
    a, b = g.adjacency_matrix, ref["adjacency"]
    assert a.shape == b.shape and a.dtype == np.float32
    scale = np.abs(b).max()
    assert scale > 0.1 and (b != 0).sum() > 100
    # float32 on both sides: agreement to ~1e-6 of the largest edge (measured: <= 6e-7)
    assert np.abs(a - b).max() <= 1e-5 * scale, np.abs(a - b).max() / scale
    assert ((a != 0) == (b != 0)).mean() > 0.999


@pytest.mark.parametrize("name", NAMES)
def test_same_pruning_and_scores(compared, name):
    _, g, ref, _ = compared[name]
    pr = g.prune()
    np.testing.assert_array_equal(pr.node_mask, ref["node_mask"])
    np.testing.assert_array_equal(pr.edge_mask, ref["edge_mask"])
    np.testing.assert_allclose(pr.cumulative_scores, ref["cumulative"], atol=1e-5)
    np.testing.assert_allclose(g.scores(), ref["scores"], atol=1e-5)
    assert 0 < pr.node_mask[:g.n_features].sum() < g.n_features


def test_top_features_are_the_ones_circuit_tracer_keeps(compared):
    _, g, ref, _ = compared["llama_top"]
    _, full, _, _ = compared["llama_skip"]
    assert g.n_features == 50 < full.n_features
    assert g.adjacency_matrix.shape[0] == 50 + full.n_errors + full.n_pos + full.n_logits
    # the kept rows equal the full graph's rows of the same features (columns of the kept features)
    cols = np.concatenate([g.selected_features, np.arange(full.n_features, full.n_nodes)])
    np.testing.assert_allclose(g.adjacency_matrix[:50], full.adjacency_matrix[g.selected_features][:, cols],
                               atol=1e-5 * np.abs(full.adjacency_matrix).max())


def test_viewer_file_matches_create_graph_files(compared, tmp_path):
    case, g, _, out = compared["llama_skip"]
    theirs = json.loads((out / "llama_skip.json").read_text())
    mine = g.to_json(tmp_path, slug="llama_skip", scan="tiny")
    assert json.loads((tmp_path / "llama_skip.json").read_text()) == mine
    listed = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [m["slug"] for m in listed["graphs"]] == ["llama_skip"]
    for key in ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version"):
        assert mine["metadata"][key] == theirs["metadata"][key], key
    assert mine["qParams"] == theirs["qParams"]
    by_id = {n["node_id"]: n for n in theirs["nodes"]}
    assert [n["node_id"] for n in mine["nodes"]] == [n["node_id"] for n in theirs["nodes"]]
    for n in mine["nodes"]:
        t = by_id[n["node_id"]]
        for key in ("feature", "layer", "ctx_idx", "feature_type", "is_target_logit", "jsNodeId", "clerp"):
            assert n[key] == t[key], (n["node_id"], key)
        for key in ("token_prob", "influence", "activation"):
            assert (n[key] is None) == (t[key] is None) and (n[key] is None or abs(n[key] - t[key]) < 1e-4)
    assert [(l["source"], l["target"]) for l in mine["links"]] == [(l["source"], l["target"]) for l in theirs["links"]]
    w_mine = np.array([l["weight"] for l in mine["links"]])
    w_theirs = np.array([l["weight"] for l in theirs["links"]])
    np.testing.assert_allclose(w_mine, w_theirs, atol=1e-5 * np.abs(w_theirs).max())
    graph_models = pytest.importorskip("circuit_tracer.frontend.graph_models",
                                       reason="circuit-tracer is not installed (pip install --no-deps circuit-tracer)")
    graph_models.Model(**mine)
