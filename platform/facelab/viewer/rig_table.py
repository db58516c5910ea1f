"""The schematic face rig as data: for each of the 61 ARKit channels, which control points it moves.

The face is seen from the front in SVG coordinates (x to the right, **y down**, about 200 x 240
units centred on the nose). The subject's left is on the image's right (+x), as in a mirror-less
photograph: ``EyeBlinkLeft`` closes the eye drawn on the right.

Everything here is plain data, read by :mod:`facelab.viewer.rig` (Python: SVG and matplotlib) and,
compiled to JSON, by ``face.js`` in the browser, so both draw with the same rules:

* ``POINTS``: neutral control points of the centre line and the subject's **left** side (names end in
  ``_l``); every ``_l`` point gets a mirror ``_r`` at ``(-x, y)``.
* ``GROUPS``: names for sets of points (a group may name other groups); ``_l`` groups are mirrored.
* ``SHAPES``: what is drawn, back to front: a ``path`` through points (``closed``, ``smooth``: a
  Catmull-Rom curve through them) or a ``circle`` around a point; ``clip`` names a closed shape that
  clips it (the pupil inside the lids, the teeth inside the lips); ``cap: butt`` for the shapes that
  are collapsed at neutral (a round cap would draw a dot). ``_l`` shapes are mirrored.
* ``CHANNELS``: per channel, ``move``: ``{point or group: (dx, dy)}`` -- the displacement at value 1,
  scaled linearly by the channel's value (clipped to the channel's range: ``[0, 1]`` for the 52
  blendshapes, ``[-1, 1]`` for head and eye pose); a target ending in ``_lr`` means its ``_l`` point
  with ``(dx, dy)`` and its ``_r`` mirror with ``(-dx, dy)``. ``rotate``: ``[(points or group,
  pivot point, degrees at value 1)]``.
* ``MIRRORED``: ``XRight`` channels defined as the mirror of ``XLeft`` (every target's ``_l``/``_r``
  swapped, dx negated, rotation angles negated).

Pose: there is no camera, so head yaw/pitch slide the features against the outline (a turn seen from
the front), head roll rotates everything about the head centre. Conventions chosen here: positive
yaw (head or eye) moves to the image's right, positive pitch moves down, positive roll turns
clockwise on screen. Some features exist only when a channel is on (the nose-sneer crease, the
dimple, the chin crease of a lower-lip shrug, the tongue): their points coincide at neutral, so
they draw nothing until the channel spreads them.

Evaluation (:func:`facelab.viewer.rig.geometry`, ``face.js``'s ``geometry``): every point =
neutral + the sum over channels of ``value * move``; then the rotations, in this table's channel
order (the eye rolls before the head roll).
"""

from __future__ import annotations

import math

# ------------------------------------------------------------------------------------------------
# Control points (centre line and the subject's left side; the right side is mirrored)
# ------------------------------------------------------------------------------------------------

_OUTLINE_RX, _OUTLINE_RY, _OUTLINE_CY = 72.0, 96.0, 2.0


def _outline_point(k: int) -> tuple[float, float]:
    """Outline point ``k`` (0 = top of the head, 12 = chin), every 15 degrees down the left side."""
    t = math.radians(15 * k)
    return round(_OUTLINE_RX * math.sin(t), 2), round(_OUTLINE_CY - _OUTLINE_RY * math.cos(t), 2)


POINTS: dict[str, tuple[float, float]] = {
    "head_c": (0.0, 0.0),  # pivot of the head roll (not drawn)
    "o0": _outline_point(0),
    **{f"o{k}_l": _outline_point(k) for k in range(1, 12)},
    "o12": _outline_point(12),  # chin
    # brow, inner (1) to outer (5)
    "b1_l": (13.0, -40.0),
    "b2_l": (25.0, -46.0),
    "b3_l": (38.0, -48.0),
    "b4_l": (50.0, -46.0),
    "b5_l": (60.0, -40.0),
    # eye: inner corner, upper lid (3), outer corner, lower lid (3)
    "ei_l": (21.0, -24.0),
    "u1_l": (27.0, -30.0),
    "u2_l": (35.0, -32.0),
    "u3_l": (43.0, -30.0),
    "eo_l": (50.0, -24.0),
    "l1_l": (27.0, -19.0),
    "l2_l": (35.0, -17.0),
    "l3_l": (43.0, -19.0),
    # iris centre and the ends of the iris mark (shows the eye roll)
    "pc_l": (35.0, -24.0),
    "pm_a_l": (35.0, -28.5),
    "pm_b_l": (35.0, -19.5),
    # cheek: the apple under the eye (3) and the nasolabial fold (3)
    "ca1_l": (26.0, -6.0),
    "ca2_l": (37.0, -3.0),
    "ca3_l": (48.0, -7.0),
    "cf1_l": (17.0, 14.0),
    "cf2_l": (25.0, 30.0),
    "cf3_l": (29.0, 46.0),
    # nose: bridge, wing, nostril floor, columella
    "ns1_l": (6.0, -16.0),
    "ns2_l": (8.0, 8.0),
    "nal_l": (15.0, 18.0),
    "nst_l": (8.0, 24.0),
    "ncol": (0.0, 23.0),
    # nose-sneer crease on the side of the bridge (collapsed at neutral)
    "wr1_l": (12.0, -4.0),
    "wr2_l": (12.0, -4.0),
    # mouth: corner; upper lip outer (2, 1, centre 0) and inner; lower lip inner and outer
    "mc_l": (25.0, 50.0),
    "muo2_l": (15.0, 44.0),
    "muo1_l": (5.0, 41.5),
    "muo0": (0.0, 43.5),
    "mui1_l": (12.0, 50.0),
    "mui0": (0.0, 50.5),
    "mli1_l": (12.0, 50.0),
    "mli0": (0.0, 50.5),
    "mlo2_l": (15.0, 56.0),
    "mlo1_l": (6.0, 59.0),
    "mlo0": (0.0, 59.5),
    # upper teeth (fixed to the skull; seen when the lips part)
    "ut1_l": (14.0, 48.0),
    "ut2_l": (13.0, 55.0),
    # dimple crease beside the corner (collapsed at neutral)
    "dm1_l": (30.0, 49.0),
    "dm2_l": (30.0, 49.0),
    # tongue (collapsed inside the closed mouth at neutral)
    "tg0_l": (0.0, 52.0),
    "tg1_l": (0.0, 52.0),
    "tgtip": (0.0, 52.0),
    # chin crease of a lower-lip shrug (collapsed at neutral)
    "ch_l": (0.0, 76.0),
}

# ------------------------------------------------------------------------------------------------
# Groups
# ------------------------------------------------------------------------------------------------

GROUPS: dict[str, list[str]] = {
    "iris_l": ["pc_l", "pm_a_l", "pm_b_l"],
    "iris_mark_l": ["pm_a_l", "pm_b_l"],
    "tongue": ["tg0_l", "tg0_r", "tg1_l", "tg1_r", "tgtip"],
    "lower_lip": ["mli1_l", "mli1_r", "mli0", "mlo2_l", "mlo2_r", "mlo1_l", "mlo1_r", "mlo0"],
    "upper_lip": ["muo2_l", "muo2_r", "muo1_l", "muo1_r", "muo0", "mui1_l", "mui1_r", "mui0"],
    "mouth": ["mc_l", "mc_r", "upper_lip", "lower_lip", "tongue", "dm1_l", "dm2_l", "dm1_r", "dm2_r"],
    "outline": ["o0", "o12", *[f"o{k}_{s}" for k in range(1, 12) for s in "lr"]],
}
_BOTH_SIDES = [*POINTS, *(p[:-2] + "_r" for p in POINTS if p.endswith("_l"))]
GROUPS["features"] = [p for p in _BOTH_SIDES if p != "head_c" and p not in GROUPS["outline"]]  # all but the outline
GROUPS["everything"] = ["outline", "features"]

# ------------------------------------------------------------------------------------------------
# Shapes, back to front
# ------------------------------------------------------------------------------------------------

SKIN, LINE, BROW, LIP, MOUTH, IRIS = "#f6dcc4", "#5a3b2e", "#6b4226", "#c4545a", "#3a1418", "#3b6f8f"

SHAPES: list[dict] = [
    {"id": "outline", "points": ["o0", *[f"o{k}_l" for k in range(1, 12)], "o12", *[f"o{k}_r" for k in range(11, 0, -1)]],
     "closed": True, "smooth": True, "fill": SKIN, "stroke": LINE, "width": 2.0},
    {"id": "eye_l", "points": ["ei_l", "u1_l", "u2_l", "u3_l", "eo_l", "l3_l", "l2_l", "l1_l"],
     "closed": True, "smooth": True, "fill": "#ffffff", "stroke": LINE, "width": 1.4},
    {"id": "iris_l", "kind": "circle", "center": "pc_l", "r": 5.5, "fill": IRIS, "stroke": "#1d3342", "width": 0.8,
     "clip": "eye_l"},
    {"id": "irismark_l", "points": ["pm_a_l", "pm_b_l"], "closed": False, "smooth": False, "fill": "none",
     "stroke": "#d9eef7", "width": 1.2, "clip": "eye_l"},
    {"id": "lid_l", "points": ["ei_l", "u1_l", "u2_l", "u3_l", "eo_l"], "closed": False, "smooth": True,
     "fill": "none", "stroke": LINE, "width": 2.2},
    {"id": "brow_l", "points": ["b1_l", "b2_l", "b3_l", "b4_l", "b5_l"], "closed": False, "smooth": True,
     "fill": "none", "stroke": BROW, "width": 3.6},
    {"id": "apple_l", "points": ["ca1_l", "ca2_l", "ca3_l"], "closed": False, "smooth": True, "fill": "none",
     "stroke": "#c98f7a", "width": 1.0},
    {"id": "fold_l", "points": ["cf1_l", "cf2_l", "cf3_l"], "closed": False, "smooth": True, "fill": "none",
     "stroke": "#b07a66", "width": 1.2},
    {"id": "bridge_l", "points": ["ns1_l", "ns2_l"], "closed": False, "smooth": False, "fill": "none",
     "stroke": "#c98f7a", "width": 1.0},
    {"id": "wing_l", "points": ["ns2_l", "nal_l", "nst_l", "ncol"], "closed": False, "smooth": True, "fill": "none",
     "stroke": LINE, "width": 1.6},
    {"id": "crease_l", "points": ["wr1_l", "wr2_l"], "closed": False, "smooth": False, "fill": "none",
     "stroke": LINE, "width": 1.2, "cap": "butt"},
    {"id": "mouth_gap", "points": ["mc_r", "mui1_r", "mui0", "mui1_l", "mc_l", "mli1_l", "mli0", "mli1_r"],
     "closed": True, "smooth": True, "fill": MOUTH, "stroke": "none", "width": 0.0},
    {"id": "teeth", "points": ["ut1_r", "ut1_l", "ut2_l", "ut2_r"], "closed": True, "smooth": False,
     "fill": "#fbfbf4", "stroke": "#d8d8cc", "width": 0.6, "clip": "mouth_gap"},
    {"id": "lower_lip", "points": ["mc_r", "mli1_r", "mli0", "mli1_l", "mc_l", "mlo2_l", "mlo1_l", "mlo0", "mlo1_r",
     "mlo2_r"], "closed": True, "smooth": True, "fill": LIP, "stroke": "#8e2f36", "width": 1.0},
    {"id": "upper_lip", "points": ["mc_r", "muo2_r", "muo1_r", "muo0", "muo1_l", "muo2_l", "mc_l", "mui1_l", "mui0",
     "mui1_r"], "closed": True, "smooth": True, "fill": LIP, "stroke": "#8e2f36", "width": 1.0},
    {"id": "tongue", "points": ["tg0_r", "tg1_r", "tgtip", "tg1_l", "tg0_l"], "closed": True, "smooth": True,
     "fill": "#e07a84", "stroke": "#8e2f36", "width": 1.0, "cap": "butt"},
    {"id": "dimple_l", "points": ["dm1_l", "dm2_l"], "closed": False, "smooth": False, "fill": "none",
     "stroke": LINE, "width": 1.2, "cap": "butt"},
    {"id": "chin_crease", "points": ["ch_r", "ch_l"], "closed": False, "smooth": False, "fill": "none",
     "stroke": "#b07a66", "width": 1.4, "cap": "butt"},
]  # fmt: skip

# ------------------------------------------------------------------------------------------------
# Channels: displacement of each point at value 1 (y down: negative dy raises)
# ------------------------------------------------------------------------------------------------

CHANNELS: dict[str, dict] = {
    # eyes (left side; the Right channels are mirrored)
    "EyeBlinkLeft": {"move": {"u1_l": (0, 9.5), "u2_l": (0, 14.0), "u3_l": (0, 9.5), "pm_a_l": (0, 2.0)}},
    "EyeLookDownLeft": {"move": {"iris_l": (0, 4.5), "u2_l": (0, 2.0), "u1_l": (0, 1.0), "u3_l": (0, 1.0)}},
    "EyeLookInLeft": {"move": {"iris_l": (-7.0, 0)}},
    "EyeLookOutLeft": {"move": {"iris_l": (7.0, 0)}},
    "EyeLookUpLeft": {"move": {"iris_l": (0, -4.5), "u2_l": (0, -1.5), "l2_l": (0, -1.0)}},
    "EyeSquintLeft": {"move": {"l1_l": (0, -3.0), "l2_l": (0, -5.0), "l3_l": (0, -3.0), "u2_l": (0, 2.0),
                               "eo_l": (-1.0, -1.0)}},
    "EyeWideLeft": {"move": {"u1_l": (0, -3.5), "u2_l": (0, -5.0), "u3_l": (0, -3.5), "l2_l": (0, 1.0)}},
    # jaw
    "JawForward": {"move": {"o12": (0, 6.0), "o11_lr": (-1.0, 4.0), "o10_lr": (-1.0, 2.0), "lower_lip": (0, 3.0),
                            "tongue": (0, 3.0), "ch_l": (0, 5.0), "ch_r": (0, 5.0)}},
    "JawLeft": {"move": {"o12": (8.0, 0), "o11_l": (7.5, 0), "o11_r": (7.5, 0), "o10_l": (6.0, 0), "o10_r": (6.0, 0),
                         "o9_l": (3.5, 0), "o9_r": (3.5, 0), "o8_l": (1.5, 0), "o8_r": (1.5, 0),
                         "lower_lip": (8.0, 0), "tongue": (8.0, 0), "mc_l": (3.0, 0), "mc_r": (3.0, 0),
                         "ch_l": (8.0, 0), "ch_r": (8.0, 0)}},
    "JawOpen": {"move": {"o12": (0, 20.0), "o11_lr": (-1.0, 17.0), "o10_lr": (-1.5, 12.0), "o9_lr": (-1.0, 6.0),
                         "o8_lr": (0, 2.0), "mli0": (0, 24.0), "mli1_lr": (0, 22.0), "mlo0": (0, 24.0),
                         "mlo1_lr": (0, 23.5), "mlo2_lr": (-1.0, 20.0), "mc_lr": (-3.0, 9.0), "cf3_lr": (-1.0, 6.0),
                         "tongue": (0, 16.0), "ch_l": (0, 20.0), "ch_r": (0, 20.0), "dm1_lr": (-2.0, 9.0),
                         "dm2_lr": (-2.0, 9.0)}},
    # mouth shapes
    "MouthClose": {"move": {"mui0": (0, 3.0), "mui1_lr": (0, 2.5), "mli0": (0, -4.0), "mli1_lr": (0, -3.5),
                            "mlo0": (0, -2.0), "mlo1_lr": (0, -2.0), "muo0": (0, 1.0), "muo1_lr": (0, 1.0)}},
    "MouthFunnel": {"move": {"mui0": (0, -7.0), "mui1_lr": (-2.0, -5.0), "mli0": (0, 7.0), "mli1_lr": (-2.0, 5.0),
                             "mc_lr": (-6.0, 0), "muo0": (0, -3.0), "muo1_lr": (0, -3.0), "muo2_lr": (-2.0, -2.0),
                             "mlo0": (0, 3.0), "mlo1_lr": (0, 3.0), "mlo2_lr": (-2.0, 2.0)}},
    "MouthPucker": {"move": {"mc_lr": (-11.0, 0), "muo2_lr": (-6.0, -1.0), "muo1_lr": (-2.0, -2.5), "muo0": (0, -1.5),
                             "mlo2_lr": (-6.0, 1.0), "mlo1_lr": (-2.0, 2.0), "mlo0": (0, 2.0),
                             "mui1_lr": (-5.0, 0.5), "mli1_lr": (-5.0, -0.5)}},
    "MouthLeft": {"move": {"mouth": (10.0, 0), "cf3_l": (4.0, 0), "cf3_r": (4.0, 0)}},
    "MouthSmileLeft": {"move": {"mc_l": (7.0, -9.0), "muo2_l": (2.5, -3.5), "mui1_l": (1.0, -3.0), "mli1_l": (1.0, -2.0),
                                "mlo2_l": (2.5, -4.5), "mlo1_l": (0.5, -1.5), "cf2_l": (3.0, -3.0), "cf3_l": (4.0, -5.0),
                                "ca1_l": (0, -2.0), "ca2_l": (0, -3.0), "ca3_l": (0, -2.0), "l2_l": (0, -1.0),
                                "dm1_l": (6.0, -8.0), "dm2_l": (6.0, -8.0)}},
    "MouthFrownLeft": {"move": {"mc_l": (-1.0, 8.0), "muo2_l": (0, 3.0), "mui1_l": (0, 2.0), "mli1_l": (0, 2.0),
                                "mlo2_l": (0, 3.5), "cf3_l": (1.0, 4.0), "dm1_l": (-1.0, 8.0), "dm2_l": (-1.0, 8.0)}},
    "MouthDimpleLeft": {"move": {"mc_l": (4.0, -1.0), "muo2_l": (1.5, 0), "mlo2_l": (1.5, 0), "dm1_l": (2.0, -4.0),
                                 "dm2_l": (2.0, 4.0)}},
    "MouthStretchLeft": {"move": {"mc_l": (9.0, 3.0), "muo2_l": (4.0, 0.5), "mui1_l": (3.0, 0), "mli1_l": (3.0, 2.0),
                                  "mlo2_l": (4.5, 2.5), "mlo1_l": (1.0, 1.0), "cf3_l": (3.0, 2.0),
                                  "dm1_l": (9.0, 3.0), "dm2_l": (9.0, 3.0)}},
    "MouthRollLower": {"move": {"mlo0": (0, -6.5), "mlo1_lr": (0, -6.5), "mlo2_lr": (0, -4.0), "mli0": (0, -1.0)}},
    "MouthRollUpper": {"move": {"muo0": (0, 5.0), "muo1_lr": (0, 6.0), "muo2_lr": (0, 3.5), "mui0": (0, 1.0)}},
    "MouthShrugLower": {"move": {"mlo0": (0, -3.5), "mlo1_lr": (0, -3.5), "mlo2_lr": (0, -2.0), "mli0": (0, -2.0),
                                 "mli1_lr": (0, -1.5), "o12": (0, -3.0), "ch_lr": (9.0, -2.0)}},
    "MouthShrugUpper": {"move": {"muo0": (0, -3.0), "muo1_lr": (0, -3.0), "muo2_lr": (0, -2.0), "mui0": (0, -2.5),
                                 "mui1_lr": (0, -2.0), "mc_lr": (0, -1.0)}},
    "MouthPressLeft": {"move": {"muo1_l": (0, 3.0), "muo2_l": (0, 3.0), "mlo1_l": (0, -3.0), "mlo2_l": (0, -3.0),
                                "mc_l": (2.0, 0), "mui1_l": (0, 1.0), "mli1_l": (0, -1.0)}},
    "MouthLowerDownLeft": {"move": {"mli1_l": (0, 7.0), "mlo1_l": (0, 6.5), "mlo2_l": (0, 4.5), "mli0": (0, 3.5),
                                    "mlo0": (0, 3.5)}},
    "MouthUpperUpLeft": {"move": {"mui1_l": (0, -7.0), "muo1_l": (0, -6.0), "muo2_l": (0, -5.0), "mui0": (0, -3.0),
                                  "muo0": (0, -3.0), "nal_l": (0, -1.5), "cf1_l": (0.5, -2.5), "cf2_l": (0.5, -1.5)}},
    # brows
    "BrowDownLeft": {"move": {"b1_l": (-3.0, 9.0), "b2_l": (-2.0, 8.0), "b3_l": (0, 6.5), "b4_l": (0, 5.0),
                              "b5_l": (0, 4.0), "u2_l": (0, 1.0)}},
    "BrowInnerUp": {"move": {"b1_lr": (0, -12.0), "b2_lr": (0, -8.0), "b3_lr": (0, -3.0)}},
    "BrowOuterUpLeft": {"move": {"b5_l": (0, -12.0), "b4_l": (0, -9.0), "b3_l": (0, -4.0)}},
    # cheeks and nose
    "CheekPuff": {"move": {"o5_lr": (7.0, 0), "o6_lr": (10.0, 0), "o7_lr": (10.0, 0), "o8_lr": (7.0, 0),
                           "o9_lr": (3.0, 0), "cf1_lr": (3.0, 0), "cf2_lr": (6.0, 0), "cf3_lr": (6.0, 0),
                           "ca1_lr": (3.0, 0), "ca2_lr": (4.0, 0), "ca3_lr": (4.0, 0), "mc_lr": (2.0, 0)}},
    "CheekSquintLeft": {"move": {"ca1_l": (0, -5.0), "ca2_l": (0, -7.0), "ca3_l": (0, -6.0), "l1_l": (0, -2.0),
                                 "l2_l": (0, -2.5), "l3_l": (0, -2.5), "eo_l": (0, -1.5), "cf1_l": (1.0, -3.0)}},
    "NoseSneerLeft": {"move": {"nal_l": (2.5, -8.0), "nst_l": (1.0, -5.0), "ns2_l": (1.0, -3.5), "wr1_l": (-3.0, -4.5),
                               "wr2_l": (3.5, 5.0), "b1_l": (0, 3.0), "cf1_l": (1.0, -4.5), "cf2_l": (1.0, -2.5),
                               "ca1_l": (0, -2.0), "muo1_l": (0, -2.5), "mui1_l": (0, -1.5), "l1_l": (0, -1.0)}},
    "TongueOut": {"move": {"tgtip": (0, 22.0), "tg1_lr": (8.0, 13.0), "tg0_lr": (9.0, 1.0)}},
    # head pose ([-1, 1])
    "HeadYaw": {"move": {"features": (9.0, 0), "outline": (2.0, 0)}},
    "HeadPitch": {"move": {"features": (0, 9.0), "outline": (0, 2.0)}},
    # eye pose ([-1, 1]); not mirrored: positive yaw turns both eyes to the image's right
    "LeftEyeYaw": {"move": {"iris_l": (7.0, 0)}},
    "LeftEyePitch": {"move": {"iris_l": (0, 4.5)}},
    "LeftEyeRoll": {"rotate": [("iris_mark_l", "pc_l", 45.0)]},
    "RightEyeYaw": {"move": {"iris_r": (7.0, 0)}},
    "RightEyePitch": {"move": {"iris_r": (0, 4.5)}},
    "RightEyeRoll": {"rotate": [("iris_mark_r", "pc_r", 45.0)]},
    "HeadRoll": {"rotate": [("everything", "head_c", 20.0)]},  # last: rotates the finished face
}  # fmt: skip

MIRRORED: dict[str, str] = {
    name.replace("Left", "Right"): name
    for name in CHANNELS
    if "Left" in name and not name.startswith("LeftEye") and name != "MouthLeft" and name != "JawLeft"
}
MIRRORED["MouthRight"] = "MouthLeft"
MIRRORED["JawRight"] = "JawLeft"
