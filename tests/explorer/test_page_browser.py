"""The explorer page in a real browser (headless Chromium through Playwright): rendering, the feature
card against the graph's edge table, filters, search, URL selection, exports, behaviour and compare
views, the steering panel (against a canned server answer) and a 100,000-edge graph.

Expected edges and counts come from the graph's Arrow tables (graph.edges), not from the payload the page reads.
"""
from __future__ import annotations

import http.server
import json
import math
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pytest

import jfig
from jfig.explorer import explorer_payload
from jfig.explorer.page import asset, render_page
from tests.support.graphs import graph_from_edges, random_layered

from .browser import background_pixel, browser, canvas_pixel, page_for  # noqa: F401

SITES = [f"blocks.{layer}.hook_resid_post" for layer in range(4)]


# ---------------------------------------------------------------- payloads

def make_payload(graph, **kw):
    return explorer_payload(graph, **kw)


def node_index(payload, site, feature):
    names = [s["name"] for s in payload["sites"]]
    nodes = payload["nodes"]
    for i, (s, f) in enumerate(zip(nodes["site"], nodes["feature"])):
        if names[s] == site and f == feature:
            return i
    raise KeyError((site, feature))


def small_graph():
    """4 sites x 6 features, 30 first-order edges of varied weight and p-value, 4 gating rows."""
    a, i, b, j, sign = random_layered(SITES, 6, 30, seed=3, pairs=[(0, 1), (1, 2), (2, 3), (0, 2)])
    rng = np.random.default_rng(7)
    weight = np.round(rng.uniform(0.05, 2.0, len(a)), 6) + 1e-9 * np.arange(len(a))   # distinct |weights|
    gating = [(0, 0, 1, 1, 2, 2), (1, 3, 0, 2, 2, 4), (2, 5, 1, 0, 3, 1), (0, 4, 2, 2, 3, 3)]
    g = graph_from_edges(SITES, a, i, b, j, sign, weight, n_features=6, gating=gating)
    edges = g.edges
    n = edges.num_rows
    p = [None if k % 7 == 3 else float(10.0 ** -(k % 6)) * 0.5 for k in range(n)]
    w = edges["weight"].to_pylist()
    kinds = edges["kind"].to_pylist()
    w = [(-0.8 - 0.1 * k if k % 2 else 0.9 + 0.1 * k) if kinds[r] == "gating" else w[r]
         for k, r in zip(range(n), range(n))]
    edges = edges.set_column(edges.schema.get_field_index("p_value"), "p_value", pa.array(p, pa.float64()))
    edges = edges.set_column(edges.schema.get_field_index("weight"), "weight", pa.array(w, pa.float64()))
    return jfig.InteractionGraph.from_tables(g.nodes, edges, g.manifest)


@pytest.fixture(scope="module")
def graph():
    return small_graph()


def edge_rows(graph):
    return graph.edges.to_pylist()


def passes(row, kinds=("excitatory", "inhibitory", "gating"), min_w=0.0, max_p=1.0, lmin=-math.inf, lmax=math.inf):
    return (row["kind"] in kinds and abs(row["weight"]) >= min_w
            and (row["p_value"] is None or row["p_value"] <= max_p)
            and lmin <= row["source_layer"] <= lmax and lmin <= row["target_layer"] <= lmax)


def busiest_node(graph):
    """(site, feature) of the node touching the most edges in all roles (first-order and gating)."""
    count = {}
    for r in edge_rows(graph):
        ends = {(r["source_site"], r["source"]), (r["target_site"], r["target"])}
        if r["modulator"] is not None:
            ends.add((r["modulator_site"], r["modulator"]))
        for e in ends:
            count[e] = count.get(e, 0) + 1
    gating_nodes = {(r["modulator_site"], r["modulator"]) for r in edge_rows(graph) if r["kind"] == "gating"}
    return max(count, key=lambda e: (e in gating_nodes, count[e], e))


def edge_count_text(page):
    return page.inner_text("#edge-count").strip()


def is_background(px, bg):
    return all(abs(a - b) <= 6 for a, b in zip(px, bg))


def colour_census(page):
    """Counts of canvas pixels that are blue-ish (excitatory), purple-ish (gating), green-ish (gained) and
    red-ish (inhibitory or lost): the edge colours blended with the white background."""
    return page.evaluate("""() => {
        const c = document.getElementById('graph');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let blue = 0, purple = 0, green = 0, red = 0;
        for (let k = 0; k < d.length; k += 4) {
            const r = d[k], g = d[k + 1], b = d[k + 2];
            if (b > 150 && b - r > 60 && b - g > 40 && r < g + 30) blue++;
            else if (b > 150 && r - g > 40 && b - g > 60) purple++;
            else if (g - r > 40 && g - b > 30) green++;
            else if (r - g > 60 && r - b > 60 && Math.abs(g - b) < 25) red++;
        }
        return {blue, purple, green, red};
    }""")


# ---------------------------------------------------------------- the template

def test_template_is_safe_to_inline():
    """The markers appear once, and the inlined CSS/JS cannot end their elements early or swallow the payload."""
    html, css, js = asset("explorer.html"), asset("explorer.css"), asset("explorer.js")
    for marker in ("/*JFIG_CSS*/", "/*JFIG_JS*/", "__JFIG_DATA__"):
        assert html.count(marker) == 1
        assert marker not in css and marker not in js
    assert "</script" not in js.lower() and "<!--" not in js
    assert "</style" not in css.lower()
    page = render_page(make_payload(small_graph(), title="a </script> title"))
    assert page.count("<script") == 2 and page.lower().count("</script>") == 2
    # the one web address is the base of the card's link to Neuronpedia (a link the user follows, not a fetch)
    assert "https://" not in js.replace('"https://neuronpedia.org/"', "")
    assert "http://" not in js.replace("http://www.w3.org/2000/svg", "")
    assert all(call.startswith('fetch(path') for call in re.findall(r"fetch\([^,)]*", js)), "fetches go to api/ only"


# ---------------------------------------------------------------- rendering and the card

def test_degenerate_payloads_load(page_for):
    """One site without edges, no optional fields: the page loads, draws the nodes and reports 0 edges."""
    payload = {"format": "jfig-explorer", "version": 1, "title": "one site", "mode": "static", "meta": {}, "notes": [],
               "sites": [{"name": "blocks.0.hook_resid_post", "layer": 0}],
               "nodes": {"site": [0, 0, 0], "feature": [5, 6, 7], "y": [0.0, 0.5, 1.0], "firing_rate": [None, 0.1, 0.2],
                         "label": [None, "a label", None], "degree": [0, 0, 0]},
               "estimators": [], "edges": {k: [] for k in ("source", "target", "kind", "weight", "p_value", "q_value",
                                                           "n", "estimator", "modulator")},
               "circuits": [], "compare": None}
    o = page_for(payload)
    page = o.page
    assert edge_count_text(page) == "0 of 0 edges"
    assert page.evaluate("jfigExplorer.lastRender.nodes") == 3
    bg = background_pixel(page)
    for i in range(3):
        pos = page.evaluate(f"jfigExplorer.nodeScreenPosition({i})")
        assert not is_background(canvas_pixel(page, pos["x"], pos["y"]), bg)
    pos = page.evaluate("jfigExplorer.nodeScreenPosition(1)")
    page.mouse.click(pos["x"], pos["y"])
    assert page.inner_text("#card-title") == "blocks.0.hook_resid_post#6 \u2014 a label"
    assert "firing rate 10%" in page.inner_text("#card-meta")
    page.evaluate("jfigExplorer.select(0)")
    assert "firing rate unknown" in page.inner_text("#card-meta")
    page.fill("#search", "label")
    assert page.get_attribute("#search-results li:first-child", "data-node") == "1"
    page.press("#search", "Escape")
    assert page.is_hidden("#search-results")
    for sel in ("#export-json", "#export-svg"):
        with page.expect_download():
            page.click(sel)
    o.assert_no_errors()


def test_page_renders_nodes(page_for, graph):
    payload = make_payload(graph)
    o = page_for(payload)
    page = o.page
    n = len(payload["nodes"]["site"])
    assert page.evaluate("jfigExplorer.lastRender.nodes") == n
    assert page.evaluate("jfigExplorer.lastRender.edges") == graph.n_edges
    assert edge_count_text(page) == f"{graph.n_edges} of {graph.n_edges} edges"
    bg = background_pixel(page)
    assert bg[3] == 255, "the canvas was never painted"
    for i in (0, n // 3, n // 2, n - 1):
        pos = page.evaluate(f"jfigExplorer.nodeScreenPosition({i})")
        px = canvas_pixel(page, pos["x"], pos["y"])
        assert not is_background(px, bg), f"node {i} at {pos} is not drawn (pixel {px}, background {bg})"
        assert sum(px[:3]) < 3 * 200, f"node {i} pixel {px} is not a node colour"
    census = colour_census(page)
    assert census["blue"] > 0 and census["purple"] > 0, census     # excitatory and gating edges are drawn
    # no behaviour subgraphs: the selector is off; static mode: the steering panel says it needs the server
    assert page.is_disabled("#behavior-select")
    assert "jfig serve" in page.text_content("#steer-note")
    assert page.is_hidden("#steer-run")
    o.assert_no_errors()


def test_click_node_shows_its_card_and_edges(page_for, graph):
    payload = make_payload(graph)
    o = page_for(payload)
    page = o.page
    site, feature = busiest_node(graph)
    i = node_index(payload, site, feature)
    pos = page.evaluate(f"jfigExplorer.nodeScreenPosition({i})")
    page.mouse.click(pos["x"], pos["y"])
    assert page.evaluate("jfigExplorer.selected()") == i
    assert page.inner_text("#card-title").startswith(f"{site}#{feature}")
    assert page.evaluate("location.hash") == "#feature=" + quote(f"{site}#{feature}", safe="")
    # without an atlas the contexts are the graph's own text snippets
    assert f"context of {site}:{feature}" in page.inner_text("#card-contexts")

    def table(sel):
        return page.eval_on_selector_all(sel + " tbody tr", """rows => rows.map(r => [r.dataset.site,
            Number(r.dataset.feature), Number(r.dataset.weight), r.dataset.role || null,
            r.dataset.sourceSite || null, r.dataset.source == null ? null : Number(r.dataset.source),
            r.dataset.targetSite || null, r.dataset.target == null ? null : Number(r.dataset.target),
            r.dataset.modulatorSite || null, r.dataset.modulator == null ? null : Number(r.dataset.modulator)])""")

    rows = edge_rows(graph)
    want_in = sorted((r["source_site"], r["source"], r["weight"]) for r in rows
                     if r["kind"] != "gating" and (r["target_site"], r["target"]) == (site, feature))
    want_out = sorted((r["target_site"], r["target"], r["weight"]) for r in rows
                      if r["kind"] != "gating" and (r["source_site"], r["source"]) == (site, feature))
    got_in, got_out = table("#card-in"), table("#card-out")
    assert sorted((s, f, w) for s, f, w, *_ in got_in) == want_in
    assert sorted((s, f, w) for s, f, w, *_ in got_out) == want_out
    # rows sorted by |weight|, strongest first; weight shown to 3 significant digits
    for got in (got_in, got_out):
        ws = [abs(w) for _, _, w, *_ in got]
        assert ws == sorted(ws, reverse=True)
    if got_out:
        first = page.inner_text("#card-out tbody tr:first-child td:nth-child(3)")
        assert float(first) == pytest.approx(got_out[0][2], rel=5e-3)
        assert len(first.lstrip("-").replace(".", "").lstrip("0")) <= 3

    me = (site, feature)
    want_gate = []
    for r in rows:
        if r["kind"] != "gating":
            continue
        roles = [name for name, end in (("modulator", (r["modulator_site"], r["modulator"])),
                                        ("source", (r["source_site"], r["source"])),
                                        ("target", (r["target_site"], r["target"]))) if end == me]
        if roles:
            want_gate.append(("/".join(roles), r["source_site"], r["source"], r["target_site"], r["target"],
                              r["modulator_site"], r["modulator"], r["weight"]))
    got_gate = [(role, ss, s, ts, t, ms, m, w) for _, _, w, role, ss, s, ts, t, ms, m in table("#card-gating")]
    assert want_gate, "the test graph should give the busiest node a gating role"
    assert sorted(got_gate) == sorted(want_gate)

    # clicking a neighbour in the table selects it; clicking empty canvas clears the selection
    other = got_in[0] if got_in else got_out[0]
    page.click(f"#card-{'in' if got_in else 'out'} tbody tr:first-child button.link")
    assert page.inner_text("#card-title").startswith(f"{other[0]}#{other[1]}")
    box = page.locator("#graph").bounding_box()
    page.mouse.click(box["x"] + 5, box["y"] + box["height"] - 5)
    assert page.evaluate("jfigExplorer.selected()") == -1
    assert page.inner_text("#card-title") == "No feature selected"
    o.assert_no_errors()


def test_card_contexts_logits_histogram_are_text(page_for, graph):
    payload = make_payload(graph)
    n = len(payload["nodes"]["site"])
    payload["vocab"] = {"1": "<b>bold</b>", "2": " Paris", "3": "\n", "4": " is", "5": " the", "6": "&amp;"}
    contexts = [None] * n
    contexts[2] = [{"tokens": [5, 2, 4, 1, 3, -1, -1], "at": 1, "activation": 3.14159},
                   {"tokens": [-1, 6, 2], "at": 2, "activation": 1.5}]
    payload["cards"] = {"contexts": contexts,
                        "logit_top": [[[2, 1.23456], [1, 0.5]] if k == 2 else None for k in range(n)],
                        "logit_bottom": [[[3, -2.5]] if k == 2 else None for k in range(n)],
                        "histogram": [{"edges": [0.01, 0.1, 1.0, 10.0], "counts": [5, 20, 3]} if k == 2 else None
                                      for k in range(n)]}
    o = page_for(payload)
    page = o.page
    page.evaluate("jfigExplorer.select(2)")
    rows = page.locator("#card-contexts .ctx")
    assert rows.count() == 2
    text = rows.nth(0).inner_text()
    assert "<b>bold</b>" in text and "\u21b5" in text and " Paris" in text
    assert page.locator("#card-contexts b").count() == 0          # token text never becomes HTML
    mark = rows.nth(0).locator("mark")
    assert mark.inner_text() == " Paris" and "3.14" in mark.get_attribute("title")
    assert rows.nth(1).locator("mark").inner_text() == " Paris"
    assert "&amp;" in rows.nth(1).inner_text()
    logits = page.inner_text("#card-logits")
    assert "Paris" in logits and "1.23" in logits and "-2.5" in logits and "\u21b5" in logits
    assert page.locator("#card-hist svg rect").count() == 3
    hist = page.inner_text("#card-hist")
    assert "0.01" in hist and "10" in hist
    # a node without cards says so, with the payload's notes
    page.evaluate("jfigExplorer.select(3)")
    assert "No top contexts" in page.inner_text("#card-contexts")
    for note in payload["notes"]:
        assert note in page.inner_text("#card-notes")
    o.assert_no_errors()


def test_drag_pans_wheel_zooms_and_fit_restores(page_for, graph):
    o = page_for(make_payload(graph))
    page = o.page
    p0 = page.evaluate("jfigExplorer.nodeScreenPosition(0)")
    p1 = page.evaluate("jfigExplorer.nodeScreenPosition(7)")
    box = page.locator("#graph").bounding_box()
    x, y = box["x"] + box["width"] * 0.47, box["y"] + box["height"] * 0.93      # empty space below the nodes
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 40, y - 30, steps=5)
    page.mouse.move(x + 80, y - 60, steps=5)
    page.mouse.up()
    moved = page.evaluate("jfigExplorer.nodeScreenPosition(0)")
    assert moved["x"] == pytest.approx(p0["x"] + 80, abs=0.5) and moved["y"] == pytest.approx(p0["y"] - 60, abs=0.5)
    assert page.evaluate("jfigExplorer.selected()") == -1          # a drag is not a click
    page.mouse.move(p1["x"] + 80, p1["y"] - 60)
    renders = page.evaluate("jfigExplorer.renders")
    page.mouse.wheel(0, -300)
    page.wait_for_function(f"jfigExplorer.renders > {renders} && jfigExplorer.lastRender.lod === false")
    zoomed0 = page.evaluate("jfigExplorer.nodeScreenPosition(0)")
    zoomed1 = page.evaluate("jfigExplorer.nodeScreenPosition(7)")
    assert zoomed1["x"] == pytest.approx(p1["x"] + 80, abs=0.5)   # the point under the cursor stays put
    assert math.dist((zoomed0["x"], zoomed0["y"]), (zoomed1["x"], zoomed1["y"])) > 1.5 * math.dist(
        (p0["x"], p0["y"]), (p1["x"], p1["y"]))
    page.click("#fit")
    assert page.evaluate("jfigExplorer.nodeScreenPosition(0)") == p0
    o.assert_no_errors()


# ---------------------------------------------------------------- filters

def test_filters_match_the_edge_table(page_for, graph):
    o = page_for(make_payload(graph))
    page = o.page
    rows = edge_rows(graph)
    total = len(rows)

    def expect(**rule):
        want = sum(passes(r, **rule) for r in rows)
        assert edge_count_text(page) == f"{want} of {total} edges", rule
        assert page.evaluate("jfigExplorer.visibleEdgeCount()") == want
        return want

    assert page.input_value("#filter-layer-min") == "0" and page.input_value("#filter-layer-max") == "3"
    page.uncheck("#filter-inhibitory")
    expect(kinds=("excitatory", "gating"))
    page.fill("#filter-weight", "0.5")
    expect(kinds=("excitatory", "gating"), min_w=0.5)
    page.fill("#filter-p", "0.01")
    expect(kinds=("excitatory", "gating"), min_w=0.5, max_p=0.01)
    page.fill("#filter-layer-min", "1")
    page.fill("#filter-layer-max", "2")
    shown = expect(kinds=("excitatory", "gating"), min_w=0.5, max_p=0.01, lmin=1, lmax=2)
    page.check("#filter-inhibitory")
    page.uncheck("#filter-gating")
    expect(kinds=("excitatory", "inhibitory"), min_w=0.5, max_p=0.01, lmin=1, lmax=2)
    # the drawing follows the filters
    page.evaluate("jfigExplorer.render()")
    assert page.evaluate("jfigExplorer.lastRender.edges") == sum(
        passes(r, kinds=("excitatory", "inhibitory"), min_w=0.5, max_p=0.01, lmin=1, lmax=2) for r in rows)
    for sel, value in (("#filter-weight", "0"), ("#filter-p", "1"), ("#filter-layer-min", "0"), ("#filter-layer-max", "3")):
        page.fill(sel, value)
    page.check("#filter-gating")
    expect()
    assert shown < total
    o.assert_no_errors()


# ---------------------------------------------------------------- search and URL

def test_search_by_feature_and_by_word(page_for, graph):
    payload = make_payload(graph)
    labelled = node_index(payload, SITES[1], 2)
    with_context = node_index(payload, SITES[3], 5)
    payload["nodes"]["label"][labelled] = "Paris detector"
    n = len(payload["nodes"]["site"])
    payload["vocab"] = {"7": " the", "8": " capital", "9": " of", "10": " France"}
    payload["cards"] = dict(payload.get("cards") or {})
    payload["cards"]["contexts"] = [[{"tokens": [7, 8, 9, 10], "at": 3, "activation": 2.0}] if k == with_context else None
                                    for k in range(n)]
    o = page_for(payload)
    page = o.page
    target = node_index(payload, SITES[2], 4)
    for query in (f"{SITES[2]}#4", f"{SITES[2]}:4", "blocks.2#4"):
        page.fill("#search", query)
        assert page.is_visible("#search-results")
        assert page.get_attribute("#search-results li:first-child", "data-node") == str(target), query
    page.press("#search", "Enter")
    assert page.evaluate("jfigExplorer.selected()") == target
    assert page.inner_text("#card-title").startswith(f"{SITES[2]}#4")

    page.fill("#search", "paris")
    found = [int(x) for x in page.eval_on_selector_all("#search-results li[data-node]", "ls => ls.map(l => l.dataset.node)")]
    assert found == [labelled]
    page.fill("#search", "CAPITAL of")
    found = [int(x) for x in page.eval_on_selector_all("#search-results li[data-node]", "ls => ls.map(l => l.dataset.node)")]
    assert found == [with_context]
    page.click("#search-results li:first-child")
    assert page.evaluate("jfigExplorer.selected()") == with_context
    page.fill("#search", "no such word anywhere")
    assert page.locator("#search-results li[data-node]").count() == 0
    o.assert_no_errors()


def test_url_selects_a_feature_and_reports_unknown_ones(page_for, graph):
    payload = make_payload(graph)
    i = node_index(payload, SITES[2], 4)
    for suffix in (f"#feature={quote(SITES[2] + '#4', safe='')}", f"?feature={SITES[2]}:4", f"#feature={SITES[2]}#4"):
        o = page_for(payload, suffix=suffix)
        assert o.page.evaluate("jfigExplorer.selected()") == i, suffix
        assert o.page.inner_text("#card-title").startswith(f"{SITES[2]}#4")
        assert o.page.is_hidden("#error")
        o.assert_no_errors()

    o = page_for(payload, suffix=f"#feature={quote(SITES[3] + '#99', safe='')}")
    page = o.page
    assert page.is_visible("#error")
    message = page.inner_text("#error")
    assert f"{SITES[3]}#99" in message and "not in this graph" in message and SITES[0] in message
    assert page.evaluate("jfigExplorer.selected()") == -1
    # the page still works: the graph is drawn and selecting updates the URL
    assert page.evaluate("jfigExplorer.lastRender.nodes") == len(payload["nodes"]["site"])
    page.evaluate(f"jfigExplorer.select({i})")
    assert page.evaluate("location.hash") == "#feature=" + quote(SITES[2] + "#4", safe="")
    page.evaluate("jfigExplorer.select('nonsense#1')")
    assert "nonsense#1" in page.inner_text("#error")
    o.assert_no_errors()


# ---------------------------------------------------------------- exports

def _edge_tuple(r):
    return (r["source_site"], r["source"], r["target_site"], r["target"], r["kind"], r["weight"], r["p_value"],
            r["n"], r["estimator"], r["modulator_site"], r["modulator"])


def test_exports(page_for, graph, tmp_path):
    o = page_for(make_payload(graph))
    page = o.page
    page.uncheck("#filter-gating")
    page.fill("#filter-weight", "0.3")
    page.evaluate("jfigExplorer.zoom(3)")
    page.click("#fit")
    rows = [r for r in edge_rows(graph) if passes(r, kinds=("excitatory", "inhibitory"), min_w=0.3)]

    with page.expect_download() as info:
        page.click("#export-json")
    d = info.value
    assert d.suggested_filename == "jfig-view.json"
    doc = json.loads(open(d.path(), encoding="utf-8").read())
    assert sorted(map(_edge_tuple, doc["edges"])) == sorted(map(_edge_tuple, rows))
    assert sorted((x["site"], x["feature"]) for x in doc["nodes"]) == sorted(
        zip(graph.nodes["site"].to_pylist(), graph.nodes["feature"].to_pylist()))

    with page.expect_download() as info:
        page.click("#export-svg")
    d = info.value
    assert d.suggested_filename == "jfig-view.svg"
    svg = ET.parse(d.path()).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f".//{ns}path")) == len(rows)
    assert len(svg.findall(f".//{ns}circle")) == graph.n_nodes

    with page.expect_download() as info:
        page.click("#export-png")
    d = info.value
    assert d.suggested_filename == "jfig-view.png"
    data = open(d.path(), "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000

    # zoomed into one corner, the JSON holds only edges with an end in view
    page.evaluate("jfigExplorer.zoom(2)")
    doc = page.evaluate("jfigExplorer.viewJSON()")
    assert 0 < len(doc["edges"]) <= len(rows) and len(doc["nodes"]) < graph.n_nodes
    o.assert_no_errors()


# ---------------------------------------------------------------- behaviour and compare

def test_behaviour_view(page_for, graph):
    payload = make_payload(graph)
    e = payload["edges"]
    k = next(k for k in range(len(e["source"])) if e["kind"][k] != 2)
    s, t = e["source"][k], e["target"][k]
    others = [x for x in range(len(payload["nodes"]["site"])) if x not in (s, t)]
    payload["circuits"] = [{"name": "toy behaviour", "nodes": [s, t], "seeds": [s], "edges": [k],
                            "numbers": {"sufficiency": 0.912345, "necessity": 0.5, "faithfulness": 12345.678},
                            "summary": "the toy behaviour runs through one edge"}]
    o = page_for(payload)
    page = o.page
    bg = background_pixel(page)

    def pixel(i):
        pos = page.evaluate(f"jfigExplorer.nodeScreenPosition({i})")
        return canvas_pixel(page, pos["x"], pos["y"])

    far = max(others, key=lambda x: min(abs(payload["nodes"]["y"][x] - payload["nodes"]["y"][s]),
                                        abs(payload["nodes"]["y"][x] - payload["nodes"]["y"][t])))
    before = pixel(far)
    assert page.is_enabled("#behavior-select")
    page.select_option("#behavior-select", "0")
    numbers = page.eval_on_selector_all("#behavior-numbers tr[data-name]",
                                        "rs => rs.map(r => [r.dataset.name, r.querySelector('td').textContent])")
    assert numbers == [["sufficiency", "0.912"], ["necessity", "0.5"], ["faithfulness", "12300"]]
    assert "through one edge" in page.inner_text("#behavior-summary")
    dimmed = pixel(far)
    assert sum(dimmed[:3]) > sum(before[:3]) + 60 and not is_background(dimmed, bg), (before, dimmed)
    assert sum(pixel(s)[:3]) < 3 * 120 and sum(pixel(t)[:3]) < 3 * 120
    page.select_option("#behavior-select", "")
    assert pixel(far) == before
    assert page.locator("#behavior-numbers tr[data-name]").count() == 0
    o.assert_no_errors()


def test_compare_mode(page_for, graph):
    payload = make_payload(graph)
    e = payload["edges"]
    m = len(e["source"])
    status = [k % 4 if e["kind"][k] != 2 else 0 for k in range(m)]
    first = next(k for k in range(m) if e["kind"][k] == 0)
    status[first] = 1                                   # the strongest excitatory edge is gained
    e["status"] = status
    e["weight_b"] = [None if st == 2 else (-w if st == 3 else w * 1.5) for st, w in zip(status, e["weight"])]
    counts = {name: status.count(k) for k, name in enumerate(("same", "gained", "lost", "flipped"))}
    payload["compare"] = {"a": "graph one", "b": "graph two", "counts": counts, "notes": ["matched by feature id"]}
    o = page_for(payload)
    page = o.page
    summary = page.inner_text("#compare-summary")
    assert "graph one" in summary and "graph two" in summary and "matched by feature id" in summary
    for name, c in counts.items():
        assert f"{name} {c}" in summary
    census = colour_census(page)
    assert census["green"] > 0 and census["blue"] == 0 and census["purple"] == 0, census
    assert page.is_visible("#legend") and "gained" in page.inner_text("#legend")
    page.uncheck("#filter-lost")
    want = sum(1 for st in status if st != 2)
    assert edge_count_text(page) == f"{want} of {m} edges"
    page.uncheck("#filter-same")
    assert edge_count_text(page) == f"{sum(1 for st in status if st in (1, 3))} of {m} edges"
    # colours follow the status, not the kind: gained edges alone are green, lost edges alone red
    page.uncheck("#filter-flipped")
    page.evaluate("jfigExplorer.render()")
    census = colour_census(page)
    assert census["green"] > 0 and census["red"] == census["blue"] == 0, census
    page.uncheck("#filter-gained")
    page.check("#filter-lost")
    assert edge_count_text(page) == f"{status.count(2)} of {m} edges"
    page.evaluate("jfigExplorer.render()")
    census = colour_census(page)
    assert census["red"] > 0 and census["green"] == census["blue"] == 0, census
    # the card shows weight B beside each weight
    page.evaluate(f"jfigExplorer.select({e['target'][first]})")
    headers = page.eval_on_selector_all("#card-in thead th", "hs => hs.map(h => h.textContent)")
    assert "weight B" in headers
    row = page.locator(f"#card-in tbody tr[data-edge='{first}']")
    assert row.count() == 1 and f"{e['weight_b'][first]:.3g}" in row.inner_text() and "gained" in row.inner_text()
    o.assert_no_errors()


# ---------------------------------------------------------------- steering panel (canned server answer)

CANNED = {"site": SITES[1], "feature": 2, "node": None, "value": 7.5, "prompt": "p", "tokens": 5,
          "rows": [{"node": None, "site": SITES[2], "feature": 4, "predicted": 0.123456789, "observed": 0.1111111111},
                   {"node": None, "site": SITES[3], "feature": 1, "predicted": -2.5, "observed": -1.75},
                   {"node": -1, "site": SITES[3], "feature": 999, "predicted": 0.0, "observed": 0.25}],
          "fit": {"r2": 0.912345, "r2_linear": 0.8, "spearman": None, "n": 3},
          "clean_text": "The capital of France is Paris <b>", "steered_text": "The capital of France is Rome\nok"}


def _serve(html: str, answers: list):
    """A tiny HTTP server on 127.0.0.1: GET -> the page, POST /api/steer -> the canned answer."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            answers.append((self.path, json.loads(self.rfile.read(n))))
            body = json.dumps(CANNED).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_steering_panel_with_a_canned_answer(page_for, graph):
    payload = make_payload(graph, mode="live")
    payload["mode"] = "live"
    i = node_index(payload, SITES[1], 2)
    canned_nodes = [node_index(payload, SITES[2], 4), node_index(payload, SITES[3], 1), -1]
    CANNED["node"] = i
    for row, node in zip(CANNED["rows"], canned_nodes):
        row["node"] = node
    posts = []
    server = _serve(render_page(payload), posts)
    try:
        o = page_for(url=f"http://127.0.0.1:{server.server_address[1]}/view/",
                     allow=("Failed to load resource: the server responded with a status of 400",))
        page = o.page
        assert page.is_visible("#steer-run") and page.is_disabled("#steer-run")
        assert page.input_value("#steer-prompt") == "The capital of France is"
        assert page.input_value("#steer-tokens") == "16"
        page.evaluate(f"jfigExplorer.select({i})")
        page.fill("#steer-value", "7.5")
        page.fill("#steer-tokens", "5")
        page.click("#steer-run")
        page.wait_for_selector("#steer-table tbody tr")
        assert posts == [("/view/api/steer", {"site": SITES[1], "feature": 2, "value": 7.5,
                                              "prompt": "The capital of France is", "max_new_tokens": 5})]
        got = page.eval_on_selector_all("#steer-table tbody tr", """rs => rs.map(r => [r.dataset.site,
            Number(r.dataset.feature), r.dataset.predicted, r.dataset.observed, r.innerText])""")
        assert [[s, f, float(p), float(v)] for s, f, p, v, _ in got] == [
            [r["site"], r["feature"], r["predicted"], r["observed"]] for r in CANNED["rows"]]
        assert got[0][2:4] == ["0.123456789", "0.1111111111"]          # full precision
        assert "0.123" in got[0][4] and "0.111" in got[0][4]
        fit = page.inner_text("#steer-fit")
        assert "0.912" in fit and "0.8" in fit and "n 3" in fit
        assert page.inner_text("#steer-clean") == CANNED["clean_text"]
        assert page.locator("#steer-clean b").count() == 0
        assert page.inner_text("#steer-steered") == CANNED["steered_text"]
        assert "done" in page.inner_text("#steer-status")
        # the affected nodes are drawn larger: red for a fall (the strongest change), blue for a rise
        pos = page.evaluate(f"jfigExplorer.nodeScreenPosition({canned_nodes[1]})")
        px = canvas_pixel(page, pos["x"] - 8, pos["y"])
        assert px[0] > px[2] + 40 and px[0] > px[1] + 40, px
        pos = page.evaluate(f"jfigExplorer.nodeScreenPosition({canned_nodes[0]})")
        px = canvas_pixel(page, pos["x"], pos["y"] - 5)
        assert px[2] > px[0] + 40, px

        # an error answer is shown in the status line and the banner
        page.route("**/api/steer", lambda route: route.fulfill(status=400, content_type="application/json",
                                                               body=json.dumps({"error": "no model is loaded"})))
        page.click("#steer-run")
        page.wait_for_function("document.getElementById('steer-status').textContent.includes('no model is loaded')")
        assert page.is_visible("#error") and "no model is loaded" in page.inner_text("#error")
        o.assert_no_errors()
    finally:
        server.shutdown()
        server.server_close()


def test_card_links_to_neuronpedia_when_the_sae_has_an_id(page_for, graph):
    payload = make_payload(graph)
    payload["sites"][1]["neuronpedia"] = "toy-model/1-res-jb"
    o = page_for(payload)
    page = o.page
    page.evaluate(f"jfigExplorer.select({node_index(payload, SITES[1], 4)})")
    assert page.get_attribute("#card-neuronpedia", "href") == "https://neuronpedia.org/toy-model/1-res-jb/4"
    page.evaluate(f"jfigExplorer.select({node_index(payload, SITES[0], 4)})")
    assert page.locator("#card-neuronpedia").count() == 0
    o.assert_no_errors()


# ---------------------------------------------------------------- scale: 100,000 edges

def test_scale_100k_edges(page_for):
    sites = [f"blocks.{layer}.hook_resid_post" for layer in range(10)]
    n_features, n_first, n_gating = 2000, 98_000, 2_000
    a, i, b, j, sign = random_layered(sites, n_features, n_first, seed=1)
    rng = np.random.default_rng(2)
    weight = rng.lognormal(-2.0, 1.0, n_first)
    ga = rng.integers(0, 9, n_gating)
    gating = [(int(x), int(rng.integers(n_features)), int(x), int(rng.integers(n_features)), int(x) + 1,
               int(rng.integers(n_features))) for x in ga]
    t0 = time.perf_counter()
    g = graph_from_edges(sites, a, i, b, j, sign, weight, n_features=n_features, gating=gating)
    payload = make_payload(g)
    build_s = time.perf_counter() - t0
    assert len(payload["edges"]["source"]) == 100_000

    t0 = time.perf_counter()
    o = page_for(payload)
    load_s = time.perf_counter() - t0
    page = o.page
    timings = page.evaluate("jfigExplorer.timings")
    assert page.evaluate("jfigExplorer.lastRender.nodes") == len(payload["nodes"]["site"])
    assert edge_count_text(page) == "100000 of 100000 edges"
    bg = background_pixel(page)
    for k in (0, 5000, 12345, 19999):
        pos = page.evaluate(f"jfigExplorer.nodeScreenPosition({k})")
        assert not is_background(canvas_pixel(page, pos["x"], pos["y"]), bg), k

    render_ms = page.evaluate("jfigExplorer.render()")
    full_edges = page.evaluate("jfigExplorer.lastRender.edges")
    lod_ms = page.evaluate("jfigExplorer.render(true)")
    lod_edges = page.evaluate("jfigExplorer.lastRender.edges")
    assert full_edges == 100_000 and 0 < lod_edges <= 15_000
    # the same with the canvas rasterised (reading a pixel back waits for the drawing to finish)
    flushed = """(lod) => { const t = performance.now(); jfigExplorer.render(lod);
        document.getElementById('graph').getContext('2d').getImageData(0, 0, 1, 1); return performance.now() - t; }"""
    render_flushed_ms = page.evaluate(flushed, False)
    lod_flushed_ms = page.evaluate(flushed, True)

    # wheel zoom draws the light frame at once and the full one after a short idle time
    box = page.locator("#graph").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    before = page.evaluate("jfigExplorer.nodeScreenPosition(0)")
    page.mouse.move(cx, cy)
    renders = page.evaluate("jfigExplorer.renders")
    page.mouse.wheel(0, -200)
    page.wait_for_function(f"jfigExplorer.renders > {renders} && jfigExplorer.lastRender.lod === false "
                           "&& jfigExplorer.lastRender.edges > 15000")
    after = page.evaluate("jfigExplorer.nodeScreenPosition(0)")
    assert math.hypot(after["x"] - cx, after["y"] - cy) > math.hypot(before["x"] - cx, before["y"] - cy) + 10
    page.click("#fit")
    filter_ms = page.evaluate("""() => {
        const t = performance.now();
        const box = document.getElementById('filter-weight');
        box.value = '0.2';
        box.dispatchEvent(new Event('input', {bubbles: true}));
        jfigExplorer.render();
        return performance.now() - t;
    }""")
    want = int(np.sum(np.abs(np.asarray(g.edges["weight"].to_pylist())) >= 0.2))
    assert edge_count_text(page) == f"{want} of 100000 edges"
    zoom_ms = page.evaluate("jfigExplorer.zoom(6)")
    pan_ms = page.evaluate("jfigExplorer.pan(-150, 80)")
    # click a node in view: the nearest node to the click gets selected
    k = page.evaluate("""() => {
        const c = document.getElementById('graph').getBoundingClientRect();
        const n = jfigExplorer.lastRender.nodes;
        for (let i = 0; i < 20000; i += 7) {
            const p = jfigExplorer.nodeScreenPosition(i);
            if (p.x > c.left + 100 && p.x < c.right - 100 && p.y > c.top + 100 && p.y < c.bottom - 100) return i;
        }
        return -1;
    }""")
    assert k >= 0
    pos = page.evaluate(f"jfigExplorer.nodeScreenPosition({k})")
    t0 = time.perf_counter()
    page.mouse.click(pos["x"], pos["y"])
    click_s = time.perf_counter() - t0
    sel = page.evaluate("jfigExplorer.selected()")
    assert sel >= 0
    got = page.evaluate(f"jfigExplorer.nodeScreenPosition({sel})")
    assert math.hypot(got["x"] - pos["x"], got["y"] - pos["y"]) <= 3
    select_render_ms = page.evaluate("jfigExplorer.lastRender.ms")
    result = {"edges": 100_000, "nodes": len(payload["nodes"]["site"]), "sites": 10,
              "html_mb": round(o.path.stat().st_size / 1e6, 2), "build_payload_s": round(build_s, 2),
              "page_load_s": round(load_s, 2), "parse_ms": round(timings["parseMs"], 1),
              "first_render_ms": round(timings["firstRenderMs"], 1), "full_render_ms": round(render_ms, 1),
              "full_render_rasterised_ms": round(render_flushed_ms, 1),
              "interaction_render_ms": round(lod_ms, 1), "interaction_render_rasterised_ms": round(lod_flushed_ms, 1),
              "interaction_edges": lod_edges,
              "filter_change_ms": round(filter_ms, 1), "zoom_ms": round(zoom_ms, 1), "pan_ms": round(pan_ms, 1),
              "click_select_s": round(click_s, 3), "select_render_ms": round(select_render_ms, 1)}
    print("explorer timings at 100k edges:", json.dumps(result))
    out = os.environ.get("JFIG_EXPLORER_TIMINGS")
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    o.assert_no_errors()
