"""Requests and answers of the KeyframeFace LM: the chat format of the release, both answer formats.

KeyframeFace (Wu et al. 2025, arXiv 2512.11321) fine-tunes a causal LM to answer one request per
keyframe. The layout below is the release's (``example.jsonl`` / ``example_result.jsonl``), byte for
byte:

system
    :data:`SYSTEM_PROMPT` (semantic format only), optionally followed by :data:`GLOSSARY`.
user ::

    Keyframe Description Sequence:
    - Keyframe One: <description of keyframe 1>
    - Keyframe Two: <description of keyframe 2>

    Background: <background>
    Emotion: <emotion>

    Task Instruction: Generate the facial expression parameters for Keyframe Two.

assistant (semantic)
    ``{"Keyframe_two":{"EyeBlinkLeft":0.0,...,"RightEyeRoll":0.0}}`` -- compact JSON, the 61 names
    in release order, the keyframe's number word in lower case.

Choices, each tested in ``tests/models/test_keyframe_lm.py``:

* **Target Frame Instruction** (§4) is the last user line, ``Task Instruction: Generate ... for
  Keyframe Two.``; ``target_frame_instruction=False`` drops it (with the blank line before it) for
  the ablation, so the K requests of a script become identical. The answer layout does not change.
* **Recursive generation** (§4, Algorithm 1) loops over the keyframes of a script; every request
  carries the *whole* description sequence, background and emotion, and the instruction names the
  target. The release's two requests do not contain earlier generated keyframes, so the K requests
  are independent: :func:`requests_for_script` returns them all and the generator batches them.
* **Semantic vs non-semantic** (§5.1): semantic = the release (system prompt naming the task, answer
  keyed by ARKit names, optional per-channel glossary in the system prompt); non-semantic = no system
  prompt and the answer is the bare vector ``[0.0, 0.2, ...]`` (61 values in release order, JSON with
  ``", "`` separators). The user message is the same in both: it never names parameters.
  ``glossary`` only applies to the semantic format (it would name the channels otherwise).
* **Numbers**: ``round(v, 2)`` written as Python's ``repr`` of that float (``0.0``, ``0.2``,
  ``0.25``, ``-0.1``, ``1.0``) -- the release's spelling; ``-0.0`` is written ``0.0``. Two decimals
  are a 0.01 grid (rounding error at most 0.005) and keep every value within 5 characters.
* **Number words**: keyframes 1-5 are ``One``..``Five`` (``keyframe_one`` .. in the answer key); a
  keyframe beyond five (never in the dataset) is written with digits.
* **Annotation** selects which description of each keyframe fills the sequence (``original``,
  ``arkit``, ``image``; §3). A keyframe without that annotation is an error, never a silent fallback.

``script`` arguments are :class:`facelab.data.keyframeface.Script` objects (or anything with
``script_id``, ``background``, ``emotion`` and ``keyframes`` whose items have ``descriptions`` and
``values``). Keyframe numbers ``k`` are 1-based, as ``Keyframe.index``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMATS = ("semantic", "non_semantic")
"""Answer formats of §5.1."""

SYSTEM_PROMPT = (
    "You are a professional facial animator. Generate all 61 ARKit facial parameters for exactly one "
    "requested semantic keyframe. The first 52 blendshapes are in [0,1], and the final 9 head/eye pose "
    'parameters are in [-1,1]. Return strict JSON only in the form {"Keyframe_x":{...}}.'
)
"""The release's system message (``example.jsonl``), verbatim."""

GLOSSARY_ENTRIES: tuple[tuple[str, str], ...] = (
    ("EyeBlinkLeft", "closing of the left eyelid (0 open, 1 closed)"),
    ("EyeLookDownLeft", "left eyelid following a downward gaze"),
    ("EyeLookInLeft", "left eyelid following a gaze toward the nose"),
    ("EyeLookOutLeft", "left eyelid following a gaze away from the nose"),
    ("EyeLookUpLeft", "left eyelid following an upward gaze"),
    ("EyeSquintLeft", "contraction of the face around the left eye (squint)"),
    ("EyeWideLeft", "widening of the left eyelids"),
    ("EyeBlinkRight", "closing of the right eyelid (0 open, 1 closed)"),
    ("EyeLookDownRight", "right eyelid following a downward gaze"),
    ("EyeLookInRight", "right eyelid following a gaze toward the nose"),
    ("EyeLookOutRight", "right eyelid following a gaze away from the nose"),
    ("EyeLookUpRight", "right eyelid following an upward gaze"),
    ("EyeSquintRight", "contraction of the face around the right eye (squint)"),
    ("EyeWideRight", "widening of the right eyelids"),
    ("JawForward", "forward thrust of the lower jaw"),
    ("JawRight", "lower jaw moving to the right"),
    ("JawLeft", "lower jaw moving to the left"),
    ("JawOpen", "opening of the lower jaw"),
    ("MouthClose", "lips closing while the jaw is open"),
    ("MouthFunnel", "lips forming an open funnel (an 'oo' shape)"),
    ("MouthPucker", "lips pushed forward and contracted (a kiss)"),
    ("MouthRight", "both lips moving to the right"),
    ("MouthLeft", "both lips moving to the left"),
    ("MouthSmileLeft", "left mouth corner pulled up (smile)"),
    ("MouthSmileRight", "right mouth corner pulled up (smile)"),
    ("MouthFrownLeft", "left mouth corner pulled down (frown)"),
    ("MouthFrownRight", "right mouth corner pulled down (frown)"),
    ("MouthDimpleLeft", "left mouth corner pulled back (dimple)"),
    ("MouthDimpleRight", "right mouth corner pulled back (dimple)"),
    ("MouthStretchLeft", "left mouth corner stretched sideways"),
    ("MouthStretchRight", "right mouth corner stretched sideways"),
    ("MouthRollLower", "lower lip rolled inward"),
    ("MouthRollUpper", "upper lip rolled inward"),
    ("MouthShrugLower", "lower lip pushed outward and up"),
    ("MouthShrugUpper", "upper lip pushed outward and up"),
    ("MouthPressLeft", "lips pressed together on the left side"),
    ("MouthPressRight", "lips pressed together on the right side"),
    ("MouthLowerDownLeft", "lower lip pulled down on the left side"),
    ("MouthLowerDownRight", "lower lip pulled down on the right side"),
    ("MouthUpperUpLeft", "upper lip raised on the left side"),
    ("MouthUpperUpRight", "upper lip raised on the right side"),
    ("BrowDownLeft", "left brow lowered (furrow)"),
    ("BrowDownRight", "right brow lowered (furrow)"),
    ("BrowInnerUp", "inner ends of both brows raised (worry)"),
    ("BrowOuterUpLeft", "outer end of the left brow raised"),
    ("BrowOuterUpRight", "outer end of the right brow raised"),
    ("CheekPuff", "both cheeks puffed outward"),
    ("CheekSquintLeft", "left cheek raised toward the eye"),
    ("CheekSquintRight", "right cheek raised toward the eye"),
    ("NoseSneerLeft", "left nostril raised (sneer)"),
    ("NoseSneerRight", "right nostril raised (sneer)"),
    ("TongueOut", "tongue stuck out"),
    ("HeadYaw", "head turned to one side or the other (-1 to 1)"),
    ("HeadPitch", "head tilted down (negative) or up (positive)"),
    ("HeadRoll", "head tilted toward a shoulder (-1 to 1)"),
    ("LeftEyeYaw", "left eyeball turned to one side or the other (-1 to 1)"),
    ("LeftEyePitch", "left eyeball looking down (negative) or up (positive)"),
    ("LeftEyeRoll", "left eyeball rolled about the line of sight (-1 to 1)"),
    ("RightEyeYaw", "right eyeball turned to one side or the other (-1 to 1)"),
    ("RightEyePitch", "right eyeball looking down (negative) or up (positive)"),
    ("RightEyeRoll", "right eyeball rolled about the line of sight (-1 to 1)"),
)
"""One short explanation per ARKit channel, in release order. Blendshape wording follows Apple's
ARFaceAnchor documentation; the pitch signs follow the release example (lowered gaze:
``HeadPitch -0.1``, ``LeftEyePitch -0.2``). The paper's glossary text is not released."""

GLOSSARY = "ARKit parameter glossary:\n" + "\n".join(f"{name}: {text}" for name, text in GLOSSARY_ENTRIES)
"""The glossary block appended (after a blank line) to the semantic system prompt when ``glossary``."""

_TASK = "Task Instruction: Generate the facial expression parameters for Keyframe {word}."


class PromptError(ValueError):
    """Bad prompt configuration or a script that cannot be written as a request."""


@dataclass(frozen=True)
class PromptConfig:
    """How requests and answers are written (one object per job; checked on construction)."""

    format: str = "semantic"
    """``"semantic"`` (release layout, answers keyed by ARKit names) or ``"non_semantic"`` (bare vector,
    no system prompt) -- §5.1."""
    annotation: str = "arkit"
    """Which description of each keyframe fills the sequence: ``original``, ``arkit`` or ``image`` (§3)."""
    glossary: bool = True
    """Append :data:`GLOSSARY` to the system prompt (semantic format only)."""
    target_frame_instruction: bool = True
    """Keep the ``Task Instruction`` line naming the target keyframe (§4); False is the ablation."""

    def __post_init__(self) -> None:
        from facelab.data.keyframeface import ANNOTATIONS

        problems = []
        if self.format not in FORMATS:
            problems.append(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.annotation not in ANNOTATIONS:
            problems.append(f"annotation must be one of {ANNOTATIONS}, got {self.annotation!r}")
        for name in ("glossary", "target_frame_instruction"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if problems:
            raise PromptError("PromptConfig: " + "; ".join(problems))

    @property
    def semantic(self) -> bool:
        return self.format == "semantic"


def keyframe_word(k: int) -> str:
    """``1 -> "One"`` .. ``5 -> "Five"``; digits beyond five."""
    from facelab.data.keyframeface import NUMBER_WORDS

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise PromptError(f"keyframe number must be an integer >= 1, got {k!r}")
    return NUMBER_WORDS[k - 1] if k <= len(NUMBER_WORDS) else str(int(k))


def keyframe_key(k: int) -> str:
    """The answer's wrapper key: ``Keyframe_two`` (number word in lower case, as the release)."""
    return f"Keyframe_{keyframe_word(k).lower()}"


def format_value(v: float) -> str:
    """One value as written in answers: ``repr(round(v, 2))``, ``-0.0`` as ``0.0``."""
    x = float(v)
    if not math.isfinite(x):
        raise PromptError(f"cannot write a non-finite value {x!r}")
    x = round(x, 2)
    return repr(x if x != 0.0 else 0.0)


def _description(script: Any, i: int, annotation: str) -> str:
    kf = script.keyframes[i]
    desc = kf.descriptions.get(annotation)
    if not isinstance(desc, str):
        raise PromptError(
            f"script {getattr(script, 'script_id', '?')!r} keyframe {i + 1}: no {annotation!r} "
            f"description (has {sorted(kf.descriptions)})"
        )
    return desc


def _check_k(script: Any, k: int) -> None:
    n = len(script.keyframes)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise PromptError(f"script {getattr(script, 'script_id', '?')!r}: keyframe {k!r} is not in 1..{n}")


def system_prompt(cfg: PromptConfig) -> str | None:
    """The system message of ``cfg`` (``None`` for the non-semantic format)."""
    if not cfg.semantic:
        return None
    return SYSTEM_PROMPT + ("\n\n" + GLOSSARY if cfg.glossary else "")


def user_message(script: Any, k: int, cfg: PromptConfig) -> str:
    """The user message for keyframe ``k`` (1-based) of ``script``, in the release layout."""
    _check_k(script, k)
    lines = ["Keyframe Description Sequence:"]
    lines += [
        f"- Keyframe {keyframe_word(i + 1)}: {_description(script, i, cfg.annotation)}"
        for i in range(len(script.keyframes))
    ]
    text = "\n".join(lines) + f"\n\nBackground: {script.background}\nEmotion: {script.emotion}"
    if cfg.target_frame_instruction:
        text += "\n\n" + _TASK.format(word=keyframe_word(k))
    return text


def build_messages(script: Any, k: int, cfg: PromptConfig) -> list[dict[str, str]]:
    """Chat messages of the request for keyframe ``k`` (1-based): ``[system,] user``."""
    messages = []
    system = system_prompt(cfg)
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user_message(script, k, cfg)})
    return messages


def requests_for_script(script: Any, cfg: PromptConfig) -> list[list[dict[str, str]]]:
    """Algorithm 1: one request per keyframe (k = 1..K), each with the whole script in context."""
    return [build_messages(script, k, cfg) for k in range(1, len(script.keyframes) + 1)]


def answer_skeleton(k: int, cfg: PromptConfig, n_values: int = 61) -> tuple[str, ...]:
    """The fixed text around the 61 values of an answer: ``n_values + 1`` pieces ``f`` with
    ``answer = f[0] + v[0] + f[1] + ... + v[60] + f[61]`` (what the constrained decoder forces)."""
    if cfg.semantic:
        from facelab.data.arkit import CHANNELS

        names = CHANNELS[:n_values]
        return (f'{{"{keyframe_key(k)}":{{"{names[0]}":', *(f',"{n}":' for n in names[1:]), "}}")
    return ("[", *([", "] * (n_values - 1)), "]")


def answer_text(values: Sequence[float] | np.ndarray, k: int, cfg: PromptConfig) -> str:
    """The answer for keyframe ``k`` (1-based) with ``values`` (61,) in release order."""
    from facelab.data.arkit import N_CHANNELS

    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (N_CHANNELS,):
        raise PromptError(f"answer for keyframe {k}: expected {N_CHANNELS} values, got shape {arr.shape}")
    pieces = answer_skeleton(k, cfg)
    return "".join(p + format_value(v) for p, v in zip(pieces, arr)) + pieces[-1]


def examples_for_script(script: Any, cfg: PromptConfig) -> list[tuple[list[dict[str, str]], str]]:
    """(request messages, answer text) for every keyframe of ``script`` -- the training pairs."""
    return [
        (build_messages(script, kf_i + 1, cfg), answer_text(kf.values, kf_i + 1, cfg))
        for kf_i, kf in enumerate(script.keyframes)
    ]
