"""`jfig behavior NAME --graph DIR` and `jfig steer`: a behaviour's circuit in a saved graph, and steered
text. The SAEs a graph was built with are found in jfig's SAE cache by the fingerprints in its manifest."""
from __future__ import annotations

import logging
from pathlib import Path

from ..behaviors import BehaviorCircuit, behavior_subgraph, behavior_suite
from ..edits import Clamp, Steer
from ..errors import JfigError
from ..graph import load_graph
from ..models.registry import load_model
from ..saes import load_sae, load_sae_ref
from ..saes.defaults import cache_root, model_id
from .build import sae_fingerprint

log = logging.getLogger(__name__)


def cached_saes_for(model, manifest: dict) -> list:
    """The SAEs listed in a graph manifest (site + fingerprint), loaded from jfig's SAE cache for
    `model`; JfigError naming the missing sites when some are not there."""
    want = {s["site"]: s.get("fingerprint") for s in manifest.get("saes", [])}
    if not want:
        raise JfigError("the graph's manifest lists no SAEs; pass them with --sae PATH")
    root = cache_root() / "saes" / model_id(model)
    found = {}
    for folder in sorted(root.glob("*/*")) if root.exists() else []:
        site = folder.name
        if site in want and site not in found and folder.is_dir() and not folder.parent.name.startswith("."):
            sae = load_sae(folder)
            if want[site] is None or sae_fingerprint(sae) == want[site]:
                found[site] = sae
    missing = sorted(set(want) - set(found))
    if missing:
        raise JfigError(f"no cached SAE matches the graph's SAE(s) at {missing} (looked in {root}); pass the SAEs "
                        f"the graph was built with using --sae PATH")
    log.info("SAEs of the graph found in %s", root)
    return [found[s] for s in want]


def graph_saes(model, graph, sae_paths) -> list:
    """SAEs from --sae paths, else those the (loaded) graph was built with, from the cache."""
    if sae_paths:
        return [load_sae_ref(p) for p in sae_paths]
    if graph is None:
        raise JfigError("pass the SAEs with --sae PATH or a graph folder with --graph DIR")
    return cached_saes_for(model, graph.manifest)


def check_graph_dir(graph_dir) -> Path:
    """graph_dir as a Path, or JfigError when it holds no graph (no manifest.json)."""
    graph_dir = Path(graph_dir)
    if not (graph_dir / "manifest.json").exists():
        raise JfigError(f"{graph_dir} is not a graph folder (no manifest.json); expected the folder a build wrote its "
                        f"graph to, e.g. OUT/graph")
    return graph_dir


def run_behavior(name: str, graph_dir, out_dir, *, model_name: str = "smollm2-135m", sae_paths=(), n: int = 48,
                 k: int = 2, seed: int = 0, **options) -> BehaviorCircuit:
    """`jfig behavior NAME --graph DIR`: the behaviour circuit of NAME (a built-in behaviour or a
    .jsonl suite) in a saved graph, written to out_dir (report.md, circuit.json, subgraph_edges.csv)."""
    if n < 1 or k < 0:
        raise JfigError(f"--n must be >= 1 prompts and --k >= 0 hops, got {n} and {k}")
    suite = behavior_suite(name, n, seed)          # an unknown behaviour or a bad suite file fails here, first
    graph_dir = check_graph_dir(graph_dir)
    graph = load_graph(graph_dir)
    model = load_model(model_name)
    saes = graph_saes(model, graph, sae_paths)
    circuit = behavior_subgraph(model, saes, graph, suite, k, n=n, seed=seed, **options)
    circuit.write(out_dir)
    return circuit


def parse_feature(text: str) -> tuple[str, int]:
    """'blocks.10.hook_resid_post#123' -> ('blocks.10.hook_resid_post', 123)."""
    site, sep, fid = str(text).rpartition("#")
    if not sep or not site or not fid.lstrip("-").isdigit():
        raise JfigError(f"--feature {text!r}: expected SITE#ID, e.g. blocks.10.hook_resid_post#123")
    return site, int(fid)


def steered_generation(model, sae, feature: int, value: float, prompts, *, mode: str = "clamp",
                       max_new_tokens: int = 32, chat: bool = False) -> list[tuple[str, str, str]]:
    """[(prompt, clean continuation, steered continuation)], greedy. mode 'clamp' sets the feature to
    `value` at every position (prompt and new tokens, error kept); 'add' adds value x its decoder row."""
    if mode not in ("clamp", "add"):
        raise JfigError(f"unknown steering mode {mode!r}; expected 'clamp' or 'add'")
    if not 0 <= feature < sae.d_sae:
        raise JfigError(f"feature {feature} is out of range for the SAE at {sae.site} with d_sae {sae.d_sae}")
    tok = model.tokenizer
    rows = [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True) if chat
            else ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p, add_bos=False) for p in prompts]
    edit = Clamp(sae, feature, value) if mode == "clamp" else Steer(sae.site, sae.W_dec[feature], value)
    clean = model.generate(rows, max_new_tokens)
    steered = model.generate(rows, max_new_tokens, edits=(edit,))
    width = max(len(r) for r in rows)
    return [(p, tok.decode([int(t) for t in c[width:]]), tok.decode([int(t) for t in s[width:]]))
            for p, c, s in zip(prompts, clean, steered)]
