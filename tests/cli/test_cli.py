"""The command line: `jfig build CONFIG.toml` end to end on a tiny model folder, and config errors."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import jfig
from jfig.cli import main
from jfig.pipeline import load_config


# a build of the tiny model folder: two SAEs, a text corpus, few sequences and candidates
CONFIG = '''
model = "model"
saes = ["saes/l0", "saes/l2"]
corpus = ["texts"]
out = "{out}"
[options]
seq_len = 16
max_sequences = 32
top_k = 6
inputs_per_source = 8
{extra}gating = false
'''


def _write(root, text):
    p = root / "graph.toml"
    p.write_text(text)
    return p


def test_build_from_config(project, capsys):
    root, model = project
    cfg = _write(root, CONFIG.format(out="out", extra=""))
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


def test_distributed_build_from_the_command_line(project):
    """`jfig build CONFIG --distributed` in two processes (JFIG_* variables, localhost) writes the graph a
    one-process `jfig build` writes."""
    root, _ = project
    one, two = _write(root, CONFIG.format(out="one", extra="block_size = 2\n")), root / "two.toml"
    two.write_text(CONFIG.format(out="two", extra="block_size = 2\n"))
    assert main(["build", str(one), "--quiet"]) == 0
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[2])
    procs = []
    for i in range(2):
        env = {**os.environ, "JFIG_COORDINATOR_ADDRESS": f"localhost:{port}", "JFIG_NUM_PROCESSES": "2",
               "JFIG_PROCESS_ID": str(i), "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, "-m", "jfig", "build", str(two), "--distributed", "--quiet"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "process 1 of 2" in outs[1][0]
    g1, g2 = jfig.load_graph(root / "one" / "graph"), jfig.load_graph(root / "two" / "graph")
    assert g1.manifest["statistics"]["n_tested"] == g2.manifest["statistics"]["n_tested"] > 20
    assert g1.manifest["statistics"]["tau"] == g2.manifest["statistics"]["tau"]
    a, b = g1.edges.to_pydict(), g2.edges.to_pydict()
    for k in ("source_site", "source", "target_site", "target", "kind", "n", "weight", "p_value"):
        assert a[k] == b[k], k
