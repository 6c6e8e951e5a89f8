"""The interaction graph: typed multigraph container, Parquet storage, NetworkX/GraphML/JSON export."""
from .graph import (EDGE_SCHEMA, ESTIMATORS, KINDS, NODE_SCHEMA, POSITIONS, InteractionGraph, gate_id,
                    library_versions, node_id)
from .io import load_graph, read_node_link_json, save_graph

__all__ = [
    "EDGE_SCHEMA", "ESTIMATORS", "KINDS", "NODE_SCHEMA", "POSITIONS", "InteractionGraph", "gate_id",
    "library_versions", "load_graph", "node_id", "read_node_link_json", "save_graph",
]
