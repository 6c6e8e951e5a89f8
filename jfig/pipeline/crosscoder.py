"""A crosscoder's interaction graph, and how it lines up with per-layer SAEs' graph.

    graph = crosscoder_graph(model, crosscoder, tokens, sources_per_layer=32)
    matching = crosscoder_matching(crosscoder, saes)            # {site: SAE id -> crosscoder id}
    diff = jfig.diff_graphs(sae_graph, graph, matching=matching)

Nodes are (home site, crosscoder feature id): each feature sits at the layer of its largest decoder
row, where it is clamped (``jfig.measure.crosscoder``). Edges are tested as a build tests a per-layer
SAE graph: per-input effects, the robust p-value (sign-flip saddle point and skewness-corrected t),
Bonferroni or BH over every tested pair, and a size threshold τ per (source site, target site) from
the same measurement along random directions with the decoder rows' norms.
"""
from __future__ import annotations

import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..errors import JfigError
from ..graph import InteractionGraph
from ..graph.assemble import EdgeRecords, NodeInfo, assemble_graph
from ..measure.crosscoder import check_crosscoder, crosscoder_effects, stacked_values
from ..measure.prefix import clean_prefix
from ..saes import Crosscoder, match_features
from ..saes.matching import empty_moments, fold_moments, moments_correlation, mutual_best
from ..stats import CORRECTIONS, decide, pair_thresholds, robust_pvalues

log = logging.getLogger(__name__)


def busiest_sources(crosscoder: Crosscoder, firing: np.ndarray, per_layer: int) -> np.ndarray:
    """Up to ``per_layer`` features per home layer (all but the last, which has no later targets), the
    most often active first; never-active features are left out. firing [n]: each feature's firing rate."""
    homes = crosscoder.home_layers()
    out = []
    for h in range(crosscoder.n_layers - 1):
        ids = np.flatnonzero((homes == h) & (firing > 0))
        out.append(ids[np.argsort(-firing[ids], kind="stable")[:per_layer]])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def crosscoder_graph(model, crosscoder: Crosscoder, tokens, *, sources=None, sources_per_layer: int = 32,
                     inputs_per_source: int = 32, method: str = "clamp", read: str = "pre", alpha: float = 0.01,
                     correction: str = "bonferroni", null_sources: int = 8, null_quantile: float = 0.99,
                     seed: int = 0, batch_size: int = 16, chunk_size: int = 4, out_dir=None,
                     progress: bool = True) -> InteractionGraph:
    """The interaction graph of a crosscoder's features on ``tokens [N, S]`` (module docstring).

    sources: feature ids, or None for the ``sources_per_layer`` most often active features of each home
    layer but the last. Targets: every feature whose home layer comes after the source's. ``null_sources``
    sources per home layer are measured again along random directions for τ (0 skips the null: τ = 0).
    Inputs: 32 by default; the smallest two-sided sign-flip p-value of m inputs is 2 / 2^m, so 16 inputs
    cannot pass Bonferroni over the ~10^5 pairs of a few dozen sources.
    method / read / inputs_per_source as :func:`jfig.measure.crosscoder.crosscoder_effects`. With
    ``out_dir`` the graph is saved there (Parquet folder)."""
    if correction not in CORRECTIONS:
        raise JfigError(f"unknown correction {correction!r}; expected one of {CORRECTIONS}")
    if not 0 < alpha < 1 or not 0 < null_quantile < 1:
        raise JfigError(f"alpha and null_quantile must lie in (0, 1); got {alpha} and {null_quantile}")
    check_crosscoder(model, crosscoder)
    tokens = model.check_tokens(tokens)
    clean = clean_prefix(model, tokens, crosscoder.sites, batch_size)
    if sources is None:
        f = np.asarray(stacked_values(crosscoder, clean, np.arange(crosscoder.d_sae), "post", batch_size))
        firing = (f[:, 1:] > 0).mean(axis=(0, 1))                 # position 0 (the sequence start) aside
        sources = busiest_sources(crosscoder, firing, sources_per_layer)
        if len(sources) == 0:
            raise JfigError("no crosscoder feature fires on these tokens at a home layer with later layers")
    opts = dict(method=method, read=read, inputs_per_source=inputs_per_source, batch_size=batch_size,
                chunk_size=chunk_size, seed=seed, clean=clean, progress=progress)
    eff = crosscoder_effects(model, crosscoder, tokens, sources, **opts)
    src_sites = np.asarray(eff.sources.sites)[:, None].repeat(len(eff.targets), 1)
    tgt_sites = np.asarray(eff.targets.sites)[None, :].repeat(len(eff.sources), 0)
    tau = np.zeros(eff.mean.shape)
    if null_sources > 0:
        homes = crosscoder.home_layers()[eff.sources.features]
        pick = np.concatenate([np.flatnonzero(homes == h)[:null_sources] for h in np.unique(homes)])
        null = crosscoder_effects(model, crosscoder, tokens, eff.sources.features[pick], direction="random",
                                  **{**opts, "seed": seed + 1})
        taus = pair_thresholds(null.mean[null.n > 0], src_sites[pick][null.n > 0], tgt_sites[pick][null.n > 0],
                               null_quantile)
        tau = np.vectorize(lambda a, b: taus.get((a, b), 0.0), otypes=[float])(src_sites, tgt_sites)
    p = robust_pvalues(eff.per_input, eff.input_weight)
    tested = eff.n > 0
    p = np.where(tested, p, np.nan)
    r, c = np.nonzero(tested)
    decision = decide(eff.mean[r, c], p[r, c], alpha=alpha, correction=correction, tau=tau[r, c])
    records = EdgeRecords(source_site=src_sites[r, c], source=eff.sources.features[r],
                          target_site=tgt_sites[r, c], target=eff.targets.features[c], mean=eff.mean[r, c],
                          var=eff.var[r, c], n=eff.n[r, c], p_value=p[r, c], decision=decision,
                          estimator=method, positions="same")
    widths = [{"site": s, "d_sae": crosscoder.d_sae, "kind": "crosscoder"} for s in crosscoder.sites]
    manifest = {"kind": "crosscoder", "crosscoder_sites": list(crosscoder.sites), "saes": widths,
                "options": {**{k: v for k, v in opts.items() if k != "clean"}, "alpha": alpha,
                            "correction": correction, "null_sources": null_sources, "null_quantile": null_quantile},
                "n_tested": int(decision.n_tested), "tokens": list(tokens.shape),
                "sources": eff.sources.features.tolist()}
    graph = assemble_graph(records, None, node_info=NodeInfo(None), sites=model.sites, positions="same",
                           manifest=manifest, sources=list(zip(eff.sources.sites, eff.sources.features.tolist())))
    log.info("crosscoder graph: %d sources, %d tested pairs, %d edges", len(eff.sources), decision.n_tested,
             int(decision.keep.sum()))
    if out_dir is not None:
        graph.save(Path(out_dir))
    return graph


def crosscoder_matching(crosscoder: Crosscoder, saes, *, method: str = "decoder", activations=None,
                        min_similarity: float = 0.5, batch_rows: int = 1024) -> dict[str, np.ndarray]:
    """{site: [d_sae] crosscoder id per SAE feature (-1: none)} for the SAEs at the crosscoder's sites,
    one to one by mutual best similarity, keeping only crosscoder features whose home is that site (the
    ones a crosscoder graph places there). Pass it to ``diff_graphs(sae_graph, crosscoder_graph,
    matching=...)``.

    method "decoder": cosine between the SAE's decoder rows and the crosscoder's decoder rows into that
    layer (``match_features(..., method="decoder")`` on ``crosscoder.decoder_view(site)``). method
    "activation": Pearson correlation over the tokens of ``activations [n, L, d]`` (the crosscoder's
    sites stacked, e.g. ``jfig.saes.train.capture_stacked``) between each SAE feature (its own layer's
    row) and each crosscoder feature (all layers), streamed ``batch_rows`` rows at a time."""
    if method not in ("decoder", "activation"):
        raise JfigError(f"unknown method {method!r}; expected 'decoder' or 'activation'")
    if method == "activation" and activations is None:
        raise JfigError("method='activation' needs activations= [n, L, d] at the crosscoder's sites")
    saes = {s.site: s for s in saes} if not isinstance(saes, dict) else saes
    homes = np.asarray(crosscoder.home_sites())
    out = {}
    for site, sae in saes.items():
        if site not in crosscoder.sites:
            continue
        if method == "decoder":
            match = match_features(sae, crosscoder.decoder_view(site), method="decoder",
                                   min_similarity=min_similarity).match
        else:
            xs = jnp.asarray(activations, jnp.float32)
            if xs.ndim != 3 or xs.shape[1:] != (crosscoder.n_layers, crosscoder.d_model):
                raise JfigError(f"activations have shape {tuple(xs.shape)}; expected [n, L={crosscoder.n_layers}, "
                                f"d={crosscoder.d_model}]")
            l = crosscoder.layer_index(site)
            moments = empty_moments(sae.d_sae, crosscoder.d_sae)
            for b in range(0, xs.shape[0], batch_rows):
                rows = xs[b: b + batch_rows]
                moments = fold_moments(moments, sae.encode(rows[:, l]), crosscoder.encode(rows),
                                       jnp.ones(rows.shape[0]))
            corr, _ = moments_correlation(moments)
            match = mutual_best(None, None, method="activation", min_similarity=min_similarity,
                                correlation=corr).match
        fwd = np.asarray(match, np.int64).copy()
        fwd[(fwd >= 0) & (homes[np.maximum(fwd, 0)] != site)] = -1
        out[site] = fwd
    if not out:
        raise JfigError(f"none of the SAEs' sites {sorted(saes)} is a crosscoder site {list(crosscoder.sites)}")
    return out


def decoder_agreement(crosscoder: Crosscoder, sae) -> np.ndarray:
    """[d_sae]: each SAE feature's best |cosine| with a crosscoder decoder row into the SAE's site."""
    W = jnp.asarray(sae.W_dec, jnp.float32)
    C = crosscoder.W_dec[:, crosscoder.layer_index(sae.site)]
    W = W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), 1e-12)
    C = C / jnp.maximum(jnp.linalg.norm(C, axis=-1, keepdims=True), 1e-12)
    return np.asarray(jnp.abs(W @ C.T).max(axis=1))
