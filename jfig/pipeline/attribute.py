"""`jfig attribute --prompt P --transcoders DIR --out FILE.json`: one prompt's attribution graph through a
model's transcoders, pruned and written as the attribution-graph JSON the circuit-tracer and Neuronpedia
viewers load; with `--graph`, its feature edges linked to a corpus-wide interaction graph."""
from __future__ import annotations

from pathlib import Path

from ..attribution import AttributionGraph, attribution_graph
from ..errors import JfigError
from ..graph import load_graph
from ..models.registry import load_model
from ..saes import load_transcoders
from .behavior import check_graph_dir


def run_attribute(prompt: str, transcoders, out, *, model_name: str = "smollm2-135m", graph_dir=None,
                  slug: str | None = None, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                  **options) -> tuple[AttributionGraph, dict]:
    """Compute, prune and write one prompt's attribution graph; returns the graph and the written JSON.
    `options` go to `attribution_graph` (max_n_logits, desired_logit_prob, max_feature_nodes,
    batch_size). Every path is checked before the model loads."""
    if not Path(transcoders).exists():
        raise JfigError(f"transcoders {transcoders} do not exist; expected a circuit-tracer or SAELens transcoder "
                        f"folder")
    out = Path(out)
    if not out.resolve().parent.exists():
        raise JfigError(f"the folder of --out ({out.parent}) does not exist")
    if out.suffix != ".json":
        raise JfigError(f"--out {out} should be a .json file (the attribution-graph JSON)")
    if graph_dir is not None:
        graph_dir = check_graph_dir(graph_dir)
    for name, t in (("node threshold", node_threshold), ("edge threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise JfigError(f"the {name} must be between 0 and 1, got {t}")
    model = load_model(model_name)
    tcs = load_transcoders(transcoders, model=model)
    graph = load_graph(graph_dir) if graph_dir is not None else None
    result = attribution_graph(model, tcs, prompt, graph=graph, **options)
    data = result.to_json(out, slug=slug or out.stem, node_threshold=node_threshold, edge_threshold=edge_threshold)
    return result, data
