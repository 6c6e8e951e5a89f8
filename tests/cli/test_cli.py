"""The command line: `jfig build CONFIG.toml` end to end on a tiny model folder, and config errors."""
import jax
import pytest

import jfig
from jfig.cli import main
from jfig.pipeline import load_config


def _write(root, text):
    p = root / "graph.toml"
    p.write_text(text)
    return p


def test_build_from_config(project, capsys):
    root, model = project
    cfg = _write(root, '''
model = "model"
saes = ["saes/l0", "saes/l2"]
corpus = ["texts"]
out = "out"
[options]
seq_len = 16
max_sequences = 32
top_k = 6
inputs_per_source = 8
gating = false
''')
    assert main(["build", str(cfg), "--quiet"]) == 0
    graph = jfig.load_graph(root / "out" / "graph")
    assert graph.manifest["options"]["top_k"] == 6
    assert (root / "out" / "build" / "build_state.json").exists()
    assert "pruning" in capsys.readouterr().out
    # rerunning resumes from the finished state and gives the same graph
    assert main(["build", str(cfg), "--quiet"]) == 0
    assert jfig.load_graph(root / "out" / "graph").edges.equals(graph.edges)


def test_config_errors(project, capsys):
    root, _ = project
    with pytest.raises(jfig.JfigError, match="unknown key"):
        load_config(_write(root, 'model = "model"\nmodle = 3\n'))
    with pytest.raises(jfig.JfigError, match="unknown build option"):
        load_config(_write(root, 'model = "model"\n[options]\ntopk = 3\n'))
    with pytest.raises(jfig.FormatError, match="not valid TOML"):
        load_config(_write(root, 'model = "model\n'))
    with pytest.raises(jfig.JfigError, match="needs a 'model'"):
        load_config(_write(root, 'out = "x"\n'))
    # through the command line: a clear one-line error and exit code 2, no traceback
    assert main(["build", str(_write(root, 'model = "model"\nbogus = 1\n'))]) == 2
    assert "unknown key" in capsys.readouterr().err
    wrong = _write(root, 'model = "model"\nsaes = ["saes/l0"]\ncorpus = ["texts"]\nout = "bad"\n')
    bad_sae = jfig.SAE.init_random(jax.random.PRNGKey(9), 8, 4, "blocks.0.hook_resid_post")
    jfig.save_sae(bad_sae, root / "saes" / "l0_wrong")
    wrong.write_text(wrong.read_text().replace("saes/l0", "saes/l0_wrong"))
    assert main(["build", str(wrong), "--quiet"]) == 2
    assert "do not belong to this model" in capsys.readouterr().err
    assert not (root / "bad" / "graph").exists()
