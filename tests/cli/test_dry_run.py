"""`jfig build CONFIG.toml --dry-run`: checks every input, prints options and estimates, writes nothing."""
import os

import jax
import pytest

import jfig
from jfig.cli import main
from jfig.pipeline import BuildOptions, estimate, plan_build

CONFIG = '''
model = "model"
saes = ["saes/l0", "saes/l2"]
corpus = ["texts"]
out = "dry-out"
[options]
seq_len = 16
max_sequences = 32
[options.candidates]
top_k = 6
[options.measure]
inputs_per_source = 8
memory_budget = "512MiB"
[options.gating]
enabled = false
'''


def _files(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


def _write(root, name, text):
    p = root / name
    p.write_text(text)
    return p


def test_dry_run_prints_options_and_estimates_and_writes_nothing(project, capsys):
    root, _ = project
    cfg = _write(root, "dry.toml", CONFIG)
    before = _files(root)
    assert main(["build", str(cfg), "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert _files(root) == before                   # nothing written, anywhere in the project
    assert not (root / "dry-out").exists()
    for text in ("every check passed", "[options.candidates]", "top_k = 6", "[options.measure]",
                 "inputs_per_source = 8", "memory_budget = 536870912.0", "[options.gating]", "enabled = false",
                 "seq_len = 16", "blocks.0.hook_resid_post: d_in 32, d_sae 16", "blocks.2.hook_resid_post",
                 "# importance_pool not set: 4 × top_k", "candidate pairs", "edited runs", "compute", "FLOP/s", "peak memory", "folder "):
        assert text in out, (text, out)
    # two sites two layers apart, window 5: one site pair, top_k² = 36 pairs; 6 sources × 8 inputs × 2 levels
    assert "candidate pairs     ≤ 36" in out
    assert "≤ 96 = sources × 8 inputs × 2 level(s)" in out


def test_estimate_bounds(project):
    root, _ = project
    plan = plan_build(_write(root, "dry.toml", CONFIG))
    assert plan.problems == []
    est = estimate(plan)
    assert (est.site_pairs, est.candidate_pairs, est.sources, est.blocks) == (1, 36, 6, 1)
    assert est.gating_interventions == 0 and est.flops > 0 and est.seconds > 0
    assert est.peak_bytes > plan.options.memory_budget + est.weights_bytes
    wide = estimate(plan_build(_write(root, "dry2.toml", CONFIG.replace("top_k = 6", "top_k = 100"))))
    assert wide.candidate_pairs == 16 * 16                      # bounded by d_sae
    narrow = estimate(plan_build(_write(root, "dry3.toml", CONFIG + "[options.atlas]\nwindow = 1\n")))
    assert narrow.candidate_pairs == 0                          # layers 0 and 2 are outside a window of 1
    dense = estimate(plan_build(_write(root, "dry4.toml", CONFIG.replace("top_k = 6", "top_k = 6\ntargets = \"all\""))))
    assert (dense.candidate_pairs, dense.sources) == (6 * 16, 6)   # 6 sources x every feature of the later SAE


def test_dry_run_missing_sae_fails_with_exit_2(project, capsys):
    root, _ = project
    cfg = _write(root, "dry.toml", CONFIG.replace('"saes/l2"', '"saes/nowhere"'))
    assert main(["build", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(root / "saes" / "nowhere") in err and "no such file or folder" in err
    assert not (root / "dry-out").exists()


def test_dry_run_collects_every_problem(project, capsys):
    root, _ = project
    text = (CONFIG.replace('"texts"', '"no-texts"').replace('model = "model"', 'model = "no-model"'))
    assert main(["build", str(_write(root, "dry.toml", text)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "no-model" in err and "no-texts" in err


def test_dry_run_sae_of_another_model(project, capsys):
    root, _ = project
    jfig.save_sae(jfig.SAE.init_random(jax.random.PRNGKey(3), 8, 4, "blocks.0.hook_resid_post"), root / "saes" / "narrow")
    jfig.save_sae(jfig.SAE.init_random(jax.random.PRNGKey(3), 32, 4, "blocks.9.hook_resid_post"), root / "saes" / "deep")
    text = CONFIG.replace('"saes/l2"', '"saes/narrow", "saes/deep"')
    assert main(["build", str(_write(root, "dry.toml", text)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "d_in 8 does not match site blocks.0.hook_resid_post width 32" in err
    assert "blocks.9.hook_resid_post is not in the model" in err


def test_dry_run_bad_option_names_file_and_line(project, capsys):
    root, _ = project
    text = CONFIG.replace("top_k = 6", "top_k = 0")
    line = text.splitlines().index("top_k = 0") + 1
    cfg = _write(root, "dry.toml", text)
    assert main(["build", str(cfg), "--dry-run"]) == 2
    assert f"{cfg}:{line}: option candidates.top_k must be an integer ≥ 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_dry_run_unwritable_out(project, capsys, tmp_path):
    root, _ = project
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        cfg = _write(root, "dry.toml", CONFIG.replace('out = "dry-out"', f'out = "{locked / "graph"}"'))
        assert main(["build", str(cfg), "--dry-run"]) == 2
        assert "cannot be written" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_flat_and_per_stage_config_give_one_fingerprint(project):
    """The build folder's fingerprint stores the flat options: the same for either form of the config."""
    root, _ = project
    flat = CONFIG.split("[options]")[0] + ('[options]\nseq_len = 16\nmax_sequences = 32\ntop_k = 6\n'
                                            'inputs_per_source = 8\nmemory_budget = 536870912\ngating = false\n')
    a = jfig.pipeline.load_config(_write(root, "flat.toml", flat))["options"]
    b = jfig.pipeline.load_config(_write(root, "nested.toml", CONFIG))["options"]
    assert a == b and BuildOptions.from_dict(a) == BuildOptions.from_dict(b)
