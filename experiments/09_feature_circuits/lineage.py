"""Experiment 09 (lineage): is "the same feature" found again through depth and across components,
where do features emerge and stop, how do they split, and which features form low-dimensional groups?

    jfig demo --out DEMO                      # once: a SmolLM2-135M graph with its atlas and build folder
    python -m experiments.09_feature_circuits.lineage --graph DEMO/graph

On a saved graph (its SAEs from jfig's cache, its atlas beside it, the build's tokens):

1. Chains through depth. The default SAEs at blocks.{6,10,14,18}.hook_resid_post matched layer to
   layer (jfig.analysis.match_layers) by decoder cosine, by activation correlation (both sites in one
   run, the sequence-start token left out) and by both; chains of mutual-best matches, and per site
   how many features persist, emerge and stop. Nulls: decoder matching against SAEs of random unit
   rows (the same shapes), and correlation matching with B's activations taken from other sequences
   (rows rolled by one sequence).
2. The causal criterion. For a random sample of live features of each earlier SAE, the standardised
   effect of clamping it on every feature of the next SAE (causal_similarity); its best target
   compared with the decoder's and the correlation's.
3. Components. resid_post 12 = resid_post 11 + attn_out 12 + mlp_out 12: SAEs at the four sites
   (default_saes; cached): each resid_post 12 feature's best correlate among the features of each
   writer, and which writer explains it best.
4. Splitting. A 512-wide SAE at blocks.10.hook_resid_post (default_saes, d_sae=512; trained once and
   cached) against the default 2048-wide one: parents by decoder cosine and by activation
   correlation, children, the split-count distribution; nulls: a random 512-row dictionary, and the
   narrow SAE's activations from other sequences.
5. Manifolds. Decoder clusters at each default site and co-activation communities over the graph's
   features; participation ratio, TWO-NN, the embedding labelled by top tokens, edges among members
   (for a one-site decoder group: the group with its decoder matches at the next site) against
   random groups.

Writes results/lineage_*.csv, results/lineage_summary.json, results/manifold_groups.csv and
results/manifold_groups.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

import jfig
from jfig.analysis import (causal_similarity, feature_chains, feature_manifolds, feature_splitting, group_manifold,
                           manifold_table, plot_manifolds, top_token_labels)
from jfig.atlas import Atlas
from jfig.data import tokens_from
from jfig.pipeline import find_atlas
from jfig.pipeline.behavior import cached_saes_for
from jfig.saes import default_saes, feature_correlation
from jfig.saes.matching import match_across, site_moments
from jfig.sites import site_key

HERE = Path(__file__).parent
SKIP = 1                        # the sequence-start token (an attention sink) is left out of correlations
# components: resid_post 12 = resid_post 11 + attn_out 12 + mlp_out 12. Residual SAEs: the default recipe at
# blocks.9..12 (2048 wide); output SAEs: 512 wide, k 16, 16,384 training tokens (each set trained once by
# default_saes and cached; their seeds, 2, 0, 1 and 3, give each a different initialisation)
RESID_SITES = tuple(f"blocks.{l}.hook_resid_post" for l in (9, 10, 11, 12))
OUTPUT_SITES = ("blocks.12.hook_attn_out", "blocks.12.hook_mlp_out")
OUTPUT_SETTINGS = dict(d_sae=512, k=16, tokens=16_384)
COMPONENT_SITES = ("blocks.11.hook_resid_post", *OUTPUT_SITES, "blocks.12.hook_resid_post")
SPLIT_SITE = "blocks.10.hook_resid_post"
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graph", required=True, help="graph folder of a build with the default SAEs (e.g. DEMO/graph)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--min-similarity", type=float, default=0.5, help="threshold of a match (cosine / correlation)")
    p.add_argument("--causal-features", type=int, default=64, help="live features per SAE clamped for the causal "
                                                                     "criterion")
    p.add_argument("--sequences", type=int, default=128, help="build sequences used for correlations")
    p.add_argument("--narrow", type=int, default=512, help="width of the narrow SAE of the splitting part (trained "
                                                          "by default_saes and cached on first use)")
    p.add_argument("--no-components", action="store_true", help="skip part 3 (it may train SAEs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--manifolds-only", action="store_true", help="only part 5 (manifolds), written to "
                                                                   "results/lineage_manifolds.json")
    p.add_argument("--init-check-only", action="store_true", help="only compare the SAEs' decoder rows with their "
                                                                    "initialisation (no model runs after loading)")
    return p.parse_args()


def write_csv(table: pa.Table, path: Path) -> None:
    pacsv.write_csv(table, path)
    log(f"wrote {path}")


def random_like(sae, seed: int):
    """An SAE of the same shape and site with random unit decoder rows (encoder = decoder^T)."""
    rows = np.random.default_rng(seed).standard_normal((sae.d_sae, sae.d_in))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return jfig.SAE(W_enc=rows.T, b_enc=np.zeros(sae.d_sae), W_dec=rows, b_dec=np.zeros(sae.d_in), site=sae.site)


def chain_rows(name: str, ch, live: dict) -> list[dict]:
    """Per site: emerge / persist / stop counts, over all features and over live ones (fired in the atlas)."""
    rows = []
    for i, site in enumerate(ch.sites):
        alive = live[site]
        present = ch.chains[:, i] >= 0
        emerged = np.zeros(ch.d_sae[i], bool)
        emerged[ch.chains[present & (ch.start == i), i]] = True
        persisted = None
        if i + 1 < len(ch.sites):
            persisted = np.zeros(ch.d_sae[i], bool)
            persisted[ch.chains[present & (ch.chains[:, i + 1] >= 0), i]] = True
        rows.append(dict(criterion=name, site=site, d_sae=ch.d_sae[i], live=int(alive.sum()),
                         emerge=int(ch.emerge[i]), persist=int(ch.persist[i]), stop=int(ch.stop[i]),
                         emerge_live=int((emerged & alive).sum()) if i else None,
                         persist_live=int((persisted & alive).sum()) if persisted is not None else None,
                         stop_live=int((~persisted & alive).sum()) if persisted is not None else None))
    return rows


def init_rows(seed: int, d_sae: int, d_in: int) -> np.ndarray:
    """The unit decoder rows jfig's trainer starts from with this seed (the default SAEs use seed 0 + the
    site's index in their set): normal rows from jax.random.key(seed), normalised."""
    w = np.array(jax.random.normal(jax.random.key(seed), (d_sae, d_in), jnp.float32), np.float64)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def init_check(saes, out: Path) -> list[dict]:
    """Per default SAE: quantiles of each decoder row's cosine with its own initial row, and of the
    largest cosine of each row with the next SAE's rows (what decoder matching across layers sees)."""
    rows = []
    unit = [np.asarray(s.W_dec, np.float64) / np.linalg.norm(np.asarray(s.W_dec, np.float64), axis=1, keepdims=True)
            for s in saes]
    for i, s in enumerate(saes):
        to_init = (unit[i] * init_rows(i, s.d_sae, s.d_in)).sum(1)
        nxt = (unit[i] @ unit[i + 1].T).max(1) if i + 1 < len(saes) else None
        rows.append(dict(site=s.site, init_seed=i, cos_to_init_q10=float(np.quantile(to_init, 0.1)),
                         cos_to_init_median=float(np.median(to_init)), cos_to_init_q90=float(np.quantile(to_init, 0.9)),
                         max_cos_next_median=None if nxt is None else float(np.median(nxt)),
                         max_cos_next_q99=None if nxt is None else float(np.quantile(nxt, 0.99))))
    rnd = init_rows(99, saes[0].d_sae, saes[0].d_in)
    rows.append(dict(site="random rows (seed 99) vs " + saes[1].site, init_seed=99,
                     max_cos_next_median=float(np.median((rnd @ unit[1].T).max(1))),
                     max_cos_next_q99=float(np.quantile((rnd @ unit[1].T).max(1), 0.99))))
    write_csv(pa.Table.from_pylist(rows), out / "lineage_decoder_init.csv")
    return rows


def narrow_acts(model, sae, tokens) -> np.ndarray:
    """[n, seq - SKIP, d_in] the activations an SAE reads, on the host."""
    out = model.run(tokens, capture=(sae.site,), stop_at=sae.site, logits=False).cache[sae.site]
    return np.asarray(out)[:, SKIP:]


PROBES = {"digits": [str(d) for d in range(10)],
          "days": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"],
          "months": ["january", "february", "march", "april", "may", "june", "july", "august", "september",
                     "october", "november", "december"]}


def manifold_part(saes, atlas, graph, model, live, decoder_matchings, out: Path, seed: int) -> dict:
    """Decoder clusters per site, co-activation communities over the graph's features, and probe groups
    (features whose top token is a digit, a day or a month name): each described, tabled and drawn."""
    t1 = time.time()
    labels = top_token_labels(atlas, model.tokenizer, [(s.site, f) for s in saes for f in range(s.d_sae)])
    groups = []
    for s in saes:
        feats = {s.site: np.flatnonzero(live[s.site])}
        groups += feature_manifolds(s, labels=labels, features=feats, graph=graph, null_samples=200, seed=seed)
    node_feats = {}
    for site, f in zip(graph.nodes["site"].to_pylist(), graph.nodes["feature"].to_pylist()):
        node_feats.setdefault(site, []).append(f)
    groups += feature_manifolds(saes, atlas=atlas, graph=graph, labels=labels, features=node_feats,
                                clusterings="coactivation", null_samples=200, seed=seed)
    for s in saes:
        for name, words in PROBES.items():
            members = [(s.site, f) for f in range(s.d_sae) if labels[(s.site, f)].strip().lower() in words]
            if len(members) >= 6:
                groups.append(group_manifold(s, members, graph=graph, labels=labels, null_samples=200, seed=seed,
                                             source=f"probe: {name}"))
    log(f"{len(groups)} groups ({sum(g.is_manifold for g in groups)} low-dimensional) in {time.time() - t1:.0f} s")
    # a one-site decoder group has no edges inside (the graph's edges go between sites): take it with its
    # decoder matches at the next site
    by_site = {s.site: i for i, s in enumerate(saes)}
    extended = []
    for g in groups:
        i = by_site[g.members[0][0]]
        if g.source != "decoder" or i + 1 >= len(saes):
            extended.append(None)
            continue
        m = decoder_matchings[i]
        nxt = [(saes[i + 1].site, int(m.match[f])) for _, f in g.members if m.match[f] >= 0]
        extended.append(group_manifold(saes, g.members + nxt, graph=graph, null_samples=200, seed=seed)
                        if nxt else None)
    table = manifold_table(groups)
    for name in ("edges", "density", "null_density", "null_p"):
        table = table.append_column(f"with_next_{name}", pa.array(
            [None if e is None else getattr(e, name) for e in extended], table[name].type))
    write_csv(table, out / "manifold_groups.csv")
    low = sorted([g for g in groups if g.is_manifold], key=lambda g: (g.participation_ratio, -g.size))
    shown = low[:9] or sorted(groups, key=lambda g: g.participation_ratio / max(g.dimension_null, 1e-9))[:6]
    if shown:
        plot_manifolds(shown, out / "manifold_groups.png")
    return dict(groups=len(groups), by_source={k: sum(g.source == k for g in groups)
                                               for k in sorted({g.source for g in groups})},
                low_dimensional=sum(g.is_manifold for g in groups), plotted="low-dimensional" if low else
                "none is low-dimensional: the groups of lowest PR / null PR",
                rows=[dict(source=g.source, size=g.size, sites=list(g.sites), pr=round(g.participation_ratio, 2),
                           pr_null=round(g.dimension_null, 2), two_nn=round(g.two_nn, 2),
                           explained_2=round(float(g.explained[:2].sum()), 3), edges=g.edges,
                           density=g.density, null_density=g.null_density, null_p=g.null_p, labels=g.labels[:16])
                      for g in groups])


def main():
    args = arguments()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    graph_dir = Path(args.graph)
    graph = jfig.load_graph(graph_dir)
    model = jfig.load_model(args.model)
    saes = sorted(cached_saes_for(model, graph.manifest), key=lambda s: site_key(s.site))
    atlas = Atlas.load(find_atlas(graph_dir))
    st = graph.manifest["statistics"]
    tokens = tokens_from("default", model, st["seq_len"], max_tokens=st["n_sequences"] * st["seq_len"])
    tokens = tokens[: args.sequences]
    live = {s.site: atlas.firing_count(s.site) > 0 for s in saes}
    log(f"graph {graph}; SAEs at {[s.site for s in saes]}; {tokens.shape[0]} x {tokens.shape[1]} tokens; live "
        f"features {[int(v.sum()) for v in live.values()]}")
    summary: dict = dict(graph=str(graph_dir), n_tokens=int(tokens[:, SKIP:].size), min_similarity=args.min_similarity,
                         seed=args.seed)
    init = init_check(saes, out)
    log("decoder rows vs their initialisation: median cosine " + ", ".join(
        f"{r['site']} {r['cos_to_init_median']:.2f}" for r in init[:-1]))
    if args.init_check_only:
        return
    if args.manifolds_only:
        decoder = [match_across(a, b, min_similarity=args.min_similarity) for a, b in zip(saes[:-1], saes[1:])]
        result = manifold_part(saes, atlas, graph, model, live, decoder, out, args.seed)
        (out / "lineage_manifolds.json").write_text(json.dumps(result, indent=1, default=float))
        log(f"done in {time.time() - T0:.0f} s")
        return
    summary["decoder_init"] = init

    # ------------------------------------------------------------ 1. chains through depth, three criteria
    t1 = time.time()
    moments = [site_moments(a, b, model=model, tokens=tokens, batch_size=16, skip_positions=SKIP)
               for a, b in zip(saes[:-1], saes[1:])]
    log(f"streamed moments of 3 layer pairs in {time.time() - t1:.0f} s")
    crit = {}
    for method in ("decoder", "activation", "both"):
        crit[method] = [match_across(a, b, method=method, min_similarity=args.min_similarity,
                                     moments=None if method == "decoder" else m)
                        for (a, b), m in zip(zip(saes[:-1], saes[1:]), moments)]
    chains = {k: feature_chains(v) for k, v in crit.items()}
    rows = [r for k, ch in chains.items() for r in chain_rows(k, ch, live)]
    # nulls: random decoder rows; correlations with B's activations from other sequences
    rand = [random_like(s, args.seed + i) for i, s in enumerate(saes)]
    null_dec = [match_across(a, b, min_similarity=args.min_similarity) for a, b in zip(rand[:-1], rand[1:])]
    rows += chain_rows("decoder null (random rows)", feature_chains(null_dec), live)
    t1 = time.time()
    null_act = []
    for a, b in zip(saes[:-1], saes[1:]):
        cache = model.run(tokens, capture=(a.site, b.site), stop_at=b.site, logits=False).cache
        xa, xb = np.asarray(cache[a.site])[:, SKIP:], np.roll(np.asarray(cache[b.site])[:, SKIP:], 1, axis=0)
        null_act.append(match_across(a, b, method="activation", min_similarity=args.min_similarity,
                                     activations=xa, activations_b=xb, batch_size=16))
    rows += chain_rows("activation null (B from other sequences)", feature_chains(null_act), live)
    log(f"null matchings in {time.time() - t1:.0f} s")
    write_csv(pa.Table.from_pylist(rows), out / "lineage_chains.csv")
    summary["chain_lengths"] = {k: {str(n): c for n, c in ch.length_counts().items()} for k, ch in chains.items()}
    full = {k: int((ch.length == len(ch.sites)).sum()) for k, ch in chains.items()}
    summary["chains_through_all_four"] = full
    log(f"chains through all four sites: {full}")

    # agreement between criteria, per layer pair
    agree = []
    for i, (a, b) in enumerate(zip(saes[:-1], saes[1:])):
        d, c, bo = crit["decoder"][i], crit["activation"][i], crit["both"][i]
        alive = live[a.site]
        same = (d.match >= 0) & (d.match == c.match)
        agree.append(dict(site_a=a.site, site_b=b.site, live_a=int(alive.sum()), decoder=d.n_matched,
                          activation=c.n_matched, both=bo.n_matched, decoder_and_activation_same=int(same.sum()),
                          decoder_only=int(((d.match >= 0) & (c.match < 0)).sum()),
                          activation_only=int(((c.match >= 0) & (d.match < 0)).sum()),
                          best_same=int((d.best == c.best)[alive].sum()),
                          null_decoder=null_dec[i].n_matched, null_activation=null_act[i].n_matched,
                          median_cos_of_matched=float(np.median(d.similarity[d.match >= 0])) if d.n_matched else None,
                          median_corr_of_matched=float(np.median(c.similarity[c.match >= 0])) if c.n_matched else None))

    # ------------------------------------------------------------ 2. the causal criterion on a sample
    rng = np.random.default_rng(args.seed)
    causal_rows = []
    for i, (a, b) in enumerate(zip(saes[:-1], saes[1:])):
        t1 = time.time()
        feats = np.sort(rng.choice(np.flatnonzero(live[a.site]), args.causal_features, replace=False))
        cs = causal_similarity(model, a, b, tokens, features=feats, moments=moments[i], inputs_per_source=16,
                               batch_size=16, skip_positions=SKIP, atlas=atlas, seed=args.seed)
        cm = match_across(a, b, method="causal", min_similarity=args.min_similarity, causal=cs)
        best_c = np.nanargmax(cs[feats], axis=1)
        d, c = crit["decoder"][i], crit["activation"][i]
        top = cs[feats, best_c]
        agree[i].update(causal_sampled=len(feats), causal_matched=int((cm.match[feats] >= 0).sum()),
                        causal_best_is_decoder_best=int((best_c == d.best[feats]).sum()),
                        causal_best_is_activation_best=int((best_c == c.best[feats]).sum()),
                        causal_median_top=float(np.median(top)),
                        causal_at_activation_match=float(np.median(
                            [cs[f, c.match[f]] for f in feats if c.match[f] >= 0])) if (c.match[feats] >= 0).any()
                        else None)
        for f, bc, tv in zip(feats, best_c, top):
            causal_rows.append(dict(site_a=a.site, feature=int(f), causal_best=int(bc), causal_top=float(tv),
                                    decoder_best=int(d.best[f]), decoder_cos=float(d.similarity[f]),
                                    activation_best=int(c.best[f]), correlation=float(c.similarity[f]),
                                    causal_match=int(cm.match[f])))
        log(f"causal {a.site} -> {b.site}: {len(feats)} sources in {time.time() - t1:.0f} s; best target = decoder's "
            f"for {agree[i]['causal_best_is_decoder_best']}, = correlation's for "
            f"{agree[i]['causal_best_is_activation_best']}")
    write_csv(pa.Table.from_pylist(agree), out / "lineage_criteria.csv")
    write_csv(pa.Table.from_pylist(causal_rows), out / "lineage_causal_sample.csv")
    summary["criteria"] = agree

    # ------------------------------------------------------------ 4. splitting
    t1 = time.time()
    narrow = default_saes(model, sites=[SPLIT_SITE], d_sae=args.narrow, progress=False)[0][0]
    wide = {s.site: s for s in saes}[SPLIT_SITE]
    log(f"narrow SAE ready in {time.time() - t1:.0f} s")
    split = feature_splitting(narrow, wide, min_similarity=args.min_similarity)
    split_null = feature_splitting(random_like(narrow, args.seed + 7), wide, min_similarity=args.min_similarity)
    # the same parent map read from activations: each wide feature's most correlated narrow feature
    corr = feature_correlation(narrow, wide, model=model, tokens=tokens, batch_size=16, skip_positions=SKIP)
    corr_best, corr_top = corr.argmax(0), corr.max(0)                          # [d_wide]
    corr_parent = np.where(corr_top >= args.min_similarity, corr_best, -1)
    corr_counts = np.bincount(corr_parent[corr_parent >= 0], minlength=narrow.d_sae)
    acts = narrow_acts(model, narrow, tokens)
    rolled = feature_correlation(narrow, wide, activations=acts, activations_b=np.roll(acts, 1, axis=0), batch_size=16)
    null_corr_parent = (rolled.max(0) >= args.min_similarity)
    dist = split.distribution()
    dist_null = split_null.distribution()
    dist_corr = dict(zip(*[x.tolist() for x in np.unique(corr_counts, return_counts=True)]))
    keys = sorted(set(dist) | set(dist_null) | set(dist_corr))
    srows = [dict(children=k, narrow_by_decoder=dist.get(k, 0), narrow_by_decoder_null=dist_null.get(k, 0),
                  narrow_by_correlation=dist_corr.get(k, 0)) for k in keys]
    write_csv(pa.Table.from_pylist(srows), out / "lineage_splitting.csv")
    both = (split.parent >= 0) & (corr_parent >= 0)
    summary["splitting"] = dict(site=wide.site, narrow=narrow.d_sae, wide=wide.d_sae,
                                decoder_wide_with_parent=int((split.parent >= 0).sum()),
                                decoder_null_wide_with_parent=int((split_null.parent >= 0).sum()),
                                median_parent_cosine=float(np.median(split.parent_cosine)),
                                null_median_parent_cosine=float(np.median(split_null.parent_cosine)),
                                correlation_wide_with_parent=int((corr_parent >= 0).sum()),
                                correlation_null_wide_with_parent=int(null_corr_parent.sum()),
                                median_parent_correlation=float(np.median(corr_top)),
                                parents_agree=int((split.parent[both] == corr_parent[both]).sum()),
                                both=int(both.sum()),
                                decoder_distribution={str(k): v for k, v in dist.items()},
                                correlation_distribution={str(k): v for k, v in dist_corr.items()},
                                correlation_max_children=int(corr_counts.max()),
                                correlation_narrow_with_2_or_more=int((corr_counts >= 2).sum()))
    log(f"splitting in {time.time() - t1:.0f} s: {split.summary()}; by correlation: {int((corr_parent >= 0).sum())} "
        f"wide features with a parent, narrow features by children {dist_corr}")

    # ------------------------------------------------------------ 5. manifolds
    summary["manifolds"] = manifold_part(saes, atlas, graph, model, live, crit["decoder"], out, args.seed)

    # ------------------------------------------------------------ 3. components
    if not args.no_components:
        t1 = time.time()
        resid = {s.site: s for s in default_saes(model, sites=list(RESID_SITES), progress=False)[0]}
        outputs = {s.site: s for s in default_saes(model, sites=list(OUTPUT_SITES), progress=False,
                                                   **OUTPUT_SETTINGS)[0]}
        by = {**resid, **outputs}
        target = by[COMPONENT_SITES[-1]]
        log(f"component SAEs ready in {time.time() - t1:.0f} s")
        best, crows = {}, []
        for site in COMPONENT_SITES[:3]:
            src = by[site]
            mom = site_moments(src, target, model=model, tokens=tokens, batch_size=16, skip_positions=SKIP)
            m = match_across(src, target, method="activation", min_similarity=args.min_similarity, moments=mom)
            # the same moments seen from the target's side (layout of jfig.saes.matching.empty_moments)
            back = match_across(target, src, method="activation", min_similarity=args.min_similarity,
                                moments=(mom[0], mom[2], mom[1], mom[4], mom[3], mom[5].T))
            best[site] = back.similarity                            # each target feature's best correlation here
            crows.append(dict(source=site, target=target.site, d_sae_source=src.d_sae, activation_matched=m.n_matched,
                              decoder_matched=match_across(src, target, min_similarity=args.min_similarity).n_matched,
                              median_best_corr_of_target=float(np.median(back.similarity))))
        stack = np.stack([best[s] for s in COMPONENT_SITES[:3]])           # [3, d_target]
        winner = np.argmax(stack, axis=0)
        for k, site in enumerate(COMPONENT_SITES[:3]):
            crows[k]["target_features_best_explained_here"] = int((winner == k).sum())
            crows[k]["of_those_corr_ge_threshold"] = int(((winner == k) & (stack.max(0) >= args.min_similarity)).sum())
        write_csv(pa.Table.from_pylist(crows), out / "lineage_components.csv")
        summary["components"] = crows
        log(f"components in {time.time() - t1:.0f} s")

    summary["seconds"] = round(time.time() - T0)
    (out / "lineage_summary.json").write_text(json.dumps(summary, indent=1, default=float))
    log(f"done in {summary['seconds']} s")


if __name__ == "__main__":
    main()
