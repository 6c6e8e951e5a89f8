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
from tests.explorer.reference import reference_steering

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
    e = strongest_source(tiny["graph"])
    site, feature, value = e["source_site"], e["source"], 3.0
    status, ans = post(server, "api/steer", {"site": site, "feature": feature, "value": value, "prompt": PROMPT,
                                             "max_new_tokens": 5})
    assert status == 200, ans
    ref = reference_steering(tiny, site, feature, value, PROMPT, 5)
    assert ans["tokens"] == ref["tokens"]
    rows = {(r["site"], r["feature"]): r for r in ans["rows"]}
    assert len(rows) >= 3
    for key, r in rows.items():
        assert r["observed"] == pytest.approx(ref["observed"][key], abs=1e-5)
        assert r["predicted"] == pytest.approx(ref["predicted"][key], abs=1e-6)
        assert r["node"] == ref["node"][key]
    assert ans["fit"]["n"] == 16 and ans["fit"]["r2"] == pytest.approx(ref["r2"], rel=1e-6)
    assert (ans["clean_text"], ans["steered_text"]) == (ref["clean_text"], ref["steered_text"])


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
