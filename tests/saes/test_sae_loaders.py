"""Loading and saving SAEs: SAELens v6 and pre-6.0 folders, Gemma Scope params.npz, jfig's own folders."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jfig.saes.loaders as loaders
from jfig.errors import FormatError
from jfig.saes import SAE, fold_activation_norm_scaling_factor, load_sae, load_sparsity, save_sae

D_IN, D_SAE = 8, 24


def weights(seed=0, d_in=D_IN, d_sae=D_SAE, threshold=False):
    rng = np.random.default_rng(seed)
    out = {"W_enc": rng.normal(size=(d_in, d_sae)), "b_enc": rng.normal(size=d_sae) * 0.1,
           "W_dec": rng.normal(size=(d_sae, d_in)), "b_dec": rng.normal(size=d_in) * 0.1}
    if threshold:
        out["threshold"] = rng.uniform(0, 0.3, size=d_sae)
    return {key: value.astype(np.float32) for key, value in out.items()}


def write_folder(folder, cfg, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def v6_cfg(**kw):
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": "standard",
           "metadata": {"hook_name": "blocks.2.hook_resid_post", "sae_lens_version": "6.3.1"}}
    cfg.update(kw)
    return cfg


def x_in(d_in=D_IN, seed=5):
    return np.random.default_rng(seed).normal(size=(3, d_in)).astype(np.float32)


def static_config(sae):
    return {f.name: getattr(sae, f.name) for f in dataclasses.fields(sae)
            if f.metadata.get("static") and f.name != "metadata"}


# ---------------------------------------------------------------- jfig round trips

ROUND_TRIP = [
    dict(architecture="relu"),
    dict(architecture="relu", apply_b_dec_to_input=False, normalize_activations="constant_norm_rescale"),
    dict(architecture="jumprelu", normalize_activations="layer_norm"),
    dict(architecture="batchtopk"),
    dict(architecture="topk", k=3),
    dict(architecture="topk", k=5, rescale_acts_by_decoder_norm=True, center_input=True),
    dict(architecture="relu", reshape_hook_z=True, hook_z_shape=(2, 4)),
]


@pytest.mark.parametrize("config", ROUND_TRIP)
def test_save_load_round_trip(tmp_path, config):
    config = dict(config)
    arch = config.pop("architecture")
    site = "blocks.1.attn.hook_z" if config.get("reshape_hook_z") else "blocks.1.hook_resid_post"
    sae = SAE.init_random(jax.random.key(1), D_IN, D_SAE, site, arch, metadata={"model_name": "tiny"}, **config)
    sae = dataclasses.replace(sae, b_enc=sae.b_enc + 0.1, b_dec=sae.b_dec - 0.2,
                              threshold=None if sae.threshold is None else sae.threshold + 0.05)
    sparsity = np.linspace(-5, -1, D_SAE).astype(np.float32)
    folder = save_sae(sae, tmp_path / "sae", sparsity=sparsity)
    loaded = load_sae(folder)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        a, b = getattr(sae, name), getattr(loaded, name)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert static_config(loaded) == static_config(sae)
    assert loaded.meta["model_name"] == "tiny" and loaded.meta["hook_name"] == site
    np.testing.assert_array_equal(load_sparsity(folder), sparsity)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0" and cfg["dtype"] == "float32"
    assert save_sae(loaded, folder) == folder  # overwriting our own folder is fine
    assert static_config(load_sae(folder / "sae_weights.safetensors")) == static_config(sae)


def test_save_is_atomic_and_careful(tmp_path, monkeypatch):
    sae = SAE.init_random(jax.random.key(0), D_IN, D_SAE, "blocks.0.hook_resid_pre")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(loaders, "save_file", crash)
    with pytest.raises(RuntimeError):
        save_sae(sae, tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FormatError, match="notes.txt"):
        save_sae(sae, tmp_path / "mine")


# ---------------------------------------------------------------- SAELens v6 and legacy cfgs


def test_v6_folder_and_dtypes(tmp_path):
    tensors = weights(threshold=True)
    folder = write_folder(tmp_path / "jr", v6_cfg(architecture="jumprelu", dtype="torch.float16"), tensors)
    sae = load_sae(folder)
    assert (sae.site, sae.architecture, sae.W_enc.dtype, sae.center_input) == \
        ("blocks.2.hook_resid_post", "jumprelu", jnp.float32, False)
    np.testing.assert_array_equal(sae.threshold, tensors["threshold"])
    assert load_sae(folder, dtype=None).W_dec.dtype == jnp.float16
    assert load_sae(folder, site="blocks.2.hook_mlp_out").site == "blocks.2.hook_mlp_out"
    scalar = {**tensors, "threshold": np.array(0.25, np.float32)}
    sae = load_sae(write_folder(tmp_path / "scalar", v6_cfg(architecture="jumprelu"), scalar))
    np.testing.assert_array_equal(sae.threshold, np.full(D_SAE, 0.25, np.float32))


def jb_cfg(hook="blocks.0.hook_resid_pre", **kw):
    """A pre-6.0 cfg.json in the style of gpt2-small-res-jb."""
    cfg = {"model_name": "gpt2-small", "hook_point": hook, "hook_point_layer": 0, "hook_point_head_index": None,
           "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cuda", "context_size": 128,
           "activation_fn_str": "relu", "normalize_activations": False, "prepend_bos": True,
           "dataset_path": "Skylion007/openwebtext", "sae_lens_training_version": "2.1.3",
           "model_from_pretrained_kwargs": {"center_writing_weights": True}}
    cfg.update(kw)
    return cfg


def test_legacy_jb_cfg_sets_gpt2_centring(tmp_path):
    sae = load_sae(write_folder(tmp_path / "jb", jb_cfg(), weights()))
    assert (sae.site, sae.architecture, sae.apply_b_dec_to_input, sae.normalize_activations) == \
        ("blocks.0.hook_resid_pre", "relu", True, "none")
    assert sae.center_input and not sae.reshape_hook_z
    meta = sae.meta
    assert meta["model_name"] == "gpt2-small" and meta["context_size"] == 128 and "hook_layer" not in meta
    x = x_in()
    np.testing.assert_allclose(sae.encode(x), sae.encode(x + 3.0), atol=1e-4)  # centred: shift-invariant
    not_centred = load_sae(write_folder(tmp_path / "off", jb_cfg(model_from_pretrained_kwargs={}), weights()))
    assert not not_centred.center_input
    hook_z = load_sae(write_folder(tmp_path / "z", jb_cfg("blocks.0.attn.hook_z"), weights()))
    assert hook_z.reshape_hook_z and not hook_z.center_input
    other = load_sae(write_folder(tmp_path / "l", jb_cfg(model_name="gemma-2-2b"), weights()))
    assert not other.center_input
    # saving keeps the decision, whatever the heuristic would say
    resaved = load_sae(save_sae(dataclasses.replace(sae, center_input=False), tmp_path / "saved"))
    assert not resaved.center_input


def test_legacy_topk_and_boolean_normalisation(tmp_path):
    cfg = jb_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 4}, normalize_activations=True)
    folder = write_folder(tmp_path / "topk", cfg, weights())
    sae = load_sae(folder)
    assert (sae.architecture, sae.k, sae.normalize_activations) == ("topk", 4, "none")
    folded = load_sae(folder, norm_scaling_factor=0.5)
    np.testing.assert_allclose(folded.W_enc, fold_activation_norm_scaling_factor(sae, 0.5).W_enc)
    np.testing.assert_allclose(folded.b_dec, sae.b_dec / 0.5)
    assert (load_sae(write_folder(tmp_path / "n", jb_cfg(normalize_activations=None), weights()))
            .normalize_activations == "none")


def test_legacy_scaling_factor(tmp_path):
    tensors = weights()
    ones = load_sae(write_folder(tmp_path / "ones", jb_cfg(), {**tensors, "scaling_factor": np.ones(D_SAE, np.float32)}))
    np.testing.assert_array_equal(ones.W_dec, tensors["W_dec"])
    factor = np.linspace(0.5, 2.0, D_SAE).astype(np.float32)
    cfg = jb_cfg(finetuning_scaling_factor=True, model_from_pretrained_kwargs={})
    sae = load_sae(write_folder(tmp_path / "sf", cfg, {**tensors, "scaling_factor": factor}))
    x = x_in()
    f = np.maximum((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"], 0)
    old_decode = (f * factor) @ tensors["W_dec"] + tensors["b_dec"]
    np.testing.assert_allclose(sae.reconstruct(x), old_decode, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- Gemma Scope


def gemma_reference(t, x):
    pre = x @ t["W_enc"] + t["b_enc"]
    return ((pre > t["threshold"]) * np.maximum(pre, 0)) @ t["W_dec"] + t["b_dec"]


def write_npz(path, tensors, lowercase=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{(key.replace("W_", "w_") if lowercase else key): value for key, value in tensors.items()})
    return path


@pytest.mark.parametrize("kind,site", [("res", "blocks.3.hook_resid_post"), ("mlp", "blocks.3.hook_mlp_out")])
def test_gemma_scope_npz(tmp_path, kind, site):
    tensors = weights(threshold=True)
    path = write_npz(tmp_path / f"gemma-scope-2b-pt-{kind}/layer_3/width_16k/average_l0_20/params.npz", tensors,
                     lowercase=kind == "mlp")
    sae = load_sae(path)
    assert (sae.site, sae.architecture, sae.apply_b_dec_to_input, sae.normalize_activations) == \
        (site, "jumprelu", False, "none")
    x = x_in()
    np.testing.assert_allclose(sae.reconstruct(x), gemma_reference(tensors, x), rtol=1e-5, atol=1e-5)
    assert load_sae(path.parent).site == site  # the folder holding params.npz works too


def test_gemma_scope_attention_and_embedding(tmp_path):
    att = write_npz(tmp_path / "gemma-scope-2b-pt-att/layer_5/width_16k/average_l0_9/params.npz",
                    weights(d_in=2048, d_sae=4, threshold=True))
    sae = load_sae(att)
    assert (sae.site, sae.reshape_hook_z, sae.hook_z_shape) == ("blocks.5.attn.hook_z", True, (8, 256))
    assert sae.reconstruct(np.zeros((2, 8, 256), np.float32)).shape == (2, 8, 256)
    tensors = weights(threshold=True)
    emb = load_sae(write_npz(tmp_path / "gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6/params.npz", tensors))
    assert emb.site == "hook_embed"
    np.testing.assert_allclose(emb.W_enc, tensors["W_enc"] / math.sqrt(D_IN), rtol=1e-6)
    np.testing.assert_allclose(emb.W_dec, tensors["W_dec"] * math.sqrt(D_IN), rtol=1e-6)


def test_gemma_scope_needs_a_site_when_the_path_has_none(tmp_path):
    path = write_npz(tmp_path / "somewhere/params.npz", weights(threshold=True))
    with pytest.raises(FormatError, match="pass site="):
        load_sae(path)
    assert load_sae(path, site="blocks.0.hook_resid_post").site == "blocks.0.hook_resid_post"


# ---------------------------------------------------------------- errors


def test_truncated_safetensors(tmp_path):
    folder = write_folder(tmp_path / "sae", v6_cfg(), weights())
    file = folder / "sae_weights.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"sae_weights\.safetensors.*truncated or corrupt"):
        load_sae(folder)
    file.write_bytes(b"\x05")
    with pytest.raises(FormatError, match="truncated or corrupt"):
        load_sae(folder)


def test_corrupt_npz(tmp_path):
    path = write_npz(tmp_path / "gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_5/params.npz",
                     weights(threshold=True))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"params\.npz.*truncated or corrupt"):
        load_sae(path)
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(FormatError, match=r"params\.npz.*truncated or corrupt"):
        load_sae(path)


def test_cfg_errors(tmp_path):
    cfg = v6_cfg()
    del cfg["d_in"]
    with pytest.raises(FormatError, match=r"cfg\.json.*'d_in'"):
        load_sae(write_folder(tmp_path / "a", cfg, weights()))
    folder = write_folder(tmp_path / "b", v6_cfg(), weights())
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"cfg\.json: not valid JSON"):
        load_sae(folder)
    for arch, message in [("gated", "gated SAEs are not supported"), ("transcoder", "transcoders are not supported"),
                          ("mystery", "'mystery'")]:
        with pytest.raises(FormatError, match=rf"'architecture'.*{message}"):
            load_sae(write_folder(tmp_path / arch, v6_cfg(architecture=arch), weights()))
    cfg = v6_cfg(metadata={"sae_lens_version": "6.0.0"})
    with pytest.raises(FormatError, match="pass site="):
        load_sae(write_folder(tmp_path / "nosite", cfg, weights()))


def test_tensor_errors(tmp_path):
    bad = {**weights(), "W_dec": np.zeros((D_SAE, D_IN + 1), np.float32)}
    with pytest.raises(FormatError, match=r"sae_weights\.safetensors: tensor 'W_dec' has shape \[24, 9\]; expected \[24, 8\]"):
        load_sae(write_folder(tmp_path / "shape", v6_cfg(), bad))
    missing = {key: value for key, value in weights().items() if key != "b_dec"}
    with pytest.raises(FormatError, match="'b_dec' is missing"):
        load_sae(write_folder(tmp_path / "missing", v6_cfg(), missing))
    with pytest.raises(FormatError, match="'threshold' is missing"):
        load_sae(write_folder(tmp_path / "thr", v6_cfg(architecture="jumprelu"), weights()))
    folder = write_folder(tmp_path / "noweights", v6_cfg(), weights())
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FormatError, match=r"sae_weights\.safetensors: missing"):
        load_sae(folder)
    with pytest.raises(FormatError, match="no such file"):
        load_sae(tmp_path / "nowhere")
