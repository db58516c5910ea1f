"""The raters' web page: ``facelab study serve STUDY --port P`` (the standard library's threading HTTP
server; one process, no network beyond it, no CDN).

Routes (the page uses them; every answer is JSON except the page and media):

* ``GET /`` and ``/?rater=NAME`` -- the page (:func:`page_html`: HTML with ``page.js``, the viewer's
  ``face.js`` and the face rig inlined);
* ``GET /api/progress?rater=NAME`` -- ``{"done": [item numbers ranked], "n_items", "k"}``;
* ``GET /api/item?rater=NAME&i=N`` -- item ``N`` as the rater sees it (:func:`facelab.study.core.rater_item`:
  the text and the outputs labelled A, B …; no method names);
* ``POST /api/rank`` -- ``{"rater", "item", "ranks": {"A": 1, …}}``: checked (each label once, each
  rank 1..K once, a known item, a valid rater name) before anything is written; ``400
  {"error": …}`` names the bad field;
* ``GET /media/<digest>.gif`` -- an avatar video (studies created with ``FACELAB_FLAME_MODEL``).
"""

from __future__ import annotations

import json
import re
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from facelab.study import core

MAX_BODY = 64 * 1024
MEDIA_RE = re.compile(r"^/media/([0-9a-f]{20}\.gif)$")

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.2rem; color: #222; }
#progress { color: #555; font-size: .9rem; }
.prompt h2 { font-size: 1.15rem; margin: .4rem 0; }
.descriptions { margin: 0 0 .5rem 1.2rem; color: #444; }
.hint { color: #555; font-size: .9rem; }
.options { display: flex; flex-wrap: wrap; gap: 1rem; }
.option { margin: 0; padding: .6rem; border: 1px solid #ccc; border-radius: 6px; width: 320px; }
.option .label { font-weight: bold; font-size: 1.3rem; }
.heat-wrap { position: relative; width: 300px; }
.heat-wrap canvas { width: 300px; height: 120px; image-rendering: pixelated; display: block; }
.heat-wrap .cursor { position: absolute; top: 0; bottom: 0; width: 2px; background: #000; }
svg.curves { width: 300px; height: 90px; display: block; background: #fafafa; }
svg.curves line.cursor { stroke: #000; stroke-width: 1.5; }
.face-box svg { width: 220px; height: 260px; }
img.avatar { width: 240px; display: block; }
.rank { display: block; margin-top: .5rem; }
.status.error { color: #b00020; font-weight: bold; }
button { margin-top: .8rem; font-size: 1rem; padding: .3rem .9rem; }
"""


def _asset(package: str, name: str) -> str:
    return resources.files(package).joinpath(name).read_text(encoding="utf-8")


def page_html(study: dict) -> str:
    """The page: no method names, only the title, the task, the frame rate and (for keyframe outputs)
    the face rig."""
    from facelab.viewer.html import _script_json
    from facelab.viewer.rig import compiled

    data = {"task": study["task"], "fps": study.get("fps", core.FPS), "k": len(study["methods"])}
    if study["task"] == "keyframes":
        data["rig"] = compiled()
    title = escape(str(study.get("title") or "facelab study"))
    face = _asset("facelab.viewer", "face.js").replace("</", "<\\/")
    page = _asset("facelab.study", "page.js").replace("</", "<\\/")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{CSS}</style></head>\n<body>\n"
        f'<header><h1>{title}</h1></header>\n<main id="study-root"></main>\n'
        "<noscript>This page needs JavaScript.</noscript>\n"
        f'<script type="application/json" id="study-data">{_script_json(data)}</script>\n'
        f"<script>\n{face}</script>\n<script>\n{page}</script>\n</body></html>\n"
    )


def make_handler(study_dir: Path):
    study = core.load(study_dir)
    html = page_html(study).encode("utf-8")
    k = len(study["methods"])

    class Handler(BaseHTTPRequestHandler):
        server_version = "facelab-study"

        def log_message(self, fmt, *args):  # quiet: raters' requests are not the operator's business
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj) -> None:
            self._send(code, json.dumps(obj, allow_nan=False).encode("utf-8"), "application/json")

        def _error(self, code: int, msg: str) -> None:
            self._json(code, {"error": msg})

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            url = urlsplit(self.path)
            q = {key: v[-1] for key, v in parse_qs(url.query).items()}
            try:
                if url.path == "/":
                    return self._send(200, html, "text/html; charset=utf-8")
                if url.path == "/favicon.ico":
                    return self._send(204, b"", "image/x-icon")
                if url.path == "/healthz":
                    return self._json(200, {"ok": True})
                if url.path == "/api/progress":
                    rater = core.check_rater(q.get("rater"))
                    mine = core.responses_of(study_dir, rater)
                    done = [i for i, it in enumerate(study["items"]) if it["id"] in mine]
                    return self._json(200, {"done": done, "n_items": len(study["items"]), "k": k})
                if url.path == "/api/item":
                    return self._json(200, core.rater_item(study_dir, study, q.get("rater"), q.get("i", "")))
                m = MEDIA_RE.match(url.path)
                if m and (study_dir / "media" / m.group(1)).is_file():
                    return self._send(200, (study_dir / "media" / m.group(1)).read_bytes(), "image/gif")
                return self._error(404, f"no such page: {url.path}")
            except core.StudyError as exc:
                return self._error(400, str(exc))

        def do_POST(self) -> None:  # noqa: N802
            if urlsplit(self.path).path != "/api/rank":
                return self._error(404, f"no such endpoint: {self.path}")
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self._error(400, "Content-Length: not a number")
            if not 0 < n <= MAX_BODY:
                return self._error(413 if n > MAX_BODY else 400, f"body: expected 1 to {MAX_BODY} bytes of JSON")
            try:
                body = json.loads(self.rfile.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return self._error(400, f"body: not JSON ({exc})")
            if not isinstance(body, dict):
                return self._error(400, "body: expected a JSON object with rater, item and ranks")
            for key in ("rater", "item", "ranks"):
                if key not in body:
                    return self._error(400, f"{key}: missing")
            try:
                res = core.submit(study_dir, study, body["rater"], body["item"], body["ranks"])
            except core.StudyError as exc:
                return self._error(400, str(exc))
            return self._json(200, {"ok": True, **res})

    return Handler


def serve(study_dir, host: str = "127.0.0.1", port: int = 8321) -> ThreadingHTTPServer:
    """A server for ``study_dir`` bound to ``host:port`` (not started: call ``serve_forever``)."""
    study_dir = Path(study_dir).resolve()
    server = ThreadingHTTPServer((host, port), make_handler(study_dir))
    server.daemon_threads = True
    return server
