"""Hub features: the features with the most interactions, what they respond to, and whether they
matter to the model.

    table = hubs(graph, k=10)                                  # top features by total degree, with contexts
    test = hub_ablation(model, saes, graph, tokens, k=10)      # hubs' loss effect vs matched random features

`hub_ablation` ablates each hub where it is active (error-preserving clamp to 0) and measures the
mean |change in next-token loss| per token of `tokens`; each hub is compared with `matched` random
features of its own SAE whose firing rate on the same tokens is closest to the hub's (no hubs among
them). The test is one-sided Mann-Whitney over (hub effects, matched effects) and a sign count of
hubs above their own matched median. A hub's firing rate decides how many tokens it can touch, so
matching on it asks whether a hub matters more than its frequency alone would say.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from functools import partial

import jax
import numpy as np
from scipy import stats

from ..errors import JfigError
from ..measure.importance import ablation_effects
from ..models.validation import saes_by_site
from .layers import FIRST

log = logging.getLogger(__name__)


def degree_table(graph) -> dict[tuple[str, int], dict]:
    """(site, feature) -> out/in degree of each sign over the first-order edges."""
    e = graph.edges.to_pydict()
    deg: dict = {}
    for a, s, b, t, kind in zip(e["source_site"], e["source"], e["target_site"], e["target"], e["kind"]):
        if kind not in FIRST:
            continue
        sign = "exc" if kind == "excitatory" else "inh"
        deg.setdefault((a, int(s)), Counter())[f"out_{sign}"] += 1
        deg.setdefault((b, int(t)), Counter())[f"in_{sign}"] += 1
    return deg


def hubs(graph, k: int = 10, by: str = "total") -> list[dict]:
    """The k features with the highest degree (`by`: "total", "out" or "in"), each with its degrees,
    firing rate, label and up to three top contexts."""
    if by not in ("total", "out", "in"):
        raise JfigError(f"hubs: by must be 'total', 'out' or 'in', got {by!r}")
    nodes = graph.nodes.to_pydict()
    info = {(s, int(f)): i for i, (s, f) in enumerate(zip(nodes["site"], nodes["feature"]))}
    rows = []
    for key, c in degree_table(graph).items():
        out, inn = c["out_exc"] + c["out_inh"], c["in_exc"] + c["in_inh"]
        i = info.get(key)
        contexts = json.loads(nodes["top_contexts"][i]) if i is not None and nodes["top_contexts"][i] else []
        rows.append({"site": key[0], "feature": key[1], "out_degree": out, "in_degree": inn, "total_degree": out + inn,
                     "out_excitatory": c["out_exc"], "out_inhibitory": c["out_inh"], "in_excitatory": c["in_exc"],
                     "in_inhibitory": c["in_inh"],
                     "firing_rate": nodes["firing_rate"][i] if i is not None else None,
                     "label": nodes["label"][i] if i is not None else None,
                     "contexts": [c_["text"] for c_ in contexts[:3]]})
    rows.sort(key=lambda r: (-r[f"{by}_degree"], r["site"], r["feature"]))
    return rows[:k]


@partial(jax.jit, static_argnames=("site",))
def _active_count(model, sae, batch, *, site):
    """[d_sae] active positions of each feature in `batch` [b, s]."""
    acts = model.run(batch, capture=(site,), stop_at=site, logits=False).cache[site]
    return (sae.encode(acts) > 0).sum((0, 1))


def firing_rates(model, sae, tokens: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """[d_sae] share of `tokens` positions where each feature of `sae` is active."""
    count = np.zeros(sae.d_sae)
    for i in range(0, len(tokens), batch_size):
        count += np.asarray(_active_count(model, sae, tokens[i:i + batch_size], site=sae.site))
    return count / tokens.size


def matched_features(rates: np.ndarray, hub: int, exclude: set[int], m: int) -> np.ndarray:
    """The m features (not in `exclude`, firing at least once) whose firing rate is closest to `hub`'s."""
    ok = np.flatnonzero(rates > 0)
    ok = ok[~np.isin(ok, list(exclude))]
    return ok[np.argsort(np.abs(rates[ok] - rates[hub]), kind="stable")[:m]]


def hub_ablation(model, saes, graph, tokens, *, k: int = 10, matched: int = 10, by: str = "out",
                 batch_size: int = 8) -> dict:
    """Loss effect of ablating each of the k hubs against `matched` firing-rate-matched random features
    of its SAE (see the module docstring). Effects are mean |Δ next-token loss| per token of `tokens`."""
    if not (isinstance(k, int) and k >= 1 and isinstance(matched, int) and matched >= 1):
        raise JfigError(f"hub_ablation: k and matched must be integers >= 1, got k={k!r}, matched={matched!r}")
    saes = saes_by_site(saes)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.size == 0:
        raise JfigError(f"hub_ablation: tokens must be a non-empty [batch, seq] array, got shape {tokens.shape}")
    top = hubs(graph, k=k, by=by)
    missing = sorted({h["site"] for h in top} - set(saes))
    if missing:
        raise JfigError(f"hub_ablation: no SAE given for hub sites {missing}; got SAEs at {sorted(saes)}")
    hub_ids = Counter()
    for h in top:
        hub_ids[(h["site"], h["feature"])] += 1
    rows, hub_effect, null_effect, rates_at = [], [], [], {}
    for h in top:
        sae = saes[h["site"]]
        if h["site"] not in rates_at:
            rates_at[h["site"]] = firing_rates(model, sae, tokens)
        rates = rates_at[h["site"]]
        exclude = {f for (s, f) in hub_ids if s == h["site"]}
        feats = np.concatenate([[h["feature"]], matched_features(rates, h["feature"], exclude, matched)])
        eff, n_active = ablation_effects(model, sae, tokens, feats, kind="loss", batch_size=batch_size)
        per_token = np.nan_to_num(eff * n_active / tokens.size)
        hub_effect.append(per_token[0])
        null_effect.extend(per_token[1:].tolist())
        log.info("hub %d of %d (%s %d): effect %.4g, matched median %.4g", len(rows) + 1, len(top), h["site"],
                 h["feature"], per_token[0], np.median(per_token[1:]) if len(feats) > 1 else float("nan"))
        rows.append({"site": h["site"], "feature": h["feature"], "degree": h[f"{by}_degree"],
                     "firing_rate": float(rates[h["feature"]]), "effect": float(per_token[0]),
                     "matched_median": float(np.median(per_token[1:])) if len(feats) > 1 else None,
                     "matched_rates": [float(r) for r in rates[feats[1:]]]})
    hub_effect, null_effect = np.asarray(hub_effect), np.asarray(null_effect)
    test = stats.mannwhitneyu(hub_effect, null_effect, alternative="greater") if len(null_effect) else None
    above = sum(r["matched_median"] is not None and r["effect"] > r["matched_median"] for r in rows)
    return {"hubs": rows, "by": by, "matched": matched, "tokens": int(tokens.size),
            "hub_median": float(np.median(hub_effect)) if len(hub_effect) else None,
            "matched_median": float(np.median(null_effect)) if len(null_effect) else None,
            "ratio": float(np.median(hub_effect) / np.median(null_effect)) if len(null_effect) and np.median(null_effect) > 0 else None,
            "hubs_above_matched": int(above), "u": float(test.statistic) if test else None,
            "p": float(test.pvalue) if test else None,
            "sign_test_p": float(stats.binomtest(above, len(rows), 0.5, alternative="greater").pvalue) if rows else None}
