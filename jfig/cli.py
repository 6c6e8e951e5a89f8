"""The `jfig` command line. `jfig --help` lists the commands."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import __version__
from .errors import JfigError
from .graph import NodeIndex, load_graph
from .models.registry import load_model
from .data import BEHAVIORS
from .pipeline import dry_run, load_config, run_analysis, run_build, run_demo, summarize
from .pipeline.adversarial import AdversarialOptions, parse_pair, run_adversarial
from .pipeline.attribute import run_attribute
from .pipeline.behavior import check_graph_dir, graph_saes, parse_feature, run_behavior, steered_generation
from .pipeline.interactions import InteractionOptions, run_interactions
from .pipeline.view import (DiffMatch, ViewSources, prepare_server, run_diff, run_export_attribution, run_label,
                            run_view)
from .saes import load_sae_ref
from .saes.defaults import default_saes, metrics_table

STEER_PROMPTS = ("The capital of France is", "My favourite hobby is", "Once upon a time,")
DEMO_PROMPTS = (
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "<|im_start|>user\nWhat is the opposite of hot?<|im_end|>\n<|im_start|>assistant\n",
)


def _load(model_name: str):
    t = time.time()
    model = load_model(model_name)
    c = model.config
    print(f"loaded {c.name or model_name}: {c.family}, {c.n_layers} layers, d_model {c.d_model}, "
          f"{c.n_heads} heads ({c.n_kv_heads} kv), vocab {c.vocab_size} in {time.time() - t:.1f}s")
    return model


def _show_prompt(model, prompt: str, saes, top: int) -> None:
    tok = model.tokenizer
    ids = tok.encode(prompt)
    sites = tuple(s.site for s in saes)
    out = model.run(jnp.asarray([ids]), capture=sites)
    probs = jax.nn.softmax(out.logits[0, -1])
    best = jnp.argsort(-probs)[:top]
    print(f"\nprompt: {prompt!r}  ({len(ids)} tokens)")
    print("  next token: " + ", ".join(f"{tok.decode([int(i)])!r} {float(probs[i]):.3f}" for i in best))
    for sae in saes:
        f = sae.encode(out.cache[sae.site])[0, -1]
        idx = jnp.argsort(-f)[:top]
        active = int((f > 0).sum())
        print(f"  {sae.site}: {active} active features at the last token; top "
              + ", ".join(f"#{int(i)}={float(f[i]):.2f}" for i in idx if f[i] > 0))


def cmd_run(args) -> int:
    model = _load(args.model)
    saes = [load_sae_ref(p) for p in args.sae]
    for prompt in args.prompt or DEMO_PROMPTS:
        _show_prompt(model, prompt, saes, args.top)
    return 0


def cmd_sites(args) -> int:
    model = _load(args.model)
    for s in model.sites:
        print(s)
    return 0


def cmd_demo(args) -> int:
    """The main job on the offline default model: default SAEs, default corpus, a graph."""
    over = {k: v for k, v in dict(max_sequences=args.max_sequences, top_k=args.top_k,
                                  inputs_per_source=args.inputs, targets=args.targets).items() if v is not None}
    t0 = time.time()
    graph = run_demo(args.out, model_name=args.model, dtype=args.dtype, progress=not args.quiet, **over)
    print(summarize(graph))
    print(f"\ngraph written to {Path(args.out) / 'graph'} (nodes.parquet, edges.parquet, manifest.json); "
          f"total {time.time() - t0:.0f} s")
    print(f"look at it: jfig view {Path(args.out) / 'graph'}   (or jfig serve {Path(args.out) / 'graph'} to steer "
          f"features); analyse it: jfig analyze {Path(args.out) / 'graph'} --out {Path(args.out) / 'analysis'}")
    return 0


DISTRIBUTED_ENV = ("JFIG_COORDINATOR_ADDRESS", "JFIG_NUM_PROCESSES", "JFIG_PROCESS_ID")


def init_distributed() -> None:
    """Join JAX's distributed runtime: from JFIG_COORDINATOR_ADDRESS (host:port of process 0),
    JFIG_NUM_PROCESSES and JFIG_PROCESS_ID when set, else as JAX detects the cluster (SLURM, TPU pods,
    Open MPI, Kubernetes)."""
    env = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
    if any(env.values()):
        missing = [k for k, v in env.items() if not v]
        if missing:
            raise JfigError(f"--distributed with {', '.join(k for k, v in env.items() if v)} set also needs "
                            f"{', '.join(missing)}")
        try:
            n, i = int(env["JFIG_NUM_PROCESSES"]), int(env["JFIG_PROCESS_ID"])
        except ValueError:
            raise JfigError(f"JFIG_NUM_PROCESSES and JFIG_PROCESS_ID must be integers, got "
                            f"{env['JFIG_NUM_PROCESSES']!r} and {env['JFIG_PROCESS_ID']!r}") from None
        jax.distributed.initialize(coordinator_address=env["JFIG_COORDINATOR_ADDRESS"], num_processes=n, process_id=i)
    else:
        jax.distributed.initialize()


def cmd_build(args) -> int:
    if args.dry_run:
        print(dry_run(args.config))
        return 0
    if args.distributed:
        init_distributed()
    graph = run_build(args.config, progress=not args.quiet)
    if graph is None:
        print(f"process {jax.process_index()} of {jax.process_count()}: its share is measured; process 0 writes "
              f"the graph")
        return 0
    print(summarize(graph))
    print(f"\ngraph written to {Path(load_config(args.config)['out']) / 'graph'}")
    return 0


def cmd_analyze(args) -> int:
    """Analyse a saved graph: report.md, analysis.json and figures/ in --out."""
    result = run_analysis(args.graph, args.out, seed=args.seed, null_samples=args.null_samples,
                          community_nulls=args.community_nulls, atlas=args.atlas, use_atlas=not args.no_atlas,
                          config=args.hub_test, demo=args.hub_test_demo, hub_sequences=args.hub_sequences,
                          hubs_k=args.hubs, matched=args.hub_matched, figures=not args.no_figures)
    for key, p in result.predictions.items():
        print(f"{p['prediction']}: {p['verdict']} ({p['reason']})")
    over = [m["motif"] for m in result.motifs if m["verdict"] == "over-represented"]
    print(f"over-represented motifs: {', '.join(over) or 'none'}")
    print(f"report written to {Path(args.out) / 'report.md'} (with analysis.json and figures/)")
    return 0


def cmd_behavior(args) -> int:
    """A behaviour's circuit in a saved graph: report.md, circuit.json, subgraph_edges.csv in --out."""
    out = args.out or f"behavior-{Path(args.name).stem}"
    c = run_behavior(args.name, args.graph, out, model_name=args.model, sae_paths=args.sae, n=args.n, k=args.k,
                     seed=args.seed, n_seeds=args.seeds, n_candidates=args.candidates, min_effect=args.min_effect,
                     per_node=args.per_node or None, n_random=args.random, n_null=args.nulls, heads=not args.no_heads)
    b, t = c.baseline, c.test
    print(f"{c.behavior}: accuracy {b['accuracy']:.3f}, mean logit difference {b['logit_diff']:.3f} on {b['n']} prompts")
    print(f"{len(c.seeds)} seed features; subgraph of {len(c.subgraph)} features and {c.subgraph.edges.num_rows} edges")
    print(f"sufficiency {t.sufficiency:.3f} (random sets {np.mean(t.random_sufficiency):.3f}, p {t.p_sufficiency:.3g}); "
          f"necessity {t.necessity:.3f} (random sets {np.mean(t.random_necessity):.3f}, p {t.p_necessity:.3g})")
    print(f"report written to {Path(out) / 'report.md'}")
    return 0


def _columns(left: str, right: str, width: int) -> list[str]:
    a = textwrap.wrap(left.replace("\n", " ⏎ "), width) or [""]
    b = textwrap.wrap(right.replace("\n", " ⏎ "), width) or [""]
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return [f"{x:<{width}} │ {y}" for x, y in zip(a, b)]


def cmd_steer(args) -> int:
    """Clean and steered greedy continuations of prompts, side by side."""
    site, feature = parse_feature(args.feature)
    if args.max_new_tokens < 1:
        raise JfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    graph_dir = check_graph_dir(args.graph) if args.graph else None
    graph = load_graph(graph_dir) if graph_dir is not None else None
    if graph is not None:                           # checked before the model loads
        index = NodeIndex.from_graph(graph)
        if index.lookup([site], [feature])[0] < 0:
            raise JfigError(f"{site}#{feature} is not a feature of the graph in {graph_dir} (its sites: "
                            f"{list(index.sites)})")
    model = _load(args.model)
    model.check_site(site)
    saes = {s.site: s for s in (graph_saes(model, graph, args.sae) if (args.sae or graph is not None)
                                else default_saes(model, progress=False)[0])}
    if site not in saes:
        raise JfigError(f"no SAE reads {site}; SAE sites are {sorted(saes)}")
    prompts = args.prompt or list(STEER_PROMPTS)
    rows = steered_generation(model, saes[site], feature, args.value, prompts, mode=args.mode,
                              max_new_tokens=args.max_new_tokens, chat=args.chat)
    width = max(20, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    verb = f"clamped to {args.value:g}" if args.mode == "clamp" else f"+ {args.value:g} x decoder row"
    for prompt, clean, steered in rows:
        print(f"\nprompt: {prompt!r}")
        print(*_columns("clean", f"steered: {site}#{feature} {verb}", width), sep="\n")
        print("─" * width + "─┼─" + "─" * width)
        print(*_columns(clean, steered, width), sep="\n")
    return 0


def _sources(args) -> ViewSources:
    return ViewSources(graph=args.graph, model=None if args.no_model else args.model, saes=tuple(args.sae),
                       atlas=args.atlas, use_atlas=not args.no_atlas, labels=args.labels,
                       behaviors=tuple(args.behavior), compare=getattr(args, "compare", None), title=args.title)


def cmd_view(args) -> int:
    """The explorer page of a graph, one self-contained HTML file."""
    out = run_view(_sources(args), args.out, open_page=not args.no_open)
    print(f"explorer page written to {out}")
    return 0


def cmd_serve(args) -> int:
    """The explorer page served with a live model (the steering simulator)."""
    server = prepare_server(_sources(args), host=args.host, port=args.port)
    print(f"jfig explorer at {server.url} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_export_attribution(args) -> int:
    """One prompt's slice of a graph as attribution-graph JSON."""
    src = ViewSources(graph=args.graph, model=args.model, saes=tuple(args.sae))
    data = run_export_attribution(src, args.prompt, args.out, n_logits=args.logits)
    n_feat = sum(n["feature_type"] != "embedding" and n["feature_type"] != "logit" for n in data["nodes"])
    print(f"{n_feat} feature nodes and {len(data['links'])} links on {len(data['metadata']['prompt_tokens'])} "
          f"tokens written to {args.out}")
    for note in data["metadata"]["info"]["left out"]:
        print(f"left out: {note}")
    return 0


def cmd_attribute(args) -> int:
    """One prompt's attribution graph through transcoders, as attribution-graph JSON."""
    graph, data = run_attribute(args.prompt, args.transcoders, args.out, model_name=args.model, graph_dir=args.graph,
                                node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
                                max_n_logits=args.max_logits, desired_logit_prob=args.logit_prob,
                                max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    replacement, completeness = graph.scores()
    kept = sum(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])
    print(f"{graph.n_pos} tokens, {len(graph.active_features)} active features, {graph.n_logits} logit targets; "
          f"replacement score {replacement:.3f}, completeness {completeness:.3f}")
    print(f"pruned: {kept} feature nodes and {len(data['links'])} links written to {args.out}")
    if graph.corpus is not None:
        links = graph.links(pruned=True, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
        both = sum(bool(b) for b in links["both_nodes"].to_pylist())
        found = sum(k is not None for k in links["corpus_kind"].to_pylist())
        print(f"corpus graph: of {links.num_rows} kept feature-to-feature edges, {both} join two of its nodes and "
              f"{found} are its edges")
    return 0


def cmd_label(args) -> int:
    """Feature labels into a graph's node table."""
    folder, n = run_label(args.graph, args.labels, args.out, sources=args.source)
    print(f"{n} nodes labelled; graph written to {folder}")
    return 0


def cmd_diff(args) -> int:
    """Edges gained, lost, sign-flipped (and strengthened or weakened) between two graphs, of the same SAEs
    or of SAEs whose features are matched."""
    match = None
    if args.match:
        match = DiffMatch(args.match, tuple(args.sae_a), tuple(args.sae_b), model=args.model, model_b=args.model_b,
                          corpus=args.corpus, n_tokens=args.match_tokens, seq_len=args.seq_len,
                          min_similarity=args.min_similarity)
    elif args.sae_a or args.sae_b:
        raise JfigError("--sae-a / --sae-b name the SAEs whose features --match matches; pass --match too")
    diff = run_diff(args.a, args.b, args.out, match=match, ratio=args.ratio, untested=args.untested)
    print(f"A = {args.a}, B = {args.b}: {diff.summary()}")
    for note in diff.notes:
        print(f"note: {note}")
    top = diff.most_changed(args.top, min_similarity=args.stable)
    if top.num_rows:
        where = f" between features matched with similarity >= {args.stable:g}" if match else ""
        print(f"\nmost changed interactions{where}:")
        for r in top.to_pylist():
            mod = f" (modulator {r['modulator_site']}#{r['modulator']})" if r["modulator"] is not None else ""
            wa, wb = (f"{w:+.4g}" if w is not None else "absent" for w in (r["weight_a"], r["weight_b"]))
            ids_b = f" [B: #{r['source_b']} -> #{r['target_b']}]" if match else ""
            print(f"  {r['source_site']}#{r['source']} -> {r['target_site']}#{r['target']}{mod}{ids_b}: "
                  f"{wa} -> {wb} ({r['status']})")
    if args.out:
        print(f"edge table written to {args.out}")
    return 0


def cmd_interactions(args) -> int:
    """The interaction metrics of a graph's feature pairs, ranked, with the strength-by-location figure."""
    src = ViewSources(graph=args.graph, model=args.model, saes=tuple(args.sae), atlas=args.atlas,
                      use_atlas=not args.no_atlas)
    opts = InteractionOptions(pairs=args.pairs, edges=args.edges, corpus=args.corpus, n_tokens=args.tokens,
                              seq_len=args.seq_len, bins=args.bins, top=args.top)
    out, table = run_interactions(src, args.out, opts)
    print(f"{table.num_rows:,} ranked interactions written to {out / 'interactions.parquet'}; figure "
          f"{out / 'interactions.png'}, report {out / 'report.md'}")
    return 0


def cmd_adversarial(args) -> int:
    """Pairs that rarely fire together but interact strongly, token swaps that make them fire together,
    and the output effect of their co-occurrence."""
    src = ViewSources(graph=args.graph, model=args.model, saes=tuple(args.sae), atlas=args.atlas)
    opts = AdversarialOptions(pairs=args.pairs, steps=args.steps, starts=args.starts, window=args.window,
                              top_k=args.top_k, candidates=args.candidates, temperature=args.temperature,
                              max_ratio=None if args.max_ratio <= 0 else args.max_ratio,
                              per_feature=args.per_feature, explicit=tuple(parse_pair(p) for p in args.pair),
                              corpus=args.corpus, seed=args.seed)
    out, examples = run_adversarial(src, args.out, opts, progress=not args.quiet_log)
    hit = sum(examples["success"].to_pylist()) if examples.num_rows else 0
    print(f"both features fire together in {hit} of {examples.num_rows} windows after the search; report "
          f"{out / 'report.md'}, examples {out / 'examples.parquet'} (and .csv)")
    return 0


def cmd_saes(args) -> int:
    """Train (or load from the cache) the default SAEs and print their quality metrics."""
    model = _load(args.model)
    over = {k: v for k, v in dict(d_sae=args.d_sae, k=args.k, tokens=args.tokens, epochs=args.epochs).items()
            if v is not None}
    if args.layers:
        over["sites"] = tuple(f"blocks.{l}.hook_resid_post" for l in args.layers)
    saes, manifest = default_saes(model, force=args.force, **over)
    print(metrics_table(manifest))
    print(f"corpus hash {manifest['corpus_hash'][:16]}…, {manifest['train_tokens']} training tokens, "
          f"trained in {manifest['seconds']} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jfig", description="Feature Interaction Graphs for SAE features, in JAX.")
    p.add_argument("--version", action="version", version=f"jfig {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    p.add_argument("-q", "--quiet-log", dest="quiet_log", action="store_true", help="log warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--model", default="smollm2-135m", help="model name, .gguf file or HF folder")
        sp.add_argument("--sae", action="append", default=[], help="SAE folder or params.npz (repeatable)")
        sp.add_argument("--top", type=int, default=5, help="how many tokens/features to show")

    d = sub.add_parser("demo", help="build a feature interaction graph on the offline default model (the main job)")
    d.add_argument("--model", default="smollm2-135m", help="model name, .gguf file or HF folder")
    d.add_argument("--out", default="jfig-demo", help="output folder (graph in OUT/graph, resumable state in OUT/build)")
    d.add_argument("--max-sequences", type=int, default=None, help="corpus sequences (scale up on a GPU)")
    d.add_argument("--top-k", type=int, default=None, help="important features per site")
    d.add_argument("--targets", choices=("all", "candidates"), default=None,
                   help="targets of each source: every feature of the next sites in the window (all, the default) "
                        "or its co-activation candidates")
    d.add_argument("--inputs", type=int, default=None, help="inputs per source feature")
    d.add_argument("--dtype", default="float32", help="model parameter dtype: float32 (default), bfloat16 (halves "
                                                      "memory on an accelerator; statistics stay float32), float16")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=cmd_demo)
    b = sub.add_parser("build", help="build a graph from a TOML config (model, saes, corpus, out, [options])")
    b.add_argument("config")
    b.add_argument("--dry-run", action="store_true",
                   help="check the model, SAEs, corpus and output folder, print the resolved options and an "
                        "estimate of the work and memory; compute and write nothing (exit 2 on a problem)")
    b.add_argument("--distributed", action="store_true",
                   help="one process per host on JAX's distributed runtime (SLURM, TPU pods, or "
                        "JFIG_COORDINATOR_ADDRESS / JFIG_NUM_PROCESSES / JFIG_PROCESS_ID); out must be a shared folder")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_build)
    a = sub.add_parser("analyze", help="network statistics, motifs, communities, hubs and the three predictions of a "
                                       "saved graph, against a degree- and sign-preserving rewired null")
    a.add_argument("graph", help="graph folder (OUT/graph of a build or demo)")
    a.add_argument("--out", required=True, help="folder for report.md, analysis.json and figures/")
    a.add_argument("--null-samples", type=int, default=20, help="rewired copies behind every z-score (default 20)")
    a.add_argument("--community-nulls", type=int, default=5, help="copies the community modularity is compared with")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--atlas", default=None, help="atlas folder (default: the one beside the graph, if any)")
    a.add_argument("--no-atlas", action="store_true", help="skip the agreement with co-activation communities")
    a.add_argument("--hub-test", default=None, metavar="CONFIG.toml",
                   help="run the hub-ablation test with the model, SAEs and corpus of this build config")
    a.add_argument("--hub-test-demo", action="store_true", help="run the hub-ablation test with the demo's model and SAEs")
    a.add_argument("--hub-sequences", type=int, default=16, help="sequences the hub-ablation test runs on")
    a.add_argument("--hub-matched", type=int, default=5, help="firing-rate-matched random features per hub")
    a.add_argument("--hubs", type=int, default=10, help="hubs listed and ablated")
    a.add_argument("--no-figures", action="store_true")
    a.set_defaults(fn=cmd_analyze)
    bh = sub.add_parser("behavior", help="a behaviour's circuit in a saved graph: seed features, k-hop subgraph, "
                                         "sufficiency and necessity against random feature sets, heads")
    bh.add_argument("name", help=f"one of {', '.join(BEHAVIORS)}, or a .jsonl suite (text, answer, distractor per line)")
    bh.add_argument("--graph", required=True, help="graph folder (OUT/graph of a build or demo)")
    bh.add_argument("--out", default=None, help="folder for report.md, circuit.json, subgraph_edges.csv "
                                                "(default behavior-NAME)")
    bh.add_argument("--model", default="smollm2-135m", help="the model the graph was built on")
    bh.add_argument("--sae", action="append", default=[], help="SAE folder or RELEASE:SAE_ID (repeatable; default: the graph's SAEs "
                                                               "from jfig's cache)")
    bh.add_argument("--n", type=int, default=48, help="prompts of a built-in suite")
    bh.add_argument("--k", type=int, default=2, help="hops up and down from the seeds")
    bh.add_argument("--per-node", type=int, default=10, help="strongest edges each feature follows (0: all)")
    bh.add_argument("--seeds", type=int, default=8, help="most seed features")
    bh.add_argument("--candidates", type=int, default=32, help="best-attributed features checked by exact ablation")
    bh.add_argument("--min-effect", type=float, default=0.05, help="a seed's ablation drop, as a fraction of the metric")
    bh.add_argument("--random", type=int, default=50, help="firing-rate-matched random feature sets")
    bh.add_argument("--nulls", type=int, default=50, help="random-seed subgraphs for self-containment")
    bh.add_argument("--no-heads", action="store_true", help="skip head patching (induction, IOI)")
    bh.add_argument("--seed", type=int, default=0)
    bh.set_defaults(fn=cmd_behavior)
    st = sub.add_parser("steer", help="clean and steered continuations side by side")
    st.add_argument("--feature", required=True, metavar="SITE#ID", help="e.g. blocks.10.hook_resid_post#123")
    st.add_argument("--value", type=float, required=True, help="clamp value (or scale with --mode add)")
    st.add_argument("--mode", choices=("clamp", "add"), default="clamp",
                    help="clamp the feature to VALUE at every position (error kept), or add VALUE x its decoder row")
    st.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    st.add_argument("--chat", action="store_true", help="render prompts as a user turn of the chat template")
    st.add_argument("--graph", default=None, help="graph folder: use its SAEs and check the feature is in it")
    st.add_argument("--sae", action="append", default=[], help="SAE folder or RELEASE:SAE_ID (repeatable)")
    st.add_argument("--model", default="smollm2-135m")
    st.add_argument("--max-new-tokens", type=int, default=32)
    st.set_defaults(fn=cmd_steer)
    def explorer_args(sp):
        sp.add_argument("graph", help="graph folder (OUT/graph of a build or demo)")
        sp.add_argument("--model", default="smollm2-135m", help="the model the graph was built on (token strings, "
                                                                "logit lens)")
        sp.add_argument("--sae", action="append", default=[], help="SAE folder or RELEASE:SAE_ID (repeatable; default: the graph's "
                                                                   "SAEs from jfig's cache)")
        sp.add_argument("--atlas", default=None, help="atlas folder (default: the one beside the graph, if any)")
        sp.add_argument("--no-atlas", action="store_true", help="no contexts with marked tokens, no histograms")
        sp.add_argument("--labels", default=None, metavar="FILE", help="feature labels: a CSV with columns "
                        "site,feature,label (or feature=SITE#ID,label), or a Neuronpedia explanation export (.json)")
        sp.add_argument("--behavior", action="append", default=[], metavar="DIR",
                        help="a behaviour circuit folder written by `jfig behavior` (repeatable)")
        sp.add_argument("--title", default=None)

    v = sub.add_parser("view", help="the graph explorer: one self-contained HTML page (works offline)")
    explorer_args(v)
    v.add_argument("--no-model", action="store_true", help="do not load the model (no token strings, no logit lens)")
    v.add_argument("--compare", default=None, metavar="GRAPH_DIR",
                   help="a second graph of the same SAEs: show edges gained, lost and sign-flipped")
    v.add_argument("--out", default=None, help="HTML file to write (default: explorer.html beside the graph folder)")
    v.add_argument("--no-open", action="store_true", help="do not open the page in a browser")
    v.set_defaults(fn=cmd_view)
    sv = sub.add_parser("serve", help="the graph explorer from a local server, with the steering simulator")
    explorer_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8050, help="port (default 8050; 0: any free port)")
    sv.set_defaults(fn=cmd_serve, no_model=False)
    ea = sub.add_parser("export-attribution", help="one prompt's slice of a graph as attribution-graph JSON (the "
                                                   "format circuit-tracer's and Neuronpedia's graph viewers read)")
    ea.add_argument("graph", help="graph folder (OUT/graph of a build or demo)")
    ea.add_argument("--prompt", required=True)
    ea.add_argument("--out", required=True, help="JSON file to write")
    ea.add_argument("--model", default="smollm2-135m", help="the model the graph was built on")
    ea.add_argument("--sae", action="append", default=[], help="SAE folder or RELEASE:SAE_ID (repeatable; default: the graph's SAEs "
                                                               "from jfig's cache)")
    ea.add_argument("--logits", type=int, default=5, help="logit nodes: the likeliest next tokens")
    ea.set_defaults(fn=cmd_export_attribution)
    at = sub.add_parser("attribute", help="one prompt's attribution graph through transcoders (as circuit-tracer "
                                          "computes it), pruned and written as attribution-graph JSON")
    at.add_argument("--prompt", required=True)
    at.add_argument("--transcoders", required=True, metavar="DIR",
                    help="transcoders replacing the model's MLPs (a circuit-tracer or SAELens folder)")
    at.add_argument("--model", default="smollm2-135m", help="the model the transcoders belong to")
    at.add_argument("--graph", default=None, metavar="GRAPH_DIR",
                    help="a corpus-wide graph over the same transcoders: link its edges to the prompt's")
    at.add_argument("--out", required=True, metavar="FILE.json", help="JSON file to write")
    at.add_argument("--max-logits", type=int, default=10, help="at most this many logit targets (default 10)")
    at.add_argument("--logit-prob", type=float, default=0.95,
                    help="logit targets until their probability reaches this (default 0.95)")
    at.add_argument("--max-feature-nodes", type=int, default=None, help="keep only the most influential features")
    at.add_argument("--node-threshold", type=float, default=0.8, help="pruning: share of influence kept (0.8)")
    at.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: share of edge influence kept (0.98)")
    at.add_argument("--batch-size", type=int, default=512, help="backward passes per batch (default 512)")
    at.set_defaults(fn=cmd_attribute)
    lb = sub.add_parser("label", help="put feature labels (a CSV or a Neuronpedia explanation export) into a "
                                      "graph's node table")
    lb.add_argument("graph", help="graph folder")
    lb.add_argument("--labels", required=True, metavar="FILE",
                    help="CSV with columns site,feature,label (or feature=SITE#ID,label), or a Neuronpedia export (.json)")
    lb.add_argument("--source", action="append", default=[], metavar="NEURONPEDIA_ID=SITE",
                    help="which site a Neuronpedia SAE reads, e.g. gpt2-small/6-res-jb=blocks.6.hook_resid_pre "
                         "(repeatable; needed for a .json export)")
    lb.add_argument("--out", default=None, help="folder for the labelled graph (default: replace GRAPH)")
    lb.set_defaults(fn=cmd_label)
    df = sub.add_parser("diff", help="edges gained, lost, sign-flipped and strengthened between two graphs, of the "
                                     "same SAEs or (with --match) of SAEs whose features are matched")
    df.add_argument("a", help="graph folder A")
    df.add_argument("b", help="graph folder B")
    df.add_argument("--out", default=None, help="CSV file for the edge table (one row per edge of either graph)")
    df.add_argument("--ratio", type=float, default=None, metavar="R",
                    help="also label edges whose |weight| grew (strengthened) or shrank (weakened) by more than a "
                         "factor R, e.g. 2")
    df.add_argument("--top", type=int, default=10, help="most changed interactions printed (default 10)")
    df.add_argument("--untested", action="store_true",
                    help="count an edge whose source the other build never measured (read from the candidates.json "
                         "each build left beside its graph) as untested instead of lost or gained")
    df.add_argument("--match", choices=("decoder", "activation", "both"), default=None,
                    help="match the two graphs' SAE features (decoder cosine, activation correlation, or both) and "
                         "compare edges through the matched ids: graphs of different SAEs")
    df.add_argument("--sae-a", action="append", default=[], metavar="SAE",
                    help="graph A's SAE: folder or RELEASE:SAE_ID (repeatable; default: graph A's SAEs from jfig's cache)")
    df.add_argument("--sae-b", action="append", default=[], metavar="SAE",
                    help="graph B's SAE: folder or RELEASE:SAE_ID (repeatable; default: graph B's SAEs from jfig's cache)")
    df.add_argument("--model", default="smollm2-135m", help="graph A's model (its cached SAEs; activations)")
    df.add_argument("--model-b", default=None, help="graph B's model, e.g. the fine-tuned one (default: --model)")
    df.add_argument("--corpus", default="default", help="text for --match activation/both (a path, or 'default')")
    df.add_argument("--match-tokens", type=int, default=8192, help="tokens the activation correlations are taken over")
    df.add_argument("--seq-len", type=int, default=64, help="sequence length of those tokens")
    df.add_argument("--min-similarity", type=float, default=0.5,
                    help="a mutual best pair less similar than this stays unmatched (default 0.5)")
    df.add_argument("--stable", type=float, default=0.9, metavar="SIM",
                    help="the most changed interactions are those whose features matched at least this well "
                         "(default 0.9)")
    df.set_defaults(fn=cmd_diff)
    it = sub.add_parser("interactions", help="interaction metrics (neurons, heads, distribution) of a graph's feature "
                                             "pairs, ranked by strength x frequency, with the strength-by-location plot")
    it.add_argument("--graph", required=True, help="graph folder (OUT/graph of a build or demo)")
    it.add_argument("--model", default="smollm2-135m", help="the model the graph was built on")
    it.add_argument("--sae", action="append", default=[], help="SAE folder or RELEASE:SAE_ID (repeatable; default: the "
                                                               "graph's SAEs from jfig's cache)")
    it.add_argument("--atlas", default=None, help="atlas folder (default: the one beside the graph, if any)")
    it.add_argument("--no-atlas", action="store_true", help="no co-active pairs or atlas frequencies")
    it.add_argument("--out", default=None, help="folder for interactions.parquet, interactions.png and report.md "
                                                "(default: interactions beside the graph folder)")
    it.add_argument("--top", type=int, default=20, help="interactions per metric listed in the report")
    it.add_argument("--pairs", type=int, default=128, help="same-site pairs per site (gating pairs, then co-active)")
    it.add_argument("--edges", type=int, default=256, help="strongest first-order edges given distribution metrics")
    it.add_argument("--corpus", default="default", help="text the data metrics run on (a path, or 'default')")
    it.add_argument("--tokens", type=int, default=4096, help="tokens of that text")
    it.add_argument("--seq-len", type=int, default=64)
    it.add_argument("--bins", type=int, default=4, help="bins of the binned mutual information (bin 0: inactive)")
    it.set_defaults(fn=cmd_interactions)
    ad = sub.add_parser("adversarial", help="feature pairs that rarely co-occur but interact strongly: token swaps "
                                            "that make them co-occur, and the output effect when they do")
    ad.add_argument("--graph", required=True, help="graph folder (OUT/graph of a build or demo)")
    ad.add_argument("--model", default="smollm2-135m", help="the model the graph was built on")
    ad.add_argument("--sae", action="append", default=[], help="SAE folder or RELEASE:SAE_ID (repeatable; default: the "
                                                               "graph's SAEs from jfig's cache)")
    ad.add_argument("--atlas", default=None, help="atlas folder (default: the one beside the graph)")
    ad.add_argument("--out", default=None, help="folder for report.md, examples.parquet / .csv and pairs.parquet "
                                                "(default: adversarial beside the graph folder)")
    ad.add_argument("--pairs", type=int, default=8, help="pairs searched, from the top of the ranking (default 8)")
    ad.add_argument("--pair", action="append", default=[], metavar="SITE:I,SITE:J",
                    help="search this edge (source first) instead of the ranking's top (repeatable)")
    ad.add_argument("--steps", type=int, default=20, help="greedy token-swap steps per pair (default 20)")
    ad.add_argument("--starts", type=int, default=4, help="starting windows per pair (default 4)")
    ad.add_argument("--window", type=int, default=16, help="tokens per window, the sequence-start token included")
    ad.add_argument("--top-k", type=int, default=8, help="tokens per position kept by the gradient's linear score")
    ad.add_argument("--candidates", type=int, default=16, help="swaps evaluated exactly per window and step")
    ad.add_argument("--temperature", type=float, default=0.5, help="of the soft minimum of the two features' margins")
    ad.add_argument("--max-ratio", type=float, default=1.0,
                    help="keep pairs co-occurring at most this many times as often as independence predicts "
                         "(0: no filter)")
    ad.add_argument("--per-feature", type=int, default=1, help="pairs a feature may appear in (default 1)")
    ad.add_argument("--corpus", default="default", help="the text the graph was built on (a path, or 'default')")
    ad.add_argument("--seed", type=int, default=0)
    ad.set_defaults(fn=cmd_adversarial)
    r = sub.add_parser("run", help="next-token prediction and most active SAE features for prompts")
    common(r)
    r.add_argument("prompt", nargs="*", help="prompt text (default: a few demo prompts)")
    r.set_defaults(fn=cmd_run)
    t = sub.add_parser("saes", help="train (or load cached) default SAEs and print FVU, L0, dead fraction, CE recovered")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--layers", type=int, nargs="*", help="residual layers (default 6 10 14 18)")
    t.add_argument("--d-sae", type=int, default=None)
    t.add_argument("--k", type=int, default=None)
    t.add_argument("--tokens", type=int, default=None, help="training tokens per site")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--force", action="store_true", help="retrain even if cached")
    t.set_defaults(fn=cmd_saes)
    s = sub.add_parser("sites", help="list the model's site names in forward order")
    s.add_argument("--model", default="smollm2-135m")
    s.set_defaults(fn=cmd_sites)
    return p


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """jfig's log lines (stage timings, resumed files) on stderr: INFO by default, DEBUG with -v,
    WARNING with -q."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jfig: %(message)s"))
    root = logging.getLogger("jfig")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv=None) -> int:
    """The `jfig` command. The "jfig" logger is configured for the command and restored afterwards, so
    calling main() in a process (tests, notebooks) leaves its logging as it found it."""
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("jfig")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    configure_logging(args.verbose, args.quiet_log or getattr(args, "quiet", False))
    try:
        return args.fn(args)
    except JfigError as e:
        print(f"jfig: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jfig: interrupted", file=sys.stderr)
        return 130
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


if __name__ == "__main__":
    sys.exit(main())
