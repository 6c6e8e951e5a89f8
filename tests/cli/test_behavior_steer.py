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
