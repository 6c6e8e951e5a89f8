"""Experiment 08, NFM on the SAE residual: does a neural factorization machine on an SAE's features
explain more of the SAE's reconstruction error (and of its loss cost) than a secondary SAE with the same
number of parameters trained on the same error, as the seed reports for OpenLLaMA-3B?

    python -m experiments.08_integration.nfm --out DIR

SmolLM2-135M and its default SAE at blocks.10.hook_resid_post (TopK, d_sae 2048, k 32). Tokens of the
default corpus (sequences of 64): the first ones held out, the rest for training. On the site's error
``x - x_hat`` (position 0 dropped) it trains

- an NFM (the seed's architecture: linear part + bi-interaction pooling over K embeddings -> Linear(K, K)
  -> ReLU -> Linear(K, d));
- a TopK secondary SAE on the same error stream (the same sequences step by step), its d_sae chosen so
  its parameter count matches the NFM's (jfig.saes.train.matched_d_sae), k = 32 like the first SAE;

and on the held-out tokens reports jfig.saes.nfm_metrics (relative error reduction, FVU, CE losses with
the site replaced, the linear / interaction split), a reading of the strongest embedding dimensions
(Gini, top features, partners, top contexts decoded) and the effect of ablating the interaction part.
Writes DIR/nfm (the NFM), DIR/secondary (the SAE), DIR/report.json, and with --results the small
tables under experiments/08_integration/results/.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


import jfig
from jfig.data import tokens_from
from jfig.integration.nfm_reading import ablate_interaction, interaction_contexts, read_dimensions
from jfig.saes import load_nfm, load_sae, nfm_metrics, save_nfm, save_sae
from jfig.saes.train import train_nfm, train_secondary_sae
from jfig.saes.train.nfm import sae_params

HERE = Path(__file__).parent
SITE = "blocks.10.hook_resid_post"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--k", type=int, default=64, help="NFM embedding size K (the seed used 150-250 on 3B)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=1008, help="tokens per step (16 sequences of 63)")
    parser.add_argument("--train-seqs", type=int, default=512)
    parser.add_argument("--eval-seqs", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--nfm-lr", type=float, default=None, help="the NFM's learning rate (default: --lr)")
    parser.add_argument("--embed-scale", type=float, default=0.1, help="std of V at initialisation (scaled units)")
    parser.add_argument("--results", action="store_true", help="write the small tables into the repository")
    parser.add_argument("--tag", default="", help="suffix of the result tables' names (nfm_metrics{tag}.md, ...)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    model = jfig.load_model()
    saes, _ = jfig.default_saes(model)
    sae = next(s for s in saes if s.site == SITE)
    n_seq = args.train_seqs + args.eval_seqs
    tokens = tokens_from("default", model, 64, seed=1, max_tokens=n_seq * 64)
    eval_tokens, train_tokens = tokens[:args.eval_seqs], tokens[args.eval_seqs:]
    print(f"tokens: {train_tokens.shape} train, {eval_tokens.shape} held out ({time.time() - t0:.0f}s)", flush=True)

    timings = {}
    t = time.time()
    if (args.out / "nfm" / "nfm.json").exists():
        nfm = load_nfm(args.out / "nfm")
    else:
        nfm = train_nfm(model, sae, train_tokens, k=args.k, steps=args.steps, batch_size=args.batch_size,
                        lr=args.nfm_lr or args.lr, embed_scale=args.embed_scale, seed=0,
                        checkpoint_dir=args.out / "nfm_ckpt", checkpoint_every=100, progress=False)
        save_nfm(nfm, args.out / "nfm")
    timings["nfm_s"] = time.time() - t
    print(f"NFM: K={nfm.k}, hidden={nfm.hidden}, {nfm.n_params} parameters ({timings['nfm_s']:.0f}s)", flush=True)

    t = time.time()
    if (args.out / "secondary" / "cfg.json").exists():
        secondary = load_sae(args.out / "secondary")
    else:
        secondary = train_secondary_sae(model, sae, train_tokens, nfm=nfm, k=32, steps=args.steps,
                                        batch_size=args.batch_size, lr=args.lr, seed=0, progress=False,
                                        checkpoint_dir=args.out / "secondary_ckpt", checkpoint_every=100)
        save_sae(secondary, args.out / "secondary")
    timings["secondary_s"] = time.time() - t
    print(f"secondary SAE: d_sae={secondary.d_sae}, {sae_params(secondary)} parameters "
          f"({timings['secondary_s']:.0f}s)", flush=True)

    t = time.time()
    metrics = nfm_metrics(model, sae, nfm, eval_tokens, secondary=secondary)
    train_metrics = nfm_metrics(model, sae, nfm, train_tokens[:args.eval_seqs], secondary=secondary)
    timings["metrics_s"] = time.time() - t
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1), flush=True)

    t = time.time()
    readings = read_dimensions(nfm, top=5, partners=3)
    top_dims = [r.k for r in readings[:3]]
    contexts = interaction_contexts(model, sae, nfm, train_tokens[:256], dims=top_dims, top=5, window=10)
    overall = interaction_contexts(model, sae, nfm, train_tokens[:256], top=5, window=10)["interaction"]
    ablation_all = ablate_interaction(model, sae, nfm, eval_tokens)
    ablation_top = ablate_interaction(model, sae, nfm, eval_tokens, dims=top_dims)
    timings["reading_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    report = {"site": SITE, "k": nfm.k, "hidden": nfm.hidden, "nfm_params": nfm.n_params,
              "secondary_d_sae": secondary.d_sae, "secondary_params": sae_params(secondary),
              "train_tokens": int(train_tokens.shape[0] * (train_tokens.shape[1] - 1)),
              "eval_tokens": int(eval_tokens.shape[0] * (eval_tokens.shape[1] - 1)), "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "nfm_lr": args.nfm_lr or args.lr,
              "embed_scale": args.embed_scale, "held_out": metrics, "train_subset": train_metrics,
              "dimensions": [r.to_dict() for r in readings[:10]],
              "contexts": {str(k): [c.__dict__ for c in v] for k, v in contexts.items()},
              "interaction_contexts": [c.__dict__ for c in overall],
              "ablation_all": ablation_all, "ablation_top_dims": {"dims": top_dims, **ablation_top},
              "timings": timings}
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    print_reading(readings[:3], contexts)
    print(json.dumps({"ablation_all": ablation_all, "ablation_top": ablation_top, "timings": timings}, indent=1))
    if args.results:
        write_results(report, readings, contexts, args.tag)


def print_reading(readings, contexts) -> None:
    for r in readings:
        print(f"dim {r.k}: strength {r.strength:.3g}, Gini {r.gini:.3f}, top {[(i, round(v, 3)) for i, v in r.top]}")
        for i, partners in list(r.partners.items())[:2]:
            print(f"   {i} partners {[(j, round(w, 4)) for j, w in partners]}")
        for c in contexts[r.k][:3]:
            print(f"   {c.score:.3g}  {c.text!r}")


def write_results(report: dict, readings, contexts, tag: str) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    m = report["held_out"]
    rows = [("SAE alone", m["fvu_sae"], 0.0, m["ce_sae"], 0.0),
            ("SAE + NFM", m["fvu_nfm"], m["error_reduction_nfm"], m["ce_nfm"], m["ce_recovered_nfm"]),
            ("SAE + NFM, linear part only", m["fvu_nfm_linear"], m["error_reduction_linear"], m["ce_nfm_linear"],
             m["ce_recovered_linear"]),
            ("SAE + secondary SAE", m["fvu_secondary"], m["error_reduction_secondary"], m["ce_secondary"],
             m["ce_recovered_secondary"])]
    lines = ["| reconstruction at blocks.10.hook_resid_post | FVU | error reduction | CE (nats) | SAE CE cost removed |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {fvu:.4f} | {red:.2%} | {ce:.4f} | {rec:.2%} |" for name, fvu, red, ce, rec in rows]
    lines.append(f"| clean model | 0 | | {m['ce_clean']:.4f} | |")
    (out / f"nfm_metrics{tag}.md").write_text("\n".join(lines) + "\n")
    (out / f"nfm_metrics{tag}.json").write_text(json.dumps({k: report[k] for k in (
        "site", "k", "hidden", "nfm_params", "secondary_d_sae", "secondary_params", "train_tokens", "eval_tokens",
        "steps", "batch_size", "lr", "nfm_lr", "embed_scale", "held_out", "train_subset", "ablation_all", "ablation_top_dims", "timings")},
        indent=1, default=float))
    dim_lines = ["| dim | strength | Gini of abs(V[:, k]) | top features (V) | partners of the top feature (V_i V_j) | "
                 "top context |", "|---|---|---|---|---|---|"]
    for r in readings[:10]:
        first = r.top[0][0]
        ctx = contexts.get(r.k, [])
        text = repr(ctx[0].text.replace("|", "/").replace("\n", " ")) if ctx and ctx[0].text else "(not searched)"
        dim_lines.append(f"| {r.k} | {r.strength:.3g} | {r.gini:.3f} | "
                         f"{', '.join(f'{i} ({v:+.3f})' for i, v in r.top[:3])} | "
                         f"{', '.join(f'{j} ({w:+.4f})' for j, w in r.partners[first][:3])} | {text} |")
    (out / f"nfm_dimensions{tag}.md").write_text("\n".join(dim_lines) + "\n")


if __name__ == "__main__":
    main()
