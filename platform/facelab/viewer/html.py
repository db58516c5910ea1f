"""Self-contained HTML pages of a run's outputs: one file with the data (JSON), ``face.js`` and
``viewer.css`` inlined -- no network, no CDN -- that a browser (or MLflow's artifact view, which
shows ``.html`` artifacts in a sandboxed frame that runs scripts) opens from disk.

Three pages, each built from a JSON-ready *payload* (the page keeps it in
``<script type="application/json" id="facelab-data">``; the same payload is logged beside the page as
``preview.json`` so a sweep page can be assembled later without the models):

* :func:`keyframe_payload` -- a keyframes run: per test item its text, the ground-truth face and the
  generated one side by side, and 61 per-channel bars (ground truth vs generated);
* :func:`expression_payload` -- an expressions run (53 FLAME coefficients per frame): per test item a
  heatmap (coefficient x time) and a few curves of the ground truth and of each generated sample,
  the stop frame (the sequence's length) marked, with a play-over-time cursor;
* :func:`sweep_payload` -- a sweep: one row per variant (the ground truth first), one column per test
  item, from the runs' payloads;
* :func:`serve_payload` -- the served model's page: a form that asks the same server's endpoint and
  draws the answer (a keyframes answer also as a 60 Hz animation, interpolated as ``facelab export``).

:func:`render_page` turns a payload into the HTML text, :func:`write_page` writes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from html import escape
from importlib import resources
from pathlib import Path

import numpy as np

VERSION = 1
"""Payload format version (``payload["version"]``)."""


def _clean(x, digits: int):
    """Nested lists of floats rounded to ``digits``; NaN and infinities become ``None`` (JSON null)."""
    if isinstance(x, (list, tuple)):
        return [_clean(v, digits) for v in x]
    v = float(x)
    return round(v, digits) if math.isfinite(v) else None


def _rows(a, width: int | None = None) -> list:
    arr = np.asarray(a, dtype=np.float64)
    if width is not None and arr.shape[-1] != width:
        raise ValueError(f"expected vectors of {width} values, got shape {arr.shape}")
    return arr.tolist()


def keyframe_payload(gt, pred, texts: Sequence[str], *, title: str, subtitle: str = "", n: int = 4) -> dict:
    """Payload of a keyframes run: the first ``n`` items of ``gt`` and ``pred`` ``(K, 61)`` (ARKit,
    release order) with their ``texts``. ``pred`` may also be ``(K, S, 61)``: ``S`` samples per item."""
    from facelab.data.arkit import N_CHANNELS

    items = []
    for i in range(min(n, len(texts))):
        p = np.asarray(pred[i], dtype=np.float64)
        samples = [p] if p.ndim == 1 else list(p)
        items.append(
            {
                "text": str(texts[i]),
                "gt": _clean(_rows(gt[i], N_CHANNELS), 4),
                "samples": [_clean(_rows(s, N_CHANNELS), 4) for s in samples],
            }
        )
    return {"version": VERSION, "kind": "keyframes", "title": title, "subtitle": subtitle, "items": items}


def coefficient_labels(d: int) -> list[str]:
    """Names of the ``d`` per-frame coefficients: for CTEG's 53, ``expr 0`` … ``expr 49`` (FLAME
    expression) and ``jaw 0`` … ``jaw 2`` (jaw pose); otherwise ``dim k``."""
    if d == 53:
        return [f"expr {k}" for k in range(50)] + [f"jaw {k}" for k in range(3)]
    return [f"dim {k}" for k in range(d)]


def expression_payload(
    texts: Sequence[str],
    generated: Sequence,
    truth: Sequence,
    *,
    title: str,
    subtitle: str = "",
    fps: int = 25,
    n: int = 3,
    curves: Sequence[int] | None = None,
) -> dict:
    """Payload of an expressions run: the first ``n`` texts, each with its ground-truth sequence
    ``(T, D)`` and its generated one(s): ``generated[i]`` is one ``(T', D)`` array, or a list of them
    (several samples side by side; lengths may differ -- each ends at its stop frame). Values are
    rounded to 3 decimals. ``curves``: the coefficients drawn as curves (default: the first
    three FLAME expression coefficients and the jaw opening, dim 50, as :func:`facelab.plots.trajectories`)."""
    items = []
    d = None
    for i in range(min(n, len(texts))):
        gt = np.asarray(truth[i], dtype=np.float64)
        gen = generated[i]
        samples = list(gen) if isinstance(gen, (list, tuple)) else [gen]
        d = gt.shape[-1]
        items.append(
            {
                "text": str(texts[i]),
                "gt": _clean(_rows(gt, d), 3),
                "samples": [_clean(_rows(s, d), 3) for s in samples],
            }
        )
    d = d or 53
    if curves is None:
        curves = (0, 1, 2, 50) if d > 50 else tuple(range(min(4, d)))
    return {
        "version": VERSION,
        "kind": "expressions",
        "title": title,
        "subtitle": subtitle,
        "fps": fps,
        "dims": coefficient_labels(d),
        "curves": [int(c) for c in curves],
        "items": items,
    }


def sweep_payload(runs: Sequence[tuple[str, str, dict]], *, title: str, subtitle: str = "") -> dict:
    """Payload of a sweep page from ``(variant label, note, run payload)`` per variant (the note, e.g.
    ``seed 0``, is printed under the label): one column per test item of the first run, matched by
    text in the others (a run without that item shows "–"); the first row is the ground truth."""
    if not runs:
        raise ValueError("sweep_payload: no runs with a preview")
    kinds = {p["kind"] for _, _, p in runs}
    if len(kinds) != 1:
        raise ValueError(f"sweep_payload: runs of different tasks {sorted(kinds)}")
    first = runs[0][2]
    columns = [it["text"] for it in first["items"]]
    rows = [{"label": "ground truth", "note": "", "truth": True, "cells": [it["gt"] for it in first["items"]]}]
    for label, note, payload in runs:
        by_text = {it["text"]: it for it in payload["items"]}
        cells = [(by_text[t]["samples"] or [None])[0] if t in by_text else None for t in columns]
        rows.append({"label": label, "note": note, "truth": False, "cells": cells})
    page = {
        "version": VERSION,
        "kind": "sweep",
        "task": first["kind"],
        "title": title,
        "subtitle": subtitle,
        "columns": columns,
        "rows": rows,
    }
    if first["kind"] == "expressions":
        page.update({k: first[k] for k in ("fps", "dims", "curves")})
    return page


SERVE_EXAMPLES = {
    "keyframes": {
        "background": "A quiet office late at night.",
        "emotion": "furious",
        "keyframes": ["narrows the eyes and sneers", "bares the teeth, jaw clenched"],
    },
    "expressions": {"text": "I am so happy to see you again!", "num_samples": 2, "max_frames": 128, "seed": 0},
}


EXPORT_FPS = 60.0
EXPORT_SPACING_S = 1.0
"""``facelab export``'s defaults (``--fps``, ``--spacing``): the served keyframes page animates the answer
on this grid, interpolated as export does (:func:`facelab.data.arkit.interpolate_keyframes`, PCHIP)."""


def serve_payload(
    task: str,
    *,
    title: str,
    endpoint: str | None = None,
    example: dict | None = None,
    fps: float = EXPORT_FPS,
    spacing: float = EXPORT_SPACING_S,
    script_writer: dict | None = None,
) -> dict:
    """Payload of the served model's page (``GET /viewer``): a form that POSTs to ``endpoint`` on the same
    server (default ``/v1/keyframes`` or ``/v1/expressions``; an ``X-API-Key`` field for a server that
    needs one) and draws the answer -- faces and 61 bars per keyframe, or heatmaps and curves per
    sample with the stop frame marked. ``example`` fills the form (:data:`SERVE_EXAMPLES`).

    A keyframes answer is also played as an animation: keyframes ``spacing`` seconds apart interpolated
    at ``fps`` exactly as ``facelab export`` does (PCHIP, ``payload["animation"]``), with play/pause, a
    frame slider, previous/next keyframe and a "download CSV" button that asks the endpoint again with
    ``?format=csv`` (the API's Live Link Face CSV of the keyframes).

    A keyframes page also has a free-text box and a "Write script" button (KeyframeFace §4.1): it asks
    ``payload["scripts"]["endpoint"]`` (``/v1/scripts`` beside ``endpoint``) and fills the script fields
    for the user to edit before sending; ``script_writer`` (the writer's ``{"model", "tiny", "note"}``,
    if known) is shown beside it -- the tiny untrained writer is labelled as such."""
    if task not in SERVE_EXAMPLES:
        raise ValueError(f"serve_payload: task must be one of {sorted(SERVE_EXAMPLES)}, got {task!r}")
    if not (math.isfinite(fps) and fps > 0 and math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"serve_payload: fps and spacing must be > 0, got {fps!r}, {spacing!r}")
    return {
        "version": VERSION,
        "kind": "serve",
        "task": task,
        "title": title,
        "subtitle": "Ask the served model; the page draws its answer (nothing leaves this server).",
        "endpoint": endpoint or f"/v1/{task}",
        "example": example or SERVE_EXAMPLES[task],
        "fps": 25,
        "dims": coefficient_labels(53),
        "curves": [0, 1, 2, 50],
        "animation": {"fps": float(fps), "spacing": float(spacing)},
        **_scripts_block(task, endpoint or f"/v1/{task}", script_writer),
    }


def _scripts_block(task: str, endpoint: str, writer: dict | None) -> dict:
    """``{"scripts": {"endpoint", "writer"}}`` of a keyframes page (``/v1/scripts`` beside its endpoint)."""
    if task != "keyframes":
        return {}
    base = endpoint[: -len("/v1/keyframes")] if endpoint.endswith("/v1/keyframes") else ""
    return {"scripts": {"endpoint": base + "/v1/scripts", "writer": writer}}


def _asset(name: str) -> str:
    return resources.files("facelab.viewer").joinpath(name).read_text(encoding="utf-8")


def _script_json(obj) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` as ``\\u`` escapes (no ``</script>``)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(payload: dict, *, flame: dict | None = None) -> str:
    """The HTML text of one page: header, the data, ``flame_gl.js``, ``face.js`` and ``viewer.css`` inlined.
    ``flame``: what :func:`facelab.viewer.flame_payload.embed` gives (the FLAME mesh, or why not), kept in
    ``<script type="application/json" id="facelab-flame">`` for an expressions page's avatars."""
    from facelab.data.arkit import CHANNELS, REGIONS
    from facelab.viewer.rig import compiled

    data = {"rig": compiled(), "channels": list(CHANNELS), "regions": REGIONS, "page": payload}
    title = escape(payload.get("title") or "facelab")
    sub = escape(payload.get("subtitle") or "")
    js = _asset("face.js").replace("</", "<\\/")
    flame_js = _asset("flame_gl.js").replace("</", "<\\/")  # before face.js: its hooks call into it
    flame_data = (
        "" if flame is None else f'<script type="application/json" id="facelab-flame">{_script_json(flame)}</script>\n'
    )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title>\n<style>\n{_asset('viewer.css')}</style></head>\n<body>\n"
        f"<header><h1>{title}</h1>" + (f"<p>{sub}</p>" if sub else "") + "</header>\n"
        f'<main id="facelab-root" data-kind="{escape(payload["kind"])}"></main>\n'
        "<noscript>This page draws its faces and plots with JavaScript; enable it to see them.</noscript>\n"
        "<footer>facelab viewer: schematic face of the 61 ARKit channels (facelab/viewer/rig_table.py); "
        "self-contained, no network.</footer>\n"
        f'<script type="application/json" id="facelab-data">{_script_json(data)}</script>\n'
        f"{flame_data}<script>\n{flame_js}</script>\n"
        f"<script>\n{js}</script>\n</body></html>\n"
    )


def write_page(payload: dict, out: Path, *, flame: dict | None = None) -> Path:
    """Write :func:`render_page` of ``payload`` to ``out`` (UTF-8); returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(payload, flame=flame), encoding="utf-8")
    return out


def write_run_preview(payload: dict, out_dir: Path) -> tuple[Path, Path]:
    """A run's ``preview.html`` and ``preview.json`` (the payload, for :func:`sweep_payload`) in ``out_dir``.
    An expressions page also embeds the FLAME mesh when ``FACELAB_FLAME_MODEL`` names the user's model
    (quantized, about 2.8 MB for FLAME 2020; :func:`facelab.viewer.flame_payload.embed`), or why not."""
    from facelab.viewer.flame_payload import embed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flame = embed() if payload.get("kind") == "expressions" else None
    page = write_page(payload, out_dir / "preview.html", flame=flame)
    data = out_dir / "preview.json"
    data.write_text(json.dumps(payload, allow_nan=False), encoding="utf-8")
    return page, data


ARTIFACT_DIR = "viewer"
"""Where a run's page and payload are logged: ``viewer/preview.html`` and ``viewer/preview.json``."""


def log_run_preview(client, run_id: str, payload: dict) -> None:
    """Log ``payload``'s page and the payload itself to the MLflow run (:data:`ARTIFACT_DIR`); MLflow's
    artifact view opens the page."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        page, data = write_run_preview(payload, Path(d))
        client.log_artifact(run_id, str(page), ARTIFACT_DIR)
        client.log_artifact(run_id, str(data), ARTIFACT_DIR)
