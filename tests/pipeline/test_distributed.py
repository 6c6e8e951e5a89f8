"""A build spread over two processes on JAX's distributed runtime (localhost) gives the graph one process
builds."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jfig
from jfig.pipeline import build_graph
from tests.support.planted_graph import recovery_model

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = dict(seq_len=8, top_k=24, min_alignment=0.0, progress=False, inputs_per_source=32, block_size=4)
SCRIPT = """
import sys, numpy as np, jax
from tests.support.planted_graph import recovery_model
from jfig.pipeline import build_graph
index, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=index)
model, saes = recovery_model()
toks = np.random.default_rng(0).integers(0, 64, size=(128, 8))
g = build_graph(model, saes, toks, out_dir=out, targets=sys.argv[4], **%r)
print("graph" if g is not None else "no graph", jax.process_index(), jax.process_count())
jax.distributed.shutdown()
""" % OPTIONS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("targets", ["candidates", "all"])
def test_two_processes_build_the_one_process_graph(tmp_path, targets):
    """Each process counts the atlas over half the rows and merges both halves (the one-process atlas),
    measures its blocks, and process 0 assembles the graph; a dense build streams the other
    process's blocks from its folder."""
    port, out = free_port(), tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), str(port), str(out), targets], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se[-3000:]
    assert "graph 0 2" in results[0][0] and "no graph" not in results[0][0]
    assert "no graph 1 2" in results[1][0]
    # each process measured its own blocks, in its own folder
    own = [sorted(p.name for p in (out / f"process_{i:03d}" / "blocks").glob("*.npz")) for i in (0, 1)]
    assert own[0] and own[1] and not set(own[0]) & set(own[1])
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(128, 8))
    one = build_graph(model, saes, toks, targets=targets, out_dir=tmp_path / "one", **OPTIONS)
    two = jfig.load_graph(out / "graph")
    whole = jfig.Atlas.load(tmp_path / "one" / "atlas")
    halves = [jfig.Atlas.load(out / f"process_{i:03d}" / "atlas_part") for i in (0, 1)]
    assert [h.n_sequences for h in halves] == [64, 64]
    for i in (0, 1):
        merged = jfig.Atlas.load(out / f"process_{i:03d}" / "atlas")
        assert merged.n_tokens == whole.n_tokens and merged.n_sequences == 128
        for site in whole.sites:
            np.testing.assert_array_equal(merged.firing_count(site), whole.firing_count(site))
            np.testing.assert_allclose(merged.quantiles(site), whole.quantiles(site), rtol=1e-6)
        np.testing.assert_array_equal(merged.coactivation(*whole.sites), whole.coactivation(*whole.sites))
    a, b = one.edges.to_pydict(), two.edges.to_pydict()
    assert len(a["source"]) >= 10
    for k in ("source_site", "source", "target_site", "target", "kind", "n", "modulator"):
        assert a[k] == b[k], k
    np.testing.assert_allclose(np.asarray(b["weight"], float), np.asarray(a["weight"], float), rtol=1e-6)
    assert two.manifest["statistics"]["n_tested"] == one.manifest["statistics"]["n_tested"]


def test_process_arguments_are_checked(tmp_path):
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(16, 8))
    with pytest.raises(jfig.JfigError, match="needs out_dir"):
        build_graph(model, saes, toks, process=(0, 2), **OPTIONS)
    with pytest.raises(jfig.JfigError, match="0 <= index < count"):
        build_graph(model, saes, toks, out_dir=tmp_path, process=(2, 2), **OPTIONS)


def test_distributed_environment_is_checked(monkeypatch):
    from jfig.cli import init_distributed
    monkeypatch.setenv("JFIG_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.delenv("JFIG_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JFIG_PROCESS_ID", raising=False)
    with pytest.raises(jfig.JfigError, match="also needs JFIG_NUM_PROCESSES, JFIG_PROCESS_ID"):
        init_distributed()
    monkeypatch.setenv("JFIG_NUM_PROCESSES", "two")
    monkeypatch.setenv("JFIG_PROCESS_ID", "0")
    with pytest.raises(jfig.JfigError, match="must be integers, got 'two'"):
        init_distributed()
