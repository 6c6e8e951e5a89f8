"""The local replacement model of one prompt, linear in its inputs, and its backward passes.

Around one prompt the model is made linear: attention patterns and norm scales are frozen
(`forward(..., freeze=True)`), each MLP output is held at its value (gradients do not pass the MLP),
and a transcoder's skip connection, when it has one, is the MLP's only linear path. The inputs of this
linear model are the token embeddings and one additive input at every MLP output; every node writes
through one of them (a feature through its decoder rows, an error node as itself). A backward pass
from one target (a transcoder's input contracted with an encoder row, or the final norm's output at
the last position contracted with a logit direction) gives its gradient at all of them at once.

Shapes: s positions, d d_model, L layers, R layers with a transcoder (readers), B targets per batch.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..models.forward import forward
from ..models.layers import norm
from ..sites import block_site


class Layout(NamedTuple):
    """Which layers carry a transcoder (static: part of the jit key).

    readers: the layers whose MLP a transcoder replaces, ascending (one transcoder each, in this order);
    skips: reader indices whose transcoder has a skip connection; writes: (reader index, decoder
    index k, layer written) for every decoder of every transcoder (a cross-layer transcoder writes its
    own layer and each later one)."""

    n_layers: int
    readers: tuple
    skips: tuple
    writes: tuple


class NormSpec(NamedTuple):
    """The fields of a model configuration that `jfig.models.layers.norm` reads."""

    norm: str
    norm_eps: float
    norm_offset: float


def frozen_input(tc, x):
    """The transcoder's input from its site's activations x [..., d], the norm's scale frozen."""
    if tc.input_norm != "model":
        return tc.prepare_input(x)
    spec = NormSpec("rms" if tc.norm_kind == "rms" else "layer", tc.norm_eps, tc.norm_offset)
    return norm(spec, x.astype(tc.W_enc.dtype), tc.norm_w, tc.norm_b, freeze=True).astype(tc.W_enc.dtype)


def mlp_sites(n_layers: int) -> tuple:
    """hook_embed, then each layer's hook_resid_mid and hook_mlp_out: what the clean run captures."""
    return ("hook_embed",) + tuple(block_site(l, k) for l in range(n_layers)
                                   for k in ("hook_resid_mid", "hook_mlp_out"))


@partial(jax.jit, static_argnames=("layout",))
def setup(tcs, cache, *, layout: Layout):
    """From a clean run's cache ({site: [1, s, ...]}, `mlp_sites`): each reader's activations
    [s, d_tc] (position 0 zeroed), the error nodes' vectors [L, s, d] (MLP output minus the
    reconstruction; position 0 zeroed) and the token nodes' vectors [s, d] (the embeddings)."""
    L = layout.n_layers
    mlp_out = jnp.stack([cache[block_site(l, "hook_mlp_out")][0] for l in range(L)])
    acts = []
    recon = jnp.zeros_like(mlp_out)
    for r, (tc, layer) in enumerate(zip(tcs, layout.readers)):
        x = cache[block_site(layer, "hook_resid_mid")][0]
        a = tc.encode(x).at[0].set(0.0)
        acts.append(a)
        recon = recon.at[layer].add(tc.b_dec)
        if r in layout.skips:
            recon = recon.at[layer].add(tc.prepare_input(x) @ tc.W_skip)
    for r, k, layer in layout.writes:
        recon = recon.at[layer].add(acts[r] @ tcs[r].decoder_rows(k))
    errors = (mlp_out - recon).at[:, 0].set(0.0)
    return tuple(acts), errors, cache["hook_embed"][0]


class LinearHook:
    """Makes the forward the prompt's linear replacement: adds the inputs `d_embed` [s, d] at
    hook_embed and `d_mlp` [L, s, d] at every hook_mlp_out, holds each MLP output at its value
    (plus the skip connection's linear path) and records the readers' residuals."""

    def __init__(self, tcs, layout: Layout, d_embed, d_mlp):
        self.tcs, self.layout, self.d_embed, self.d_mlp = tcs, layout, d_embed, d_mlp
        self.reader_of = {layer: r for r, layer in enumerate(layout.readers)}
        self.resid = {}
        self.sites = frozenset(["hook_embed"] + [block_site(l, "hook_resid_mid") for l in layout.readers]
                               + [block_site(l, "hook_mlp_out") for l in range(layout.n_layers)])

    def __call__(self, site: str, x):
        if site == "hook_embed":
            return x + self.d_embed[None].astype(x.dtype)
        layer = int(site.split(".")[1])
        if site.endswith("hook_resid_mid"):
            self.resid[layer] = x
            return x
        out = jax.lax.stop_gradient(x)
        r = self.reader_of.get(layer)
        if r is not None and r in self.layout.skips:
            tc = self.tcs[r]
            skip = frozen_input(tc, self.resid[layer]) @ tc.W_skip
            out = out + (skip - jax.lax.stop_gradient(skip)).astype(x.dtype)
        return out + self.d_mlp[layer][None].astype(x.dtype)


@partial(jax.jit, static_argnames=("cfg", "layout"))
def gradients(params, tcs, tokens, errors, embeds, cot_reader, cot_pos, cot_vec, cot_final, *, cfg, layout: Layout):
    """One backward pass per target of a batch of B, through the linear replacement of the prompt
    `tokens` [1, s].

    A target is reader `cot_reader` [B] at position `cot_pos` [B] contracted with `cot_vec` [B, d]
    (an index R or more: none), plus the final norm's output at the last position contracted with
    `cot_final` [B, d]. Returns the gradients at every MLP output, flattened to [B, L*s, d] (row
    l*s + p), and the rows of the error and token nodes [B, L*s + s] (gradient . vector)."""
    s, d = tokens.shape[1], cfg.d_model
    L, R = layout.n_layers, len(layout.readers)

    def linear(d_embed, d_mlp):
        hook = LinearHook(tcs, layout, d_embed, d_mlp)
        x = forward(cfg, params, tokens=tokens, hook=hook, logits=False, freeze=True)
        x_in = jnp.stack([frozen_input(tc, hook.resid[layer][0]) for tc, layer in zip(tcs, layout.readers)])
        h = norm(cfg, x[0, -1], params["ln_f_w"], params.get("ln_f_b"), freeze=True)
        return x_in, h

    zeros = (jnp.zeros((s, d), jnp.float32), jnp.zeros((L, s, d), jnp.float32))
    (x_in, h), pullback = jax.vjp(linear, *zeros)
    at = (jax.nn.one_hot(cot_reader, R, dtype=x_in.dtype)[:, :, None, None]
          * jax.nn.one_hot(cot_pos, s, dtype=x_in.dtype)[:, None, :, None])
    cot_x = at * cot_vec[:, None, None, :].astype(x_in.dtype)
    g_embed, g_mlp = jax.vmap(pullback)((cot_x, cot_final.astype(h.dtype)))
    err_rows = jnp.einsum("blsd,lsd->bls", g_mlp, errors).reshape(-1, L * s)
    tok_rows = jnp.einsum("bsd,sd->bs", g_embed, embeds)
    return g_mlp.reshape(-1, L * s, d), jnp.concatenate([err_rows, tok_rows], axis=1)


@jax.jit
def contract(g_flat, rows, vecs):
    """Edges from C decoder writes: g_flat [B, L*s, d] at rows [C] (layer*s + position) dotted with
    vecs [C, d] (activation x decoder row) -> [B, C]."""
    return jnp.einsum("bcd,cd->bc", g_flat[:, rows], vecs)
