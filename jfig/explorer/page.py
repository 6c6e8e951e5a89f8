"""One self-contained HTML page: the template, its CSS and JavaScript inlined, and the payload as JSON.

The page needs no network: nothing is fetched at view time (the live server only answers the
steering simulator's POSTs). Payload format: docs/explorer_payload.md.
"""
from __future__ import annotations

import json
from importlib import resources

from ..errors import JfigError

ASSETS = ("explorer.html", "explorer.css", "explorer.js")
PAYLOAD_FORMAT, PAYLOAD_VERSION = "jfig-explorer", 1


def asset(name: str) -> str:
    """The text of one of the page's asset files (jfig/explorer/assets/NAME)."""
    if name not in ASSETS:
        raise JfigError(f"unknown explorer asset {name!r}; expected one of {ASSETS}")
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def payload_json(payload: dict) -> str:
    """The payload as JSON safe inside a <script> element: every `<` escaped (\\u003c), so no text in
    it can close the element or open a comment; NaN and Infinity are refused (they must be None)."""
    if payload.get("format") != PAYLOAD_FORMAT or payload.get("version") != PAYLOAD_VERSION:
        raise JfigError(f"not an explorer payload: expected format {PAYLOAD_FORMAT!r} version {PAYLOAD_VERSION}, "
                        f"got {payload.get('format')!r} version {payload.get('version')!r}")
    try:
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except ValueError as e:
        raise JfigError(f"explorer payload holds a NaN or infinite number ({e}); they must be None") from None
    return text.replace("<", "\\u003c")           # `<` only occurs inside strings: no </script>, no <!--


def render_page(payload: dict) -> str:
    """The complete HTML page for `payload` (a dict in the explorer payload format)."""
    html = asset("explorer.html")
    for marker in ("/*JFIG_CSS*/", "/*JFIG_JS*/", "__JFIG_DATA__"):
        if html.count(marker) != 1:
            raise JfigError(f"the explorer template must hold the marker {marker!r} exactly once")
    data = payload_json(payload)
    # the payload goes in last, so that text inside it is never taken for a marker
    return (html.replace("/*JFIG_CSS*/", asset("explorer.css")).replace("/*JFIG_JS*/", asset("explorer.js"))
            .replace("__JFIG_DATA__", data))
