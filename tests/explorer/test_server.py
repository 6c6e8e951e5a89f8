"""`jfig serve`'s server on the tiny model: the page, the steering simulator's numbers (against
observe_cascade / predict_cascade and a direct clamped run), the attribution export, and errors."""
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pyarrow.compute as pc
import pytest

import jfig
from jfig.explorer import explorer_payload, simulate_steering
from jfig.explorer.server import make_server
from jfig.steering import cascade_nodes

PROMPT = "alpha beta gamma the sequence"


@pytest.fixture(scope="module")
def server(tiny):
    payload = explorer_payload(tiny["graph"], model=tiny["model"], saes=tiny["saes"], mode="live")
    srv = make_server(payload, tiny["model"], tiny["saes"], tiny["graph"], port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(server, path, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def strongest_source(graph):
    e = graph.edges.to_pylist()
    e = [r for r in e if r["kind"] != "gating" and r["source_site"] == "blocks.0.hook_resid_post"]
    return max(e, key=lambda r: abs(r["weight"]))


def test_page_is_served_live(server):
    with urllib.request.urlopen(server.url, timeout=30) as r:
        html = r.read().decode()
    assert r.status == 200 and '"mode":"live"' in html and 'id="jfig-data"' in html
    with urllib.request.urlopen(server.url + "api/health", timeout=30) as r:
        assert json.loads(r.read()) == {"ok": True}


def test_steering_numbers_are_the_model_and_the_graph(server, tiny):
    model, saes, graph = tiny["model"], {s.site: s for s in tiny["saes"]}, tiny["graph"]
    e = strongest_source(graph)
    site, feature, value = e["source_site"], e["source"], 3.0
    status, ans = post(server, "api/steer", {"site": site, "feature": feature, "value": value, "prompt": PROMPT,
                                             "max_new_tokens": 5})
    assert status == 200, ans
    tokens = np.asarray([[model.tokenizer.bos_id] + model.tokenizer.encode(PROMPT, add_bos=False)], np.int32)
    mask = np.ones(tokens.shape, bool)
    mask[:, 0] = False
    assert ans["tokens"] == int(mask.sum())
    # observed: a direct clamped run against a clean one, encoded at the later site, averaged over the mask
    later = "blocks.2.hook_resid_post"
    clean = np.asarray(saes[later].encode(model.run(tokens, capture=(later,)).cache[later]))
    edit = jfig.Clamp(saes[site], feature, value, positions=mask)
    steered = np.asarray(saes[later].encode(model.run(tokens, edits=(edit,), capture=(later,)).cache[later]))
    observed = (steered - clean)[mask].mean(0)
    # predicted: predict_cascade from the per-token clamp deltas, bounded below by the clean activations
    f0 = np.asarray(saes[site].encode(model.run(tokens, capture=(site,)).cache[site]))[..., feature][mask]
    nodes = cascade_nodes(graph)
    base = np.stack([clean[..., f][mask] if s == later else
                     np.asarray(saes[s].encode(model.run(tokens, capture=(s,)).cache[s]))[..., f][mask]
                     for s, f in nodes], axis=1)
    predicted = jfig.predict_cascade(graph, {(site, feature): value - f0}, baseline=base)
    rows = {(r["site"], r["feature"]): r for r in ans["rows"]}
    assert len(rows) >= 3
    for (s, f), r in rows.items():
        assert s == later
        assert r["observed"] == pytest.approx(float(observed[f]), abs=1e-5)
        want = float(np.mean(predicted[(s, f)])) if (s, f) in predicted else 0.0
        assert r["predicted"] == pytest.approx(want, abs=1e-6)
        assert r["node"] == (nodes.index((s, f)) if (s, f) in nodes else -1)
    # the fit is over every later node
    p = np.asarray([float(np.mean(predicted.get((later, f), 0.0))) for f in range(16)])
    o = observed[:16]
    r2 = 1 - np.sum((o - p) ** 2) / np.sum((o - o.mean()) ** 2)
    assert ans["fit"]["n"] == 16 and ans["fit"]["r2"] == pytest.approx(r2, rel=1e-6)
    # texts: greedy continuations, the clamp acting on every position but the first
    gen_mask = np.ones(tokens.shape[1] + 5, bool)
    gen_mask[0] = False
    want = model.generate(tokens, 5, edits=(jfig.Clamp(saes[site], feature, value, positions=gen_mask),))
    assert ans["steered_text"] == model.tokenizer.decode([int(t) for t in want[0, tokens.shape[1]:]])
    assert ans["clean_text"] == model.tokenizer.decode([int(t) for t in model.generate(tokens, 5)[0, tokens.shape[1]:]])


def test_attribution_endpoint(server):
    status, ans = post(server, "api/attribution", {"prompt": PROMPT})
    assert status == 200 and set(ans) == {"metadata", "qParams", "nodes", "links"}
    assert ans["metadata"]["prompt"] == PROMPT


@pytest.mark.parametrize("body, message", [
    ({"site": "blocks.0.hook_resid_post", "feature": 1, "value": 1.0, "prompt": PROMPT, "temperature": 1},
     "unknown request field"),
    ({"site": "blocks.0.hook_resid_post", "feature": 1, "value": 1.0}, "lacks ['prompt']"),
    ({"site": "blocks.1.hook_resid_post", "feature": 1, "value": 1.0, "prompt": PROMPT}, "has no SAE here"),
    ({"site": "blocks.0.hook_resid_post", "feature": 99, "value": 1.0, "prompt": PROMPT}, "out of range"),
    ({"site": "blocks.0.hook_resid_post", "feature": 1, "value": "big", "prompt": PROMPT}, "finite number"),
    ({"site": "blocks.0.hook_resid_post", "feature": 1, "value": 1.0, "prompt": "  "}, "prompt is empty"),
    ({"site": "blocks.0.hook_resid_post", "feature": 1, "value": 1.0, "prompt": PROMPT, "max_new_tokens": 1000},
     "max_new_tokens"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
])
def test_bad_requests_get_a_message(server, body, message):
    status, ans = post(server, "api/steer", body)
    assert status == 400 and message in ans["error"]


def test_a_feature_outside_the_graph_is_refused(tiny):
    g = tiny["graph"]
    keep = lambda t, a, b: pc.invert(pc.and_(pc.equal(t[a], "blocks.0.hook_resid_post"), pc.equal(t[b], 15)))  # noqa: E731
    edges = g.edges.filter(keep(g.edges, "source_site", "source"))
    edges = edges.filter(pc.fill_null(keep(edges, "modulator_site", "modulator"), True))
    smaller = jfig.InteractionGraph.from_tables(g.nodes.filter(keep(g.nodes, "site", "feature")), edges, g.manifest)
    with pytest.raises(jfig.JfigError, match="blocks.0.hook_resid_post#15 is not a node of the graph"):
        simulate_steering(tiny["model"], tiny["saes"], smaller, "blocks.0.hook_resid_post", 15, 1.0, PROMPT)


def test_unknown_paths(server):
    status, ans = post(server, "api/nothing", {})
    assert status == 404 and "/api/steer" in ans["error"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "missing.js", timeout=30)
    assert e.value.code == 404


def test_server_needs_a_live_payload_and_the_model(tiny):
    static = explorer_payload(tiny["graph"])
    with pytest.raises(jfig.JfigError, match="mode='live'"):
        make_server(static, tiny["model"], tiny["saes"], tiny["graph"], port=0)
    live = dict(static, mode="live")
    with pytest.raises(jfig.JfigError, match="needs the model and the graph's SAEs"):
        make_server(live, None, None, tiny["graph"], port=0)
