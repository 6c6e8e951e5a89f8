"""Tiny random HF transformers models (PyTorch, CPU) of each family, as references."""
from __future__ import annotations

import numpy as np
import torch
import transformers as tf

torch.set_grad_enabled(False)


def tiny_hf(family: str, *, n_heads=4, n_kv_heads=4, seed=0, **over):
    """A tiny random HF model (eval mode, float32) of `family` and its config dict."""
    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
                             rms_norm_eps=1e-5, tie_word_embeddings=False, **over)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                              num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=16,
                              max_position_embeddings=64, query_pre_attn_scalar=24, sliding_window=4,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **over)
        model = tf.Gemma2ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=n_heads, n_positions=64, **over)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    model.float().eval()
    # Random init leaves norms at 1/0: perturb every parameter so norm weights matter too.
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    return model, cfg.to_dict()


def state_dict_numpy(model) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def hf_forward(model, tokens: np.ndarray):
    out = model(torch.as_tensor(tokens), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]
