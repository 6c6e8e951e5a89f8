"""load_sae(release=, sae_id=): SAELens registry names, Gemma Scope releases and repo ids, resolved to
files in a local Hugging Face cache; the messages when something is missing."""
import io
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save as safetensors_bytes

import jfig
import jfig.saes.registry as registry
from jfig.errors import FormatError, OptionError
from jfig.models.hub_cache import NotInCacheError
from jfig.saes import fold_activation_norm_scaling_factor, load_sae, load_sae_ref
from jfig.saes.registry import REGISTRY_ENV, locate_sae, resolve_sae, sae_lens_registry_file

from tests.support.fake_hub import add_snapshot, use_cache
from tests.support.reference_env import run_reference

D_IN, D_SAE = 8, 16
GS_ID = "layer_3/width_16k/average_l0_71"

FAKE_REGISTRY = """
my-saes:
  conversion_func: null
  model: gpt2-small
  repo_id: org/my-saes
  config_overrides:
    model_from_pretrained_kwargs:
      center_writing_weights: true
  saes:
  - id: blocks.2.hook_resid_pre
    path: blocks.2.hook_resid_pre
    neuronpedia: gpt2-small/2-my
  - id: scaled
    path: v6/scaled
    norm_scaling_factor: 2.5
gemma-scope-2b-pt-res-canonical:
  conversion_func: gemma_2
  model: gemma-2-2b
  repo_id: google/gemma-scope-2b-pt-res
  saes:
  - id: layer_3/width_16k/canonical
    neuronpedia: gemma-2-2b/3-gemmascope-res-16k
    path: layer_3/width_16k/average_l0_71
gemma-scope-2b-pt-res:
  conversion_func: gemma_2
  model: gemma-2-2b
  repo_id: google/gemma-scope-2b-pt-res
  saes:
  - id: layer_3/width_16k/average_l0_14
    path: layer_3/width_16k/average_l0_14
llama-scope-thing:
  conversion_func: llama_scope
  model: meta-llama/Llama-3.1-8B
  repo_id: fnlp/Llama-Scope
  saes:
  - id: l0r_8x
    path: Llama3_1-8B-Base-L0R-8x
"""


def gemma_npz(d_in=D_IN, seed=0) -> tuple[bytes, dict]:
    """A Gemma Scope params.npz (FORMATS.md section 5 keys), small."""
    rng = np.random.default_rng(seed)
    arrays = {"W_enc": rng.normal(size=(d_in, D_SAE)), "W_dec": rng.normal(size=(D_SAE, d_in)),
              "b_enc": rng.normal(size=D_SAE) * 0.1, "b_dec": rng.normal(size=d_in) * 0.1,
              "threshold": rng.uniform(0, 0.3, size=D_SAE)}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue(), arrays


def saelens_files(folder: str, *, pre_6=False, model_name="gpt2-small", hook="blocks.2.hook_resid_pre",
                  normalize="none", seed=1) -> tuple[dict[str, bytes], dict]:
    """cfg.json + sae_weights.safetensors as SAELens 6.x writes them (FORMATS.md section 3(b)), or a
    flat pre-6.0 cfg."""
    rng = np.random.default_rng(seed)
    tensors = {"W_enc": rng.normal(size=(D_IN, D_SAE)), "b_enc": rng.normal(size=D_SAE) * 0.1,
               "W_dec": rng.normal(size=(D_SAE, D_IN)), "b_dec": rng.normal(size=D_IN) * 0.1}
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    if pre_6:
        cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cpu", "model_name": model_name,
               "hook_point": hook, "hook_point_layer": 2, "activation_fn_str": "relu",
               "apply_b_dec_to_input": True, "normalize_activations": normalize == "expected_average_only_in",
               "context_size": 128, "prepend_bos": True}
    else:
        cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": normalize, "reshape_activations": "none", "architecture": "standard",
               "metadata": {"model_name": model_name, "hook_name": hook, "hook_name_out": None,
                            "hook_head_index": None, "prepend_bos": True, "context_size": 128,
                            "dataset_path": "Skylion007/openwebtext", "model_from_pretrained_kwargs": {},
                            "neuronpedia_id": None, "sae_lens_version": "6.54.12"}}
    files = {f"{folder}/cfg.json": json.dumps(cfg).encode(), f"{folder}/sae_weights.safetensors": safetensors_bytes(tensors)}
    return files, tensors


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty cache (HF_HUB_CACHE), no registry in the environment, and sae-lens treated as absent."""
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    monkeypatch.setattr(registry, "sae_lens_registry_file", lambda: None)
    return use_cache(monkeypatch, tmp_path / "cache")


@pytest.fixture
def fake_registry(tmp_path):
    path = tmp_path / "pretrained_saes.yaml"
    path.write_text(FAKE_REGISTRY)
    return path


# ------------------------------------------------------------------------------------ Gemma Scope


@pytest.mark.parametrize("release,sae_id,site", [
    ("gemma-scope-2b-pt-res", GS_ID, "blocks.3.hook_resid_post"),
    ("gemma-scope-9b-pt-mlp", "layer_20/width_131k/average_l0_9", "blocks.20.hook_mlp_out"),
    ("gemma-scope-9b-it-res", "layer_9/width_16k/average_l0_88", "blocks.9.hook_resid_post"),
])
def test_gemma_scope_without_the_registry(hub, release, sae_id, site):
    data, arrays = gemma_npz()
    add_snapshot(hub, f"google/{release}", {f"{sae_id}/params.npz": data})
    sae = load_sae(release=release, sae_id=sae_id)
    assert sae.site == site
    assert sae.architecture == "jumprelu" and not sae.apply_b_dec_to_input
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        np.testing.assert_array_equal(np.asarray(getattr(sae, name)), arrays[name])


def test_gemma_scope_attention_site(hub):
    data, _ = gemma_npz()
    add_snapshot(hub, "google/gemma-scope-2b-pt-att", {"layer_5/width_16k/average_l0_30/params.npz": data})
    sae = load_sae(release="gemma-scope-2b-pt-att", sae_id="layer_5/width_16k/average_l0_30", hook_z_shape=(2, 4))
    assert sae.site == "blocks.5.attn.hook_z" and sae.reshape_hook_z and sae.hook_z_shape == (2, 4)


def test_gemma_scope_embedding_is_rescaled_through_the_cache_links(hub):
    """params.npz is a link into blobs/: the embedding rescaling must read the link's own path."""
    data, arrays = gemma_npz()
    add_snapshot(hub, "google/gemma-scope-2b-pt-res", {"embedding/width_4k/average_l0_6/params.npz": data})
    sae = load_sae(release="gemma-scope-2b-pt-res", sae_id="embedding/width_4k/average_l0_6")
    assert sae.site == "hook_embed"
    np.testing.assert_allclose(np.asarray(sae.W_enc), arrays["W_enc"] / math.sqrt(D_IN), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sae.W_dec), arrays["W_dec"] * math.sqrt(D_IN), rtol=1e-6)


def test_gemma_scope_site_override(hub):
    data, _ = gemma_npz()
    add_snapshot(hub, "google/gemma-scope-2b-pt-res", {f"{GS_ID}/params.npz": data})
    assert load_sae(release="gemma-scope-2b-pt-res", sae_id=GS_ID, site="blocks.3.hook_resid_pre").site == \
        "blocks.3.hook_resid_pre"


def test_gemma_scope_not_in_the_cache(hub):
    with pytest.raises(NotInCacheError) as err:
        load_sae(release="gemma-scope-2b-pt-res", sae_id=GS_ID)
    message = str(err.value)
    assert message.startswith(f"SAE gemma-scope-2b-pt-res / {GS_ID} (google/gemma-scope-2b-pt-res, folder {GS_ID}) "
                              f"is not in the local Hugging Face cache (looked in "
                              f"{hub / 'models--google--gemma-scope-2b-pt-res'}): ")
    assert f"`hf download google/gemma-scope-2b-pt-res {GS_ID}/params.npz`" in message
    assert f"into {hub} here" in message and message.endswith("jfig never downloads")


def test_gemma_scope_file_missing_from_a_cached_repo(hub):
    data, _ = gemma_npz()
    snapshot = add_snapshot(hub, "google/gemma-scope-2b-pt-res", {"layer_0/width_16k/average_l0_105/params.npz": data})
    with pytest.raises(NotInCacheError) as err:
        load_sae(release="gemma-scope-2b-pt-res", sae_id=GS_ID)
    message = str(err.value)
    assert f"{snapshot} lacks {GS_ID}/params.npz: " in message
    assert f"`hf download google/gemma-scope-2b-pt-res {GS_ID}/params.npz`" in message
    assert err.value.missing == (f"{GS_ID}/params.npz",)


def test_gemma_scope_canonical_needs_the_registry(hub):
    with pytest.raises(FormatError, match="canonical ids map to one average_l0_N folder through the SAELens "
                                          "registry, and sae-lens is not installed; install sae-lens"):
        load_sae(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_0/width_16k/canonical")


@pytest.mark.parametrize("sae_id", ["layer_3/width_17k/average_l0_71", "layer_3/average_l0_71", "layer_3"])
def test_gemma_scope_bad_id(hub, sae_id):
    with pytest.raises(FormatError, match="is not a Gemma Scope SAE folder; expected 'layer_L/width_W/average_l0_N'"):
        load_sae(release="gemma-scope-2b-pt-res", sae_id=sae_id)


def test_unknown_release_without_sae_lens(hub):
    with pytest.raises(FormatError) as err:
        load_sae(release="gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")
    message = str(err.value)
    assert "unknown SAE release 'gpt2-small-res-jb'" in message
    assert "sae-lens is not installed" in message and "install sae-lens" in message
    assert "pass the SAE's folder or file to load_sae" in message


# ------------------------------------------------------------------------------------ repo ids


def test_saelens_folder_under_a_repo_id(hub, tmp_path):
    files, tensors = saelens_files("blocks.2.hook_resid_pre")
    snapshot = add_snapshot(hub, "org/repo", files)
    sae = load_sae(release="org/repo", sae_id="blocks.2.hook_resid_pre")
    assert sae.site == "blocks.2.hook_resid_pre" and sae.architecture == "relu"
    np.testing.assert_array_equal(np.asarray(sae.W_dec), tensors["W_dec"])
    by_path = load_sae(snapshot / "blocks.2.hook_resid_pre")
    assert sae.meta == by_path.meta and sae.center_input == by_path.center_input


def test_repo_id_missing_weights(hub):
    files, _ = saelens_files("sub/sae")
    del files["sub/sae/sae_weights.safetensors"]
    snapshot = add_snapshot(hub, "org/repo", files)
    with pytest.raises(NotInCacheError) as err:
        load_sae(release="org/repo", sae_id="sub/sae")
    message = str(err.value)
    assert f"{snapshot} lacks sub/sae/sae_weights.safetensors: " in message
    assert "`hf download org/repo sub/sae/sae_weights.safetensors`" in message


def test_repo_id_holding_params_npz(hub):
    data, _ = gemma_npz()
    add_snapshot(hub, "someone/gemma-scope-copy-res", {f"{GS_ID}/params.npz": data})
    sae = load_sae(release="someone/gemma-scope-copy-res", sae_id=GS_ID)
    assert sae.architecture == "jumprelu" and sae.site == "blocks.3.hook_resid_post"


def test_revision(hub):
    files, _ = saelens_files("f", seed=1)
    add_snapshot(hub, "org/repo", files)
    files2, tensors2 = saelens_files("f", seed=2)
    add_snapshot(hub, "org/repo", files2, commit="b" * 40, ref="v2")
    np.testing.assert_array_equal(np.asarray(load_sae(release="org/repo", sae_id="f", revision="v2").W_dec),
                                  tensors2["W_dec"])


# ------------------------------------------------------------------------------------ the registry


def test_registry_resolves_ids_to_folders(hub, fake_registry):
    source = resolve_sae("gemma-scope-2b-pt-res-canonical", "layer_3/width_16k/canonical", registry=fake_registry)
    assert (source.repo_id, source.path, source.format, source.site) == (
        "google/gemma-scope-2b-pt-res", GS_ID, "gemma_scope", "blocks.3.hook_resid_post")
    assert source.files == (f"{GS_ID}/params.npz",)
    assert source.neuronpedia_id == "gemma-2-2b/3-gemmascope-res-16k"
    source = resolve_sae("my-saes", "scaled", registry=fake_registry)
    assert (source.repo_id, source.path, source.format, source.norm_scaling_factor) == (
        "org/my-saes", "v6/scaled", "saelens", 2.5)
    assert source.files == ("v6/scaled/cfg.json", "v6/scaled/sae_weights.safetensors")


def test_canonical_release_loads_through_the_registry(hub, fake_registry):
    data, arrays = gemma_npz()
    add_snapshot(hub, "google/gemma-scope-2b-pt-res", {f"{GS_ID}/params.npz": data})
    sae = load_sae(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_3/width_16k/canonical",
                   registry=fake_registry)
    assert sae.site == "blocks.3.hook_resid_post"
    assert sae.meta["neuronpedia_id"] == "gemma-2-2b/3-gemmascope-res-16k"
    np.testing.assert_array_equal(np.asarray(sae.W_enc), arrays["W_enc"])


def test_registry_from_the_environment(hub, fake_registry, monkeypatch):
    monkeypatch.setenv(REGISTRY_ENV, str(fake_registry))
    assert resolve_sae("my-saes", "blocks.2.hook_resid_pre").repo_id == "org/my-saes"


def test_registry_config_overrides_apply_as_in_saelens(hub, fake_registry):
    """The release's center_writing_weights override reaches a pre-6.0 GPT-2 SAE, which then centres its
    input; the Neuronpedia id lands in the metadata."""
    files, _ = saelens_files("blocks.2.hook_resid_pre", pre_6=True)
    snapshot = add_snapshot(hub, "org/my-saes", files)
    sae = load_sae(release="my-saes", sae_id="blocks.2.hook_resid_pre", registry=fake_registry)
    assert sae.center_input
    assert sae.meta["neuronpedia_id"] == "gpt2-small/2-my"
    assert not load_sae(snapshot / "blocks.2.hook_resid_pre").center_input


def test_registry_norm_scaling_factor_is_folded(hub, fake_registry):
    files, _ = saelens_files("v6/scaled", normalize="expected_average_only_in")
    snapshot = add_snapshot(hub, "org/my-saes", files)
    sae = load_sae(release="my-saes", sae_id="scaled", registry=fake_registry)
    expected = fold_activation_norm_scaling_factor(load_sae(snapshot / "v6/scaled"), 2.5)
    np.testing.assert_allclose(np.asarray(sae.W_enc), np.asarray(expected.W_enc), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sae.b_dec), np.asarray(expected.b_dec), rtol=1e-6)
    own = load_sae(release="my-saes", sae_id="scaled", registry=fake_registry, norm_scaling_factor=4.0)
    np.testing.assert_allclose(np.asarray(own.W_enc), np.asarray(expected.W_enc) / 2.5 * 4.0, rtol=1e-5)


def test_unknown_id_in_a_registry_release(hub, fake_registry):
    with pytest.raises(FormatError, match=r"SAE id 'blocks.3.hook_resid_pre' is not in release 'my-saes' of the "
                                          r"SAELens registry .*closest: blocks.2.hook_resid_pre"):
        load_sae(release="my-saes", sae_id="blocks.3.hook_resid_pre", registry=fake_registry)


def test_gemma_scope_id_the_registry_does_not_list(hub, fake_registry):
    """The repo pattern still names the folder; the cache decides, and the message says the registry
    does not list it."""
    with pytest.raises(NotInCacheError, match="note: the SAELens registry .* does not list 'layer_3/width_16k/"
                                              "average_l0_71' in gemma-scope-2b-pt-res"):
        load_sae(release="gemma-scope-2b-pt-res", sae_id=GS_ID, registry=fake_registry)
    data, _ = gemma_npz()
    add_snapshot(hub, "google/gemma-scope-2b-pt-res", {f"{GS_ID}/params.npz": data})
    assert load_sae(release="gemma-scope-2b-pt-res", sae_id=GS_ID, registry=fake_registry).site == \
        "blocks.3.hook_resid_post"


def test_release_in_a_format_jfig_does_not_read(hub, fake_registry):
    with pytest.raises(FormatError, match="converts with 'llama_scope', which jfig does not read; convert it with "
                                          "SAELens"):
        load_sae(release="llama-scope-thing", sae_id="l0r_8x", registry=fake_registry)


def test_unknown_release_with_a_registry(hub, fake_registry):
    with pytest.raises(FormatError, match=r"unknown SAE release 'my-sae' \(did you mean my-saes\?\): not in the "
                                          r"SAELens registry"):
        resolve_sae("my-sae", "x", registry=fake_registry)


def test_missing_registry_file(hub, tmp_path):
    with pytest.raises(FormatError, match="no such SAE registry file"):
        resolve_sae("my-saes", "x", registry=tmp_path / "nope.yaml")


def test_malformed_registry(hub, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rel:\n  saes: []\n")
    with pytest.raises(FormatError, match="release 'rel' needs 'repo_id'"):
        resolve_sae("rel", "x", registry=path)


def test_sae_lens_registry_is_found_without_importing_sae_lens(tmp_path, monkeypatch):
    package = tmp_path / "site" / "sae_lens"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('sae_lens must not be imported')\n")
    (package / "pretrained_saes.yaml").write_text(FAKE_REGISTRY)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "sae_lens", raising=False)
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    assert sae_lens_registry_file() == package / "pretrained_saes.yaml"
    assert resolve_sae("my-saes", "scaled").path == "v6/scaled"
    assert "sae_lens" not in sys.modules


def test_real_sae_lens_registry():
    """SAELens's own registry: sae-lens's pretrained_saes.yaml where it is installed, $JFIG_SAE_REGISTRY,
    or the file in the reference environment's sae-lens (tests/support/reference_env.py)."""
    path = sae_lens_registry_file() or registry.registry_file()
    if path is None:
        where = run_reference("import os, sae_lens; "
                              "print(os.path.join(os.path.dirname(sae_lens.__file__), 'pretrained_saes.yaml'))")
        path = Path(where.stdout.strip().splitlines()[-1])
        assert path.is_file(), f"sae-lens's registry is not at {path}"
    source = resolve_sae("gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical", registry=path)
    assert (source.repo_id, source.path, source.format, source.site) == (
        "google/gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_105", "gemma_scope", "blocks.0.hook_resid_post")
    assert source.neuronpedia_id == "gemma-2-2b/0-gemmascope-res-16k"
    source = resolve_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre", registry=path)
    assert (source.repo_id, source.path, source.format) == (
        "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre", "saelens")
    assert source.config_overrides["model_from_pretrained_kwargs"] == {"center_writing_weights": True}


# ------------------------------------------------------------------------------------ arguments


def test_path_and_release_together(tmp_path):
    with pytest.raises(OptionError, match="a path or release= with sae_id=, not both"):
        load_sae(tmp_path, release="org/repo", sae_id="x")


def test_release_needs_an_id():
    with pytest.raises(OptionError, match="needs both release= and sae_id="):
        load_sae(release="org/repo")


def test_nothing_to_load():
    with pytest.raises(OptionError, match="needs a path, or release= and sae_id="):
        load_sae()


def test_revision_with_a_path(tmp_path):
    with pytest.raises(OptionError, match="revision= and registry= apply to load_sae"):
        load_sae(tmp_path, revision="v2")


def test_locate_returns_the_cached_file(hub):
    data, _ = gemma_npz()
    snapshot = add_snapshot(hub, "google/gemma-scope-2b-pt-res", {f"{GS_ID}/params.npz": data})
    source, file = locate_sae("gemma-scope-2b-pt-res", GS_ID)
    assert file == snapshot / GS_ID / "params.npz" and file.is_symlink()


def test_command_line_references(tmp_path, monkeypatch):
    """--sae takes a path or RELEASE:SAE_ID; anything else is named."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    sae = jfig.SAE.init_random(jax.random.PRNGKey(0), 8, 4, "blocks.0.hook_resid_post")
    jfig.save_sae(sae, tmp_path / "s")
    assert load_sae_ref(tmp_path / "s").site == "blocks.0.hook_resid_post"
    with pytest.raises(jfig.JfigError, match="neither an existing path nor RELEASE:SAE_ID"):
        load_sae_ref(tmp_path / "missing")
    with pytest.raises(NotInCacheError, match="gemma-scope-2b-pt-res"):
        load_sae_ref("gemma-scope-2b-pt-res:layer_3/width_16k/average_l0_14")
