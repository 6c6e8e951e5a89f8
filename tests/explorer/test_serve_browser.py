"""`jfig serve` in a real browser on the tiny model: select a feature by clicking it, run the steering
simulator from the page, and check the table's numbers against an independent computation (direct
clamped runs for the observed cascade, predict_cascade for the predicted one); export the prompt's
attribution graph from the page."""
import json
import threading

import pytest

from jfig.explorer import explorer_payload
from jfig.explorer.server import make_server
from tests.explorer.browser import browser, page_for  # noqa: F401 (fixtures)
from tests.explorer.reference import LATER, reference_steering

PROMPT = "gamma delta the words of"


@pytest.fixture(scope="module")
def served(tiny):
    payload = explorer_payload(tiny["graph"], atlas=tiny["atlas"], model=tiny["model"], saes=tiny["saes"],
                               mode="live")
    srv = make_server(payload, tiny["model"], tiny["saes"], tiny["graph"], port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, payload
    srv.shutdown()
    srv.server_close()


def test_steering_from_the_page(page_for, served, tiny):
    srv, payload = served
    opened = page_for(url=srv.url)
    page = opened.page
    e = max((r for r in tiny["graph"].edges.to_pylist() if r["kind"] != "gating" and r["target_site"] == LATER),
            key=lambda r: abs(r["weight"]))
    site, feature = e["source_site"], e["source"]
    node = next(i for i, (s, f) in enumerate(zip(payload["nodes"]["site"], payload["nodes"]["feature"]))
                if payload["sites"][s]["name"] == site and f == feature)
    pos = page.evaluate(f"window.jfigExplorer.nodeScreenPosition({node})")
    page.mouse.click(pos["x"], pos["y"])
    assert page.evaluate("window.jfigExplorer.selected()") == node
    # the clamp value defaults to the top of the feature's measured range (its 90th percentile)
    level = payload["cards"]["levels"][node][2]
    assert float(page.input_value("#steer-value")) == pytest.approx(level, rel=1e-2)
    page.fill("#steer-value", "2.5")
    page.fill("#steer-prompt", PROMPT)
    page.fill("#steer-tokens", "4")
    page.click("#steer-run")
    page.wait_for_function("document.querySelectorAll('#steer-table tbody tr').length > 0", timeout=120_000)
    rows = page.eval_on_selector_all("#steer-table tbody tr", """rows => rows.map(r => [r.dataset.site,
        +r.dataset.feature, +r.dataset.predicted, +r.dataset.observed])""")
    ref = reference_steering(tiny, site, feature, 2.5, PROMPT, 4)
    assert len(rows) >= 3
    for s, f, predicted, observed in rows:
        assert predicted == pytest.approx(ref["predicted"][(s, f)], abs=1e-6)
        assert observed == pytest.approx(ref["observed"][(s, f)], abs=1e-5)
    assert page.text_content("#steer-steered") == ref["steered_text"]
    assert page.text_content("#steer-clean") == ref["clean_text"]
    assert "R²" in page.text_content("#steer-fit")
    with page.expect_download() as dl:
        page.click("#steer-attribution")
    data = json.loads(open(dl.value.path()).read())
    assert data["metadata"]["prompt"] == PROMPT and data["nodes"] and "links" in data


def test_a_bad_request_shows_its_message(page_for, served):
    srv, _ = served
    opened = page_for(url=srv.url, allow=("400",))
    page = opened.page
    page.evaluate("window.jfigExplorer.select(0)")
    page.fill("#steer-prompt", "   ")
    page.click("#steer-run")
    page.wait_for_function("document.getElementById('steer-status').textContent.includes('failed')")
    assert "the prompt is empty" in page.text_content("#steer-status")
    assert "the prompt is empty" in page.text_content("#error")
