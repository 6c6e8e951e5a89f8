"""Acausal crosscoders: one dictionary over the residual stream at several layers at once.

A crosscoder reads every layer's activations ``x [..., L, d]`` together and reconstructs each layer
from one set of latents:

    f = act( sum_l (x_l - b_dec_l) W_enc_l + b_enc )           [..., n]
    x_hat_l = f W_dec_l + b_dec_l                                [..., d] for each layer l

which is an SAE on the stacked vector ``concat_l x_l`` (the encoder subtracts ``b_dec`` first, as
jfig's SAEs do by default). :class:`Crosscoder` holds that flat SAE and the layer structure. A
feature's decoder rows ``W_dec[i, l]`` say what it writes at each layer; its **home layer** (where it
is clamped when measured as a source, and where it sits in a graph) is the layer of its largest
decoder row relative to that layer's typical activation norm (``layer_norms``, recorded by training;
the residual grows with depth, so raw norms would put almost every feature at the last layer). Saved as a folder: ``crosscoder.json`` + ``crosscoder.safetensors`` (arrays in the
stacked shapes below), written atomically.
"""
from __future__ import annotations

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jfig.errors import JfigError, ShapeError
from jfig.saes.sae import SAE
from jfig.saes.weight_folder import read_weight_folder, write_weight_folder
from jfig.sites import parse_site, site_key

CROSSCODER_FORMAT = "jfig-crosscoder"
CONFIG_FILE = "crosscoder.json"
WEIGHTS_FILE = "crosscoder.safetensors"
FLAT_SITE = "crosscoder"   # the site name of the flat SAE inside (never a model site)


class Crosscoder(eqx.Module):
    """A crosscoder over ``sites`` (L residual sites in forward order, one width d).

    Arrays (stacked shapes): ``W_enc [L, d, n]``, ``b_enc [n]``, ``W_dec [n, L, d]``, ``b_dec [L, d]``,
    ``threshold [n]`` (jumprelu). ``architecture`` "relu" | "jumprelu" | "topk" (``k`` kept per token).
    ``layer_norms``: each layer's mean activation norm on the training data (None: unknown, raw decoder
    norms decide home layers). ``metadata``: a JSON-able dict (training config and metrics)."""

    sae: SAE
    sites: tuple[str, ...] = eqx.field(static=True)
    d_model: int = eqx.field(static=True)
    layer_norms: tuple[float, ...] | None = eqx.field(static=True)

    def __init__(self, W_enc, b_enc, W_dec, b_dec, sites, *, threshold=None, architecture: str = "relu",
                 k: int | None = None, layer_norms=None, metadata: dict | None = None):
        W_enc, W_dec, b_dec = jnp.asarray(W_enc), jnp.asarray(W_dec), jnp.asarray(b_dec)
        sites = tuple(str(s) for s in sites)
        if W_enc.ndim != 3 or W_dec.ndim != 3 or b_dec.ndim != 2:
            raise ShapeError(f"a crosscoder has W_enc [L, d, n], W_dec [n, L, d] and b_dec [L, d]; got shapes "
                             f"{W_enc.shape}, {W_dec.shape} and {b_dec.shape}")
        L, d, n = W_enc.shape
        if W_dec.shape != (n, L, d) or b_dec.shape != (L, d) or jnp.shape(b_enc) != (n,):
            raise ShapeError(f"crosscoder arrays disagree: W_enc {W_enc.shape} needs W_dec {(n, L, d)}, b_dec "
                             f"{(L, d)} and b_enc {(n,)}; got {W_dec.shape}, {b_dec.shape} and {jnp.shape(b_enc)}")
        check_crosscoder_sites(sites, L)
        if layer_norms is not None:
            layer_norms = tuple(float(v) for v in np.asarray(layer_norms, np.float64).reshape(-1))
            if len(layer_norms) != L or not all(np.isfinite(v) and v > 0 for v in layer_norms):
                raise ShapeError(f"layer_norms must be {L} positive numbers (one per site), got {layer_norms}")
        self.sites, self.d_model, self.layer_norms = sites, int(d), layer_norms
        self.sae = SAE(W_enc=W_enc.reshape(L * d, n), b_enc=b_enc, W_dec=W_dec.reshape(n, L * d),
                       b_dec=b_dec.reshape(L * d), site=FLAT_SITE, threshold=threshold, architecture=architecture,
                       k=k, metadata=metadata or {})

    # ------------------------------------------------------------------ shapes and weights
    @property
    def n_layers(self) -> int:
        return len(self.sites)

    @property
    def d_sae(self) -> int:
        return self.sae.d_sae

    @property
    def architecture(self) -> str:
        return self.sae.architecture

    @property
    def meta(self) -> dict:
        return self.sae.meta

    @property
    def W_enc(self) -> jax.Array:
        return self.sae.W_enc.reshape(self.n_layers, self.d_model, self.d_sae)

    @property
    def W_dec(self) -> jax.Array:
        return self.sae.W_dec.reshape(self.d_sae, self.n_layers, self.d_model)

    @property
    def b_dec(self) -> jax.Array:
        return self.sae.b_dec.reshape(self.n_layers, self.d_model)

    def decoder_norms(self) -> jax.Array:
        """[n, L]: the norm of each feature's decoder row at each layer."""
        return jnp.linalg.norm(self.W_dec, axis=-1)

    def relative_decoder_norms(self) -> jax.Array:
        """[n, L]: decoder row norms divided by each layer's mean activation norm (raw without
        ``layer_norms``): how much of a typical activation the feature writes at each layer."""
        norms = self.decoder_norms()
        return norms if self.layer_norms is None else norms / jnp.asarray(self.layer_norms)

    def home_layers(self) -> np.ndarray:
        """int [n]: each feature's home layer index (into ``sites``): its largest relative decoder row."""
        return np.asarray(jnp.argmax(self.relative_decoder_norms(), axis=-1))

    def home_sites(self) -> tuple[str, ...]:
        """Each feature's home site, [n]."""
        return tuple(self.sites[i] for i in self.home_layers())

    def layer_index(self, site: str) -> int:
        if site not in self.sites:
            raise JfigError(f"{site!r} is not a site of this crosscoder; it reads {list(self.sites)}")
        return self.sites.index(site)

    def decoder_view(self, site: str) -> SAE:
        """An SAE at ``site`` whose decoder is the crosscoder's decoder into that layer (``W_dec[:, l]``,
        ``b_dec[l]``), for weight-only uses: decoder cosines (``match_features(..., method="decoder")``)
        and the interaction metrics that read decoder directions. Its encoder is the decoder's
        transpose, not the crosscoder's: the crosscoder's activations need every layer (:meth:`encode`)."""
        l = self.layer_index(site)
        W = self.W_dec[:, l]
        return SAE(W_enc=W.T, b_enc=jnp.zeros(self.d_sae), W_dec=W, b_dec=self.b_dec[l], site=site,
                   architecture="relu", metadata={"crosscoder_view": True})

    # ------------------------------------------------------------------ encode / decode
    def stack(self, xs: jax.Array) -> jax.Array:
        """``[..., L, d] -> [..., L * d]`` after checking the shape."""
        if xs.ndim < 2 or tuple(xs.shape[-2:]) != (self.n_layers, self.d_model):
            raise ShapeError(f"crosscoder inputs have shape {tuple(xs.shape)}; expected [..., L={self.n_layers}, "
                             f"d={self.d_model}] (one row per site of {list(self.sites)})")
        return xs.reshape(*xs.shape[:-2], self.n_layers * self.d_model)

    def pre_activations(self, xs: jax.Array) -> jax.Array:
        """``xs [..., L, d] -> [..., n]``: the encoder before the activation function."""
        return self.sae.pre_activations(self.stack(xs))

    def activation(self, pre: jax.Array) -> jax.Array:
        return self.sae.activation(pre)

    def encode(self, xs: jax.Array) -> jax.Array:
        """``xs [..., L, d] -> f [..., n]``."""
        return self.sae.encode(self.stack(xs))

    def decode(self, f: jax.Array) -> jax.Array:
        """``f [..., n] -> x_hat [..., L, d]``."""
        out = self.sae.decode(f)
        return out.reshape(*out.shape[:-1], self.n_layers, self.d_model)

    def reconstruct(self, xs: jax.Array) -> jax.Array:
        return self.decode(self.encode(xs))


def check_crosscoder_sites(sites: tuple[str, ...], n_layers: int) -> None:
    """L distinct residual-stream sites in forward order."""
    if len(sites) != n_layers:
        raise ShapeError(f"the crosscoder has {n_layers} layers of weights but {len(sites)} sites {list(sites)}")
    for s in sites:
        parsed = parse_site(s)
        if parsed.layer < 0 or not parsed.local.startswith("hook_resid"):
            raise JfigError(f"crosscoder site {s!r} is not a residual-stream site; expected "
                            f"blocks.L.hook_resid_pre / hook_resid_mid / hook_resid_post")
    keys = [site_key(s) for s in sites]
    if len(set(sites)) != len(sites) or keys != sorted(keys):
        raise JfigError(f"crosscoder sites must be distinct and in forward order; got {list(sites)}")


def save_crosscoder(cc: Crosscoder, path) -> Path:
    """Write ``cc`` to the folder ``path`` (config + safetensors), atomically."""
    cfg = {"format": CROSSCODER_FORMAT, "version": 1, "sites": list(cc.sites), "d_model": cc.d_model,
           "d_sae": cc.d_sae, "architecture": cc.architecture, "k": cc.sae.k,
           "layer_norms": list(cc.layer_norms) if cc.layer_norms is not None else None, "metadata": cc.meta}
    tensors = {"W_enc": np.asarray(cc.W_enc), "b_enc": np.asarray(cc.sae.b_enc), "W_dec": np.asarray(cc.W_dec),
               "b_dec": np.asarray(cc.b_dec)}
    if cc.sae.threshold is not None:
        tensors["threshold"] = np.asarray(cc.sae.threshold)
    return write_weight_folder(path, cfg, tensors, config_file=CONFIG_FILE, weights_file=WEIGHTS_FILE,
                               what="a crosscoder")


def load_crosscoder(path) -> Crosscoder:
    """Read a folder :func:`save_crosscoder` wrote. FormatError names a missing or corrupt file."""
    cfg, t = read_weight_folder(path, config_file=CONFIG_FILE, weights_file=WEIGHTS_FILE, fmt=CROSSCODER_FORMAT,
                                what="a crosscoder", required=("W_enc", "b_enc", "W_dec", "b_dec"))
    return Crosscoder(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], cfg["sites"], threshold=t.get("threshold"),
                      architecture=cfg["architecture"], k=cfg.get("k"), layer_norms=cfg.get("layer_norms"),
                      metadata=cfg.get("metadata") or {})
