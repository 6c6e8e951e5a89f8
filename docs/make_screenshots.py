"""Regenerate the explorer screenshots in docs/img from a graph (the demo's, by default).

    python docs/make_screenshots.py --graph jfig-demo/graph --behavior behavior-ioi \\
        --compare other/graph --feature blocks.6.hook_resid_post#454 --steer blocks.6.hook_resid_post#454

Needs Chromium (`apt-get install -y chromium`, or JFIG_CHROMIUM) and Playwright for Python. The graph's
model and SAEs load as `jfig view` loads them (the default model, the SAEs from jfig's cache).
"""
from __future__ import annotations

import argparse
import shutil
import threading
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from jfig.explorer import explorer_payload, render_page
from jfig.explorer.server import make_server
from jfig.pipeline.view import ViewSources, load_parts

VIEWPORT = {"width": 1500, "height": 900}


def shrink(folder: Path) -> None:
    """Store the screenshots with a 256-colour palette (a quarter of the size; the page has few colours)."""
    for f in folder.glob("explorer-*.png"):
        Image.open(f).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE,
                                              dither=Image.Dither.NONE).save(f, optimize=True)


def open_page(browser, url: str):
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(url)
    page.wait_for_function("window.jfigExplorer && window.jfigExplorer.ready", timeout=120_000)
    return page


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", default="jfig-demo/graph")
    ap.add_argument("--behavior", default=None, help="a folder written by `jfig behavior`")
    ap.add_argument("--compare", default=None, help="a second graph of the same SAEs")
    ap.add_argument("--feature", default=None, help="SITE#ID shown in the feature card")
    ap.add_argument("--steer", default=None, help="SITE#ID steered in the simulator (needs the model)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--out", default=str(Path(__file__).parent / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = ViewSources(graph=args.graph, behaviors=(args.behavior,) if args.behavior else ())
    graph, kwargs, model, saes = load_parts(src, need_saes=True)
    work = out / ".pages"
    work.mkdir(exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page_file = work / "view.html"
        page_file.write_text(render_page(explorer_payload(graph, **kwargs)))
        page = open_page(browser, page_file.as_uri())
        page.screenshot(path=str(out / "explorer-overview.png"))
        if args.feature:
            page.evaluate("(f) => window.jfigExplorer.select(f)", args.feature)
            page.wait_for_timeout(300)
            page.screenshot(path=str(out / "explorer-card.png"))
        if args.behavior:
            page.evaluate("window.jfigExplorer.select(-1)")
            page.select_option("#behavior-select", index=1)
            page.evaluate("document.getElementById('sec-behavior').open = true")
            page.wait_for_timeout(300)
            page.screenshot(path=str(out / "explorer-behavior.png"))
        if args.compare:
            other = ViewSources(graph=args.graph, model=None, compare=args.compare)
            g2, kw2, _, _ = load_parts(other, need_saes=False)
            page_file = work / "compare.html"
            page_file.write_text(render_page(explorer_payload(g2, **kw2)))
            page = open_page(browser, page_file.as_uri())
            page.evaluate("document.getElementById('sec-compare').open = true")
            page.screenshot(path=str(out / "explorer-compare.png"))
        if args.steer:
            server = make_server(explorer_payload(graph, mode="live", **kwargs), model, saes, graph, port=0)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            try:
                page = open_page(browser, server.url)
                page.evaluate("(f) => window.jfigExplorer.select(f)", args.steer)
                page.fill("#steer-prompt", args.prompt)
                page.evaluate("document.getElementById('sec-card').open = false")
                page.click("#steer-run")
                page.wait_for_function("document.querySelectorAll('#steer-table tbody tr').length > 0",
                                       timeout=300_000)
                page.screenshot(path=str(out / "explorer-steer.png"))
            finally:
                server.shutdown()
        browser.close()
    shutil.rmtree(work)
    shrink(out)
    print(f"screenshots written to {out}")


if __name__ == "__main__":
    main()
