"""Exports of an interaction graph's NetworkX view: GraphML and node-link JSON (and reading it back)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import networkx as nx
import pyarrow as pa

LINKS_KEY = "edges"   # the node-link JSON key holding the edges, whatever networkx's default is
# Link endpoints go under "from"/"to": an edge row already has attributes named "source" and "target".
_LINK_NAMES = {"source": "from", "target": "to", "key": "key", "name": "id"}
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")   # chars XML 1.0 cannot hold


def write_graphml(g: nx.MultiDiGraph, types: dict, path) -> None:
    """A graph from ``InteractionGraph.to_networkx()`` as GraphML; ``types`` maps column names to their
    Arrow types. GraphML has no null: null strings become "", null numbers
    NaN (an integer column with nulls, which only extra columns can have, loses the attribute);
    characters XML 1.0 cannot hold (control characters) become U+FFFD; the manifest is stored as a
    JSON string in the graph attribute ``manifest``."""
    bad_ids = {n: _NOT_XML.sub("\ufffd", n) for n in g if _NOT_XML.search(n)}
    if bad_ids:
        g = nx.relabel_nodes(g, bad_ids)
    g.graph["manifest"] = json.dumps(g.graph["manifest"])
    for _, data in g.nodes(data=True):
        _graphml_safe(data, types)
    for _, _, data in g.edges(data=True):
        _graphml_safe(data, types)
    nx.write_graphml(g, str(path), infer_numeric_types=True)


def write_node_link_json(g: nx.MultiDiGraph, path) -> None:
    """A graph from ``InteractionGraph.to_networkx()`` as node-link JSON: nodes under "nodes" (id "id"), edges under "edges"
    with endpoints "from"/"to" and multigraph key "key"; NaN and infinities are written as null (JSON has neither)."""
    try:
        data = nx.node_link_data(g, edges=LINKS_KEY, **_LINK_NAMES)
    except TypeError:   # networkx < 3.4 calls the argument ``link``
        data = nx.node_link_data(g, link=LINKS_KEY, **_LINK_NAMES)
    Path(path).write_text(json.dumps(_nonfinite_to_none(data), allow_nan=False))


def read_node_link_json(path):
    """The ``networkx.MultiDiGraph`` of a file written by ``write_node_link_json``."""
    data = json.loads(Path(path).read_text())
    try:
        return nx.node_link_graph(data, directed=True, multigraph=True, edges=LINKS_KEY, **_LINK_NAMES)
    except TypeError:
        return nx.node_link_graph(data, directed=True, multigraph=True, link=LINKS_KEY, **_LINK_NAMES)


def _graphml_safe(data: dict, types: dict) -> None:
    for key, value in list(data.items()):
        t = types.get(key)
        if value is None:
            if t is not None and pa.types.is_floating(t):
                data[key] = math.nan
            elif t is not None and pa.types.is_integer(t):
                del data[key]
            else:
                data[key] = ""
        elif isinstance(value, (list, dict)):
            data[key] = json.dumps(value)
        elif isinstance(value, str) and _NOT_XML.search(value):
            data[key] = _NOT_XML.sub("\ufffd", value)


def _nonfinite_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nonfinite_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nonfinite_to_none(v) for v in x]
    return x
