"""penzai's llama-like transformer with random weights, and its weights in jfig's parameter pytree.

`tiny_llamalike()` builds penzai's own model (penzai.models.transformer.variants.llamalike_common);
`jfig_model(pz_model, pz_config)` converts its parameters to a built-in jfig Llama model, so the two
forwards (penzai's and jfig's) can be compared on the same weights.
"""
import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer.variants import llamalike_common as llamalike

import jfig
from jfig.models.config import llama_config


def tiny_config(**kw) -> llamalike.LlamalikeTransformerConfig:
    """2 blocks, d_model 16, 4 query heads in 2 KV groups of d_head 4, MLP 24, vocabulary 50 (kw overrides)."""
    base = dict(num_kv_heads=2, query_head_multiplier=2, embedding_dim=16, projection_dim=4, mlp_hidden_dim=24,
                num_decoder_blocks=2, vocab_size=50, mlp_variant="swiglu", tie_embedder_and_logits=False)
    base.update(kw)
    return llamalike.LlamalikeTransformerConfig(**base)


def tiny_llamalike(seed: int = 0, **kw):
    """(penzai TransformerLM, its config), random weights; norm scales drawn around 1 so they matter."""
    cfg = tiny_config(**kw)
    model = llamalike.build_llamalike_transformer(cfg, init_base_rng=jax.random.key(seed))
    _, params = pz.unbind_params(model)
    rng = np.random.default_rng(seed)
    for p in params:                      # Parameters are shared with the model: set in place
        if p.label.endswith("scale.weights"):
            data = p.value.data_array
            p.value = pz.nx.NamedArray(named_axes=p.value.named_axes,
                                       data_array=jnp.asarray(1.0 + 0.3 * rng.standard_normal(data.shape),
                                                              data.dtype))
    return model, cfg


def jfig_config(cfg: llamalike.LlamalikeTransformerConfig) -> jfig.ModelConfig:
    n_heads = cfg.num_kv_heads * cfg.query_head_multiplier
    return llama_config(n_layers=cfg.num_decoder_blocks, d_model=cfg.embedding_dim, n_heads=n_heads,
                        n_kv_heads=cfg.num_kv_heads, d_head=cfg.projection_dim, d_mlp=cfg.mlp_hidden_dim,
                        vocab_size=cfg.vocab_size, norm_eps=cfg.rms_norm_eps, rope_theta=float(cfg.rope_wavelength),
                        max_seq_len=64)


def jfig_params(model, cfg: llamalike.LlamalikeTransformerConfig) -> dict:
    """penzai's parameters in jfig's layout (docs/architecture.md, "Parameter pytree"): weights [in, out],
    blocks stacked on a leading layer axis, query heads ordered (kv group, head within the group)."""
    _, params = pz.unbind_params(model)
    named = {p.label.removeprefix("transformer/"): p.value for p in params}
    d = cfg.embedding_dim

    def get(name, *axes):
        return jnp.asarray(named[name].unwrap(*axes), jnp.float32)

    def per_layer(l):
        b = f"block_{l}/"
        return {
            "ln1_w": get(b + "pre_attention_norm/scale.weights", "embedding"),
            "W_q": get(b + "attention/query.weights", "embedding", "head_groups", "query_heads", "projection")
            .reshape(d, -1),
            "W_k": get(b + "attention/key.weights", "embedding", "head_groups", "projection").reshape(d, -1),
            "W_v": get(b + "attention/value.weights", "embedding", "head_groups", "projection").reshape(d, -1),
            "W_o": get(b + "attention/output.weights", "head_groups", "query_heads", "projection", "embedding")
            .reshape(-1, d),
            "ln2_w": get(b + "pre_ffw_norm/scale.weights", "embedding"),
            "W_gate": get(b + "mlp/gating_linear.weights", "embedding", "neurons"),
            "W_up": get(b + "mlp/value_linear.weights", "embedding", "neurons"),
            "W_down": get(b + "mlp/out_linear.weights", "neurons", "embedding"),
        }

    layers = [per_layer(l) for l in range(cfg.num_decoder_blocks)]
    return {"embed": get("embedder.embeddings", "vocabulary", "embedding"),
            "blocks": {k: jnp.stack([p[k] for p in layers]) for k in layers[0]},
            "ln_f_w": get("final_norm/scale.weights", "embedding"),
            "unembed": get("lm_head.weights", "embedding", "vocabulary")}


def jfig_model(model, cfg) -> jfig.Model:
    """The built-in jfig model with the penzai model's weights."""
    return jfig.Model.from_config(jfig_config(cfg), jfig_params(model, cfg))


def penzai_logits(model, tokens) -> jax.Array:
    """penzai's own forward on int tokens [batch, seq]: logits [batch, seq, vocab] (jitted: penzai's
    named-axis operations are slow to dispatch one by one)."""
    run = jax.jit(lambda t: model(pz.nx.wrap(t).tag("batch", "seq")).unwrap("batch", "seq", "vocabulary"))
    return run(jnp.asarray(tokens))
