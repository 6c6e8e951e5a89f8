"""Crosscoders on SmolLM2: reconstruction with and without the interaction penalty, and the crosscoder's
interaction graph against the per-layer SAEs' graph.

    python -m experiments.06_compact_proof_metrics.crosscoder --graph DEMO/graph --out DIR

Stages (each reused from DIR when already there, so an interrupted run resumes):
1. capture the residual stream at the graph's SAE sites on the default corpus (the SAE recipe's tokens);
2. train a TopK crosscoder over the stacked sites (lambda = 0), then one with the interaction penalty,
   lambda set so the penalty weighs a tenth of the plain crosscoder's reconstruction error;
3. evaluate both (and the per-layer SAEs) on held-out sequences: FVU per layer, L0, dead fraction, the
   interaction penalty per token;
4. the plain crosscoder's graph on the SAE graph's tokens, with the SAE graph's testing (clamp at the
   strongest position, encoder pre-activation, Bonferroni alpha = 0.01, tau from random directions);
5. compare: decoder agreement per site, edge counts and kinds by layer distance, diff_graphs through
   the decoder matching.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

import jfig
from jfig.data import tokens_from
from jfig.interactions.neurons import mlp_readers
from jfig.pipeline.behavior import cached_saes_for
from jfig.pipeline.crosscoder import crosscoder_graph, crosscoder_matching, decoder_agreement
from jfig.saes import load_crosscoder, save_crosscoder
from jfig.saes.train import capture_stacked, fit_crosscoder, interaction_penalty, CrosscoderConfig

HERE = Path(__file__).parent
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.0f} s] {msg}", flush=True)


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graph", required=True, help="the per-layer SAE graph (jfig demo's OUT/graph)")
    p.add_argument("--out", required=True, help="working folder (crosscoders, captured activations, graph)")
    p.add_argument("--results", default=str(HERE / "results"), help="where the small result tables go")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--d-cc", type=int, default=2048)
    p.add_argument("--k", type=int, default=64, help="latents kept per token (the four SAEs keep 4 x 32)")
    p.add_argument("--train-sequences", type=int, default=512)
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--penalty-share", type=float, default=0.1,
                   help="lambda = share x (plain crosscoder's mse / its penalty) on the first batches")
    p.add_argument("--sources-per-layer", type=int, default=32)
    p.add_argument("--inputs", type=int, default=32, help="inputs per source (the SAE graph's 32: 16 cannot reach Bonferroni)")
    return p.parse_args()


def evaluate(cc, xs, readers, scale) -> dict:
    """FVU per layer, L0, dead fraction and the interaction penalty per token on xs [n, L, d] (the
    penalty in training units: decoder rows times each layer's input scale [L])."""
    f = np.concatenate([np.asarray(cc.encode(jnp.asarray(xs[i:i + 1024]))) for i in range(0, len(xs), 1024)])
    xh = np.concatenate([np.asarray(cc.decode(jnp.asarray(f[i:i + 1024]))) for i in range(0, len(f), 1024)])
    fvu = ((xh - xs) ** 2).sum(axis=(0, 2)) / ((xs - xs.mean(0)) ** 2).sum(axis=(0, 2))
    W = cc.W_dec * jnp.asarray(scale)[None, :, None]
    pen = np.mean([float(interaction_penalty(jnp.asarray(f[i:i + 512]), W, readers)) for i in range(0, len(f), 512)])
    return {"fvu_" + s.split(".")[1]: float(v) for s, v in zip(cc.sites, fvu)} | {
        "fvu_pooled": float(((xh - xs) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()),
        "l0": float((f > 0).sum(-1).mean()), "dead_fraction": float(((f > 0).sum(0) == 0).mean()),
        "interaction_per_token": pen}


def unit_readers(model, sites) -> jnp.ndarray:
    r = mlp_readers(model, sites)
    return jnp.asarray(r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12))


def train(xs, sites, cfg, readers, folder: Path):
    if (folder / "crosscoder.json").exists():
        log(f"crosscoder in {folder}: reused")
        return load_crosscoder(folder)
    t = time.time()
    cc, hist = fit_crosscoder(xs, sites, xs.shape[-1], cfg, readers=readers, checkpoint_dir=folder.with_suffix(".ckpt"),
                              progress=False)
    log(f"trained {folder.name}: {cfg.steps} steps in {time.time() - t:.0f} s, last loss {hist['loss'][-1]:.4g}")
    save_crosscoder(cc, folder)
    return cc


def edge_profile(graph, name: str) -> list[dict]:
    e = graph.edges.to_pydict()
    layer = lambda s: int(s.split(".")[1])  # noqa: E731
    n_src = len({(s, f) for s, f in zip(graph.nodes["site"].to_pylist(), graph.nodes["feature"].to_pylist())})
    rows = []
    for gap in sorted({layer(t) - layer(s) for s, t in zip(e["source_site"], e["target_site"])}):
        sel = [i for i, (s, t) in enumerate(zip(e["source_site"], e["target_site"])) if layer(t) - layer(s) == gap]
        exc = sum(e["kind"][i] == "excitatory" for i in sel)
        rows.append({"graph": name, "layer_gap": gap, "edges": len(sel), "excitatory": exc,
                     "inhibitory": len(sel) - exc,
                     "median_abs_weight": float(np.median(np.abs([e["weight"][i] for i in sel]))),
                     "nodes": n_src})
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    pacsv.write_csv(pa.Table.from_pylist(rows), path)


def main():
    args = arguments()
    out, res = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    res.mkdir(parents=True, exist_ok=True)
    sae_graph = jfig.load_graph(args.graph)
    model = jfig.load_model(args.model)
    saes = {s.site: s for s in cached_saes_for(model, sae_graph.manifest)}
    sites = sorted(saes, key=jfig.sites.site_key)
    log(f"sites {sites}")
    n_seq = args.train_sequences + args.eval_sequences
    toks = tokens_from("default", model, 64, seed=0, max_tokens=n_seq * 64)
    train_toks, eval_toks = toks[: args.train_sequences], toks[args.train_sequences: n_seq]
    xs = capture_stacked(model, train_toks, sites)
    xe = np.asarray(capture_stacked(model, eval_toks, sites))
    log(f"captured {xs.shape[0]:,} training and {xe.shape[0]:,} held-out tokens x {len(sites)} layers")
    readers = unit_readers(model, sites)
    scale = np.sqrt(xs.shape[-1]) / np.linalg.norm(np.asarray(xs[:4096]), axis=-1).mean(0)     # [L] training units
    steps = max(1, args.epochs * xs.shape[0] // 1024)
    base = dict(d_sae=args.d_cc, architecture="topk", k=args.k, steps=steps, batch_size=1024, lr=2e-3,
                warmup_steps=20, checkpoint_every=25)
    plain = train(xs, sites, CrosscoderConfig(**base), None, out / "cc_plain")
    probe = evaluate(plain, xe, readers, scale)
    sample = jnp.asarray(xe[:1024])
    err = (plain.reconstruct(sample) - sample) * jnp.asarray(scale)[:, None]
    mse_scaled = float(jnp.mean(jnp.sum(err ** 2, axis=(-2, -1))))
    lam = args.penalty_share * mse_scaled / max(probe["interaction_per_token"], 1e-12)
    log(f"penalty weight lambda = {lam:.3g} (a share {args.penalty_share} of the plain crosscoder's mse "
        f"{mse_scaled:.4g} over its penalty {probe['interaction_per_token']:.4g}, both in training units)")
    pen = train(xs, sites, CrosscoderConfig(**base, interaction_penalty=lam), readers, out / "cc_penalty")
    rows = [{"dictionary": "crosscoder", "lambda": 0.0, **probe},
            {"dictionary": "crosscoder + penalty", "lambda": lam, **evaluate(pen, xe, readers, scale)}]
    sae_row = {"dictionary": "per-layer SAEs (4 x TopK 32)", "lambda": float("nan")}
    for s in sites:
        x = xe[:, sites.index(s)]
        xh = np.asarray(saes[s].reconstruct(jnp.asarray(x)))
        sae_row["fvu_" + s.split(".")[1]] = float(((xh - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    sae_row["l0"] = float(sum((np.asarray(saes[s].encode(jnp.asarray(xe[:, i]))) > 0).sum(-1).mean()
                              for i, s in enumerate(sites)))
    rows.append(sae_row)
    write_csv(rows, res / "crosscoder_training.csv")
    log("training table: " + json.dumps(rows, default=float))

    st = sae_graph.manifest["statistics"]
    gtoks = tokens_from("default", model, st["seq_len"], max_tokens=st["n_sequences"] * st["seq_len"])
    gdir = out / "graph_plain"
    if (gdir / "manifest.json").exists():
        cc_graph = jfig.load_graph(gdir)
        log("crosscoder graph reused")
    else:
        t = time.time()
        cc_graph = crosscoder_graph(model, plain, gtoks, sources_per_layer=args.sources_per_layer,
                                    inputs_per_source=args.inputs, read="pre", alpha=0.01, correction="bonferroni",
                                    null_sources=8, out_dir=gdir, progress=False)
        log(f"crosscoder graph in {time.time() - t:.0f} s: {cc_graph}")
    agree = [{"site": s, "sae_features": saes[s].d_sae,
              "best_abs_cos_median": float(np.median(decoder_agreement(plain, saes[s]))),
              "share_cos_ge_0.7": float((decoder_agreement(plain, saes[s]) >= 0.7).mean()),
              "crosscoder_home_features": int((np.asarray(plain.home_sites()) == s).sum())} for s in sites]
    write_csv(agree, res / "crosscoder_decoder_agreement.csv")
    prof = edge_profile(sae_graph, "per-layer SAEs") + edge_profile(cc_graph, "crosscoder")
    write_csv(prof, res / "crosscoder_edges_by_gap.csv")
    diffs = {}
    cc_sources = set(int(f) for f in cc_graph.manifest["sources"])
    for method in ("decoder", "activation"):
        matching = crosscoder_matching(plain, saes, method=method, activations=xe, min_similarity=0.5)
        diff = jfig.diff_graphs(sae_graph, cc_graph, matching=matching)
        t = diff.table.to_pydict()
        # SAE edges whose matched source the crosscoder graph measured: found again (same sign), flipped, absent
        found = {"same": 0, "flipped": 0, "lost": 0}
        for status, sb in zip(t["status"], t["source_b"]):
            if status in found and sb is not None and int(sb) in cc_sources:
                found[status] += 1
        diffs[method] = {"matched_sae_features": {s: int((m >= 0).sum()) for s, m in matching.items()},
                         "status_counts": dict(diff.counts), "sae_edges_with_measured_matched_source": found}
        log(f"diff through {method} matching: {diffs[method]}")
    summary = {"training": rows, "decoder_agreement": agree, "edges_by_gap": prof,
               "diffs": diffs, "sae_graph_tested": sae_graph.manifest.get("n_tested"),
               "crosscoder_graph_tested": cc_graph.manifest.get("n_tested"),
               "crosscoder_graph_edges": cc_graph.edges.num_rows, "sae_graph_edges": sae_graph.edges.num_rows,
               "seconds": time.time() - T0}
    (res / "crosscoder_summary.json").write_text(json.dumps(summary, indent=2, default=float))
    log("summary: " + json.dumps({k: summary[k] for k in ("diffs", "crosscoder_graph_edges", "sae_graph_edges")}))


if __name__ == "__main__":
    main()
