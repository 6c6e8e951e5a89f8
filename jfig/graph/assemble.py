"""Turn measured blocks into a typed InteractionGraph: thresholds, corrections, kinds, nodes."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
from scipy.special import erfc

from ..errors import JfigError, SiteError
from ..sites import parse_site
from ..stats import benjamini_hochberg, bonferroni, null_threshold
from .graph import InteractionGraph


def site_layer(model, site: str) -> int:
    try:
        return parse_site(site).layer
    except SiteError:
        return model.sites.index(site)


def _contexts(model, atlas, site, feature, k=3) -> str | None:
    try:
        ctx = atlas.contexts(site, int(feature))[:k]
    except Exception:  # noqa: BLE001 -- untracked feature: no contexts
        return None
    tok = model.tokenizer
    out = []
    for c in ctx:
        ids = [t for t in c["tokens"] if t >= 0]
        text = tok.decode(ids) if tok is not None else " ".join(map(str, ids))
        out.append({"text": text, "activation": round(float(c["activation"]), 4)})
    return json.dumps(out)


def _firing_rate(atlas, site, feature):
    try:
        return float(atlas.firing_rate(site)[int(feature)])
    except Exception:  # noqa: BLE001
        return None


def _adjusted(correction, p, p_bonf, q):
    if correction == "bonferroni":
        return p_bonf
    if correction in ("bh", "fdr"):
        return q
    if correction == "none":
        return p
    raise JfigError(f"unknown correction {correction!r}; expected 'bonferroni', 'bh' or 'none'")


def _significant(rec, opts, tau):
    p = rec["p_value"].astype(np.float64)
    m = int(np.isfinite(p).sum())
    p_bonf = bonferroni(p, m)
    q = benjamini_hochberg(p)
    adj = _adjusted(opts.correction, p, p_bonf, q)
    mean = rec["mean"].astype(np.float64)
    keep = np.isfinite(adj) & (adj < opts.alpha) & np.isfinite(mean) & (np.abs(mean) > tau)
    return keep, p_bonf, q


def _gating_rows(gate, opts):
    if gate is None or len(gate.get("mean", [])) == 0:
        return None
    mean, var, n = (gate[k].astype(np.float64) for k in ("mean", "var", "n"))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.abs(mean) / np.sqrt(var / np.maximum(n, 1))
    p = np.where(np.isfinite(z), erfc(z / np.sqrt(2)), np.nan)
    p_bonf = bonferroni(p)
    q = benjamini_hochberg(p)
    adj = _adjusted(opts.correction, p, p_bonf, q)
    keep = np.isfinite(adj) & (adj < opts.alpha)
    return keep, p, p_bonf, q


def assemble_graph(model, saes, atlas, rec, opts, report, fingerprint, tokens, progress, run=None):
    """InteractionGraph from the block records (and the gating stage when enabled)."""
    null = rec["null_mean"][np.isfinite(rec["null_mean"])] if len(rec["null_mean"]) else np.zeros(0)
    tau = null_threshold(null, opts.tau_quantile) if null.size else 0.0
    keep, p_bonf, q = _significant(rec, opts, tau)
    edges = {k: [] for k in ("source_site", "source", "target_site", "target", "kind", "weight", "p_value",
                             "p_bonferroni", "q_value", "variance", "n", "estimator", "positions", "source_layer",
                             "target_layer", "modulator_site", "modulator")}

    def add(ss, s, ts, t, kind, w, p, pb, qv, var, n, est, mod=None):
        for k, v in (("source_site", ss), ("source", int(s)), ("target_site", ts), ("target", int(t)),
                     ("kind", kind), ("weight", float(w)), ("p_value", float(p)), ("p_bonferroni", float(pb)),
                     ("q_value", float(qv)), ("variance", float(np.nan_to_num(var))), ("n", int(n)),
                     ("estimator", est), ("positions", opts.positions), ("source_layer", site_layer(model, ss)),
                     ("target_layer", site_layer(model, ts)), ("modulator_site", None if mod is None else ss),
                     ("modulator", None if mod is None else int(mod))):
            edges[k].append(v)

    for i in np.flatnonzero(keep):
        add(rec["source_site"][i], rec["source"][i], rec["target_site"][i], rec["target"][i],
            "excitatory" if rec["mean"][i] > 0 else "inhibitory", rec["mean"][i], rec["p_value"][i], p_bonf[i], q[i],
            rec["var"][i], rec["n"][i], opts.method)
    n_gating_tested = 0
    if opts.gating:
        from ..measure_blocks import gating_stage
        sig = {k: rec[k][keep] for k in ("source_site", "source", "target_site", "target")}
        gate = gating_stage(model, saes, tokens, sig, opts, run, progress)
        g = _gating_rows(gate, opts)
        if g is not None:
            gkeep, gp, gpb, gq = g
            n_gating_tested = int(len(gp))
            for i in np.flatnonzero(gkeep):
                add(str(gate["source_site"][i]), gate["source"][i], str(gate["target_site"][i]), gate["target"][i],
                    "gating", gate["mean"][i], gp[i], gpb[i], gq[i], gate["var"][i], gate["n"][i],
                    opts.gating_method, mod=gate["modulator"][i])
    # nodes: every measured source and every edge endpoint
    keys = {(str(s), int(f)) for s, f in zip(rec["source_site"], rec["source"])}
    keys |= {(s, f) for s, f in zip(edges["target_site"], edges["target"])}
    keys |= {(s, f) for s, f in zip(edges["source_site"], edges["modulator"]) if f is not None}
    keys = sorted(keys, key=lambda k: (site_layer(model, k[0]), k[0], k[1]))
    nodes = {"site": [k[0] for k in keys], "feature": [k[1] for k in keys],
             "layer": [site_layer(model, k[0]) for k in keys],
             "firing_rate": [_firing_rate(atlas, *k) for k in keys], "label": [None] * len(keys),
             "top_contexts": [_contexts(model, atlas, *k) for k in keys]}
    cfg = model.config
    manifest = {
        "model": {"name": getattr(cfg, "name", "") if cfg is not None else "function",
                  "family": getattr(cfg, "family", None), "n_layers": getattr(cfg, "n_layers", None),
                  "d_model": getattr(cfg, "d_model", None)},
        "saes": [{"site": s, "d_sae": int(x.d_sae), "architecture": x.architecture, "k": x.k,
                  "fingerprint": fingerprint["saes"][s]} for s, x in sorted(saes.items())],
        "corpus_hash": fingerprint["tokens"],
        "options": dataclasses.asdict(opts),
        "statistics": {"tau": tau, "n_tested": int(np.isfinite(rec["p_value"]).sum()),
                       "n_null": int(null.size), "n_gating_tested": n_gating_tested,
                       "n_sequences": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])},
        "pruning_report": [dict(r) for r in report.rows],
    }
    return InteractionGraph.from_tables(nodes, edges, manifest)
