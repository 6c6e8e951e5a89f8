"""Neuron-level interaction metrics of feature pairs at an MLP: plain (GPT-2's GELU) or gated (Llama's
SiLU, Gemma-2's GELU). docs/interactions.md defines each one.

Per unit of activation and at unit norm scale (readin.py), feature i adds u_i = N(d_i) @ W_up [d_mlp]
to the MLP's pre-activations (and N(d_i) @ W_gate for gated MLPs). Its size at neuron m is
v_im = |u_im| for a plain MLP; a gated neuron reads two numbers and v_im = sqrt(up_im² + gate_im²).

- ratio s_ijm: with ĩ the feature of the pair with the larger v at m and j̃ the other,
  s = u_j̃m / u_ĩm (plain; signed) or v_j̃m / v_ĩm (gated). The pair then writes
  a_ĩ u_ĩm (1 + (a_j̃ / a_ĩ) s) into m; s = 0 where the weaker feature does not reach m.
- expected: E[(a_j̃ / a_ĩ) |s_ijm|] over the tokens where both fire.
- hadamard: ||v_i ⊙ v_j||, the overlap of the two features' neuron footprints.
- error / neuron_error: the MLP's failure to distribute over the pair where both fire (neuron_stream.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from ..errors import JfigError
from ..saes import SAE
from .neuron_stream import stream_pairs
from .pairs import check_pairs
from .readin import check_finite, check_model_sae, feature_directions, layer_params, mm, norm_map, reading_layer

MLP_WEIGHTS = ("ln2_w", "ln2_b", "W_up", "b_up", "W_gate", "W_down", "b_down", "ln_mlp_post_w")
PAIR_METRICS = ("hadamard", "cooccurrence", "error")
NEURON_METRICS = ("ratio", "expected", "neuron_error")
DEFAULT_BUDGET = 1 << 30


@dataclass(frozen=True)
class NeuronInteractions:
    """Interaction metrics of feature pairs at the MLP of `layer` (P pairs, F = d_mlp neurons).

    Weights only: ``ratio`` [P, F] (s_ijm), ``i_dominant`` [P, F] (whether pair[0] is ĩ at m),
    ``hadamard`` [P]. From data (None without tokens): ``n_tokens``, ``cooccurrence`` [P] (fraction of
    tokens where both fire), ``expected`` [P, F], ``error`` [P] (mean ||output error|| where both fire),
    ``neuron_error`` [P, F] (mean |e_m| · ||row m of the output map||, the per-neuron terms whose sum
    bounds ``error``). Data metrics are NaN for pairs that never fire together.
    """

    site: str
    layer: int
    mlp: str                                  # "plain" | "gated"
    pairs: np.ndarray                         # [P, 2] SAE feature ids
    ratio: np.ndarray                         # [P, F]
    i_dominant: np.ndarray                    # [P, F] bool
    hadamard: np.ndarray                      # [P]
    n_tokens: int = 0
    cooccurrence: np.ndarray | None = None    # [P]
    expected: np.ndarray | None = None        # [P, F]
    error: np.ndarray | None = None           # [P]
    neuron_error: np.ndarray | None = None    # [P, F]

    def strongest(self, metric: str = "expected", k: int = 10) -> list[tuple[int, int, int, float]]:
        """The k largest entries of `metric` as (feature i, feature j, neuron, value), largest first
        (|value| for `ratio`); neuron is -1 for per-pair metrics. NaN entries are skipped."""
        if metric not in PAIR_METRICS + NEURON_METRICS:
            raise JfigError(f"metric must be one of {PAIR_METRICS + NEURON_METRICS}, got {metric!r}")
        values = getattr(self, metric)
        if values is None:
            raise JfigError(f"{metric} is measured on data: pass tokens to neuron_interactions")
        mag = np.abs(values) if metric == "ratio" else np.asarray(values)
        flat = np.where(np.isnan(mag), -np.inf, mag).reshape(-1)
        top = [t for t in np.argsort(-flat, kind="stable")[:k] if np.isfinite(flat[t])]
        per_neuron = values.ndim == 2
        rows = [(t // values.shape[1], t % values.shape[1]) if per_neuron else (t, -1) for t in top]
        return [(int(self.pairs[p, 0]), int(self.pairs[p, 1]), int(m), float(values[p, m] if per_neuron
                                                                            else values[p])) for p, m in rows]


def mlp_read_in(model, sae, features, layer: int) -> dict:
    """{"up": [n, F]} (and "gate" [n, F] for gated MLPs): each feature's pre-activation contribution per
    unit of activation at unit norm scale, N(d_i) @ W."""
    w = layer_params(model, layer, ("ln2_w", "W_up", "W_gate"))
    x = norm_map(model.config, feature_directions(sae, features), w["ln2_w"])             # [n, d]
    out = {"up": mm(x, w["W_up"])}
    if model.config.mlp == "gated":
        out["gate"] = mm(x, w["W_gate"])
    return out


def mlp_readers(model, sites) -> np.ndarray:
    """[L, d, F, c]: for each residual site, the map from a residual direction to the pre-activations of
    the first MLP that reads it, at unit norm scale (N(v) @ W_up, and N(v) @ W_gate for gated MLPs:
    c = 2), the read directions a crosscoder's interaction penalty weighs (``jfig.train_crosscoder(...,
    interaction_penalty=, readers=)``)."""
    out = []
    for site in sites:
        d = model.site_width(site) if getattr(model, "config", None) is not None else None
        eye = SAE(W_enc=jnp.eye(d or 1), b_enc=jnp.zeros(d or 1), W_dec=jnp.eye(d or 1), b_dec=jnp.zeros(d or 1),
                  site=site)                      # one unit feature per residual dimension
        cfg = check_model_sae(model, eye, "mlp_readers")
        r = mlp_read_in(model, eye, None, reading_layer(site, cfg.n_layers, "mlp"))
        out.append(np.stack([np.asarray(r[k]) for k in ("up", "gate") if k in r], axis=-1))
    return np.stack(out)


def neuron_sizes(read_in: dict):
    """v [..., F]: |up| (plain) or sqrt(up² + gate²) (gated)."""
    up, gate = read_in["up"], read_in.get("gate")
    return jnp.abs(up) if gate is None else jnp.sqrt(up * up + gate * gate)


def pair_ratios(read_in: dict):
    """(ratio [P, F], i_dominant [P, F]) from per-pair read-ins (each entry [P, 2, F])."""
    v = neuron_sizes(read_in)
    vi, vj = v[:, 0], v[:, 1]
    i_dom = vi >= vj
    if "gate" in read_in:
        big, small = jnp.where(i_dom, vi, vj), jnp.where(i_dom, vj, vi)
        return jnp.where(big > 0, small / jnp.where(big > 0, big, 1.0), 0.0), i_dom
    ui, uj = read_in["up"][:, 0], read_in["up"][:, 1]
    num, den = jnp.where(i_dom, uj, ui), jnp.where(i_dom, ui, uj)
    return jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), 0.0), i_dom


def output_row_norms(model, layer: int):
    """[F]: ||W_down[m] ⊙ γ_post|| (γ_post: Gemma-2's post-feedforward norm weight, else 1)."""
    w = layer_params(model, layer, ("W_down", "ln_mlp_post_w"))
    gamma = (model.config.norm_offset + w["ln_mlp_post_w"]) if model.config.post_norms else 1.0
    return jnp.linalg.norm(w["W_down"] * gamma, axis=-1)


def neuron_interactions(model, sae, pairs, tokens=None, *, layer: int | None = None, batch_size: int = 8,
                        skip_positions: int = 0, memory_budget: int = DEFAULT_BUDGET,
                        progress: bool = False) -> NeuronInteractions:
    """Neuron-level interaction metrics of feature `pairs` ([P, 2] ids of `sae`) at an MLP.

    The MLP is the first one that reads `sae.site` (or `layer`, a later one). Without `tokens` only
    the weight metrics are computed; with tokens ([n_seq, seq] ints) one pass over them adds the data
    metrics. Cost: weights O(P·F + n·d·F); data O(tokens·P·F) elementwise, vectorised over pairs in
    chunks that fit `memory_budget` bytes.

    >>> model = jfig.testing.tiny_model("llama")
    >>> sae = jfig.SAE.init_random(jax.random.key(0), 16, 32, "blocks.0.hook_resid_mid")
    >>> out = neuron_interactions(model, sae, [[0, 1], [2, 3]], np.ones((2, 8), np.int32))
    >>> out.ratio.shape, out.error.shape
    ((2, 32), (2,))
    """
    cfg = check_model_sae(model, sae, "neuron_interactions")
    layer = reading_layer(sae.site, cfg.n_layers, "mlp", layer)
    pairs = check_pairs(pairs, sae.d_sae, sae.site)
    w = layer_params(model, layer, MLP_WEIGHTS)
    feats, local = np.unique(pairs, return_inverse=True)
    per_feature = mlp_read_in(model, sae, feats, layer)
    for name, arr in per_feature.items():
        check_finite(f"the read-in of the SAE at {sae.site} into layer {layer}'s MLP ({name})", arr)
    read_in = {k: v[local.reshape(-1, 2)] for k, v in per_feature.items()}                # [P, 2, F]
    ratio, i_dom = pair_ratios(read_in)
    v = neuron_sizes(read_in)
    out = dict(site=sae.site, layer=layer, mlp=cfg.mlp, pairs=pairs, ratio=np.asarray(ratio),
               i_dominant=np.asarray(i_dom), hadamard=np.asarray(jnp.linalg.norm(v[:, 0] * v[:, 1], axis=-1)))
    if tokens is None:
        return NeuronInteractions(**out)
    sums = stream_pairs(model, sae, layer, w, pairs, {k: np.asarray(a) for k, a in read_in.items()}, tokens,
                        batch_size=batch_size, skip_positions=skip_positions, memory_budget=memory_budget,
                        progress=progress)
    if sums["bad"]:
        raise JfigError(f"the SAE at {sae.site} gave {int(sums['bad'])} NaN or infinite activation(s) on these "
                        f"tokens")
    both = sums["both"].astype(np.float64)
    act_ratio = np.where(out["i_dominant"], per_pair_mean(sums["r_ji"], both)[:, None],
                         per_pair_mean(sums["r_ij"], both)[:, None])
    out.update(n_tokens=sums["n_tokens"], cooccurrence=both / max(sums["n_tokens"], 1),
               expected=act_ratio * np.abs(out["ratio"]), error=per_pair_mean(sums["err"], both),
               neuron_error=per_pair_mean(sums["nerr"], both) * np.asarray(output_row_norms(model, layer))[None])
    return NeuronInteractions(**out)


def per_pair_mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """total [P, ...] / count [P], NaN where count is 0."""
    c = count.reshape((-1,) + (1,) * (total.ndim - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, total / np.where(c > 0, c, 1.0), np.nan)
