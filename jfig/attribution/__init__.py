"""Per-prompt attribution graphs over transcoder features, as circuit-tracer computes them: the
prompt's linear replacement model (frozen attention patterns and norm scales, MLPs replaced by
transcoders plus error nodes), pruning by influence on the logits, links to a corpus-wide
interaction graph, and the attribution-graph JSON the circuit-tracer and Neuronpedia viewers load."""
from .attribute import attribution_graph
from .graph import LINK_SCHEMA, AttributionGraph
from .influence import PruneResult, graph_scores, prune
from .prompt import prompt_ids
from .viewer import cantor, error_node, feature_node, graph_file, logit_id, logit_node, token_node

__all__ = ["AttributionGraph", "LINK_SCHEMA", "PruneResult", "attribution_graph", "cantor", "error_node",
           "feature_node", "graph_file", "graph_scores", "logit_id", "logit_node", "prompt_ids", "prune", "token_node"]
