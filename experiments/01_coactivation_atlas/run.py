"""Experiment 01: the co-activation atlas of SmolLM2-135M, the correlational scaffold of the graph.

    python -m experiments.01_coactivation_atlas.run [--scale cpu|accelerator|smoke] [--corpus PATH]

Streams the experiment's corpus through the model and its SAEs (the sites of experiment 02) and
counts, for every pair of tracked features at sites at most 5 layers apart (same token), how often
they fire together: P(j | i), PMI and the conditional mean, plus a test for anomalously low
co-activation (P(j | i) far below P(j): a candidate for inhibition). Writes results/site_pairs.csv,
results/top_pmi.md, results/communities.csv (Leiden communities of the graph of strong associations:
pairs co-active >= 50 times with PMI > 1),
results/pmi_histogram.png and results/summary.json.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
from scipy import stats as sps
from matplotlib.figure import Figure

from experiments.scales import arguments, describe, setup, work_folder
from jfig import Atlas, build_atlas
from jfig.data import tokens_from

HERE = Path(__file__).parent
MIN_COUNT = 10          # co-activations a pair needs before its PMI is read
COMMUNITY_COUNT = 50    # communities: pairs co-active at least this often ...
COMMUNITY_PMI = 1.0     # ... and at least e times more often than independence predicts
LOW_ALPHA = 0.01        # Bonferroni level for anomalously low co-activation


def site_pair_rows(atlas) -> tuple[list[dict], dict]:
    rows, pmis = [], {}
    for a, b in atlas.pairs:
        co, pmi = atlas.coactivation(a, b), atlas.pmi(a, b)
        seen = co >= MIN_COUNT
        if a == b:
            seen &= ~np.eye(*seen.shape, dtype=bool)
        # Anomalously low: C at most half its expectation E = n_i m_j / N (P(j | i) <= P(j) / 2) and the
        # atlas's hypergeometric P(X <= C) below the Bonferroni level over all pairs (~1e-9). Evaluated only
        # where E >= 10: below it p >= P(X = 0) ~ exp(-E) > 4e-5 and nothing can pass.
        expected = atlas.expected_coactivation(a, b)
        cand = (co <= expected / 2) & (expected >= 10)
        i, j = np.nonzero(cand)
        n_i, m_j = atlas.source_count(a)[i], atlas.target_count(b)[j]
        p_low = sps.hypergeom.cdf(co[i, j], atlas.n_tokens, m_j, n_i)
        low = int((p_low * co.size < LOW_ALPHA).sum())
        pmis[(a, b)] = pmi[seen]
        rows.append({"source_site": a, "target_site": b, "tracked_pairs": int(co.size),
                     "pairs_coactive_10x": int(seen.sum()),
                     "median_pmi": float(np.median(pmi[seen])) if seen.any() else None,
                     "share_pmi_above_1": float((pmi[seen] > 1).mean()) if seen.any() else None,
                     "anomalously_low": low})
    return rows, pmis


def top_pairs(atlas, model, k: int = 15) -> list[str]:
    best = []
    for a, b in atlas.pairs:
        if a == b:
            continue
        co, pmi = atlas.coactivation(a, b), atlas.pmi(a, b)
        score = np.where(co >= 4 * MIN_COUNT, pmi, -np.inf)
        for flat in np.argsort(-score, axis=None)[:k]:
            i, j = np.unravel_index(flat, score.shape)
            if np.isfinite(score[i, j]):
                best.append((float(score[i, j]), a, int(atlas.features[a][i]), b, int(atlas.features[b][j]), int(co[i, j])))
    best.sort(reverse=True)
    lines = ["| PMI | co-activations | source | its top context | target | its top context |", "|---|---|---|---|---|---|"]
    for pmi, a, i, b, j, c in best[:k]:
        ca, cb = context_text(atlas, model, a, i), context_text(atlas, model, b, j)
        lines.append(f"| {pmi:.2f} | {c} | {a}:{i} | {ca} | {b}:{j} | {cb} |")
    return lines


def context_text(atlas, model, site: str, feature: int) -> str:
    """The feature's strongest context, decoded, on one line (the last 50 characters)."""
    cs = atlas.contexts(site, feature)
    if not cs:
        return ""
    text = model.tokenizer.decode([int(t) for t in cs[0]["tokens"] if t >= 0])
    return " ".join(text.split())[-50:].replace("|", "\\|")


def main():
    args = arguments(__doc__.splitlines()[0], str(HERE / "results")).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model, saes, corpus, scale, corpus_text = setup(args)
    tokens = tokens_from(corpus, model, scale.seq_len, seed=0, max_tokens=scale.atlas_sequences * scale.seq_len)
    t = time.perf_counter()
    saved = work_folder(args) / "atlas-01"
    if (saved / "manifest.json").exists():
        atlas = Atlas.load(saved)          # an earlier run's atlas (delete the folder to count again)
    else:
        atlas = build_atlas(model, saes, tokens, window=5, progress=True, skip_positions=1)
        atlas.save(saved)
    seconds = time.perf_counter() - t
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, pmis = site_pair_rows(atlas)
    with open(out / "site_pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "top_pmi.md").write_text("\n".join(top_pairs(atlas, model)) + "\n")
    groups = atlas.communities(min_count=COMMUNITY_COUNT, min_pmi=COMMUNITY_PMI, seed=0, method="leiden")
    with open(out / "communities.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["community", "size", "sites", "first_members"])
        for k, c in enumerate(groups[:50]):
            members = sorted(c)
            w.writerow([k, len(c), ";".join(sorted({s for s, _ in c})), ";".join(f"{s}:{i}" for s, i in members[:8])])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for (a, b), v in pmis.items():
        if a != b and len(v):
            ax.hist(v, bins=80, histtype="step", label=f"{a.replace('blocks.', '')} → {b.replace('blocks.', '')}")
    ax.set(xlabel=f"PMI (pairs co-active ≥ {MIN_COUNT} times)", ylabel="pairs", yscale="log",
           title="PMI between sites")
    ax.legend(fontsize=5)
    fig.savefig(out / "pmi_histogram.png", dpi=120, bbox_inches="tight")
    summary = {"scale": args.scale, "settings": describe(scale), "corpus": corpus_text, "tokens": int(tokens.size),
               "atlas_seconds": round(seconds), "site_pairs": len(rows),
               "communities": {"count": len(groups), "min_count": COMMUNITY_COUNT, "min_pmi": COMMUNITY_PMI, "largest": [len(c) for c in groups[:10]],
                               "spanning_several_sites": sum(len({s for s, _ in c}) > 1 for c in groups)},
               "anomalously_low_pairs": sum(r["anomalously_low"] for r in rows)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
