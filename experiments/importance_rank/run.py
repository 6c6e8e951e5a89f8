"""Rank agreement of attribution importance with exact ablation importance on SmolLM2-135M.

For the most frequent features of one default SAE on a batch of the default corpus, measure the
exact ablation effect (`ablation_effects`, kind "loss") and its first-order estimate
(`attribution_effects`), plus two cheap baselines: the previous per-sequence estimate
(|Σ_t ∂loss/∂h · Δh| per sequence, one backward pass per batch) and the firing rate. Writes
results.csv (per feature) and summary.md (the table) next to this file.

    python -m experiments.importance_rank.run [--features 64] [--seqs 16] [--seq-len 64] [--site ...]
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import kendalltau, spearmanr

import jfig
from jfig.data import tokens_from
from jfig.edits import Steer
from jfig.measure import ablation_effects, attribution_effects

HERE = Path(__file__).parent


@partial(jax.jit, static_argnames=("site",))
def per_sequence_batch(model, sae, tokens, feats, *, site):
    """Σ over sequences of |Σ_p ∂loss/∂h_p · (-f_i,p d_i)| [n] for tokens [b, s] (previous estimator)."""
    def loss(delta):
        logits = model.run(tokens, edits=(Steer(site, delta, 1.0),)).logits
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).sum()

    acts = model.run(tokens, capture=(site,), stop_at=site).cache[site]
    grad = jax.grad(loss)(jnp.zeros_like(acts))                                  # [b, s, d]
    f, stats = sae.encode_with_stats(acts)
    dirs = jax.vmap(lambda i: jnp.broadcast_to(sae.decode_direction(i, stats), acts.shape))(feats)
    lin = jnp.einsum("bsd,nbsd->nbs", grad, dirs) * -jnp.moveaxis(jnp.take(f, feats, -1), -1, 0)
    return jnp.abs(lin.sum(-1)).sum(-1)


def per_sequence_effects(model, sae, tokens, feats, batch_size):
    total = np.zeros(len(feats))
    for r in range(0, len(tokens), batch_size):
        total += np.asarray(per_sequence_batch(model, sae, jnp.asarray(tokens[r:r + batch_size]),
                                               jnp.asarray(feats), site=sae.site))
    return total


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def top_overlap(a, b, k):
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--site", default="blocks.18.hook_resid_post")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--sae-path", default=None,
                    help="load the SAE from this folder (e.g. one site of the default-SAE cache) instead of "
                         "jfig.default_saes, which trains all default sites when they are not cached")
    args = ap.parse_args()

    model = jfig.load_model("smollm2-135m")
    if args.sae_path:
        sae = jfig.load_sae(args.sae_path)
    else:
        sae = {s.site: s for s in jfig.default_saes(model, progress=False)[0]}[args.site]
    tokens = tokens_from("default", model, args.seq_len, max_tokens=4 * args.seqs * args.seq_len)[:args.seqs]
    acts = model.run(tokens, capture=(sae.site,), stop_at=sae.site).cache[sae.site]
    count = (np.asarray(sae.encode(acts)) > 0).sum((0, 1))
    feats = np.argsort(-count, kind="stable")[:args.features].astype(np.int32)
    assert count[feats].min() > 0, "fewer features fire than were asked for"
    n_tok = args.seqs * args.seq_len

    kw = dict(batch_size=args.batch_size, chunk=args.chunk)
    # compile first (one padded chunk, same shapes as the timed runs), then time
    ablation_effects(model, sae, tokens[:args.batch_size], feats[:1], **kw)
    attribution_effects(model, sae, tokens[:args.batch_size], feats[:1], **kw)
    per_sequence_effects(model, sae, tokens[:args.batch_size], feats, args.batch_size)
    (exact, n_ex), t_exact = timed(ablation_effects, model, sae, tokens, feats, **kw)
    (attr, n_att), t_attr = timed(attribution_effects, model, sae, tokens, feats, **kw)
    per_seq, t_seq = timed(per_sequence_effects, model, sae, tokens, feats, args.batch_size)
    assert np.array_equal(n_ex, n_att)
    per_seq = per_seq / n_ex
    rate = n_ex / n_tok

    rows = []
    for name, est, secs in (("attribution (per-token jvp)", attr, t_attr),
                            ("per-sequence gradient (previous estimator)", per_seq, t_seq),
                            ("firing rate (no model)", rate, 0.0)):
        rows.append({"estimator": name, "spearman": spearmanr(est, exact).statistic,
                     "kendall": kendalltau(est, exact).statistic,
                     f"top{args.top}_overlap": top_overlap(est, exact, args.top),
                     "ms_per_feature": 1e3 * secs / len(feats)})
    rows.append({"estimator": "exact ablation (reference)", "spearman": 1.0, "kendall": 1.0,
                 f"top{args.top}_overlap": args.top, "ms_per_feature": 1e3 * t_exact / len(feats)})

    np.savetxt(HERE / "results.csv", np.column_stack([feats, n_ex, exact, attr, per_seq]), delimiter=",",
               header="feature,n_active,exact_ablation,attribution,per_sequence", comments="", fmt="%.8g")
    null_overlap = args.top * args.top / len(feats)
    lines = [f"SmolLM2-135M, default SAE at `{sae.site}` (d_sae {sae.d_sae}, k {sae.k}); the "
             f"{len(feats)} most frequent features on {args.seqs} x {args.seq_len} tokens of the default "
             f"corpus; batch {args.batch_size}, chunk {args.chunk}; times exclude compilation "
             f"({jax.devices()[0].platform}).", "",
             f"| estimator vs exact ablation | Spearman | Kendall | top-{args.top} overlap | ms / feature |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['spearman']:.3f} | {r['kendall']:.3f} | "
                     f"{r[f'top{args.top}_overlap']}/{args.top} | {r['ms_per_feature']:.0f} |")
    lines += ["", f"Null (random order): rank correlation 0, expected top-{args.top} overlap "
              f"{null_overlap:.2f}/{args.top}."]
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    (HERE / "settings.json").write_text(json.dumps(vars(args), indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
