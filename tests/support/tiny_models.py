"""Tiny random models of each family, shared by the tests."""
import jax

import jfig
from jfig.models.config import gemma2_config, gpt2_config, llama_config
from jfig.models.forward import init_params


def tiny_config(family: str = "llama", **kw):
    """A 4-layer, 16-wide config of `family` (GQA for Llama/Gemma-2, window 3 for Gemma-2); kw overrides."""
    make = {"llama": llama_config, "gpt2": gpt2_config, "gemma2": gemma2_config}[family]
    base = dict(n_layers=4, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=50, max_seq_len=32)
    if family == "gpt2":
        base["n_kv_heads"] = 4
    if family == "gemma2":
        base["sliding_window"] = 3
    base.update(kw)
    return make(**base)


def tiny_model(family: str = "llama", *, scale: float = 0.2, seed: int = 0, **kw) -> jfig.Model:
    cfg = tiny_config(family, **kw)
    return jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(seed), scale=scale))
