"""Build options: per-stage dataclasses that check themselves, flat and per-stage forms, TOML errors with lines."""
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

import jfig
from jfig.errors import OptionError
from jfig.pipeline import (AtlasOptions, BuildOptions, CandidateOptions, GatingOptions, MeasureOptions,
                           SignificanceOptions, build_graph, load_config, options_table)
from jfig.pipeline.options import parse_bytes
from tests.support.planted_graph import recovery_model

# The flat names of the options before they were split per stage: manifests and build folders use them.
FLAT_NAMES = ["seq_len", "max_sequences", "window", "position_window", "top_k", "importance", "importance_pool",
              "importance_sequences", "min_coact", "keep_low_coact", "min_alignment", "max_sources", "targets", "method",
              "positions", "clamp_at", "read", "inputs", "inputs_per_source", "block_size", "null_every", "alpha", "correction", "tau_quantile",
              "pvalue", "n_perm", "gating", "gating_max_targets", "gating_max_pairs", "gating_method", "batch_size",
              "memory_budget", "seed"]


def _err(**options) -> str:
    with pytest.raises(OptionError) as e:
        BuildOptions.from_dict(options)
    return str(e.value)


@pytest.mark.parametrize("options, message", [
    (dict(top_k="ten"), "option top_k must be an integer ≥ 1, got 'ten' (str)"),
    (dict(top_k=True), "option top_k must be an integer ≥ 1, got True (bool)"),
    (dict(top_k=2.0), "option top_k must be an integer ≥ 1, got 2.0 (float)"),
    (dict(top_k=0), "option top_k must be an integer ≥ 1, got 0"),
    (dict(alpha=5.0), "option alpha must be in (0, 1), got 5.0"),
    (dict(alpha=0), "option alpha must be in (0, 1), got 0"),
    (dict(alpha="0.05"), "option alpha must be a number in (0, 1), got '0.05' (str)"),
    (dict(alpha=float("nan")), "option alpha must be in (0, 1), got nan"),
    (dict(window=-1), "option window must be an integer ≥ 0, got -1"),
    (dict(gating="yes"), "option gating must be true or false, got 'yes' (str)"),
    (dict(gating=1), "option gating must be true or false, got 1 (int)"),
    (dict(keep_low_coact="no"), "option keep_low_coact must be true or false"),
    (dict(min_coact=1.5), "option min_coact must be in [0, 1], got 1.5"),
    (dict(importance_sequences=0), "option importance_sequences must be an integer ≥ 1, or None (all sequences)"),
    (dict(seq_len=None), "option seq_len must be an integer ≥ 1, got None (NoneType)"),
    (dict(memory_budget="2 bananas"), "option memory_budget must be a number of bytes > 0, or a string such as "
                                      "'2GB', '512MiB' or '1.5e9'"),
    (dict(memory_budget=-5), "option memory_budget must be a number of bytes > 0"),
    (dict(memory_budget=True), "option memory_budget must be a number of bytes > 0"),
    (dict(gating_max_targets=0), "option gating_max_targets must be an integer ≥ 1, got 0"),
    (dict(gating={"max_pairs": "x"}), "option gating.max_pairs must be an integer ≥ 1, got 'x' (str)"),
])
def test_bad_values_name_option_and_expectation(options, message):
    assert message in _err(**options)


@pytest.mark.parametrize("name, valid", [
    ("method", "'clamp', 'ablate', 'mean_ablate', 'jacobian', 'jacobian_direct'"),
    ("positions", "'same', 'later', 'all'"),
    ("correction", "'bonferroni', 'bh', 'none'"),
    ("importance", "'loss', 'kl', 'attribution', 'rate'"),
    ("gating_method", "'mixed', 'factorial'"),
    ("pvalue", "'robust', 'saddlepoint', 'normal', 'permutation'"),
])
def test_choices_list_the_valid_values(name, valid):
    assert f"option {name} must be one of {valid}, got 'bogus'" in _err(**{name: "bogus"})


def test_choice_typo_gets_the_nearest_choice():
    assert _err(method="clmap").endswith("did you mean 'clamp'?")
    assert _err(correction="holm").startswith("option correction must be one of")


def test_memory_budget_accepts_bytes_and_units():
    assert BuildOptions.from_dict(dict(memory_budget="2GB")).memory_budget == 2e9
    assert BuildOptions.from_dict(dict(memory_budget="512MiB")).memory_budget == 512 * 2**20
    assert BuildOptions.from_dict(dict(memory_budget="1.5e9")).memory_budget == 1.5e9
    assert BuildOptions.from_dict(dict(memory_budget=3_000_000)).memory_budget == 3e6
    assert parse_bytes("4 kib") == 4096 and parse_bytes("1e3 B") == 1000 and parse_bytes("2 XB") is None
    assert isinstance(BuildOptions.from_dict(dict(memory_budget=10**9)).memory_budget, float)


def test_unknown_names_get_the_nearest_valid_one():
    assert _err(windoww=3) == "unknown build option 'windoww'; did you mean 'window'?"
    assert _err(gating_max_target=3) == "unknown build option 'gating_max_target'; did you mean 'gating_max_targets'?"
    assert _err(atlas={"windw": 3}) == "unknown build option 'atlas.windw'; did you mean 'atlas.window'?"
    assert "top_k is a candidates option (candidates.top_k)" in _err(atlas={"top_k": 3})
    assert "seq_len is a shared option" in _err(atlas={"seq_len": 3})
    assert "known options: seq_len, max_sequences" in _err(zzzzzzzz=1)
    assert "given twice (as top_k and as candidates.top_k)" in _err(top_k=3, candidates={"top_k": 4})
    assert "option atlas must be a table of atlas options (window, position_window)" in _err(atlas=3)


def test_stage_dataclasses_check_themselves():
    with pytest.raises(OptionError, match=r"option window must be an integer ≥ 0, got -1"):
        AtlasOptions(window=-1)
    with pytest.raises(OptionError, match=r"option max_targets must be an integer ≥ 1"):
        GatingOptions(max_targets=0)
    with pytest.raises(OptionError, match=r"option alpha must be in \(0, 1\)"):
        SignificanceOptions(alpha=1.0)
    with pytest.raises(OptionError, match="option measure must be a MeasureOptions"):
        BuildOptions(measure=3)
    assert isinstance(OptionError("x"), jfig.JfigError) and isinstance(OptionError("x"), ValueError)
    opts = BuildOptions(candidates=CandidateOptions(top_k=np.int64(7)), measure={"method": "ablate"})
    assert opts.top_k == 7 and type(opts.top_k) is int and opts.method == "ablate"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.measure.block_size = 3


def test_flat_properties_read_the_stages():
    opts = BuildOptions.from_dict(dict(top_k=9, window=2, alpha=0.05, gating=False, gating_max_targets=4,
                                       gating_method="mixed", memory_budget="1GB", seed=5))
    assert (opts.top_k, opts.candidates.top_k) == (9, 9)
    assert (opts.window, opts.atlas.window) == (2, 2)
    assert opts.alpha == opts.significance.alpha == 0.05
    assert opts.gating_max_targets == opts.gating.max_targets == 4 and opts.gating_method == "mixed"
    assert not opts.gating and not opts.gating.enabled and BuildOptions().gating
    assert opts.memory_budget == opts.measure.memory_budget == 1e9 and opts.seed == 5
    assert opts.replace(top_k=3).top_k == 3 and opts.replace(top_k=3).alpha == 0.05


def test_flat_and_nested_forms_are_the_same_options():
    flat = BuildOptions.from_dict(dict(seq_len=16, top_k=6, window=3, method="ablate", alpha=0.05, gating=False,
                                       gating_max_pairs=4, memory_budget=5e8))
    nested = BuildOptions.from_dict(dict(seq_len=16, atlas={"window": 3}, candidates={"top_k": 6},
                                         measure=MeasureOptions(method="ablate", memory_budget="500MB"),
                                         significance={"alpha": 0.05}, gating={"enabled": False, "max_pairs": 4}))
    assert flat == nested and flat.to_dict() == nested.to_dict()
    assert json.dumps(flat.to_dict()) == json.dumps(nested.to_dict())        # same build fingerprint


def test_flat_dict_keeps_the_old_names_and_round_trips():
    opts = BuildOptions.from_dict(dict(top_k=5, gating=False))
    d = opts.to_dict()
    assert list(d) == FLAT_NAMES
    assert BuildOptions.from_dict(d) == opts
    json.dumps(d)
    json.dumps(dataclasses.asdict(opts))
    assert [row[0] for row in options_table()] == FLAT_NAMES


def test_docs_list_every_option():
    text = (Path(__file__).resolve().parents[2] / "docs" / "options.md").read_text()
    for name, stage, _, _ in options_table():
        assert re.search(rf"^\| `{name}` \| {stage} \|", text, re.M), name


def test_build_graph_flat_and_nested_share_a_build_folder(tmp_path):
    """The fingerprint of a build folder is the same for either form: the second call resumes it."""
    model, saes = recovery_model()
    toks = np.random.default_rng(0).integers(0, 64, size=(16, 8))
    common = dict(max_sequences=16, seq_len=8, progress=False)
    a = build_graph(model, saes, toks, out_dir=tmp_path, top_k=4, min_alignment=0.0, gating=False, null_every=0,
                    inputs_per_source=4, **common)
    state = json.loads((tmp_path / "build_state.json").read_text())
    assert state["fingerprint"]["options"]["top_k"] == 4 and a.manifest["options"]["gating"] is False
    b = build_graph(model, saes, toks, out_dir=tmp_path, candidates={"top_k": 4, "min_alignment": 0.0},
                    gating={"enabled": False}, measure={"null_every": 0, "inputs_per_source": 4}, **common)
    assert b.edges.equals(a.edges)
    with pytest.raises(jfig.JfigError, match="different inputs or options"):
        build_graph(model, saes, toks, out_dir=tmp_path, candidates={"top_k": 5, "min_alignment": 0.0},
                    gating={"enabled": False}, measure={"null_every": 0, "inputs_per_source": 4}, **common)


# ---- TOML ----------------------------------------------------------------------------------------

def _toml(tmp_path, text, name="build.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("setting, message", [
    ("alpha = 5.0", "option alpha must be in (0, 1), got 5.0"),
    ('top_k = "ten"', "option top_k must be an integer ≥ 1, got 'ten' (str)"),
    ("window = -1", "option window must be an integer ≥ 0, got -1"),
    ('gating = "yes"', "option gating must be true or false, got 'yes' (str)"),
    ("top_k = true", "option top_k must be an integer ≥ 1, got True (bool)"),
    ('memory_budget = "2 bananas"', "option memory_budget must be a number of bytes > 0"),
    ('method = "clmap"', "did you mean 'clamp'?"),
    ("windoww = 3", "unknown build option 'windoww'; did you mean 'window'?"),
])
def test_toml_errors_name_file_and_line(tmp_path, setting, message):
    text = f'model = "m"\nout = "o"\n\n[options]\nseq_len = 16\n# a comment\n{setting}\nseed = 1\n'
    with pytest.raises(OptionError) as e:
        load_config(_toml(tmp_path, text))
    assert str(e.value).startswith(f"{tmp_path / 'build.toml'}:7: ")
    assert message in str(e.value)


def test_toml_per_stage_tables_errors_and_lines(tmp_path):
    text = ('model = "m"\n[options]\nseed = 1\n[options.atlas]\nwindow = 3\n[options.significance]\n'
            'alpha = 2.0\n')
    with pytest.raises(OptionError, match=r"build.toml:7: option significance.alpha must be in \(0, 1\), got 2.0"):
        load_config(_toml(tmp_path, text))
    text = 'model = "m"\n[options.measure]\nmethod = "clamp"\n"positions" = "sometimes"\n'
    with pytest.raises(OptionError, match=r"build.toml:4: option measure.positions must be one of 'same'"):
        load_config(_toml(tmp_path, text))
    text = 'model = "m"\n[options.atlas]\nposition_window = 0\nwindw = 3\n'
    with pytest.raises(OptionError, match=r"build.toml:4: unknown build option 'atlas.windw'; did you mean "
                                          r"'atlas.window'\?"):
        load_config(_toml(tmp_path, text))
    text = 'model = "m"\n[options]\ncandidates.top_k = 0\n'           # dotted keys
    with pytest.raises(OptionError, match=r"build.toml:3: option candidates.top_k must be"):
        load_config(_toml(tmp_path, text))
    text = 'model = "m"\n[options]\ngating = { enabled = "no" }\n'   # inline tables: the table's line
    with pytest.raises(OptionError, match=r"build.toml:3: option gating.enabled must be true or false"):
        load_config(_toml(tmp_path, text))


def test_toml_unknown_top_level_key(tmp_path):
    with pytest.raises(jfig.JfigError, match=r"build.toml:3: unknown key 'modle'; did you mean 'model'\?"):
        load_config(_toml(tmp_path, 'model = "m"\nout = "o"\nmodle = 3\n'))
    with pytest.raises(jfig.JfigError, match=r"build.toml:2: unknown key 'zzz'; expected corpus, default_saes, dtype"):
        load_config(_toml(tmp_path, 'model = "m"\nzzz = 3\n'))
    with pytest.raises(jfig.JfigError, match=r"build.toml:2: saes must be a path string or a non-empty list"):
        load_config(_toml(tmp_path, 'model = "m"\nsaes = 3\n'))


def test_toml_dtype(tmp_path):
    assert load_config(_toml(tmp_path, 'model = "smollm2-135m"\ndtype = "bfloat16"\n'))["dtype"] == "bfloat16"
    with pytest.raises(jfig.JfigError, match=r"build.toml:2: dtype must be one of float32, bfloat16, float16, float64, "
                                             r"got 'bf16'"):
        load_config(_toml(tmp_path, 'model = "smollm2-135m"\ndtype = "bf16"\n'))


def test_toml_flat_and_stage_tables_give_identical_options(tmp_path):
    flat = ('model = "m"\n[options]\nseq_len = 16\ntop_k = 6\nwindow = 2\nmethod = "ablate"\nalpha = 0.05\n'
            'gating = false\ngating_max_pairs = 3\nmemory_budget = "512MiB"\n')
    nested = ('model = "m"\n[options]\nseq_len = 16\n[options.atlas]\nwindow = 2\n[options.candidates]\ntop_k = 6\n'
              '[options.measure]\nmethod = "ablate"\nmemory_budget = 536870912\n[options.significance]\nalpha = 0.05\n'
              '[options.gating]\nenabled = false\nmax_pairs = 3\n')
    a = load_config(_toml(tmp_path, flat, "flat.toml"))["options"]
    b = load_config(_toml(tmp_path, nested, "nested.toml"))["options"]
    assert a == b and BuildOptions.from_dict(a) == BuildOptions.from_dict(b)
    assert json.dumps(a) == json.dumps(b)


def test_toml_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "proj").mkdir()
    cfg = load_config(_toml(tmp_path / "proj", 'model = "model"\nsaes = ["s/a", "/abs/b"]\ncorpus = "texts"\n'
                                               'out = "o"\n'))
    monkeypatch.chdir("/")
    base = tmp_path / "proj"
    assert cfg["model"] == str(base / "model") and cfg["saes"] == [str(base / "s/a"), "/abs/b"]
    assert cfg["corpus"] == [str(base / "texts")] and cfg["out"] == str(base / "o")
    named = load_config(_toml(tmp_path, 'model = "smollm2-135m"\nsaes = "default"\ncorpus = "default"\n'))
    assert (named["model"], named["saes"], named["corpus"]) == ("smollm2-135m", "default", "default")


def test_demo_options_by_backend():
    """The demo's options are valid build options on every backend; an accelerator gets exact ablation
    importance and a larger job, the CPU the attribution estimate and the small one."""
    from jfig.pipeline import demo_options
    cpu, gpu = demo_options("cpu"), demo_options("gpu")
    assert demo_options("tpu") == gpu
    for o in (cpu, gpu):
        BuildOptions.from_dict(o)
    assert cpu["importance"] == "attribution" and gpu["importance"] == "loss"
    assert gpu["max_sequences"] > cpu["max_sequences"] and gpu["inputs_per_source"] > cpu["inputs_per_source"]
    assert gpu["importance_pool"] >= 2 * gpu["top_k"]
