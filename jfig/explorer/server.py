"""`jfig serve`: the explorer page from a local HTTP server (Python's standard library), with a live
model behind it for the steering simulator.

    GET  /            the page (payload mode "live")
    GET  /api/health  {"ok": true, "graph": title}
    POST /api/steer   body {site, feature, value, prompt, max_new_tokens} -> simulate_steering's answer
    POST /api/attribution   body {prompt} -> the prompt's slice of the graph as attribution-graph JSON

One request runs the model at a time (a lock); errors in a request are 400 answers {"error": message}.
"""
from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import JfigError
from .attribution import attribution_json
from .page import render_page
from .simulate import simulate_steering

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20


class ExplorerServer(ThreadingHTTPServer):
    """The HTTP server: `page` (the rendered HTML) and `api` {path: request dict -> answer dict}."""

    daemon_threads = True

    def __init__(self, address, page: str, api: dict):
        super().__init__(address, ExplorerHandler)
        self.page = page.encode("utf-8")
        self.api = dict(api)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class ExplorerHandler(BaseHTTPRequestHandler):
    server: ExplorerServer

    def log_message(self, format, *args):             # noqa: A002 (the stdlib's name)
        log.debug("%s %s", self.address_string(), format % args)

    def answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def answer_json(self, status: int, data: dict) -> None:
        self.answer(status, json.dumps(data, allow_nan=False).encode("utf-8"), "application/json")

    def do_GET(self):                                   # noqa: N802 (the stdlib's name)
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if path in ("/", "/index.html"):
            self.answer(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/health":
            self.answer_json(HTTPStatus.OK, {"ok": True})
        else:
            self.answer_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}; the explorer is at /"})

    def do_POST(self):                                  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path not in self.server.api:
            self.answer_json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {path}; POST to one of "
                                                             f"{sorted(self.server.api)}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self.answer_json(HTTPStatus.BAD_REQUEST, {"error": f"a request body of 1 byte to {MAX_BODY} bytes is "
                                                               f"expected, got {length}"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict):
                raise JfigError("the request body must be a JSON object")
            with self.server.lock:
                result = self.server.api[path](request)
            self.answer_json(HTTPStatus.OK, result)
        except json.JSONDecodeError as e:
            self.answer_json(HTTPStatus.BAD_REQUEST, {"error": f"the request body is not JSON ({e})"})
        except JfigError as e:
            self.answer_json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:                          # a bug: say so on the page and in the log
            log.exception("%s failed", path)
            self.answer_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(e).__name__}: {e}"})


def check_fields(request: dict, required: set, optional: set = frozenset()) -> None:
    unknown = sorted(set(request) - required - optional)
    if unknown:
        raise JfigError(f"unknown request field(s) {unknown}; expected {sorted(required | optional)}")
    missing = sorted(required - set(request))
    if missing:
        raise JfigError(f"the request lacks {missing}")


def api_handlers(model, saes, graph) -> dict:
    """{path: request dict -> answer dict} of the live endpoints, the request's fields checked."""
    def steer(request: dict) -> dict:
        check_fields(request, {"site", "feature", "value", "prompt"}, {"max_new_tokens"})
        return simulate_steering(model, saes, graph, request["site"], request["feature"], request["value"],
                                 request["prompt"], max_new_tokens=request.get("max_new_tokens", 16))

    def attribution(request: dict) -> dict:
        check_fields(request, {"prompt"}, {"n_logits"})
        return attribution_json(model, saes, graph, request["prompt"], n_logits=request.get("n_logits", 5))
    return {"/api/steer": steer, "/api/attribution": attribution}


def make_server(payload: dict, model, saes, graph, *, host: str = "127.0.0.1", port: int = 8050) -> ExplorerServer:
    """A server (not yet serving: call serve_forever) for a payload made with mode="live"."""
    if payload.get("mode") != "live":
        raise JfigError("the served page needs a payload made with mode='live'")
    if model is None or not saes:
        raise JfigError("jfig serve needs the model and the graph's SAEs for the steering simulator")
    if not 0 <= int(port) <= 65535:
        raise JfigError(f"port must be 0..65535 (0: any free port), got {port}")
    try:
        return ExplorerServer((host, int(port)), render_page(payload), api_handlers(model, saes, graph))
    except OSError as e:
        raise JfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None

