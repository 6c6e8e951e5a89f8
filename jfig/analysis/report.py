"""report.md of an analysis: the analysis.json document rendered as Markdown tables with the
figures inline. Numbers only come from the document, so the two always agree."""
from __future__ import annotations


IDS = {"feature", "distance"}       # integer columns printed without thousands separators


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    if isinstance(x, float):
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        if x != 0 and abs(x) < 1e-3:
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}".rstrip("0").rstrip(".") if "." in f"{x:.{digits}f}" else f"{x:.{digits}f}"
    return str(x)


def _cell(key: str, value) -> str:
    text = str(value) if key in IDS and isinstance(value, int) else _num(value)
    return " ".join(text.split()).replace("|", "\\|")     # one line, no column breaks


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> list[str]:
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell(k, r.get(k)) for k, _ in cols) + " |")
    return out


def _figure(doc: dict, name: str, caption: str) -> list[str]:
    path = f"figures/{name}"
    return [f"![{caption}]({path})", ""] if path in doc.get("figures", []) else []


def markdown_report(doc: dict) -> str:
    g, s = doc["graph"], doc["settings"]
    lines = [f"# Interaction graph analysis: {g.get('model') or 'model'}", "",
             f"{_num(g['nodes'])} features, edges {', '.join(f'{k} {_num(v)}' for k, v in g['edges'].items())}, "
             f"{_num(g.get('pairs_tested'))} pairs tested, sites {', '.join(g['sites'])}.", "",
             f"Null: {s['null']}; {s['null_samples']} rewired copies (seed {s['seed']}); community modularity "
             f"against the first {s['community_nulls']}. z = (value - null mean) / null sd.", "",
             "## Predictions", ""]
    for key, p in doc["predictions"].items():
        lines += [f"- **{p['prediction']}**: **{p['verdict']}** ({p['reason']}). Null: {p.get('null', '–')}."]
        stat = p.get("statistic")
        if key == "sparsity" and stat:
            lines += [f"  Edge fraction {stat['fraction']:.4%} ({_num(stat['edges'])} / {_num(stat['tested'])}), "
                      f"95 % interval [{stat['ci95'][0]:.4%}, {stat['ci95'][1]:.4%}]."]
        elif key == "excitation_by_layer" and stat:
            c, w = stat["cross_layer"], stat["within_layer"]
            lines += [f"  Excitatory share across layers {_num(c['share'])} of {_num(c['edges'])} edges "
                      f"(p above 1/2: {_num(c.get('p_above_half'))}); within a layer {_num(w['share'])} of "
                      f"{_num(w['edges'])} (p below cross-layer: {_num(w.get('p_share_below_cross'))})."]
        elif key == "heavy_tails" and stat:
            f, h, d = stat["out_degree_fit"] or {}, stat["hub_ablation"], stat["degree_vs_firing_rate"]
            lines += [f"  Out-degree tail: α {_num(f.get('alpha'))} above xmin {_num(f.get('xmin'))}; power law vs "
                      f"exponential R {_num(f.get('r_exponential'))} (p {_num(f.get('p_exponential'))}), vs log-normal "
                      f"R {_num(f.get('r_lognormal'))} (p {_num(f.get('p_lognormal'))})."]
            if h:
                lines += [f"  Hub ablation: median loss effect {_num(h['hub_median'])} vs matched {_num(h['matched_median'])}"
                          f" (ratio {_num(h['ratio'])}, {h['hubs_above_matched']} hubs above their matched median, "
                          f"one-sided Mann-Whitney p {_num(h['p'])})."]
            if d:
                lines += [f"  Degree vs firing rate: Spearman {_num(d['spearman'])} (p {_num(d['p'])}, "
                          f"{_num(d['features'])} features)."]
    lines += ["", "## Degree distributions", "",
              *_table(doc["degrees"], [("direction", "direction"), ("sign", "edges"), ("weighted", "weighted (sum |w|)"),
                                       ("n_nodes", "features"),
                                       ("max_degree", "max"), ("alpha", "α"), ("xmin", "xmin"), ("n_tail", "in tail"),
                                       ("r_lognormal", "R vs log-normal"), ("p_lognormal", "p"),
                                       ("r_exponential", "R vs exponential"), ("p_exponential", "p"),
                                       ("vs_exponential", "power law or exponential")]),
              "", "R > 0 favours the power law; p tests the sign of R. Weighted rows fit each feature's strength "
                  "(summed |weight| of its edges) as a continuous value.", "",
              *_figure(doc, "degree_ccdf.png", "degree CCDFs"),
              "## Network statistics", "",
              *_table(doc["network"], [("statistic", "statistic"), ("value", "graph"), ("null_mean", "null mean"),
                                       ("null_sd", "null sd"), ("z", "z")]), ""]
    r = doc["reciprocity"]
    lines += [f"Reciprocity: {_num(r['value'])}" + (f" ({r['note']})." if r.get("note") else "."), "",
              "## Motifs (the feature grammar)", "",
              *_table(doc["motifs"], [("motif", "motif"), ("count", "count"), ("null_mean", "null mean"), ("z", "z"),
                                      ("verdict", "verdict"), ("description", "meaning")]), ""]
    for m in doc["motifs"]:
        for ex in m.get("examples", []):
            parts = [f"{n['site']}:{n['feature']}" + (f" “{' '.join(n['context'].split())[:60]}”" if n.get("context")
                                                       else "") for n in ex]
            lines.append(f"- {m['motif']}: " + " → ".join(parts))
    lines += ["", *_figure(doc, "motif_z.png", "motif z-scores"), "## Communities", ""]
    rows = [{"method": k, **v, **(v.get("atlas_agreement") or {})} for k, v in doc["communities"]["methods"].items()]
    lines += _table(rows, [("method", "method"), ("n_communities", "communities (≥ 2 features)"), ("value", "modularity"),
                           ("null_mean", "null mean"), ("z", "z"), ("nmi", "NMI with atlas"),
                           ("adjusted_rand", "ARI with atlas")])
    a = doc["communities"]["louvain_leiden_agreement"]
    lines += ["", f"Louvain and Leiden agree with NMI {_num(a['nmi'])}, ARI {_num(a['adjusted_rand'])}.", "",
              *_figure(doc, "community_sizes.png", "community sizes"),
              "## Excitatory and inhibitory subgraphs", "",
              *_table([{"sign": k, **v} for k, v in doc["signs"]["signs"].items()],
                      [("sign", "sign"), ("edges", "edges"), ("within_layer_share", "within a layer"),
                       ("mean_layer_distance", "mean layer distance"), ("mean_abs_weight", "mean abs weight"),
                       ("mean_fan_out", "mean fan-out"), ("mean_fan_in", "mean fan-in")]), "",
              *_table([{"quantity": k, **v} for k, v in doc["signs"]["tests"].items()],
                      [("quantity", "quantity"), ("excitatory_median", "excitatory median"),
                       ("inhibitory_median", "inhibitory median"), ("p", "Mann-Whitney p")]), "",
              "Each sign's subgraph against the same rewired copies restricted to that sign:", "",
              *_table([{"sign": k, **r} for k, rows in doc["signs"].get("network", {}).items() for r in rows
                       if r["statistic"] in ("average_clustering", "transitivity", "mean_path_length",
                                             "assortativity_out_in")],
                      [("sign", "sign"), ("statistic", "statistic"), ("value", "subgraph"), ("null_mean", "null mean"),
                       ("z", "z")]), "",
              "## Layer distance", "",
              *_table(doc["layer_decay"]["rows"], [("distance", "distance"), ("tested", "tested"), ("edges", "edges"),
                                                   ("excitatory", "excitatory"), ("inhibitory", "inhibitory"),
                                                   ("density", "density"), ("mean_abs_weight", "mean abs weight")]), ""]
    for key, label in (("weight_fit", "mean abs weight"), ("density_fit", "density")):
        f = doc["layer_decay"][key]
        lines.append(f"- {label}: preferred **{f.get('preferred')}**" + (f" ({f['note']})" if f.get("note") else "")
                     + (f"; exponential length {_num(f['exponential']['length'])}, power-law β "
                        f"{_num(f['power_law']['beta'])}" if f.get("exponential") else ""))
    lines += ["", *_figure(doc, "layer_decay.png", "layer-distance decay"), *_figure(doc, "adjacency.png", "adjacency"),
              "## Hubs", "",
              *_table([{**h, "context": (h["contexts"] or [""])[0][:50]} for h in doc["hubs"]],
                      [("site", "site"), ("feature", "feature"), ("out_degree", "out"), ("in_degree", "in"),
                       ("out_excitatory", "out +"), ("out_inhibitory", "out -"), ("firing_rate", "firing rate"),
                       ("context", "top context")]), ""]
    h = doc.get("hub_ablation")
    if h:
        lines += ["Hub ablation (mean |Δ loss| per token):", "",
                  *_table(h["hubs"], [("site", "site"), ("feature", "feature"), ("degree", "degree"),
                                      ("firing_rate", "firing rate"), ("effect", "effect"),
                                      ("matched_median", "matched median")]), ""]
    lines += [*_figure(doc, "estimator_agreement.png", "estimator agreement"),
              f"Seconds: {', '.join(f'{k} {v}' for k, v in s['seconds'].items())}.", ""]
    return "\n".join(lines)
