"""`jfig steer` and `jfig behavior` on the tiny model folder of the CLI tests, and their errors."""
import json

import numpy as np
import pytest

import jfig
from jfig.cli import main
from jfig.pipeline.behavior import steered_generation
from tests.support.graphs import graph_from_edges

SITES = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]


@pytest.fixture(scope="module")
def graph_dir(project, tmp_path_factory):
    """A graph over the two SAE sites of the tiny project (16 features each)."""
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(0, 16, 30), rng.integers(0, 16, 30)
    g = graph_from_edges(SITES, [0] * 30, src, [1] * 30, tgt, rng.choice([-1, 1], 30), rng.uniform(0.1, 1, 30),
                         n_features=16)
    path = tmp_path_factory.mktemp("g") / "graph"
    g.save(path)
    return path


def test_steer_prints_clean_and_steered_side_by_side(project, capsys):
    root, model = project
    code = main(["steer", "--model", str(root / "model"), "--sae", str(root / "saes" / "l0"),
                 "--feature", f"{SITES[0]}#3", "--value", "40", "--prompt", "alpha beta", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0 and "prompt: 'alpha beta'" in out and "clean" in out and f"steered: {SITES[0]}#3" in out
    sae = jfig.load_sae(root / "saes" / "l0")
    (_, clean, steered), = steered_generation(model, sae, 3, 40.0, ["alpha beta"], max_new_tokens=6)
    ids = [0] + model.tokenizer.encode("alpha beta", add_bos=False)
    want = model.generate([ids], 6, edits=(jfig.Clamp(sae, 3, 40.0),))[0, len(ids):]
    assert steered == model.tokenizer.decode([int(t) for t in want]) and clean != steered
    assert steered in out.replace("\n", "") or steered[:10] in out


def test_steer_errors(project, graph_dir, capsys):
    root, _ = project
    base = ["steer", "--model", str(root / "model"), "--sae", str(root / "saes" / "l0"), "--value", "1"]
    assert main(base + ["--feature", "blocks.0.hook_resid_post"]) == 2
    assert "expected SITE#ID" in capsys.readouterr().err
    assert main(base + ["--feature", f"{SITES[0]}#99", "--graph", str(graph_dir)]) == 2
    assert f"{SITES[0]}#99 is not a feature of the graph" in capsys.readouterr().err
    assert main(base + ["--feature", f"{SITES[0]}#99"]) == 2
    assert "out of range for the SAE" in capsys.readouterr().err
    assert main(base + ["--feature", "blocks.1.hook_resid_post#1"]) == 2
    assert "no SAE reads blocks.1.hook_resid_post" in capsys.readouterr().err


def test_behavior_writes_a_report_for_a_jsonl_suite(project, graph_dir, tmp_path, capsys):
    root, _ = project
    suite = tmp_path / "toy.jsonl"
    rows = [{"text": "alpha beta gamma alpha beta", "answer": " gamma", "distractor": " delta"},
            {"text": "the sequence of words the sequence", "answer": " of", "distractor": " a"},
            {"text": "beta gamma delta beta gamma", "answer": " delta", "distractor": " alpha"}]
    suite.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "report"
    code = main(["behavior", str(suite), "--graph", str(graph_dir), "--model", str(root / "model"),
                 "--sae", str(root / "saes" / "l0"), "--sae", str(root / "saes" / "l2"), "--out", str(out),
                 "--min-effect", "0", "--random", "5", "--nulls", "5", "--candidates", "8"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "circuit.json").read_text())
    assert data["behavior"] == "toy" and data["baseline"]["n"] == 3 and data["seeds"]
    assert len(data["circuit_test"]["random_sufficiency"]) == 5
    assert "# Behaviour circuit: toy" in (out / "report.md").read_text()
    assert "sufficiency" in capsys.readouterr().out


def test_behavior_errors_come_before_any_work(project, graph_dir, tmp_path, capsys):
    root, _ = project
    assert main(["behavior", "nope", "--graph", str(graph_dir), "--model", "no/such/model"]) == 2
    assert "unknown behaviour 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "alpha", "answer": " beta"}\n')
    assert main(["behavior", str(bad), "--graph", str(graph_dir), "--model", "no/such/model"]) == 2
    assert "missing or empty field(s) ['distractor']" in capsys.readouterr().err
    assert main(["behavior", "ioi", "--graph", str(tmp_path), "--model", "no/such/model"]) == 2
    assert "is not a graph folder" in capsys.readouterr().err


def test_head_level_part_runs_for_a_head_circuit_behaviour(project, graph_dir):
    """A suite named like a behaviour with a published head-level circuit, with corrupted prompts of the
    same length, gets head patching and per-head edge shares in its circuit."""
    root, model = project
    saes = [jfig.load_sae(root / "saes" / "l0"), jfig.load_sae(root / "saes" / "l2")]
    prompts = tuple(jfig.data.Prompt(t, " a", " b", "ioi", corrupted=c) for t, c in
                    (("alpha beta gamma alpha", "delta beta gamma delta"), ("the words of the", "all words of all"),
                     ("beta alpha beta", "beta gamma beta")))
    suite = jfig.BehaviorSuite("ioi", prompts)
    c = jfig.behavior_subgraph(model, saes, jfig.load_graph(graph_dir), suite, k=1, min_effect=0.0, n_random=3,
                               n_null=3, top_heads=2, top_edges=2, n_seeds=2, per_node=2)
    h = c.heads
    assert h is not None and h["n_prompts"] == 3 and len(h["top_heads"]) == 2
    assert all({"layer", "head", "activation_patching", "path_to_logits"} <= set(x) for x in h["top_heads"])
    for e in h["edges"]:                                      # heads between blocks.0 and blocks.2 only
        assert all(k in ("L1H0", "L1H1", "L1H2", "L1H3", "L2H0", "L2H1", "L2H2", "L2H3") for k in e["share"])
    assert "## Heads" in jfig.behaviors.circuit_report(c)
