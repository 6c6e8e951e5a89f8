"""The neural factorization machine (NFM) on an SAE's features: a linear map plus every pairwise
product of features through low-rank embeddings, predicting what the SAE leaves out.

For feature activations ``f [..., n]`` (an SAE's ``encode``) the NFM predicts ``y [..., d]``:

    y_hat = f @ W_lin + b  +  g(z),   z = 0.5 * ((f @ V)^2 - (f^2) @ (V^2))      [..., K]
    g(z)  = relu(z @ W_hidden) @ W_out       (hidden > 0, the seed's Linear(K, K) + ReLU + Linear(K, d))
    g(z)  = z @ W_out                        (hidden = 0, a plain projection K -> d)

``z`` is bi-interaction pooling (He & Chua 2017): ``z_k = sum_{i<j} f_i f_j V[i, k] V[j, k]``, every
pair of co-active features in one pass, ``O(n K)`` instead of ``O(n^2 K)``. ``V [n, K]`` embeds each
feature; ``K`` is the embedding size. The interaction part ``g(z)`` has no bias (the hidden layer
neither: ``g(0) = 0``), so it is exactly zero on a token with fewer than two active features and the
constant lives in ``b``; the seed's MLP had biases in both layers, which would move a constant into
the "interaction" part.

The target is named by ``target``: "error" (the SAE's reconstruction error ``x - x_hat`` at its site;
the corrected reconstruction is ``x_hat + y_hat``) or "next" (the activation ``x`` itself, the input
the next component reads; the NFM's output then replaces the reconstruction). Saved as a folder:
``nfm.json`` (sizes, site, target, metadata) + ``nfm.safetensors`` (the arrays), written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jfig.errors import FormatError, JfigError, ShapeError
from jfig.saes.sae import freeze_metadata, thaw_metadata
from jfig.saes.weight_folder import read_weight_folder, write_weight_folder

NFM_FORMAT = "jfig-nfm"
CONFIG_FILE = "nfm.json"
WEIGHTS_FILE = "nfm.safetensors"
TARGETS = ("error", "next")


def bi_interaction(f: jax.Array, V: jax.Array) -> jax.Array:
    """Bi-interaction pooling ``0.5 * ((f @ V)^2 - (f^2) @ (V^2))``: ``f [..., n]``, ``V [n, K]`` ->
    ``[..., K]``, equal to ``sum_{i<j} f_i f_j (V[i] * V[j])``."""
    s = f @ V
    return 0.5 * (s * s - (f * f) @ (V * V))


def _as_array(x):
    return None if x is None else jnp.asarray(x)


class NFM(eqx.Module):
    """A neural factorization machine from ``n`` SAE features to ``d`` outputs at one site.

    Arrays: ``W_lin [n, d]``, ``b [d]``, ``V [n, K]``, ``W_hidden [K, H]`` (None when ``hidden`` is 0),
    ``W_out [H or K, d]``. Static: ``site`` (the SAE's hook), ``target`` ("error" or "next"),
    ``metadata``. Every method takes any leading batch axes.

    >>> nfm = NFM.init(jax.random.key(0), 6, 4, 3, "blocks.0.hook_resid_post")
    >>> nfm(jnp.ones((2, 6))).shape, nfm.interaction(jnp.ones((2, 6))).shape
    ((2, 4), (2, 4))
    """

    W_lin: jax.Array = eqx.field(converter=_as_array)  # [n, d]
    b: jax.Array = eqx.field(converter=_as_array)  # [d]
    V: jax.Array = eqx.field(converter=_as_array)  # [n, K]
    W_out: jax.Array = eqx.field(converter=_as_array)  # [H or K, d]
    site: str = eqx.field(static=True)
    W_hidden: jax.Array | None = eqx.field(default=None, converter=_as_array)  # [K, H]
    target: str = eqx.field(default="error", static=True)
    metadata: tuple = eqx.field(default=(), static=True, converter=freeze_metadata)

    def __check_init__(self):
        if not isinstance(self.site, str) or not self.site:
            raise JfigError(f"NFM site must be a non-empty hook name, got {self.site!r}")
        if self.target not in TARGETS:
            raise JfigError(f"NFM target {self.target!r} is unknown; expected one of {TARGETS}")
        shape = getattr(self.W_lin, "shape", None)
        if shape is None:
            return
        if len(shape) != 2:
            raise ShapeError(f"NFM at {self.site}: W_lin has shape {tuple(shape)}; expected [n, d]")
        n, d = shape
        k = self.V.shape[-1] if self.V.ndim == 2 else None
        width = k if self.W_hidden is None else self.W_hidden.shape[-1]
        want = {"b": (d,), "V": (n, k), "W_out": (width, d)}
        if self.W_hidden is not None:
            want["W_hidden"] = (k, width)
        for name, shape_wanted in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape_wanted:
                raise ShapeError(f"NFM at {self.site}: {name} has shape {got}; expected {list(shape_wanted)} from "
                                 f"W_lin [n={n}, d={d}] and V [n, K={k}]")

    # ------------------------------------------------------------------ sizes

    @property
    def n_features(self) -> int:
        return self.W_lin.shape[0]

    @property
    def d_out(self) -> int:
        return self.W_lin.shape[1]

    @property
    def k(self) -> int:
        """The embedding size K."""
        return self.V.shape[1]

    @property
    def hidden(self) -> int:
        """The hidden layer's width (0: none, a projection K -> d)."""
        return 0 if self.W_hidden is None else self.W_hidden.shape[1]

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in (self.W_lin, self.b, self.V, self.W_out, self.W_hidden)
                   if a is not None)

    @property
    def meta(self) -> dict[str, Any]:
        return thaw_metadata(self.metadata)

    # ------------------------------------------------------------------ the function

    def _check(self, f: jax.Array) -> None:
        if f.ndim < 1 or f.shape[-1] != self.n_features:
            raise ShapeError(f"NFM at {self.site} takes feature activations [..., n={self.n_features}]; got shape "
                             f"{tuple(f.shape)}")

    def pooled(self, f: jax.Array) -> jax.Array:
        """``f [..., n] -> z [..., K]``: the bi-interaction vector (:func:`bi_interaction`)."""
        self._check(f)
        return bi_interaction(f, self.V)

    def project(self, z: jax.Array) -> jax.Array:
        """``z [..., K] -> [..., d]``: the output layer ``g`` (zero at ``z = 0``)."""
        if self.W_hidden is not None:
            z = jax.nn.relu(z @ self.W_hidden)
        return z @ self.W_out

    def linear(self, f: jax.Array) -> jax.Array:
        """``f [..., n] -> [..., d]``: the first-order part ``f @ W_lin + b``."""
        self._check(f)
        return f @ self.W_lin + self.b

    def interaction(self, f: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``f [..., n] -> [..., d]``: the second-order part ``g(z)``; ``mask [K]`` (0/1 or weights)
        multiplies ``z`` first, so ``mask = 0`` at dimension k ablates that dimension."""
        z = self.pooled(f)
        return self.project(z if mask is None else z * mask)

    def parts(self, f: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(linear(f), interaction(f))``, each ``[..., d]``; their sum is ``self(f)``."""
        return self.linear(f), self.interaction(f)

    def __call__(self, f: jax.Array) -> jax.Array:
        """``f [..., n] -> y_hat [..., d]``."""
        lin, inter = self.parts(f)
        return lin + inter

    def corrected(self, x_hat: jax.Array, f: jax.Array) -> jax.Array:
        """The site's reconstruction with the NFM: ``x_hat + y_hat`` (target "error") or ``y_hat``
        (target "next"); ``x_hat [..., d]`` the SAE's reconstruction, ``f [..., n]`` its features."""
        y = self(f)
        return x_hat + y if self.target == "error" else y

    # ------------------------------------------------------------------ construction

    @classmethod
    def init(cls, key: jax.Array, n: int, d: int, k: int, site: str, *, hidden: int | None = None,
             target: str = "error", embed_scale: float = 0.1, metadata: dict | None = None) -> "NFM":
        """A fresh NFM: ``V ~ N(0, embed_scale^2)``, ``W_hidden ~ N(0, 1/K)`` (``hidden`` defaults to
        K, the seed's ``Linear(K, K)``; 0 for none), ``W_lin``, ``b`` and ``W_out`` zero (so the first
        update moves the output layers and the embeddings follow)."""
        for name, value in (("n", n), ("d", d), ("k", k)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise JfigError(f"NFM {name} must be a positive int, got {value!r}")
        hidden = int(k) if hidden is None else hidden
        if not isinstance(hidden, (int, np.integer)) or isinstance(hidden, bool) or hidden < 0:
            raise JfigError(f"NFM hidden must be an int >= 0 (0: no hidden layer), got {hidden!r}")
        k_v, k_h = jax.random.split(key)
        V = embed_scale * jax.random.normal(k_v, (n, k), jnp.float32)
        W_hidden = jax.random.normal(k_h, (k, hidden), jnp.float32) / np.sqrt(k) if hidden else None
        return cls(W_lin=jnp.zeros((n, d)), b=jnp.zeros((d,)), V=V, W_out=jnp.zeros((hidden or k, d)), site=site,
                   W_hidden=W_hidden, target=target, metadata=metadata or {})


def nfm_params(n: int, d: int, k: int, hidden: int) -> int:
    """The number of parameters of an NFM with ``n`` features, ``d`` outputs, embedding size ``k``
    and a hidden layer of ``hidden`` (0: none): ``n d + d + n k + (k hidden + hidden d or k d)``."""
    return n * d + d + n * k + (k * hidden + hidden * d if hidden else k * d)


def save_nfm(nfm: NFM, path) -> Path:
    """Write ``nfm`` to the folder ``path`` (``nfm.json`` + ``nfm.safetensors``), atomically."""
    cfg = {"format": NFM_FORMAT, "version": 1, "site": nfm.site, "target": nfm.target, "n_features": nfm.n_features,
           "d_out": nfm.d_out, "k": nfm.k, "hidden": nfm.hidden, "metadata": nfm.meta}
    tensors = {name: np.asarray(getattr(nfm, name), np.float32) for name in ("W_lin", "b", "V", "W_out")}
    if nfm.W_hidden is not None:
        tensors["W_hidden"] = np.asarray(nfm.W_hidden, np.float32)
    return write_weight_folder(path, cfg, tensors, config_file=CONFIG_FILE, weights_file=WEIGHTS_FILE, what="an NFM")


def load_nfm(path) -> NFM:
    """Read a folder :func:`save_nfm` wrote. FormatError names a missing, corrupt or mismatched file."""
    cfg, t = read_weight_folder(path, config_file=CONFIG_FILE, weights_file=WEIGHTS_FILE, fmt=NFM_FORMAT,
                                what="an NFM")
    weights, cfg_file = Path(path) / WEIGHTS_FILE, Path(path) / CONFIG_FILE
    need = {"W_lin", "b", "V", "W_out"} | ({"W_hidden"} if cfg.get("hidden") else set())
    if need - set(t):
        raise FormatError(f"{weights}: missing arrays {sorted(need - set(t))}")
    nfm = NFM(W_lin=t["W_lin"], b=t["b"], V=t["V"], W_out=t["W_out"], W_hidden=t.get("W_hidden"), site=cfg["site"],
              target=cfg.get("target", "error"), metadata=cfg.get("metadata") or {})
    if (nfm.n_features, nfm.d_out, nfm.k, nfm.hidden) != (cfg["n_features"], cfg["d_out"], cfg["k"], cfg["hidden"]):
        raise FormatError(f"{weights}: arrays give n={nfm.n_features}, d={nfm.d_out}, K={nfm.k}, hidden={nfm.hidden}; "
                          f"{cfg_file} records {cfg['n_features']}, {cfg['d_out']}, {cfg['k']}, {cfg['hidden']}")
    return nfm
