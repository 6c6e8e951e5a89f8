"""Jacobian against clamping on SmolLM2-135M: how often and where the two estimators agree.

Measures every (source, target) pair of `--sources` frequent features of the SAE at
blocks.6.hook_resid_post against all features of the SAE at blocks.10.hook_resid_post with
`jfig.compare_estimators` (same inputs for both methods), then explains the disagreements by the
target's state at the operating point: its clean activity and its distance from the TopK boundary.

    python -m experiments.estimator_agreement.run                  # the recorded run (~10 min CPU)
    python -m experiments.estimator_agreement.run --sources 2      # a quick check

Writes into --out: summary.json, summary.txt, disagreements.csv / .md, by_target_state.md,
by_rank.md, by_source_group.md, per_source.md and, when matplotlib is importable, scatter.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

import jfig
from jfig.analysis import relative_error

try:                                   # optional: only for scatter.png
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

SRC, TGT = "blocks.6.hook_resid_post", "blocks.10.hook_resid_post"
HERE = Path(__file__).resolve().parent


def frequent_features(model, sae, tokens, n: int, batch: int = 16):
    """The n features of `sae` that fire on the most tokens; (features [n], firing rates [n])."""
    fired = np.zeros(sae.d_sae)
    for b in range(0, len(tokens), batch):
        acts = model.run(tokens[b: b + batch], capture=(sae.site,), stop_at=sae.site, logits=False).cache[sae.site]
        fired += np.asarray(sae.encode(acts) > 0).sum((0, 1))
    rate = fired / tokens.size
    top = np.argsort(-rate, kind="stable")[:n]
    return top, rate[top]


def operating_point(model, src_sae, tgt_sae, tokens, eff):
    """Per (source row, input slot): the clamp position and the target SAE's pre-activations there.

    Returns pos [S, M] and pre [S, M, d_sae_t], and the clean source value there [S, M]."""
    rows = np.unique(eff.input_index[eff.input_weight > 0])
    cache = model.run(tokens[rows], capture=(SRC, TGT), stop_at=TGT, logits=False).cache
    f_src = np.asarray(src_sae.encode(cache[SRC]))            # [R, seq, d_src]
    pre_t = np.asarray(tgt_sae.pre_activations(cache[TGT]))   # [R, seq, d_tgt]
    where = {int(r): i for i, r in enumerate(rows)}
    S, M = eff.input_index.shape
    pos = np.zeros((S, M), np.int64)
    pre = np.zeros((S, M, tgt_sae.d_sae), np.float32)
    val = np.zeros((S, M), np.float32)
    for s in range(S):
        feat = eff.sources[s][1]
        for m in range(M):
            if eff.input_weight[s, m] == 0:
                continue
            i = where[int(eff.input_index[s, m])]
            p = int(np.argmax(f_src[i, :, feat]))
            pos[s, m], val[s, m], pre[s, m] = p, f_src[i, p, feat], pre_t[i, p]
    return pos, pre, val


def topk_rank(pre):
    """Rank of every feature's pre-activation at its token, [..., d_sae] (0: the largest; < k: inside the TopK)."""
    order = np.argsort(-pre, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(pre.shape[-1]), axis=-1)
    return rank


def clean(v):
    """JSON-safe copy: NaN and inf become None, numpy scalars Python numbers."""
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out) + "\n"


def group_stats(a, b, tol):
    """n, share non-negligible in both, sign agreement there, median / p90 relative error (either non-negligible),
    share of the total |a − b|."""
    both = (np.abs(a) > tol) & (np.abs(b) > tol)
    either = (np.abs(a) > tol) | (np.abs(b) > tol)
    rel = relative_error(a[either], b[either])
    nan = float("nan")
    return dict(n=int(a.size), n_both=int(both.sum()), n_either=int(either.sum()),
                sign_agreement=float(np.mean(np.sign(a[both]) == np.sign(b[both]))) if both.any() else nan,
                rel_median=float(np.median(rel)) if rel.size else nan,
                rel_p90=float(np.percentile(rel, 90)) if rel.size else nan,
                gap_sum=float(np.abs(a - b).sum()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, default=16)
    ap.add_argument("--inputs", type=int, default=48, help="inputs per source")
    ap.add_argument("--seqs", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = jfig.load_model("smollm2-135m")
    saes, _ = jfig.default_saes(model)
    saes = {s.site: s for s in saes}
    src_sae, tgt_sae = saes[SRC], saes[TGT]
    tokens = jfig.data.tokens_from("default", model, args.seq_len, max_tokens=args.seqs * args.seq_len)
    feats, rates = frequent_features(model, src_sae, tokens, args.sources)
    t_setup = time.time() - t0
    t1 = time.time()
    cmp = jfig.compare_estimators(model, [src_sae, tgt_sae], {SRC: feats}, tokens, methods=("jacobian", "clamp"),
                                  targets={TGT: np.arange(tgt_sae.d_sae)}, inputs_per_source=args.inputs,
                                  top=args.top, progress=False)
    t_measure = time.time() - t1
    jac, clamp = cmp.effects["jacobian"], cmp.effects["clamp"]
    p = cmp.pairs[0]
    tol = p.negligible
    a, b = jac.mean.astype(np.float64), clamp.mean.astype(np.float64)

    # --- where: by the target's clean activity at the operating point (fraction of inputs active)
    frac = np.nan_to_num(clamp.target_active, nan=0.0)
    groups = {"inactive on every input (Jacobian exactly 0)": frac == 0,
              "active on some inputs": (frac > 0) & (frac < 1), "active on every input": frac == 1}
    state_rows = []
    total_gap = float(np.abs(a - b).sum())
    for name, g in groups.items():
        s = group_stats(a[g], b[g], tol)
        state_rows.append([name, s["n"], s["n_either"], s["n_both"], s["sign_agreement"], s["rel_median"], s["rel_p90"],
                           s["gap_sum"] / total_gap if total_gap else float("nan")])

    # --- why: per input, the target's rank among the target SAE's pre-activations at the clamp position
    # (TopK keeps ranks 0..k-1; ranks near k are near the selection boundary)
    pos, pre, src_val = operating_point(model, src_sae, tgt_sae, tokens, jac)
    k = tgt_sae.k
    rank = topk_rank(pre)                                                       # [S, M, T]
    w = jac.input_weight > 0
    ja, cl = jac.per_input.astype(np.float64), clamp.per_input.astype(np.float64)
    live = np.broadcast_to(w[..., None], ja.shape)
    inside = rank < k
    off, on = live & ~inside, live & inside
    switched = off & (np.abs(cl) > tol)           # the Jacobian is 0 there; the clamp moved the target
    margin_rows = []
    for lo, hi in ((0, k // 4), (k // 4, k // 2), (k // 2, 3 * k // 4), (3 * k // 4, k), (k, k + k // 4),
                   (k + k // 4, 2 * k), (2 * k, 4 * k), (4 * k, tgt_sae.d_sae)):
        sel = live & (rank >= lo) & (rank < hi)
        n = int(sel.sum())
        nan = float("nan")
        if lo < k:
            both = sel & (np.abs(ja) > tol) & (np.abs(cl) > tol)
            rel = relative_error(ja[sel & ((np.abs(ja) > tol) | (np.abs(cl) > tol))],
                                 cl[sel & ((np.abs(ja) > tol) | (np.abs(cl) > tol))])
            margin_rows.append([f"active, rank {lo}-{hi - 1}", n, int(both.sum()),
                                float(np.mean(np.sign(ja[both]) == np.sign(cl[both]))) if both.any() else nan,
                                float(np.median(rel)) if rel.size else nan, nan])
        else:
            margin_rows.append([f"inactive, rank {lo}-{hi - 1}", n, int(switched[sel].sum()), nan, nan,
                                float(switched[sel].mean()) if n else nan])

    # --- per source: clamp width against the natural value
    src_rows = []
    for s in range(len(feats)):
        lo_a, hi_a = clamp.alphas[s]
        nat = float(np.median(src_val[s][w[s]])) if w[s].any() else float("nan")
        g = group_stats(a[s], b[s], tol)
        first = float(np.mean(pos[s][w[s]] == 0)) if w[s].any() else float("nan")
        src_rows.append([int(feats[s]), float(rates[s]), int(w[s].sum()), float(lo_a), float(hi_a), nat, first,
                         g["n_both"], g["sign_agreement"], g["rel_median"]])
    # sources whose clamp spans more than 10x (α_hi / α_lo): bimodal features with huge values at a few positions
    wide = clamp.alphas[:, 1] > 10 * clamp.alphas[:, 0]
    group_rows = []
    for name, g in (("clamp range α_hi/α_lo > 10", wide), ("clamp range α_hi/α_lo <= 10", ~wide)):
        st = group_stats(a[g], b[g], tol)
        group_rows.append([name, int(g.sum()), st["n_both"], st["sign_agreement"], st["rel_median"],
                           st["gap_sum"] / total_gap if total_gap else float("nan")])

    # --- outputs
    d = cmp.as_dict()
    d.update(model="smollm2-135m", source_site=SRC, target_site=TGT, source_features=feats.tolist(),
             source_firing_rates=rates.tolist(), n_sequences=int(len(tokens)), seq_len=int(tokens.shape[1]),
             seconds=dict(setup=t_setup, measure_and_compare=t_measure, total=time.time() - t0),
             by_target_state=[dict(zip(["group", "pairs", "either", "both", "sign_agreement", "rel_median", "rel_p90",
                                        "share_of_total_gap"], r)) for r in state_rows],
             inactive_input_pairs=dict(n=int(off.sum()), switched_on_by_clamp=int(switched.sum())),
             active_input_pairs=dict(n=int(on.sum()),
                                     sign_agreement=float(np.mean(np.sign(ja[on]) == np.sign(cl[on])))),
             by_source_group=[dict(zip(["group", "sources", "both", "sign_agreement", "rel_median", "share_of_total_gap"],
                                       r)) for r in group_rows],
             by_rank=[dict(zip(["group", "n", "count", "sign_agreement", "rel_median", "share_moved"], r))
                      for r in margin_rows])
    (args.out / "summary.json").write_text(json.dumps(clean(d), indent=1, allow_nan=False, default=str))
    (args.out / "summary.txt").write_text(cmp.summary() + "\n")
    rows = cmp.disagreements.to_pylist()
    with open(args.out / "disagreements.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(list(rows[0].keys()) if rows else [])
        for r in rows:
            wr.writerow([json.dumps(v) if isinstance(v, list) else v for v in r.values()])
    md = md_table(["source", "target", "jacobian", "clamp", "rel. error", "p jac", "p clamp", "worst input: context"],
                  [[r["source_feature"], r["target_feature"], r["mean_a"], r["mean_b"], r["rel_error"], r["p_a"], r["p_b"],
                    f"{r['worst_inputs'][0]}: `{r['worst_contexts'][0]}`".replace("|", "\\|") if r["worst_inputs"] else ""]
                   for r in rows])
    (args.out / "disagreements.md").write_text(md)
    (args.out / "by_source_group.md").write_text(md_table(
        ["sources", "n", "pairs both > tol", "sign agreement (both)", "rel. error median (either)", "share of total gap"],
        group_rows))
    (args.out / "by_target_state.md").write_text(md_table(
        ["target at the operating point", "pairs", "either > tol", "both > tol", "sign agreement (both)",
         "rel. error median", "rel. error p90", "share of total gap"], state_rows))
    (args.out / "by_rank.md").write_text(md_table(
        ["(input, pair) by target rank at the clamp position", "n", "active: both > tol / inactive: clamp > tol",
         "sign agreement (both > tol)", "rel. error median (either > tol)", "share moved by the clamp (Jacobian 0)"],
        margin_rows))
    (args.out / "per_source.md").write_text(md_table(
        ["source", "firing rate", "inputs", "α_lo", "α_hi", "median natural value", "share clamped at position 0",
         "pairs both > tol",
         "sign agreement", "rel. error median"], src_rows))
    if plt is not None:
        ok = np.isfinite(a) & np.isfinite(b)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(b[ok], a[ok], s=2, alpha=0.3, c=np.where(frac[ok] == 0, "tab:red", "tab:blue"), rasterized=True)
        ax.set_xscale("symlog", linthresh=tol)
        ax.set_yscale("symlog", linthresh=tol)
        lim = np.nanmax(np.abs(np.concatenate([a[ok], b[ok]])))
        ax.plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
        ax.set_xlabel("clamp (10th -> 90th percentile), per unit of source")
        ax.set_ylabel("Jacobian at the operating point")
        ax.set_title(f"{len(feats)} sources x {tgt_sae.d_sae} targets (red: target inactive)", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.out / "scatter.png", dpi=110)
    print(cmp.summary())
    print(f"setup {t_setup:.0f}s, measure+compare {t_measure:.0f}s")


if __name__ == "__main__":
    main()
