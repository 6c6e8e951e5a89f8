"""`behavior_subgraph`: a behaviour's seed features, its k-hop subgraph of the interaction graph, and
the tests that make it a circuit (sufficiency, necessity, self-containment, head-level carriers)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

from ..data.files import atomic_folder
from ..errors import JfigError
from .heads import can_carry, edge_heads, head_patching
from .metric import suite_baseline
from .modularity import self_containment
from .seeds import Seed, feature_scores, find_seeds
from .subgraph import Subgraph, khop_subgraph
from .suite import SuiteTokens, as_suite, tokenize_suite
from .validate import CircuitTest, circuit_test

log = logging.getLogger(__name__)
HEAD_CIRCUITS = ("induction", "ioi")    # behaviours with published head-level circuits


@dataclass
class BehaviorCircuit:
    """What `behavior_subgraph` found for one behaviour (see `as_dict` for every field)."""

    behavior: str
    k: int
    baseline: dict
    seeds: list
    subgraph: Subgraph
    test: CircuitTest
    seeds_test: CircuitTest
    containment: dict
    heads: dict | None = None
    options: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"behavior": self.behavior, "k": self.k, "options": self.options, "baseline": self.baseline,
                "seeds": [s._asdict() for s in self.seeds],
                "subgraph": {"n_nodes": len(self.subgraph), "n_edges": self.subgraph.edges.num_rows,
                             "nodes": [{"site": s, "feature": f, "hop": self.subgraph.hop[(s, f)]}
                                       for s, f in self.subgraph.nodes]},
                "circuit_test": self.test.as_dict(), "seeds_only_test": self.seeds_test.as_dict(),
                "self_containment": self.containment, "heads": self.heads}

    def write(self, out_dir) -> Path:
        """report.md, circuit.json and subgraph_edges.csv in out_dir (written atomically)."""
        with atomic_folder(out_dir) as tmp:
            (tmp / "circuit.json").write_text(json.dumps(self.as_dict(), indent=1, default=float))
            pacsv.write_csv(self.subgraph.edges, tmp / "subgraph_edges.csv")
            (tmp / "report.md").write_text(circuit_report(self))
        return Path(out_dir)


def behavior_subgraph(model, saes, graph, suite, k: int = 2, *, n: int | None = 48, seed: int = 0,
                      n_candidates: int = 32, n_seeds: int = 8, min_effect: float = 0.05, min_weight: float = 0.0,
                      per_node: int | None = 10,
                      n_random: int = 50, pool: int = 10, n_null: int = 50, heads: bool = True, top_heads: int = 5,
                      top_edges: int = 5, batch_size: int = 8) -> BehaviorCircuit:
    """Seed features of `suite` (a behaviour name, .jsonl path, BehaviorSuite, or SuiteTokens for a model
    without a tokenizer; n prompts of a built-in suite), the k-hop
    subgraph of `graph` around them, and its sufficiency/necessity against matched random sets.
    The walk follows each feature's `per_node` strongest edges per direction (None: all of them).

    saes: the SAEs of the graph's sites (a list or {site: SAE}); features of sites without an SAE
    cannot be edited and are refused. With `heads` and a behaviour in HEAD_CIRCUITS whose prompts
    have aligned corrupted versions, the heads are found by patching and the strongest subgraph
    edges are attributed to them.
    """
    for name, v, least in (("k", k, 0), ("n_random", n_random, 0), ("n_null", n_null, 0), ("n_seeds", n_seeds, 1),
                           ("n_candidates", n_candidates, 1), ("pool", pool, 1), ("top_heads", top_heads, 1),
                           ("top_edges", top_edges, 1), ("batch_size", batch_size, 1),
                           ("per_node", 1 if per_node is None else per_node, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
            raise JfigError(f"{name} must be an int >= {least}, got {v!r}")
    if not 0 <= min_effect < np.inf or not 0 <= min_weight < np.inf:
        raise JfigError(f"min_effect and min_weight must be finite and >= 0, got {min_effect} and {min_weight}")
    saes = model.check_saes(saes)
    graph_sites = set(graph.nodes["site"].to_pylist())
    saes = {s: sae for s, sae in saes.items() if s in graph_sites}
    if not saes:
        raise JfigError(f"none of the SAEs reads a site of the graph (graph sites: {sorted(graph_sites)})")
    if isinstance(suite, SuiteTokens):                  # already tokenised (models without a tokenizer)
        name, batch = "tokens", suite
    else:
        suite = as_suite(suite, n, seed)
        name, batch = suite.name, tokenize_suite(model, suite)
    baseline = suite_baseline(model, batch, batch_size=batch_size)
    log.info("%s: %d prompts, accuracy %.3f, mean logit difference %.3f", name, baseline.n, baseline.accuracy,
             baseline.logit_diff)
    scores = feature_scores(model, saes, batch, batch_size=batch_size)
    nodes = {}
    for s, f in zip(graph.nodes["site"].to_pylist(), graph.nodes["feature"].to_pylist()):
        nodes.setdefault(s, set()).add(f)
    seeds = find_seeds(model, saes, batch, scores, baseline.logit_diff, nodes=nodes, n_candidates=n_candidates,
                       n_seeds=n_seeds, min_effect=min_effect, batch_size=batch_size)
    if not seeds:
        raise JfigError(f"no seed features for {name!r}: none of the {n_candidates} best-attributed graph "
                        f"features drops the metric by {min_effect:.0%} of its clean value when ablated; lower "
                        f"min_effect or raise n_candidates")
    seed_nodes = [(s.site, s.feature) for s in seeds]
    sub = khop_subgraph(graph, seed_nodes, k, min_weight=min_weight, per_node=per_node)
    log.info("%s: %d seeds, subgraph of %d features and %d edges", name, len(seeds), len(sub),
             sub.edges.num_rows)
    test = circuit_test(model, saes, batch, sub.nodes, scores.mean, scores.firing_rate, n_random=n_random,
                        pool=pool, seed=seed, batch_size=batch_size)
    seeds_test = circuit_test(model, saes, batch, seed_nodes, scores.mean, scores.firing_rate, n_random=n_random,
                              pool=pool, seed=seed + 1, batch_size=batch_size)
    containment = self_containment(graph, sub.nodes, seed_nodes, k, n_null=n_null, pool=pool, seed=seed,
                                   min_weight=min_weight, per_node=per_node)
    head_part = None
    if heads and name in HEAD_CIRCUITS and model.config is not None and batch.corrupted is not None \
            and batch.aligned.any():
        head_part = head_circuit(model, saes, batch, sub, top_heads=top_heads, top_edges=top_edges,
                                 batch_size=batch_size)
    options = dict(n=len(batch.tokens), seed=seed, n_candidates=n_candidates, n_seeds=n_seeds, min_effect=min_effect,
                   min_weight=min_weight, per_node=per_node, n_random=n_random, pool=pool, n_null=n_null)
    return BehaviorCircuit(name, k, baseline.as_dict(), seeds, sub, test, seeds_test, containment, head_part,
                           options)


def head_circuit(model, saes, batch, sub: Subgraph, *, top_heads: int, top_edges: int, batch_size: int) -> dict:
    """Heads found by patching (clean <- corrupted, aligned rows), and for each of the strongest subgraph
    edges the share of its cross-position effect carried by each of the `top_heads` heads (by
    activation patching) among those whose layer can carry it."""
    rows = np.flatnonzero(batch.aligned)
    args = (batch.tokens[rows], batch.corrupted[rows], batch.last[rows], batch.answer[rows], batch.distractor[rows])
    effects = head_patching(model, *args, batch_size=batch_size)
    ranked = [lh for lh, _ in effects.top(effects.activation.size)]
    first = sub.edges.filter(np.asarray([k != "gating" for k in sub.edges["kind"].to_pylist()]))
    order = np.argsort(-np.abs(first["weight"].to_numpy()))[:top_edges]
    carried = []
    for i in order:
        r = {c: first[c][int(i)].as_py() for c in ("source_site", "source", "target_site", "target", "weight")}
        heads = [lh for lh in ranked if can_carry(lh[0], r["source_site"], r["target_site"])][:top_heads]
        if not heads:
            continue
        got = edge_heads(model, saes[r["source_site"]], r["source"], saes[r["target_site"]], r["target"],
                         batch.tokens[rows], batch.last[rows], heads, batch_size=batch_size)
        r.update(cross_position_effect=float(got.effect),
                 share={f"L{l}H{h}": float(x) for (l, h), x in zip(heads, got.share)},
                 patching={f"L{l}H{h}": float(effects.activation[l, h]) for l, h in heads})
        carried.append(r)
    return {"n_prompts": int(len(rows)), "clean_metric": float(effects.clean_metric),
            "corrupted_metric": float(effects.corrupted_metric),
            "top_heads": [{"layer": int(l), "head": int(h), "activation_patching": float(effects.activation[l, h]),
                           "path_to_logits": float(effects.path_to_logits[l, h])} for l, h in ranked[:top_heads]],
            "edges": carried}


def circuit_report(c: BehaviorCircuit) -> str:
    """Markdown report of one behaviour circuit."""
    b, t, s = c.baseline, c.test, c.seeds_test
    lines = [f"# Behaviour circuit: {c.behavior}", "",
             f"Baseline on {b['n']} prompts: accuracy {b['accuracy']:.3f} (answer outscores the distractor), top-1 "
             f"{b['top1']:.3f}, p(answer) {b['p_answer']:.3f}, mean logit difference {b['logit_diff']:.3f}"
             + (f" (corrupted prompts: {b['corrupted_logit_diff']:.3f})" if b.get("corrupted_logit_diff") is not None
                else "") + ".", "",
             "## Seed features", "",
             "Ranked by attribution patching, confirmed by exact error-preserving ablation (every prompt position "
             "after the first).", "",
             "| site | feature | attribution | ablation drop | fraction of metric | firing rate |", "|---|---|---|---|---|---|"]
    lines += [f"| {x.site} | {x.feature} | {x.attribution:.3f} | {x.effect:.3f} | {x.fraction:.3f} | {x.firing_rate:.3f} |"
              for x in c.seeds]
    hops = [h for h in c.subgraph.hop.values()]
    lines += ["", f"## Subgraph ({c.k} hops up and down)", "",
              f"{len(c.subgraph)} features ({sum(h < 0 for h in hops)} upstream, {sum(h > 0 for h in hops)} downstream "
              f"of the seeds) and {c.subgraph.edges.num_rows} edges "
              f"({', '.join(f'{k} {v}' for k, v in _kinds(c.subgraph).items())}).", "",
              "## Sufficiency and necessity", "",
              "m is the mean logit difference; clean "
              f"{t.clean:.3f}, every feature of every SAE site mean-ablated {t.none:.3f}. Sufficiency = (m(only the set "
              "kept, everything else mean-ablated) − m(all mean-ablated)) / (m(clean) − m(all mean-ablated)); "
              "necessity = 1 − m(the set ablated to 0) / m(clean), the fraction of the logit difference lost. "
              "Controls: random sets of the same size per site, matched in firing rate.", "",
              "| set | size | sufficiency | controls (mean) | p | necessity | controls (mean) | p |",
              "|---|---|---|---|---|---|---|---|"]
    for name, x in (("subgraph", t), ("seeds only", s)):
        lines.append(f"| {name} | {x.size} | {x.sufficiency:.3f} | {np.mean(x.random_sufficiency):.3f} | "
                     f"{x.p_sufficiency:.3g} | {x.necessity:.3f} | {np.mean(x.random_necessity):.3f} | "
                     f"{x.p_necessity:.3g} |")
    m = c.containment
    lines += ["", "## Self-containment", "",
              f"Internal fraction of the edges touching the subgraph: {m['internal_fraction']:.3f}; subgraphs grown "
              f"the same way from {m['n_null']} matched random seed sets: {m['null_mean']:.3f} ± {m['null_sd']:.3f}, "
              f"p = {m['p']:.3g}."]
    if c.heads:
        h = c.heads
        lines += ["", "## Heads", "",
                  f"Patching each head's output from the corrupted prompt into the clean one ({h['n_prompts']} aligned "
                  f"prompts; clean metric {h['clean_metric']:.3f}, corrupted {h['corrupted_metric']:.3f}; 1 = the "
                  "head alone moves the metric to its corrupted value):", "",
                  "| head | activation patching | path to logits |", "|---|---|---|"]
        lines += [f"| L{x['layer']}H{x['head']} | {x['activation_patching']:.3f} | {x['path_to_logits']:.3f} |"
                  for x in h["top_heads"]]
        lines += ["", "Share of each strong subgraph edge's cross-position effect (source ablated before the last "
                      "token, target read at the last token) that passes through each head, for the heads that "
                      "patching ranks highest among those whose layer lies between the edge's sites (patching "
                      "effect in brackets):", ""]
        for e in h["edges"]:
            share = ", ".join(f"{k} {v:.2f} ({e['patching'][k]:+.3f})" for k, v in e["share"].items())
            lines.append(f"- {e['source_site']}#{e['source']} → {e['target_site']}#{e['target']} (weight "
                         f"{e['weight']:.3f}, effect {e['cross_position_effect']:.3g}): {share}")
    return "\n".join(lines) + "\n"


def _kinds(sub: Subgraph) -> dict:
    kinds: dict = {}
    for k in sub.edges["kind"].to_pylist():
        kinds[k] = kinds.get(k, 0) + 1
    return kinds
