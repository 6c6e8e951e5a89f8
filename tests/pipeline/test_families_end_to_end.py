"""GPT-2 and Gemma-2 end to end, as a user with real weights runs them: tiny random checkpoints written
by HF transformers in their own format, SAEs written as SAELens (GPT-2's centred residual SAEs, a
pre-6.0 gpt2-small-res-jb style cfg) and Gemma Scope (params.npz under its release's folder layout)
publish them, then load_model / load_sae, build_graph, analyze and the explorer page."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import jfig
from jfig.explorer import explorer_payload, render_page
from tests.support.hf_reference import tiny_hf

BUILD = dict(seq_len=12, top_k=6, inputs_per_source=12, targets="all", correction="bh", alpha=0.5, tau_quantile=0.5, gating=False,
             progress=False)


def random_sae_tensors(d_in, d_sae, seed, *, threshold=False):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1 / np.sqrt(d_in), (d_in, d_sae)).astype(np.float32)
    out = {"W_enc": w, "b_enc": np.zeros(d_sae, np.float32), "W_dec": np.ascontiguousarray(w.T),
           "b_dec": np.zeros(d_in, np.float32)}
    if threshold:
        out["threshold"] = np.full(d_sae, 0.05, np.float32)
    return out


def write_jb_sae(folder, hook, d_in, d_sae, seed):
    """A pre-6.0 SAELens folder in the style of gpt2-small-res-jb (centred residual stream)."""
    folder.mkdir(parents=True)
    cfg = {"model_name": "gpt2-small", "hook_point": hook, "hook_point_layer": int(hook.split(".")[1]),
           "hook_point_head_index": None, "d_in": d_in, "d_sae": d_sae, "dtype": "torch.float32", "device": "cpu",
           "context_size": 128, "activation_fn_str": "relu", "normalize_activations": False, "prepend_bos": True,
           "model_from_pretrained_kwargs": {"center_writing_weights": True}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(random_sae_tensors(d_in, d_sae, seed), str(folder / "sae_weights.safetensors"))
    return folder


def write_gemma_scope_sae(root, layer, d_in, d_sae, seed):
    """params.npz where Gemma Scope keeps it: gemma-scope-2b-pt-res/layer_L/width_16k/average_l0_K/."""
    path = root / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_16k" / "average_l0_20" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **random_sae_tensors(d_in, d_sae, seed, threshold=True))
    return path


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_checkpoint_and_published_saes_through_build_analyze_and_view(family, tmp_path):
    hf, cfg = tiny_hf(family, n_heads=4, n_kv_heads=2 if family == "gemma2" else 4)
    hf.save_pretrained(tmp_path / "model", safe_serialization=True)
    model = jfig.load_model(tmp_path / "model")
    d = model.config.d_model
    if family == "gpt2":
        paths = [write_jb_sae(tmp_path / "saes" / f"l{layer}", f"blocks.{layer}.hook_resid_pre", d, 24, layer)
                 for layer in (0, 2)]
    else:
        paths = [write_gemma_scope_sae(tmp_path / "saes", layer, d, 24, layer) for layer in (0, 2)]
    saes = [jfig.load_sae(p) for p in paths]
    if family == "gpt2":
        assert all(s.center_input and s.architecture == "relu" for s in saes)
        assert [s.site for s in saes] == ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]
    else:
        assert all(s.architecture == "jumprelu" and not s.apply_b_dec_to_input for s in saes)
        assert [s.site for s in saes] == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    tokens = np.random.default_rng(0).integers(1, model.config.vocab_size, (24, 12)).astype(np.int32)
    graph = jfig.build_graph(model, saes, tokens, out_dir=tmp_path / "out", **BUILD)
    assert graph.manifest["model"]["family"] == family and graph.n_edges > 0
    assert {s["site"] for s in graph.manifest["saes"]} == {s.site for s in saes}
    analysis = jfig.analyze(graph, null_samples=2, community_nulls=None)
    assert analysis.write(tmp_path / "analysis").exists()
    atlas = jfig.Atlas.load(tmp_path / "out" / "atlas")
    payload = explorer_payload(graph, atlas=atlas, model=model, saes=saes)
    assert payload["cards"]["logit_top"][0] and payload["cards"]["contexts"][0]
    assert len(render_page(payload)) > 10_000
