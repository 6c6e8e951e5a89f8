"""End to end: calibration on a null model, recovery of a planted graph, resume after interruption."""
import json

import numpy as np
import pyarrow.compute as pc
import pytest
from scipy.stats import binom

import jfig
from jfig.pipeline import build_graph
from tests.support.planted_graph import (EXCITATORY, MOD_I, MOD_J, MOD_K, SRC, TGT, curvature_model, modulator_model,
                                        null_model, recovery_model, skewed_null_model, truth)

FAST = dict(seq_len=8, top_k=24, min_alignment=0.0, progress=False)


def _recovered(graph):
    e = graph.edges.to_pydict()
    first = {(s, t): k for s, t, k in zip(e["source"], e["target"], e["kind"]) if k != "gating"}
    gates = {(min(s, m), max(s, m), t) for s, m, t, k in zip(e["source"], e["modulator"], e["target"], e["kind"])
             if k == "gating"}
    return first, gates


def test_recovers_planted_graph():
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(128, 8))
    # one clamped position per input carries less signal than every active one: 64 inputs per source
    g = build_graph(model, saes, toks, max_sequences=128, inputs_per_source=64, **FAST)
    found, gates = _recovered(g)
    true_first, true_gates = truth()
    tp = sum(1 for k, v in found.items() if true_first.get(k) == v)   # right pair and right kind
    assert tp / max(len(found), 1) >= 0.95 and tp / len(true_first) >= 0.95, (found, true_first)
    assert gates == true_gates
    assert g.manifest["statistics"]["n_tested"] >= 24 * 20           # many non-interacting pairs tested
    assert min(g.manifest["statistics"]["tau"].values()) > 0           # random-direction null was used, per site


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_null_model_is_calibrated(alpha):
    model, saes = null_model()
    toks = np.random.default_rng(1).integers(0, 512, size=(256, 8))
    g = build_graph(model, saes, toks, max_sequences=256, correction="none", alpha=alpha, null_every=0,
                    gating=False, **FAST)
    n = g.manifest["statistics"]["n_tested"]
    slack = 3 * np.sqrt(alpha * (1 - alpha) / n)
    assert g.n_edges / n <= alpha + slack
    strict = build_graph(model, saes, toks, max_sequences=256, gating=False, null_every=0, **FAST)
    assert strict.n_edges / n <= 0.01


def test_family_wise_error_with_skewed_effects():
    """No interaction anywhere, per-input clamp effects skewed (centred exponentials): over 16 token
    samples, Bonferroni at α = 0.05 over all 576 pairs (tau off, so only the p-values decide) may give
    an edge in no more builds than a binomial(16, α) allows. The default p-value holds this; the
    sign-flip tail alone, exact only for symmetric effects, does not (7 of 16 when written)."""
    alpha, draws = 0.05, 16
    model, saes = skewed_null_model()
    errors = {"robust": 0, "saddlepoint": 0}
    for pvalue in errors:
        for draw in range(draws):
            toks = np.random.default_rng(50 + draw).integers(0, 512, size=(256, 8))
            g = build_graph(model, saes, toks, alpha=alpha, null_every=0, gating=False, pvalue=pvalue, seed=draw,
                            **FAST)
            assert g.manifest["statistics"]["n_tested"] == 24 * 24
            assert g.manifest["options"]["inputs_per_source"] == 100        # the default: M toward 100
            errors[pvalue] += int(g.n_edges > 0)
    limit = binom.ppf(0.99, draws, alpha)
    assert errors["robust"] <= limit, errors
    assert errors["saddlepoint"] > limit, errors


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(96, 8))
    opts = dict(max_sequences=96, block_size=4, **FAST)
    full = build_graph(model, saes, toks, out_dir=tmp_path / "a", **opts)

    class Stop(Exception):
        pass

    def boom(i):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        build_graph(model, saes, toks, out_dir=tmp_path / "b", on_block=boom, **opts)
    done = sorted(p.name for p in (tmp_path / "b" / "blocks").iterdir())
    assert done == ["block_00000.npz", "block_00001.npz", "block_00002.npz"]    # finished blocks kept
    assert not (tmp_path / "b" / "graph").exists()                               # nothing half-written
    seen = []
    resumed = build_graph(model, saes, toks, out_dir=tmp_path / "b", on_block=seen.append, **opts)
    mtimes = [(tmp_path / "b" / "blocks" / n).stat().st_mtime_ns for n in done]
    assert resumed.edges.equals(full.edges) and resumed.nodes.equals(full.nodes)
    assert [(tmp_path / "b" / "blocks" / n).stat().st_mtime_ns for n in done] == mtimes   # not redone
    loaded = jfig.load_graph(tmp_path / "b" / "graph")
    assert loaded.edges.equals(full.edges)


def test_deterministic_given_seed():
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(64, 8))
    a = build_graph(model, saes, toks, max_sequences=64, seed=3, **FAST)
    b = build_graph(model, saes, toks, max_sequences=64, seed=3, **FAST)
    assert a.edges.equals(b.edges)


def test_bad_input(tmp_path):
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(32, 8))
    with pytest.raises(jfig.JfigError, match="unknown build option"):
        build_graph(model, saes, toks, windoww=3)
    with pytest.raises(jfig.JfigError, match="correction"):
        build_graph(model, saes, toks, correction="holm")
    wrong = jfig.SAE.init_random(__import__("jax").random.PRNGKey(0), 16, 8, SRC)
    with pytest.raises(jfig.JfigError, match="do not belong to this model"):
        build_graph(model, [wrong, saes[1]], toks)
    build_graph(model, saes, toks, out_dir=tmp_path, max_sequences=32, **FAST)
    with pytest.raises(jfig.JfigError, match="different inputs or options"):
        build_graph(model, saes, toks, out_dir=tmp_path, max_sequences=32, alpha=0.05, **FAST)


def test_corrupt_build_files_are_measured_again(tmp_path, caplog):
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(64, 8))
    opts = dict(max_sequences=64, block_size=4, **FAST)
    full = build_graph(model, saes, toks, out_dir=tmp_path, **opts)
    block = tmp_path / "blocks" / "block_00001.npz"
    block.write_bytes(block.read_bytes()[: block.stat().st_size // 2])          # cut in half
    cands = tmp_path / "candidates.json"
    cands.write_text(cands.read_text().replace('"source"', '"sourcx"', 1))      # altered, still valid JSON
    site_file = tmp_path / "atlas" / "site_0.npz"
    site_file.write_bytes(b"\0" * 64)                                           # garbage inside the atlas
    untouched = tmp_path / "blocks" / "block_00002.npz"
    before = untouched.stat().st_mtime_ns
    seen = []
    with caplog.at_level("WARNING", logger="jfig"):
        again = build_graph(model, saes, toks, out_dir=tmp_path, on_block=seen.append, **opts)
    assert again.edges.equals(full.edges) and again.nodes.equals(full.nodes)
    assert "block_00001.npz" in caplog.text and "candidates.json" in caplog.text and "atlas" in caplog.text
    assert untouched.stat().st_mtime_ns == before                               # intact blocks are reused
    state = json.loads((tmp_path / "build_state.json").read_text())
    assert {"blocks/block_00001.npz", "candidates.json", "atlas/manifest.json"} <= set(state["files"])


def test_a_block_without_a_recorded_checksum_is_not_trusted(tmp_path):
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(32, 8))
    opts = dict(max_sequences=32, block_size=4, **FAST)
    full = build_graph(model, saes, toks, out_dir=tmp_path, **opts)
    state_file = tmp_path / "build_state.json"
    state = json.loads(state_file.read_text())
    del state["files"]["blocks/block_00000.npz"]            # as if the run died between writing and recording
    state_file.write_text(json.dumps(state))
    np.savez(tmp_path / "blocks" / "block_00000.npz", mean=np.zeros(3))            # and the file is foreign
    assert build_graph(model, saes, toks, out_dir=tmp_path, **opts).edges.equals(full.edges)


def test_token_arrays_are_used_as_given():
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(40, 16))        # 16-token rows; seq_len defaults to 64
    g = build_graph(model, saes, toks, top_k=24, min_alignment=0.0, progress=False)
    assert g.manifest["statistics"]["seq_len"] == 16 and g.manifest["statistics"]["n_sequences"] == 40
    assert g.n_edges > 0


def test_no_gating_edges_without_a_gate_and_the_null_sets_tau_gate():
    """Strong first-order edges and curvature along each input, no gate: every tested triple is null,
    and the random-modulator control (which the curvature does reach) gives tau_gate > 0."""
    model, saes = curvature_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(96, 8))
    g = build_graph(model, saes, toks, max_sequences=96, **FAST)
    stats = g.manifest["statistics"]
    assert g.edges_by_kind()["gating"] == 0
    assert stats["n_gating_tested"] >= 10 and stats["n_gating_null"] == stats["n_gating_tested"]
    assert stats["tau_gate"] > 0
    found, _ = _recovered(g)
    assert {(i, j) for i, j in EXCITATORY} <= set(found)


def test_pure_modulator_is_found_as_a_gating_hyperedge():
    model, saes = modulator_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(128, 8))
    g = build_graph(model, saes, toks, max_sequences=128, gating_max_pairs=24, **FAST)
    found, gates = _recovered(g)
    assert found.get((MOD_I, MOD_J)) == "excitatory"
    assert (MOD_K, MOD_J) not in found                                  # k is no first-order input of j
    e = g.edges.filter(pc.equal(g.edges["kind"], "gating")).to_pylist()
    hit = [r for r in e if (r["source"], r["modulator"], r["target"]) == (MOD_I, MOD_K, MOD_J)]
    assert len(hit) == 1 and abs(hit[0]["weight"] - 2.0) < 0.05, e
    assert hit[0]["estimator"] == "factorial" and hit[0]["positions"] == "same"
    first = g.edges.filter(pc.not_equal(g.edges["kind"], "gating")).to_pylist()
    assert all(r["cv"] is not None and r["gating_flag"] == (r["cv"] > g.manifest["statistics"]["gating_flag_cv"])
               for r in first)


def test_default_alignment_is_a_prior_not_a_filter():
    """Identity SAEs on adjacent sites: every off-diagonal pair has decoder alignment 0, and the planted
    interactions are not aligned. The old default filter (|cos| >= 2/sqrt(d)) tested only the diagonal;
    by default every co-active pair is tested now, and the planted edges are found."""
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(64, 8))
    g = build_graph(model, saes, toks, seq_len=8, top_k=24, progress=False)
    assert g.manifest["statistics"]["n_tested"] >= 24 * 20
    found, _ = _recovered(g)
    assert {(1, 5), (2, 7), (6, 1), (7, 3)} <= set(found)          # off-diagonal: alignment 0
    filtered = build_graph(model, saes, toks, seq_len=8, top_k=24, min_alignment=0.1, progress=False)
    assert filtered.manifest["statistics"]["n_tested"] <= 24      # the opt-in filter keeps the diagonal only


def test_weights_in_target_standard_deviations():
    """weight_sd = weight / the target's standard deviation over every token of the build, computed here
    from a plain run of the model (the identity SAE's activation is the target site's value)."""
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(64, 8))
    g = build_graph(model, saes, toks, gating=False, inputs_per_source=32, **FAST)
    t = np.asarray(model.run(toks, capture=(TGT,), stop_at=TGT).cache[TGT], np.float64).reshape(-1, 24)
    sd = np.maximum(t, 0).std(0)
    e = g.edges.to_pydict()
    assert len(e["weight"]) >= 5
    want = np.asarray(e["weight"]) / sd[np.asarray(e["target"])]
    np.testing.assert_allclose(e["weight_sd"], want, rtol=1e-4)
    assert not np.allclose(e["weight_sd"], e["weight"], rtol=0.05)         # a different unit, not a copy
