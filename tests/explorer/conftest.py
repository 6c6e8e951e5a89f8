"""Shared fixtures of the explorer tests: the tiny project (a model folder with a tokenizer, two SAEs,
texts), its atlas, and a graph over its SAE sites saved beside the atlas as a build leaves them."""
import numpy as np
import pytest

import jfig
from jfig.data import tokens_from
from tests.support.graphs import graph_from_edges
from tests.support.tiny_project import SAE_SITES, make_project


@pytest.fixture(scope="package")
def tiny(tmp_path_factory):
    """dict: root, model, saes (list), atlas, graph (16 features per site, 40 first-order edges and two
    gating rows), graph_dir (root/build/graph, with the atlas at root/build/atlas)."""
    root, model = make_project(tmp_path_factory.mktemp("explorer"))
    saes = [jfig.load_sae(root / "saes" / "l0"), jfig.load_sae(root / "saes" / "l2")]
    tokens = tokens_from(str(root / "texts"), model, 16, max_tokens=16 * 24)
    atlas = jfig.build_atlas(model, saes, tokens, window=5)
    rng = np.random.default_rng(0)
    pairs = rng.choice(16 * 16, 40, replace=False)
    src, tgt = pairs // 16, pairs % 16
    graph = graph_from_edges(list(SAE_SITES), [0] * 40, src, [1] * 40, tgt, rng.choice([-1, 1], 40),
                             rng.uniform(0.05, 2.0, 40), n_features=16,
                             gating=[(0, 3, 0, 1, 1, 2), (0, 5, 0, 6, 1, 7)])
    graph_dir = root / "build" / "graph"
    graph.save(graph_dir)
    atlas.save(root / "build" / "atlas")
    return {"root": root, "model": model, "saes": saes, "atlas": atlas, "graph": graph, "graph_dir": graph_dir}
