"""Run circuit-tracer's `attribute`, `prune_graph` and `compute_graph_scores` on local files; run in the
reference environment (tests/support/reference_env.py), never imported by the suite.

argv: a JSON file [{name, family, model, transcoders, kind, n_layers, input_hook, output_hook, prompt,
kwargs, json}], an output folder. Each case writes OUT/{name}.npz (and with `json`, the viewers' file
OUT/{name}.json from circuit-tracer's `create_graph_files`). The model is a local HF folder made into
circuit-tracer's TransformerLens replacement model without the network: TransformerLens's config and
weight conversion of the folder, the tokenizer from the folder.
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from transformer_lens import HookedTransformerConfig
from transformer_lens import loading_from_pretrained as loading
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from circuit_tracer.attribution.attribute import attribute
from circuit_tracer.graph import compute_graph_scores, prune_graph
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from circuit_tracer.utils.create_graph_files import create_graph_files

CPU = torch.device("cpu")


def gemma2_config(folder):
    """TransformerLens's Gemma-2 settings (it has them only for the released sizes) at this folder's sizes."""
    hf = AutoConfig.from_pretrained(folder)
    kinds = ["local" if t == "sliding_attention" else "global" for t in hf.layer_types]
    return HookedTransformerConfig(
        d_model=hf.hidden_size, d_head=hf.head_dim, n_heads=hf.num_attention_heads, d_mlp=hf.intermediate_size,
        n_layers=hf.num_hidden_layers, n_ctx=hf.max_position_embeddings, eps=hf.rms_norm_eps,
        d_vocab=hf.vocab_size, act_fn="gelu_pytorch_tanh", normalization_type="RMS", rotary_base=hf.rope_theta,
        positional_embedding_type="rotary", use_attn_scale=True, attn_scale=hf.query_pre_attn_scalar ** 0.5,
        n_key_value_heads=hf.num_key_value_heads, window_size=hf.sliding_window, use_local_attn=True,
        attn_types=kinds, attn_scores_soft_cap=hf.attn_logit_softcapping,
        output_logits_soft_cap=hf.final_logit_softcapping, gated_mlp=True, final_rms=True,
        use_normalization_before_and_after=True, original_architecture="Gemma2ForCausalLM", model_name=str(folder),
        tokenizer_name=str(folder), device="cpu", dtype=torch.float32)


def replacement_model(folder, transcoders, family):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if family == "gemma2":
        cfg = gemma2_config(folder)
        state = convert_gemma_weights(hf, cfg)
    else:
        # TransformerLens guesses the architecture from a path containing "llama" or "gemma": read the
        # folder's config through a link with a neutral name
        link = os.path.join(tempfile.mkdtemp(prefix="ref"), "model")
        os.symlink(os.path.abspath(folder), link)
        cfg = loading.get_pretrained_model_config(link, fold_ln=False, device="cpu", dtype=torch.float32)
        state = loading.get_pretrained_state_dict(folder, cfg, hf, dtype=torch.float32)
    model = TransformerLensReplacementModel(cfg, AutoTokenizer.from_pretrained(folder), move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    model._configure_replacement_model(transcoders)
    return model


def transcoders(case):
    if case["kind"] == "clt":
        return load_clt(case["transcoders"], case["input_hook"], case["output_hook"], scan="tiny", device=CPU,
                        dtype=torch.float32, lazy_decoder=False)
    paths = {i: f"{case['transcoders']}/layer_{i}.safetensors" for i in range(case["n_layers"])}
    return load_transcoder_set(paths, scan="tiny", feature_input_hook=case["input_hook"],
                               feature_output_hook=case["output_hook"], device=CPU, dtype=torch.float32,
                               lazy_encoder=False, lazy_decoder=False)


def main(spec, out):
    models = {}
    for case in json.load(open(spec)):
        t0 = time.time()
        key = (case["model"], case["transcoders"])
        if key not in models:
            models[key] = replacement_model(case["model"], transcoders(case), case["family"])
        model = models[key]
        prompt = case["prompt"] if isinstance(case["prompt"], str) else torch.tensor(case["prompt"])
        g = attribute(prompt, model, **case["kwargs"])
        pr = prune_graph(g, 0.8, 0.98)
        scores = compute_graph_scores(g)
        np.savez(f"{out}/{case['name']}.npz", adjacency=g.adjacency_matrix.numpy(),
                 active=g.active_features.numpy(), values=g.activation_values.numpy(),
                 selected=g.selected_features.numpy(), tokens=g.input_tokens.numpy(),
                 logit_tokens=np.array([t.vocab_idx for t in g.logit_targets]),
                 logit_probabilities=g.logit_probabilities.numpy(), node_mask=pr.node_mask.numpy(),
                 edge_mask=pr.edge_mask.numpy(), cumulative=pr.cumulative_scores.numpy(), scores=np.array(scores))
        if case.get("json"):
            create_graph_files(g, slug=case["name"], output_path=out, scan="tiny")
        print(case["name"], f"{time.time() - t0:.1f}s", tuple(g.adjacency_matrix.shape), flush=True)
    for model in models.values():
        model.reset_hooks(including_permanent=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
