"""The interaction graph: typed multigraph container, Parquet storage, NetworkX/GraphML/JSON export,
and its assembly from measured and tested records (a pure function: no model runs here)."""
from .assemble import EdgeRecords, NodeInfo, assemble_graph
from .diff import STATUSES, GraphDiff, diff_graphs
from .export import read_node_link_json, write_graphml, write_node_link_json
from .graph import (EDGE_SCHEMA, ESTIMATORS, KINDS, NODE_SCHEMA, POSITIONS, InteractionGraph, gate_id,
                    library_versions, load_graph, node_id, save_graph)
from .index import NodeIndex
from .labels import load_labels, neuronpedia_labels
from .storage import read_graph_folder, write_graph_folder

__all__ = [
    "EDGE_SCHEMA", "ESTIMATORS", "EdgeRecords", "GraphDiff", "STATUSES", "diff_graphs", "KINDS", "NODE_SCHEMA", "NodeIndex", "NodeInfo", "POSITIONS", "InteractionGraph",
    "assemble_graph", "gate_id", "library_versions", "load_graph", "load_labels", "neuronpedia_labels", "node_id", "read_graph_folder",
    "read_node_link_json", "save_graph", "write_graph_folder", "write_graphml", "write_node_link_json",
]
