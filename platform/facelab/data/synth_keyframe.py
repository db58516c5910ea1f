"""Embedded synthetic KeyframeFace corpus: scripts whose descriptions determine their ARKit keyframes.

The KeyframeFace release (Wu et al., arXiv 2512.11321) ships only an inference example, so the
platform generates a stand-in corpus in the format of :mod:`facelab.data.keyframeface`, shaped like
the paper's dataset section:

* 2,100 scripts by 21 actors (100 each, round robin), 1 to 5 keyframes per script, mostly 2-3. The
  paper gives no histogram; we fix ``P(K = 1..5) = .10, .40, .35, .10, .05`` (mean 2.6) and draw the
  counts by exact quota (largest remainder), so the default corpus has 210 / 840 / 735 / 210 / 105
  scripts with 1 / 2 / 3 / 4 / 5 keyframes, shuffled.
* Splits 80 / 10 / 10 % by a seeded permutation of the scripts (1,680 / 210 / 210 by default).
* 21 complex emotions (:data:`EMOTIONS`, written like the release's ``"Anxiety concealed by a
  restrained smile."``), each with three situations; backgrounds are ``"A <person> <situation>."``.

**Keyframes are sparse, plausible ARKit vectors.** Each keyframe is the sum of a few facial
*actions* (:data:`ACTIONS`: smile, frown, brow raise, brow furrow, jaw drop, lip press, squint,
eyes closed, pucker, gaze down / up / left / right, head tilt / turn / nod, sneer, cheek puff, ...).
An action drives a fixed set of channels with fixed weights (a primary channel pair or single
channel at weight 1 plus secondary channels, e.g. a smile also squints the cheeks); its intensity
``a`` comes from the emotion's range for that action (restrained emotions low, explosive ones high)
times the actor's expressiveness (0.9-1.1). Left / right channels get a per-actor asymmetry of up
to +-8 %. One to three *main* actions are drawn from the emotion's pool and zero to two *subtle*
ones (``a`` in [0.08, 0.22]) from all actions, at most one action per group (one brow shape, one
mouth-corner shape, one gaze direction, ...) and no incompatible pairs (an open jaw with pressed
lips). Everything else is exactly 0; secondary channels of weak actions give the tiny values
(0.01-0.02). Blendshapes stay in [0, 1], pose in [-1, 1] (gaze actions scale eye pose by 0.6, head
actions head pose by 0.5); values are rounded to 2 decimals. Pose sign convention (the release
does not state one; its example has a lowered gaze with negative eye pitch): pitch > 0 is up,
yaw > 0 turns toward the subject's left, roll > 0 tilts toward the subject's left.

**Descriptions are generated from the activations**, in the paper's three annotation types, so
the text determines the target, and the amount of information is ``arkit > image > original``:

``arkit``     (an LLM reading the coefficients) every action, in face order, with a ten-step
              intensity word measured from the actual primary channels (0.1 wide bins: "faintly"
              ... "maximally") and the stronger side when left and right differ by >= 0.06;
``image``     (an MLLM looking at the render) visual noun phrases with three intensity levels;
              actions measured below 0.25 are not visible and are dropped;
``original``  (the script author) the one or two strongest actions as plain verbs, no intensity,
              plus a phrase of the emotion.

Generation is deterministic for a seed and byte-stable: numpy's PCG64 only, values rounded to 2
decimals before they are stored, files written by :func:`facelab.data.keyframeface.write_dataset`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facelab.data.arkit import HIGH, INDEX, LOW, N_CHANNELS
from facelab.data.keyframeface import SPLITS, Keyframe, Script, claim_output, write_dataset

GENERATOR_VERSION = 1

KEYFRAME_PROBS = (0.10, 0.40, 0.35, 0.10, 0.05)
"""P(K = 1..5 keyframes per script); the paper says "mostly 2-3"."""

FINE_WORDS = (
    "faintly",
    "slightly",
    "lightly",
    "mildly",
    "moderately",
    "noticeably",
    "clearly",
    "strongly",
    "very strongly",
    "maximally",
)
"""Ten intensity words of ``arkit`` descriptions, bin ``i`` covering intensities ``(i/10, (i+1)/10]``."""

IMAGE_MIN = 0.25
"""Actions measured below this intensity are not visible in ``image`` descriptions."""
IMAGE_LEVELS = (0.45, 0.70)
"""``image`` level boundaries: [0.25, 0.45) low, [0.45, 0.70) mid, >= 0.70 high."""
ASYMMETRY_MENTION = 0.06
"""``arkit`` names the stronger side when a Left/Right primary pair differs by at least this."""

_SUBTLE_RANGE = (0.08, 0.22)
_ACTOR_ASYM = 0.08
_ACTOR_EXPRESSIVENESS = (0.9, 1.1)
_N_MAIN_PROBS = (0.20, 0.45, 0.35)  # 1, 2, 3 main actions
_N_SUBTLE_PROBS = (0.35, 0.45, 0.20)  # 0, 1, 2 subtle actions


# --------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One facial action: ``weights`` per channel (value = intensity * ``scale`` * weight, before
    asymmetry and clipping); the channels of largest ``|weight|`` are its *primary* channels, whose
    mean ``|value| / scale`` is the intensity a description reports. ``group``: at most one action
    per group in a keyframe; ``excludes``: groups that cannot co-occur with it. ``arkit`` is a
    phrase the intensity word follows; ``image`` three noun phrases (low, mid, high intensity);
    ``original`` a third-person verb phrase."""

    name: str
    group: str
    weights: tuple[tuple[str, float], ...]
    arkit: str
    image: tuple[str, str, str]
    original: str
    scale: float = 1.0
    excludes: tuple[str, ...] = ()

    @property
    def primary(self) -> tuple[str, ...]:
        top = max(abs(w) for _, w in self.weights)
        return tuple(c for c, w in self.weights if abs(w) == top)


def _lr(stem: str, w: float) -> tuple[tuple[str, float], tuple[str, float]]:
    return (f"{stem}Left", w), (f"{stem}Right", w)


_ACTION_LIST: tuple[Action, ...] = (
    # brows
    Action(
        "inner_brow_raise",
        "brows",
        (("BrowInnerUp", 1.0),),
        "inner brows raised",
        ("faintly worried brows", "worried, raised inner brows", "sharply upturned inner brows"),
        "lifts the inner brows",
    ),
    Action(
        "brow_raise",
        "brows",
        (*_lr("BrowOuterUp", 1.0), ("BrowInnerUp", 0.7), *_lr("EyeWide", 0.15)),
        "whole brows raised",
        ("slightly raised eyebrows", "raised eyebrows", "eyebrows arched high"),
        "raises the eyebrows",
    ),
    Action(
        "brow_furrow",
        "brows",
        (*_lr("BrowDown", 1.0), *_lr("EyeSquint", 0.2), *_lr("NoseSneer", 0.1)),
        "brows lowered and drawn together",
        ("a hint of a frown between the brows", "knitted brows", "deeply furrowed brows"),
        "furrows the brows",
    ),
    Action(
        "brow_raise_left",
        "brows",
        (("BrowOuterUpLeft", 1.0), ("BrowInnerUp", 0.3), ("BrowDownRight", 0.2)),
        "left brow arched",
        ("a slightly cocked left eyebrow", "a raised left eyebrow", "the left eyebrow arched high"),
        "raises one eyebrow",
    ),
    Action(
        "brow_raise_right",
        "brows",
        (("BrowOuterUpRight", 1.0), ("BrowInnerUp", 0.3), ("BrowDownLeft", 0.2)),
        "right brow arched",
        ("a slightly cocked right eyebrow", "a raised right eyebrow", "the right eyebrow arched high"),
        "raises one eyebrow",
    ),
    # eyelids
    Action(
        "eyes_wide",
        "eyelids",
        (*_lr("EyeWide", 1.0), *_lr("BrowOuterUp", 0.2)),
        "eyelids widened",
        ("slightly widened eyes", "wide eyes", "eyes stretched wide open"),
        "widens the eyes",
    ),
    Action(
        "squint",
        "eyelids",
        (*_lr("EyeSquint", 1.0), *_lr("CheekSquint", 0.3)),
        "eyes narrowed",
        ("slightly narrowed eyes", "narrowed eyes", "tightly squinted eyes"),
        "narrows the eyes",
    ),
    Action(
        "eyes_closed",
        "eyelids",
        (*_lr("EyeBlink", 1.0), *_lr("EyeSquint", 0.1)),
        "eyelids lowered",
        ("heavy-lidded eyes", "half-closed eyes", "eyes shut"),
        "closes the eyes",
    ),
    # gaze (eye blendshapes + eye rotation)
    Action(
        "gaze_down",
        "gaze",
        (*_lr("EyeLookDown", 1.0), ("LeftEyePitch", -1.0), ("RightEyePitch", -1.0)),
        "gaze lowered",
        ("eyes glancing slightly down", "eyes looking down", "eyes cast far down"),
        "looks down",
        scale=0.6,
    ),
    Action(
        "gaze_up",
        "gaze",
        (*_lr("EyeLookUp", 1.0), ("LeftEyePitch", 1.0), ("RightEyePitch", 1.0)),
        "gaze raised",
        ("eyes glancing slightly up", "eyes looking up", "eyes rolled far up"),
        "looks up",
        scale=0.6,
    ),
    Action(
        "gaze_left",
        "gaze",
        (("EyeLookOutLeft", 1.0), ("EyeLookInRight", 1.0), ("LeftEyeYaw", 1.0), ("RightEyeYaw", 1.0)),
        "gaze turned to the left",
        ("eyes glancing slightly left", "eyes looking to the left", "eyes turned far to the left"),
        "glances to the left",
        scale=0.6,
    ),
    Action(
        "gaze_right",
        "gaze",
        (("EyeLookInLeft", 1.0), ("EyeLookOutRight", 1.0), ("LeftEyeYaw", -1.0), ("RightEyeYaw", -1.0)),
        "gaze turned to the right",
        ("eyes glancing slightly right", "eyes looking to the right", "eyes turned far to the right"),
        "glances to the right",
        scale=0.6,
    ),
    # nose and cheeks
    Action(
        "sneer",
        "nose",
        (*_lr("NoseSneer", 1.0), *_lr("MouthUpperUp", 0.5), *_lr("BrowDown", 0.2), *_lr("CheekSquint", 0.2)),
        "nose wrinkled with the upper lip raised",
        ("a faintly wrinkled nose", "a sneer", "a deep, snarling sneer"),
        "sneers",
    ),
    Action(
        "cheek_puff",
        "cheeks",
        (("CheekPuff", 1.0), ("MouthClose", 0.3), ("MouthPucker", 0.1)),
        "cheeks puffed out",
        ("slightly full cheeks", "puffed cheeks", "cheeks blown up like balloons"),
        "puffs out the cheeks",
        excludes=("jaw",),
    ),
    # mouth corners
    Action(
        "smile",
        "corners",
        (*_lr("MouthSmile", 1.0), *_lr("CheekSquint", 0.35), *_lr("EyeSquint", 0.15), *_lr("MouthDimple", 0.15)),
        "mouth corners pulled up",
        ("a faint smile", "a clear smile", "a broad smile"),
        "smiles",
    ),
    Action(
        "smirk_left",
        "corners",
        (("MouthSmileLeft", 1.0), ("MouthDimpleLeft", 0.3), ("CheekSquintLeft", 0.3), ("MouthLeft", 0.15)),
        "left mouth corner pulled up",
        ("a faint smirk on the left", "a lopsided smirk to the left", "a pronounced smirk on the left"),
        "smirks",
    ),
    Action(
        "smirk_right",
        "corners",
        (("MouthSmileRight", 1.0), ("MouthDimpleRight", 0.3), ("CheekSquintRight", 0.3), ("MouthRight", 0.15)),
        "right mouth corner pulled up",
        ("a faint smirk on the right", "a lopsided smirk to the right", "a pronounced smirk on the right"),
        "smirks",
    ),
    Action(
        "frown",
        "corners",
        (*_lr("MouthFrown", 1.0), ("MouthShrugLower", 0.3), *_lr("MouthLowerDown", 0.1)),
        "mouth corners pulled down",
        ("slightly downturned lips", "a frown", "a deep frown"),
        "frowns",
    ),
    Action(
        "mouth_stretch",
        "corners",
        (*_lr("MouthStretch", 1.0), *_lr("MouthLowerDown", 0.3), ("JawOpen", 0.1)),
        "lips stretched sideways",
        ("slightly tense lips", "lips stretched tight", "a wide grimace"),
        "grimaces",
    ),
    # lips
    Action(
        "lip_press",
        "lips",
        (*_lr("MouthPress", 1.0), ("MouthClose", 0.5)),
        "lips pressed together",
        ("lightly pressed lips", "lips pressed together", "lips pressed into a thin hard line"),
        "presses the lips together",
    ),
    Action(
        "lip_roll",
        "lips",
        (("MouthRollLower", 1.0), ("MouthRollUpper", 0.7), *_lr("MouthPress", 0.2)),
        "lips rolled inward",
        ("lips slightly drawn in", "lips rolled inward", "lips sucked in completely"),
        "bites the lips",
    ),
    Action(
        "pucker",
        "lips",
        (("MouthPucker", 1.0), ("MouthFunnel", 0.35)),
        "lips puckered",
        ("slightly pursed lips", "pursed lips", "tightly puckered lips"),
        "purses the lips",
    ),
    Action(
        "pout",
        "lips",
        (("MouthShrugLower", 1.0), ("MouthShrugUpper", 0.4), *_lr("MouthFrown", 0.2)),
        "lower lip pushed up",
        ("a hint of a pout", "a pout", "a strong pout"),
        "pouts",
    ),
    # mouth shift
    Action(
        "mouth_shift_left",
        "shift",
        (("MouthLeft", 1.0), ("JawLeft", 0.3)),
        "mouth pulled to the left",
        ("the mouth slightly skewed left", "the mouth twisted to the left", "the mouth pulled far to the left"),
        "twists the mouth to one side",
    ),
    Action(
        "mouth_shift_right",
        "shift",
        (("MouthRight", 1.0), ("JawRight", 0.3)),
        "mouth pulled to the right",
        ("the mouth slightly skewed right", "the mouth twisted to the right", "the mouth pulled far to the right"),
        "twists the mouth to one side",
    ),
    # jaw and tongue
    Action(
        "jaw_drop",
        "jaw",
        (("JawOpen", 1.0), *_lr("MouthLowerDown", 0.3), *_lr("MouthUpperUp", 0.1)),
        "jaw dropped open",
        ("slightly parted lips", "an open mouth", "the mouth wide open"),
        "opens the mouth",
        excludes=("lips", "cheeks"),
    ),
    Action(
        "jaw_thrust",
        "jaw",
        (("JawForward", 1.0), ("MouthShrugLower", 0.2)),
        "jaw pushed forward",
        ("a slightly set jaw", "a jutting jaw", "the jaw thrust far forward"),
        "sets the jaw",
        scale=0.6,
    ),
    Action(
        "tongue_out",
        "tongue",
        (("TongueOut", 1.0), ("JawOpen", 0.3), ("MouthFunnel", 0.1)),
        "tongue stuck out",
        ("the tongue tip showing", "the tongue sticking out", "the tongue stuck far out"),
        "sticks out the tongue",
        excludes=("lips", "cheeks"),
    ),
    # head
    Action(
        "head_down",
        "head_pitch",
        (("HeadPitch", -1.0),),
        "head pitched down",
        ("the head slightly bowed", "the head bowed", "the head hanging low"),
        "lowers the head",
        scale=0.5,
    ),
    Action(
        "head_up",
        "head_pitch",
        (("HeadPitch", 1.0),),
        "head pitched up",
        ("the chin slightly raised", "the chin raised", "the head thrown back"),
        "lifts the chin",
        scale=0.5,
    ),
    Action(
        "head_turn_left",
        "head_yaw",
        (("HeadYaw", 1.0),),
        "head turned to the left",
        ("the head turned slightly left", "the head turned to the left", "the head turned far to the left"),
        "turns the head to the left",
        scale=0.5,
    ),
    Action(
        "head_turn_right",
        "head_yaw",
        (("HeadYaw", -1.0),),
        "head turned to the right",
        ("the head turned slightly right", "the head turned to the right", "the head turned far to the right"),
        "turns the head to the right",
        scale=0.5,
    ),
    Action(
        "head_tilt_left",
        "head_roll",
        (("HeadRoll", 1.0),),
        "head tilted to the left",
        ("the head tilted slightly left", "the head tilted to the left", "the head tilted far to the left"),
        "tilts the head",
        scale=0.5,
    ),
    Action(
        "head_tilt_right",
        "head_roll",
        (("HeadRoll", -1.0),),
        "head tilted to the right",
        ("the head tilted slightly right", "the head tilted to the right", "the head tilted far to the right"),
        "tilts the head",
        scale=0.5,
    ),
)
ACTIONS: dict[str, Action] = {a.name: a for a in _ACTION_LIST}
"""All actions by name, in face order (brows, eyelids, gaze, nose / cheeks, mouth, jaw, head):
descriptions list actions in this order."""

_ORDER = {name: i for i, name in enumerate(ACTIONS)}


def _compatible(action: Action, chosen: Sequence[Action]) -> bool:
    for other in chosen:
        if other.group == action.group or other.group in action.excludes or action.group in other.excludes:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Emotions and backgrounds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmotionSpec:
    """A complex emotion: its text (release style), phrases for ``original`` descriptions, the
    actions it uses as ``(name, weight, low, high)`` (selection weight, intensity range), and three
    situations for backgrounds."""

    text: str
    tails: tuple[str, ...]
    pool: tuple[tuple[str, float, float, float], ...]
    situations: tuple[str, str, str]


def _both(stem: str, w: float, lo: float, hi: float) -> tuple[tuple[str, float, float, float], ...]:
    return ((f"{stem}_left", w / 2, lo, hi), (f"{stem}_right", w / 2, lo, hi))


EMOTIONS: tuple[EmotionSpec, ...] = (
    EmotionSpec(
        "Anxiety concealed by a restrained smile.",
        ("trying to hide the anxiety", "masking the nerves"),
        (
            ("smile", 3, 0.3, 0.5),
            ("inner_brow_raise", 3, 0.2, 0.5),
            ("lip_press", 2, 0.3, 0.6),
            ("gaze_down", 2, 0.2, 0.5),
            ("gaze_up", 1, 0.2, 0.4),
            ("squint", 1, 0.1, 0.3),
            ("head_down", 1, 0.1, 0.3),
            ("lip_roll", 1, 0.2, 0.5),
        ),
        (
            "waits outside an interview room and tries to hide their anxiety",
            "meets their partner's parents for the first time",
            "smiles for a photo while waiting for test results",
        ),
    ),
    EmotionSpec(
        "Overwhelming joy.",
        ("beaming with joy", "overjoyed"),
        (
            ("smile", 4, 0.6, 1.0),
            ("jaw_drop", 2, 0.3, 0.7),
            ("brow_raise", 2, 0.3, 0.7),
            ("eyes_wide", 1, 0.2, 0.5),
            ("head_up", 2, 0.2, 0.6),
            *_both("head_tilt", 2, 0.2, 0.5),
            ("squint", 1, 0.2, 0.5),
        ),
        (
            "hears that they won the scholarship",
            "sees a long-lost friend at the airport",
            "opens the acceptance letter from their dream university",
        ),
    ),
    EmotionSpec(
        "Quiet sadness.",
        ("lost in sadness", "quietly sad"),
        (
            ("frown", 3, 0.3, 0.6),
            ("inner_brow_raise", 3, 0.3, 0.7),
            ("gaze_down", 3, 0.3, 0.7),
            ("head_down", 2, 0.2, 0.5),
            ("eyes_closed", 1, 0.2, 0.5),
            ("pout", 1, 0.2, 0.5),
            ("lip_press", 1, 0.2, 0.4),
        ),
        (
            "reads an old letter from a friend who moved away",
            "sits alone in an empty apartment after a move",
            "watches the rain on the last day of summer",
        ),
    ),
    EmotionSpec(
        "Suppressed anger.",
        ("holding the anger in", "barely containing the anger"),
        (
            ("brow_furrow", 4, 0.4, 0.8),
            ("lip_press", 3, 0.4, 0.8),
            ("squint", 2, 0.3, 0.6),
            ("jaw_thrust", 2, 0.2, 0.5),
            ("sneer", 1, 0.1, 0.3),
            ("head_down", 1, 0.1, 0.3),
            *_both("gaze", 1, 0.2, 0.4),
        ),
        (
            "listens to a colleague take credit for their work",
            "is told their flight is cancelled again",
            "hears an unfair decision in a meeting",
        ),
    ),
    EmotionSpec(
        "Explosive rage.",
        ("exploding with rage", "furious"),
        (
            ("brow_furrow", 4, 0.7, 1.0),
            ("sneer", 3, 0.5, 0.9),
            ("jaw_drop", 2, 0.4, 0.8),
            ("mouth_stretch", 2, 0.4, 0.8),
            ("eyes_wide", 1, 0.3, 0.7),
            ("squint", 1, 0.5, 0.8),
            ("jaw_thrust", 1, 0.4, 0.8),
            ("head_down", 1, 0.2, 0.5),
        ),
        (
            "discovers their car has been vandalised",
            "confronts the person who lied to them",
            "shouts at a referee after a bad call",
        ),
    ),
    EmotionSpec(
        "Shock turning into fear.",
        ("frozen in fear", "gripped by sudden fear"),
        (
            ("eyes_wide", 4, 0.5, 1.0),
            ("brow_raise", 3, 0.5, 1.0),
            ("inner_brow_raise", 2, 0.4, 0.8),
            ("jaw_drop", 3, 0.3, 0.8),
            ("mouth_stretch", 2, 0.3, 0.7),
            ("head_up", 1, 0.2, 0.5),
            *_both("gaze", 1, 0.3, 0.6),
        ),
        (
            "hears footsteps behind them in a dark parking garage",
            "sees smoke coming from their kitchen",
            "gets a call that their child is missing",
        ),
    ),
    EmotionSpec(
        "Disgust mixed with contempt.",
        ("clearly disgusted", "recoiling in disgust"),
        (
            ("sneer", 4, 0.4, 0.8),
            *_both("smirk", 2, 0.3, 0.6),
            ("brow_furrow", 2, 0.3, 0.6),
            *_both("head_turn", 2, 0.2, 0.5),
            ("squint", 1, 0.2, 0.5),
            ("frown", 1, 0.2, 0.5),
            ("head_up", 1, 0.2, 0.4),
        ),
        (
            "finds a hair in their restaurant soup",
            "watches a rival brag about cheating",
            "opens a fridge full of spoiled food",
        ),
    ),
    EmotionSpec(
        "Cold contempt.",
        ("full of contempt", "looking down on them"),
        (
            *_both("smirk", 4, 0.3, 0.6),
            ("head_up", 2, 0.2, 0.5),
            ("squint", 2, 0.2, 0.5),
            *_both("gaze", 1, 0.2, 0.5),
            *_both("brow_raise", 1, 0.3, 0.6),
            ("lip_press", 1, 0.1, 0.3),
        ),
        (
            "listens to an arrogant boss explain something obvious",
            "watches a former friend beg for a favour",
            "reads an insincere apology",
        ),
    ),
    EmotionSpec(
        "Pleasant surprise.",
        ("pleasantly surprised", "delighted by the surprise"),
        (
            ("brow_raise", 4, 0.4, 0.9),
            ("eyes_wide", 3, 0.3, 0.8),
            ("jaw_drop", 3, 0.2, 0.6),
            ("smile", 3, 0.3, 0.8),
            ("head_up", 1, 0.1, 0.4),
        ),
        (
            "walks into a surprise birthday party",
            "finds an unexpected gift on their desk",
            "hears their favourite song on the radio",
        ),
    ),
    EmotionSpec(
        "Embarrassment.",
        ("blushing with embarrassment", "embarrassed"),
        (
            ("smile", 3, 0.2, 0.5),
            ("gaze_down", 3, 0.3, 0.7),
            ("head_down", 2, 0.2, 0.5),
            *_both("head_turn", 2, 0.2, 0.5),
            ("lip_roll", 2, 0.2, 0.5),
            ("eyes_closed", 1, 0.2, 0.6),
            ("inner_brow_raise", 1, 0.2, 0.4),
        ),
        (
            "realises they called their teacher 'mum'",
            "trips on stage in front of the whole school",
            "is caught singing loudly in the office",
        ),
    ),
    EmotionSpec(
        "Grief held back.",
        ("holding back tears", "fighting back grief"),
        (
            ("frown", 3, 0.3, 0.7),
            ("inner_brow_raise", 4, 0.5, 0.9),
            ("lip_press", 3, 0.3, 0.7),
            ("lip_roll", 2, 0.3, 0.6),
            ("eyes_closed", 2, 0.3, 0.8),
            ("gaze_down", 2, 0.3, 0.6),
            ("head_down", 1, 0.2, 0.5),
        ),
        (
            "gives a speech at their grandfather's funeral",
            "packs up the belongings of a friend who has died",
            "hears the doctor's bad news and stays composed",
        ),
    ),
    EmotionSpec(
        "Nervous anticipation.",
        ("nervously waiting", "on edge"),
        (
            ("lip_roll", 3, 0.3, 0.6),
            ("lip_press", 2, 0.2, 0.5),
            ("inner_brow_raise", 2, 0.2, 0.5),
            *_both("gaze", 2, 0.2, 0.5),
            ("gaze_up", 1, 0.2, 0.4),
            ("eyes_wide", 1, 0.2, 0.4),
            ("pucker", 1, 0.2, 0.4),
            ("smile", 1, 0.1, 0.3),
        ),
        (
            "waits for the lottery numbers to be drawn",
            "stands backstage before their first concert",
            "watches the final penalty kick",
        ),
    ),
    EmotionSpec(
        "Smug satisfaction.",
        ("quietly pleased with themselves", "smugly satisfied"),
        (
            *_both("smirk", 4, 0.4, 0.8),
            ("squint", 2, 0.2, 0.5),
            ("head_up", 2, 0.2, 0.5),
            *_both("head_tilt", 2, 0.2, 0.4),
            ("smile", 1, 0.2, 0.5),
            *_both("brow_raise", 1, 0.2, 0.5),
        ),
        ("watches their prediction come true", "wins an argument with their older sibling", "sees the rival team lose"),
    ),
    EmotionSpec(
        "Confusion.",
        ("puzzled", "trying to make sense of it"),
        (
            ("brow_furrow", 2, 0.2, 0.5),
            *_both("brow_raise", 4, 0.3, 0.7),
            *_both("head_tilt", 4, 0.2, 0.6),
            *_both("mouth_shift", 2, 0.2, 0.6),
            ("pout", 1, 0.2, 0.5),
            ("squint", 1, 0.2, 0.5),
            ("gaze_up", 1, 0.2, 0.5),
        ),
        (
            "reads instructions written in a foreign language",
            "is handed a bill for something they never ordered",
            "listens to a friend's complicated plan",
        ),
    ),
    EmotionSpec(
        "Skeptical doubt.",
        ("unconvinced", "doubting every word"),
        (
            *_both("brow_raise", 3, 0.4, 0.8),
            ("squint", 2, 0.3, 0.6),
            *_both("smirk", 2, 0.2, 0.5),
            ("lip_press", 2, 0.2, 0.5),
            *_both("head_tilt", 1, 0.2, 0.4),
            ("pout", 1, 0.2, 0.4),
        ),
        (
            "listens to a salesman promise miracles",
            "hears a friend's excuse for being late",
            "reads an email claiming they won a prize",
        ),
    ),
    EmotionSpec(
        "Tenderness.",
        ("full of tenderness", "warmly affectionate"),
        (
            ("smile", 4, 0.3, 0.6),
            *_both("head_tilt", 2, 0.2, 0.5),
            ("eyes_closed", 2, 0.2, 0.5),
            ("gaze_down", 2, 0.2, 0.5),
            ("inner_brow_raise", 1, 0.1, 0.3),
            ("brow_raise", 1, 0.1, 0.3),
        ),
        (
            "watches their newborn sleep",
            "holds an old dog that has been with them for years",
            "reads a card from their grandchild",
        ),
    ),
    EmotionSpec(
        "Exhaustion.",
        ("completely exhausted", "worn out"),
        (
            ("eyes_closed", 4, 0.4, 0.8),
            ("jaw_drop", 2, 0.3, 0.7),
            ("head_down", 2, 0.3, 0.6),
            ("gaze_down", 2, 0.3, 0.6),
            ("frown", 1, 0.1, 0.4),
            ("inner_brow_raise", 1, 0.2, 0.4),
            *_both("head_tilt", 1, 0.2, 0.4),
        ),
        (
            "comes home after a double night shift",
            "finishes a marathon",
            "sits at the desk at three in the morning before a deadline",
        ),
    ),
    EmotionSpec(
        "Playful mischief.",
        ("up to mischief", "playfully teasing"),
        (
            *_both("smirk", 4, 0.4, 0.8),
            ("tongue_out", 2, 0.3, 0.8),
            ("squint", 2, 0.3, 0.6),
            ("cheek_puff", 2, 0.3, 0.8),
            ("pucker", 1, 0.3, 0.7),
            *_both("head_tilt", 2, 0.2, 0.5),
            *_both("brow_raise", 2, 0.3, 0.6),
        ),
        ("hides their sibling's phone as a prank", "makes faces at a baby on the train", "plans a prank on a roommate"),
    ),
    EmotionSpec(
        "Quiet determination.",
        ("determined", "set on the goal"),
        (
            ("brow_furrow", 3, 0.3, 0.6),
            ("lip_press", 4, 0.4, 0.8),
            ("jaw_thrust", 2, 0.3, 0.6),
            ("squint", 2, 0.3, 0.6),
            ("head_down", 1, 0.1, 0.3),
            ("gaze_up", 1, 0.2, 0.4),
            ("head_up", 1, 0.2, 0.4),
        ),
        (
            "steps up for the final lap of a race",
            "prepares to lift a record weight",
            "reads the exam question one more time",
        ),
    ),
    EmotionSpec(
        "Bitter disappointment.",
        ("bitterly disappointed", "let down"),
        (
            ("frown", 4, 0.4, 0.8),
            ("pout", 2, 0.3, 0.7),
            ("inner_brow_raise", 2, 0.3, 0.6),
            ("brow_furrow", 1, 0.2, 0.5),
            ("gaze_down", 2, 0.3, 0.6),
            *_both("head_turn", 2, 0.2, 0.4),
            ("lip_press", 2, 0.2, 0.5),
            ("eyes_closed", 1, 0.2, 0.5),
        ),
        (
            "learns they did not get the promotion",
            "sees their team lose in the last minute",
            "opens a rejection letter",
        ),
    ),
    EmotionSpec(
        "Relief after tension.",
        ("finally relieved", "letting the tension go"),
        (
            ("smile", 3, 0.3, 0.6),
            ("eyes_closed", 3, 0.3, 0.7),
            ("head_up", 2, 0.2, 0.5),
            ("cheek_puff", 2, 0.3, 0.7),
            ("jaw_drop", 1, 0.2, 0.4),
            ("inner_brow_raise", 1, 0.1, 0.3),
        ),
        (
            "hears that the surgery went well",
            "finds their lost passport in the last pocket",
            "sees the exam results and has passed",
        ),
    ),
)
"""The 21 complex emotions of the synthetic corpus."""

PEOPLE = (
    "student",
    "nurse",
    "young father",
    "retired teacher",
    "waiter",
    "chef",
    "office worker",
    "teenager",
    "lawyer",
    "musician",
    "shop owner",
    "grandmother",
    "bus driver",
    "programmer",
    "painter",
    "farmer",
)
"""Background subjects: ``"A <person> <situation>."`` (``An`` before vowels)."""

_IMAGE_FRAMES = ("The face shows {}.", "In the image: {}.", "The rendered face has {}.", "Visible are {}.")
_NEUTRAL = {
    "arkit": "All channels near rest; no action above the faint level.",
    "image": "The face looks relaxed and almost neutral.",
    "original": "{S} keeps a neutral face, {tail}.",
}


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------------------------------------------
# Values and descriptions
# --------------------------------------------------------------------------------------------


def compose(actions: Sequence[tuple[str, float]], *, asymmetry: float = 0.0) -> np.ndarray:
    """ARKit vector of ``(action name, intensity)`` pairs: float64 ``(61,)``, 2 decimals, clipped.

    Each action adds ``intensity * scale * weight`` to its channels; channels ending in ``Left`` are
    scaled by ``1 + asymmetry``, ``Right`` by ``1 - asymmetry``; the sum is clipped to the channel
    range and rounded to 2 decimals (no ``-0.0``).
    """
    vec = np.zeros(N_CHANNELS, dtype=np.float64)
    for name, a in actions:
        act = ACTIONS[name]
        for ch, w in act.weights:
            side = 1.0 + asymmetry if ch.endswith("Left") else 1.0 - asymmetry if ch.endswith("Right") else 1.0
            vec[INDEX[ch]] += a * act.scale * w * side
    np.clip(vec, LOW, HIGH, out=vec)
    return np.round(vec, 2) + 0.0  # (61,)


def measure(values: np.ndarray, name: str) -> float:
    """Intensity of action ``name`` read off ``values``: mean ``|value| / scale`` over its primary
    channels, at most 1. This is what every description reports."""
    act = ACTIONS[name]
    mags = [abs(float(values[INDEX[c]])) for c in act.primary]
    return min(sum(mags) / len(mags) / act.scale, 1.0)


def fine_word(intensity: float) -> str:
    """The ``arkit`` intensity word: bin ``ceil(10 * intensity) - 1`` of :data:`FINE_WORDS`."""
    return FINE_WORDS[min(max(math.ceil(round(intensity * 10, 6)) - 1, 0), len(FINE_WORDS) - 1)]


def image_level(intensity: float) -> int | None:
    """``None`` below :data:`IMAGE_MIN` (not visible), else 0 / 1 / 2 (low / mid / high)."""
    if intensity < IMAGE_MIN:
        return None
    return sum(intensity >= b for b in IMAGE_LEVELS)


def _stronger_side(values: np.ndarray, act: Action) -> str | None:
    stems = {c[:-4] for c in act.primary if c.endswith("Left")} & {c[:-5] for c in act.primary if c.endswith("Right")}
    for stem in sorted(stems):
        diff = float(values[INDEX[stem + "Left"]]) - float(values[INDEX[stem + "Right"]])
        if abs(diff) >= ASYMMETRY_MENTION - 1e-9:
            return "left" if diff > 0 else "right"
    return None


def describe(
    values: np.ndarray, actions: Sequence[str], *, emotion: EmotionSpec, person: str, rng: np.random.Generator
) -> dict[str, str]:
    """The three descriptions of a keyframe with ``values`` made of ``actions`` (see the module doc).

    ``rng`` picks among equivalent phrasings only; the information each text carries depends on
    ``values`` and ``actions`` alone.
    """
    acts = sorted(actions, key=_ORDER.__getitem__)
    level = {name: measure(values, name) for name in acts}
    tail = emotion.tails[int(rng.integers(len(emotion.tails)))]
    subject = f"The {person}"
    frame = _IMAGE_FRAMES[int(rng.integers(len(_IMAGE_FRAMES)))]
    original_first = bool(rng.integers(2))
    if not acts:
        return {
            "original": _NEUTRAL["original"].format(S=subject, tail=tail),
            "arkit": _NEUTRAL["arkit"],
            "image": _NEUTRAL["image"],
        }

    parts = []
    for name in acts:
        act = ACTIONS[name]
        text = f"{act.arkit} {fine_word(level[name])}"
        side = _stronger_side(values, act)
        if side:
            text += f", stronger on the {side}"
        parts.append(text)
    arkit = "; ".join(parts)
    arkit = arkit[0].upper() + arkit[1:] + "."

    seen = [ACTIONS[n].image[image_level(level[n])] for n in acts if image_level(level[n]) is not None]
    image = frame.format(_join(seen)) if seen else _NEUTRAL["image"]
    image = image[0].upper() + image[1:]

    top = sorted(acts, key=lambda n: (-level[n], _ORDER[n]))
    main = [n for n in top if level[n] >= IMAGE_MIN][:2] or top[:1]
    verbs = []
    for n in sorted(main, key=_ORDER.__getitem__):
        verb = ACTIONS[n].original
        if verb not in verbs:
            verbs.append(verb)
    if original_first:
        original = f"{subject} {_join(verbs)}, {tail}."
    else:
        original = f"{tail[0].upper() + tail[1:]}, the {person} {_join(verbs)}."
    return {"original": original, "arkit": arkit, "image": image}


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _quota_counts(n: int, probs: Sequence[float]) -> list[int]:
    """Largest-remainder apportionment of ``n`` items to ``probs`` (ties to the lower index)."""
    raw = [n * p for p in probs]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(probs)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_sizes(n_scripts: int, split: Sequence[float]) -> dict[str, int]:
    """``{"train", "val", "test"}`` sizes: val and test are ``round(n * fraction)``, train the rest."""
    n_val = int(round(n_scripts * split[1]))
    n_test = int(round(n_scripts * split[2]))
    return {"train": n_scripts - n_val - n_test, "val": n_val, "test": n_test}


def _pick_actions(rng: np.random.Generator, emotion: EmotionSpec, expressiveness: float) -> list[tuple[str, float]]:
    pool = list(emotion.pool)
    n_main = 1 + int(rng.choice(3, p=_N_MAIN_PROBS))
    chosen: list[tuple[str, float]] = []
    acts: list[Action] = []
    while pool and len(chosen) < n_main:
        w = np.array([p[1] for p in pool], dtype=np.float64)
        name, _, lo, hi = pool.pop(int(rng.choice(len(pool), p=w / w.sum())))
        a = lo + (hi - lo) * float(rng.random())
        if _compatible(ACTIONS[name], acts):
            chosen.append((name, min(a * expressiveness, 1.0)))
            acts.append(ACTIONS[name])
    n_subtle = int(rng.choice(3, p=_N_SUBTLE_PROBS))
    names = list(ACTIONS)
    for _ in range(n_subtle):
        name = names[int(rng.integers(len(names)))]
        a = _SUBTLE_RANGE[0] + (_SUBTLE_RANGE[1] - _SUBTLE_RANGE[0]) * float(rng.random())
        if _compatible(ACTIONS[name], acts):
            chosen.append((name, a))
            acts.append(ACTIONS[name])
    return chosen


def generate_scripts(n_scripts: int = 2100, *, seed: int = 0, n_actors: int = 21) -> list[Script]:
    """The ``n_scripts`` synthetic scripts in generation order (ids ``synth-0001`` ...)."""
    if isinstance(n_scripts, bool) or not isinstance(n_scripts, (int, np.integer)) or n_scripts < 1:
        raise ValueError(f"n_scripts must be an integer >= 1, got {n_scripts!r}")
    if isinstance(n_actors, bool) or not isinstance(n_actors, (int, np.integer)) or n_actors < 1:
        raise ValueError(f"n_actors must be an integer >= 1, got {n_actors!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    root = np.random.SeedSequence(int(seed))
    plan_ss, actor_ss, script_ss = root.spawn(3)
    plan = np.random.default_rng(plan_ss)
    counts = _quota_counts(int(n_scripts), KEYFRAME_PROBS)
    n_keyframes = plan.permutation(np.repeat(np.arange(1, len(KEYFRAME_PROBS) + 1), counts))  # (n,)

    actor_rng = np.random.default_rng(actor_ss)
    asym = actor_rng.uniform(-_ACTOR_ASYM, _ACTOR_ASYM, size=n_actors)  # (A,)
    expr = actor_rng.uniform(*_ACTOR_EXPRESSIVENESS, size=n_actors)  # (A,)
    width = max(2, len(str(n_actors)))

    scripts = []
    for i, script_seed in enumerate(script_ss.spawn(int(n_scripts))):
        rng = np.random.default_rng(script_seed)
        actor = i % n_actors
        emotion = EMOTIONS[int(rng.integers(len(EMOTIONS)))]
        person = PEOPLE[int(rng.integers(len(PEOPLE)))]
        situation = emotion.situations[int(rng.integers(len(emotion.situations)))]
        keyframes = []
        previous: set[str] | None = None
        for k in range(1, int(n_keyframes[i]) + 1):
            for _ in range(8):  # consecutive keyframes show different action sets
                chosen = _pick_actions(rng, emotion, float(expr[actor]))
                if {n for n, _ in chosen} != previous:
                    break
            previous = {n for n, _ in chosen}
            values = compose(chosen, asymmetry=float(asym[actor]))
            desc = describe(values, [n for n, _ in chosen], emotion=emotion, person=person, rng=rng)
            keyframes.append(Keyframe(index=k, descriptions=desc, values=values.astype(np.float32)))
        scripts.append(
            Script(
                script_id=f"synth-{i + 1:04d}",
                actor=f"actor{actor + 1:0{width}d}",
                background=f"{_article(person)} {person} {situation}.",
                emotion=emotion.text,
                keyframes=tuple(keyframes),
            )
        )
    return scripts


def generate_keyframeface(
    out_dir: str | Path,
    *,
    n_scripts: int = 2100,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    n_actors: int = 21,
    force: bool = False,
) -> dict:
    """Write the synthetic KeyframeFace corpus to ``out_dir`` (via ``write_dataset``); return its summary.

    ``split`` are the train / val / test fractions (non-negative, summing to 1); scripts are
    assigned by a seeded permutation. The default corpus (2,100 scripts by 21 actors, as the paper) takes
    a few seconds. The summary is :func:`facelab.data.keyframeface.summarize` (per split: keyframes
    per script histogram, mean active channels, mean words per annotation, ...) plus ``params``.
    An existing ``out_dir`` is replaced only if it is empty or a KeyframeFace dataset written here
    (e.g. this stage's previous output), or with ``force`` (:func:`facelab.data.keyframeface.claim_output`).
    """
    split = tuple(float(x) for x in split)
    if len(split) != 3 or any(x < 0 or not math.isfinite(x) for x in split) or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {split}")
    claim_output(out_dir, force)  # before the work: a wrong --out fails at once
    scripts = generate_scripts(n_scripts, seed=seed, n_actors=n_actors)
    sizes = split_sizes(len(scripts), split)
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 1])).permutation(len(scripts))
    splits: dict[str, list[Script]] = {}
    start = 0
    for name in SPLITS:
        idx = np.sort(order[start : start + sizes[name]])
        splits[name] = [scripts[int(j)] for j in idx]
        start += sizes[name]
    params = {
        "n_scripts": int(n_scripts),
        "split": list(split),
        "seed": int(seed),
        "n_actors": int(n_actors),
        "keyframe_probs": list(KEYFRAME_PROBS),
    }
    summary = write_dataset(
        out_dir,
        splits,
        {
            "source": "synthetic",
            "generator": "facelab.data.synth_keyframe.generate_keyframeface",
            "generator_version": GENERATOR_VERSION,
            "params": params,
        },
        force=force,
    )
    summary["params"] = params
    return summary


__all__ = [
    "GENERATOR_VERSION",
    "KEYFRAME_PROBS",
    "FINE_WORDS",
    "IMAGE_MIN",
    "IMAGE_LEVELS",
    "ASYMMETRY_MENTION",
    "Action",
    "ACTIONS",
    "EmotionSpec",
    "EMOTIONS",
    "PEOPLE",
    "compose",
    "measure",
    "fine_word",
    "image_level",
    "describe",
    "split_sizes",
    "generate_scripts",
    "generate_keyframeface",
]
