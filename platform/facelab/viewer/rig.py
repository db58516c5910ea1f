"""The schematic face of :mod:`facelab.viewer.rig_table`, evaluated and drawn (SVG and matplotlib).

:func:`compiled` turns the declarative table into the flat form both renderers read (the same JSON is
embedded in every HTML page for ``face.js``): point names and neutral positions, shapes by point
index, and per ARKit channel (release order, :data:`facelab.data.arkit.CHANNELS`) its value range,
its moves ``[point, dx, dy]`` and rotations ``[[points], pivot, degrees]``. :func:`geometry` evaluates
it for a 61-value vector; :func:`face_svg` and :func:`draw_face` draw it. ``face.js`` implements
the same evaluation and path construction line for line (``tests/test_viewer.py`` compares the
path coordinates the browser writes with :func:`face_svg`'s).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from facelab.data.arkit import CHANNELS, HIGH, LOW, N_CHANNELS

VIEWBOX = (-100.0, -112.0, 200.0, 232.0)
"""SVG ``viewBox`` of one face: x from -100, y from -112 (y down), 200 wide, 232 high."""


class RigError(ValueError):
    """The rig table names a point, group, shape or channel that does not exist."""


def _mirror_name(name: str) -> str:
    if name.endswith("_l"):
        return name[:-2] + "_r"
    if name.endswith("_r"):
        return name[:-2] + "_l"
    return name


@functools.cache
def compiled() -> dict:
    """The rig table with mirrors, ``_lr`` targets and groups expanded (a JSON-ready dict, cached).

    Keys: ``viewBox``; ``points`` (names) and ``neutral`` (``[x, y]`` per point); ``shapes`` (``id``,
    ``kind`` path|circle, ``points`` as indices, ``closed``, ``smooth``, ``r``, ``fill``, ``stroke``,
    ``width``, ``clip``: the id of a closed shape or null, ``cap``: round|butt); ``channels``: one entry per ARKit channel
    in release order with ``name``, ``lo``, ``hi``, ``move`` (``[point index, dx, dy]``, one per
    point, summed over the table's targets) and ``rotate`` (``[[point indices], pivot index, deg]``);
    ``rotation_order``: channel indices whose rotations apply, in table order. Raises
    :class:`RigError` when the table names something unknown or leaves a channel out.
    """
    from facelab.viewer import rig_table as T

    points: dict[str, tuple[float, float]] = {}
    for name, (x, y) in T.POINTS.items():
        points[name] = (float(x), float(y))
        if name.endswith("_l"):
            points[_mirror_name(name)] = (-float(x), float(y))
    index = {n: i for i, n in enumerate(points)}

    groups: dict[str, list[str]] = {}
    for name, members in T.GROUPS.items():
        groups[name] = list(members)
        if name.endswith("_l"):
            groups[_mirror_name(name)] = [_mirror_name(m) for m in members]

    def expand(target: str, seen: tuple[str, ...] = ()) -> list[str]:
        if target in points:
            return [target]
        if target in groups and target not in seen:
            out: list[str] = []
            for m in groups[target]:
                out += [p for p in expand(m, (*seen, target)) if p not in out]
            return out
        raise RigError(f"rig table: unknown point or group {target!r}")

    def sided(move: dict) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for target, (dx, dy) in move.items():
            if target.endswith("_lr"):
                out[target[:-3] + "_l"] = (dx, dy)
                out[target[:-3] + "_r"] = (-dx, dy)
            else:
                out[target] = (dx, dy)
        return out

    table: dict[str, dict] = {}
    for name, spec in T.CHANNELS.items():
        table[name] = {"move": sided(spec.get("move", {})), "rotate": list(spec.get("rotate", []))}
    for right, left in T.MIRRORED.items():
        spec = table[left]
        table[right] = {
            "move": {_mirror_name(t): (-dx, dy) for t, (dx, dy) in spec["move"].items()},
            "rotate": [(_mirror_name(g), _mirror_name(p), -deg) for g, p, deg in spec["rotate"]],
        }
    unknown = sorted(set(table) - set(CHANNELS))
    missing = [c for c in CHANNELS if c not in table]
    if unknown or missing:
        raise RigError(f"rig table: unknown channels {unknown}, channels without an entry {missing}")

    channels = []
    for c, name in enumerate(CHANNELS):
        acc: dict[int, list[float]] = {}
        for target, (dx, dy) in table[name]["move"].items():
            for p in expand(target):
                d = acc.setdefault(index[p], [0.0, 0.0])
                d[0] += float(dx)
                d[1] += float(dy)
        rotate = []
        for target, pivot, deg in table[name]["rotate"]:
            if pivot not in points:
                raise RigError(f"rig table: {name}: unknown pivot {pivot!r}")
            rotate.append([[index[p] for p in expand(target)], index[pivot], float(deg)])
        channels.append(
            {
                "name": name,
                "lo": float(LOW[c]),
                "hi": float(HIGH[c]),
                "move": [[i, d[0], d[1]] for i, d in sorted(acc.items())],
                "rotate": rotate,
            }
        )
    order = [CHANNELS.index(n) for n in T.CHANNELS if table[n]["rotate"]]
    order += [CHANNELS.index(n) for n in T.MIRRORED if table[n]["rotate"] and CHANNELS.index(n) not in order]

    shapes = []
    for spec in T.SHAPES:
        variants = [spec]
        if spec["id"].endswith("_l"):
            mirrored = dict(spec, id=_mirror_name(spec["id"]))
            for key in ("points",):
                if key in spec:
                    mirrored[key] = [_mirror_name(p) for p in spec[key]]
            if "center" in spec:
                mirrored["center"] = _mirror_name(spec["center"])
            if spec.get("clip"):
                mirrored["clip"] = _mirror_name(spec["clip"])
            variants.append(mirrored)
        for s in variants:
            names = [s["center"]] if s.get("kind") == "circle" else s["points"]
            for p in names:
                if p not in index:
                    raise RigError(f"rig table: shape {s['id']!r}: unknown point {p!r}")
            shapes.append(
                {
                    "id": s["id"],
                    "kind": s.get("kind", "path"),
                    "points": [index[p] for p in names],
                    "closed": bool(s.get("closed", False)),
                    "smooth": bool(s.get("smooth", False)),
                    "r": float(s.get("r", 0.0)),
                    "fill": s.get("fill", "none"),
                    "stroke": s.get("stroke", "none"),
                    "width": float(s.get("width", 1.0)),
                    "clip": s.get("clip"),
                    "cap": s.get("cap", "round"),
                }
            )
    ids = {s["id"] for s in shapes}
    for s in shapes:
        if s["clip"] and s["clip"] not in ids:
            raise RigError(f"rig table: shape {s['id']!r} clipped by unknown shape {s['clip']!r}")
    return {
        "viewBox": list(VIEWBOX),
        "points": list(points),
        "neutral": [list(xy) for xy in points.values()],
        "shapes": shapes,
        "channels": channels,
        "rotation_order": order,
    }


def clip_values(values: Sequence[float]) -> np.ndarray:
    """A 61-value vector as float64, each value clipped to its channel's range; NaN reads as 0."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.shape != (N_CHANNELS,):
        raise ValueError(f"expected {N_CHANNELS} ARKit values, got shape {np.shape(values)}")
    return np.clip(np.nan_to_num(v, nan=0.0), LOW, HIGH)


def geometry(values: Sequence[float]) -> np.ndarray:
    """Point positions ``(N_points, 2)`` for 61 ARKit values: neutral + sum of ``value * move``, then
    the rotations (``rotation_order``) about their pivots' current positions. Values are clipped."""
    rig = compiled()
    v = clip_values(values)
    pts = np.array(rig["neutral"], dtype=np.float64)  # (N, 2)
    for c, ch in enumerate(rig["channels"]):
        if v[c] == 0.0:
            continue
        for i, dx, dy in ch["move"]:
            pts[i, 0] += v[c] * dx
            pts[i, 1] += v[c] * dy
    for c in rig["rotation_order"]:
        if v[c] == 0.0:
            continue
        for members, pivot, deg in rig["channels"][c]["rotate"]:
            t = math.radians(v[c] * deg)
            cos, sin = math.cos(t), math.sin(t)
            px, py = pts[pivot]
            for i in members:
                dx, dy = pts[i, 0] - px, pts[i, 1] - py
                pts[i, 0] = px + cos * dx - sin * dy
                pts[i, 1] = py + sin * dx + cos * dy
    return pts


def segments(xy: np.ndarray, closed: bool, smooth: bool) -> list[tuple[tuple[float, float], ...]]:
    """The drawing commands through points ``xy`` ``(n, 2)``: first ``(start,)``, then ``(end,)`` for a
    straight segment or ``(c1, c2, end)`` for a cubic Bezier. ``smooth``: a uniform Catmull-Rom curve
    through the points (end tangents from the end points themselves); ``closed`` joins back to the
    start (the caller adds ``Z``)."""
    n = len(xy)
    p = [(float(x), float(y)) for x, y in xy]
    out: list[tuple[tuple[float, float], ...]] = [(p[0],)]
    count = n if closed else n - 1
    for i in range(count):
        a, b = p[i], p[(i + 1) % n]
        if not smooth or n < 3:
            out.append((b,))
            continue
        prev = p[(i - 1) % n] if (closed or i > 0) else a
        nxt = p[(i + 2) % n] if (closed or i + 2 < n) else b
        c1 = (a[0] + (b[0] - prev[0]) / 6.0, a[1] + (b[1] - prev[1]) / 6.0)
        c2 = (b[0] - (nxt[0] - a[0]) / 6.0, b[1] - (nxt[1] - a[1]) / 6.0)
        out.append((c1, c2, b))
    return out


def fmt(x: float) -> str:
    """A coordinate as SVG text: two decimals, never ``-0.00`` (``face.js``'s ``fmt`` is the same)."""
    s = f"{x:.2f}"
    return "0.00" if s == "-0.00" else s


def path_d(xy: np.ndarray, closed: bool, smooth: bool) -> str:
    """SVG path data of :func:`segments` (``M``, ``L``, ``C``, ``Z``)."""
    parts = []
    for k, seg in enumerate(segments(xy, closed, smooth)):
        cmd = "M" if k == 0 else ("L" if len(seg) == 1 else "C")
        parts.append(cmd + " " + " ".join(f"{fmt(x)} {fmt(y)}" for x, y in seg))
    if closed:
        parts.append("Z")
    return " ".join(parts)


def face_svg(values: Sequence[float], prefix: str = "face", title: str = "") -> str:
    """One face as a standalone ``<svg>`` element. ``prefix`` makes the clip-path ids unique when several
    faces share a page. Every shape carries ``data-shape="<id>"``."""
    from html import escape

    rig = compiled()
    pts = geometry(values)
    vb = " ".join(fmt(x) for x in rig["viewBox"])
    clips = sorted({s["clip"] for s in rig["shapes"] if s["clip"]})
    by_id = {s["id"]: s for s in rig["shapes"]}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="face" viewBox="{vb}" data-prefix="{escape(prefix)}">']
    if title:
        out.append(f"<title>{escape(title)}</title>")
    out.append("<defs>")
    for cid in clips:
        s = by_id[cid]
        out.append(f'<clipPath id="{escape(prefix)}-{cid}"><path d="{path_d(pts[s["points"]], True, s["smooth"])}"/>')
        out.append("</clipPath>")
    out.append("</defs>")
    for s in rig["shapes"]:
        out.append(_shape_svg(s, pts, prefix))
    out.append("</svg>")
    return "".join(out)


def _shape_svg(s: dict, pts: np.ndarray, prefix: str) -> str:
    style = f'fill="{s["fill"]}" stroke="{s["stroke"]}" stroke-width="{s["width"]}"'
    style += f' stroke-linecap="{s["cap"]}" stroke-linejoin="round"'
    if s["clip"]:
        style += f' clip-path="url(#{prefix}-{s["clip"]})"'
    if s["kind"] == "circle":
        x, y = pts[s["points"][0]]
        return f'<circle data-shape="{s["id"]}" cx="{fmt(x)}" cy="{fmt(y)}" r="{fmt(s["r"])}" {style}/>'
    return f'<path data-shape="{s["id"]}" d="{path_d(pts[s["points"]], s["closed"], s["smooth"])}" {style}/>'


def top_channels(values: Sequence[float], k: int = 4, threshold: float = 0.05) -> list[tuple[str, float]]:
    """The ``k`` channels of largest magnitude (at least ``threshold``), largest first."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64).reshape(-1))
    order = np.argsort(-np.abs(v), kind="stable")[:k]
    return [(CHANNELS[i], float(v[i])) for i in order if abs(v[i]) >= threshold]


def draw_face(ax, values: Sequence[float], title: str = "") -> None:
    """Draw the face on a matplotlib axis with the same geometry, shapes, colours and clips as
    :func:`face_svg` (y down), and the strongest channels under it."""
    from matplotlib.patches import Circle, PathPatch
    from matplotlib.path import Path as MplPath

    rig = compiled()
    pts = geometry(values)
    patches: dict[str, PathPatch] = {}

    def mpl_path(s: dict, closed: bool) -> MplPath:
        verts, codes = [], []
        for k, seg in enumerate(segments(pts[s["points"]], closed, s["smooth"])):
            if k == 0:
                verts.append(seg[0])
                codes.append(MplPath.MOVETO)
            elif len(seg) == 1:
                verts.append(seg[0])
                codes.append(MplPath.LINETO)
            else:
                verts += list(seg)
                codes += [MplPath.CURVE4] * 3
        if closed:
            verts.append(verts[0])
            codes.append(MplPath.CLOSEPOLY)
        return MplPath(verts, codes)

    def color(c: str):
        return "none" if c == "none" else c

    for s in rig["shapes"]:
        common = dict(
            facecolor=color(s["fill"]),
            edgecolor=color(s["stroke"]),
            linewidth=s["width"] * 0.45,
            capstyle=s["cap"],
            joinstyle="round",
        )
        if s["kind"] == "circle":
            artist = Circle(tuple(pts[s["points"][0]]), s["r"], **common)
        else:
            artist = PathPatch(mpl_path(s, s["closed"]), **common)
            patches[s["id"]] = artist
        ax.add_patch(artist)
        if s["clip"]:
            clip = PathPatch(mpl_path(next(x for x in rig["shapes"] if x["id"] == s["clip"]), True))
            clip.set_transform(ax.transData)
            artist.set_clip_path(clip)
    x0, y0, w, h = rig["viewBox"]
    ax.set_xlim(x0, x0 + w)
    ax.set_ylim(y0 + h, y0)  # y down, as in SVG
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=7)
    top = top_channels(values)
    caption = "\n".join(f"{n} {v:.2f}" for n, v in top) if top else "(neutral)"
    ax.text(0.5, -0.02, caption, transform=ax.transAxes, ha="center", va="top", fontsize=6, family="monospace")
