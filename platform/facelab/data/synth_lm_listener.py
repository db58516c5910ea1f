"""Embedded synthetic LM-Listener corpus, written in the release's own format and then imported.

The LM-Listener data (Ng et al., ICCV 2023) come from talk-show videos and are not redistributable, so
the platform ships this generator for its ``lm_listener`` DVC stage. :func:`generate_release` writes a
directory laid out like one speaker's directory of the release (github.com/sanjayss34/lm-listener,
README "Data Preparation"): ``segments_train.pth`` / ``segments_val.pth`` (``torch.save`` of a list
of segment dicts with ``fname``, ``split_start_frame``, ``split_end_frame``, the listener's ``p0_exp``,
``p0_pose``, ``p0_shape``, the speaker's ``p1_exp``, ``p1_pose``, ``p1_shape``, and the speaker's
``before_words`` / ``during_words`` with timestamps) plus the ``mean.npy`` / ``std.npy`` statistics
files. :func:`build_lm_listener` then imports it with :func:`facelab.data.lm_listener_data.import_release`
-- the same code path as the real release. (``p0_detail``, DECA's detail code that only the release's
training loader reads, is not generated.)

Like the release: one conversation pair throughout (a single listener and a single speaker, fixed
identity codes), 30 fps, segments of 10-24 s cut from longer "episode" videos, so each episode
contributes two segments and the dev split can hold out whole videos.

**The speaker's words drive the listener's face.** The speaker talks in sentences built from
:data:`TEMPLATES`, each with one cue word of a :data:`CUES` category (a joke, bad news, a surprise,
an opinion to agree with). A fraction of a second after a cue word ends the listener reacts along that
category's expression direction (a laugh also opens the jaw rhythmically; agreement is a head nod),
rising and fading with the category's time constants; a sentence end sometimes earns a back-channel
nod. Underneath is smooth AR(1) motion. The speaker's mouth and jaw move at syllable rate while a
word is spoken. So a window's text (the words before and during it) predicts the listener's
expression, and the speaker's frames are coupled to the listener's -- what P-FD measures.

Scales: expression and jaw values use the per-dimension mean and std of the EmoAva release
(:data:`facelab.data.synth.RELEASE_MEAN` / ``RELEASE_STD``; both corpora are EMOCA FLAME codes), head
rotation a few hundredths of a radian. They are *not* calibrated to the LM-Listener release, whose
statistics are not available here. Generation is deterministic for its parameters (numpy PCG64,
values rounded to 4 decimals, ``torch.save`` into memory so the files carry no path-dependent name).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facelab.data import emoava
from facelab.data.emoava import DataError
from facelab.data.lm_listener_data import (
    DELAY_START,
    EXP_DIM,
    FPS,
    MAX_TIME_BEFORE,
    MIN_FRAMES,
    POSE_DIM,
    WINDOW,
    import_release,
)
from facelab.data.synth import RELEASE_MEAN, RELEASE_STD

GENERATOR_VERSION = 1
MARKER = "synthetic.json"
"""Provenance file in a generated release directory (how a re-run recognises its own output)."""
SHAPE_DIM = 100
_FEAT = EXP_DIM + POSE_DIM  # 56: exp | global rotation (3) | jaw (3)
_ROT = slice(EXP_DIM, EXP_DIM + 3)
_JAW = slice(EXP_DIM + 3, _FEAT)


@dataclass(frozen=True)
class Cue:
    """A category of speaker words and the listener's reaction to it (std units of the expression dims)."""

    words: tuple[str, ...]
    axes: tuple[tuple[int, float], ...]  # sparse expression direction over the 50 exp dims
    gain: float
    onset_s: float
    decay_s: float
    laugh: bool = False  # rhythmic jaw opening while the reaction lasts
    nod: bool = False  # a head nod (pitch) instead of a large expression


CUES: dict[str, Cue] = {
    "joke": Cue(
        words=("hilarious", "funny", "ridiculous", "absurd", "crazy"),
        axes=((0, 1.0), (2, 0.7), (9, 0.5), (5, -0.4)),
        gain=2.4,
        onset_s=0.25,
        decay_s=1.6,
        laugh=True,
    ),
    "bad_news": Cue(
        words=("sad", "terrible", "tragic", "awful", "painful"),
        axes=((0, -0.8), (1, -0.7), (4, 0.6), (12, 0.5)),
        gain=2.0,
        onset_s=0.8,
        decay_s=2.5,
    ),
    "surprise": Cue(
        words=("unbelievable", "shocking", "insane", "wild", "incredible"),
        axes=((3, 0.9), (7, 0.7), (2, -0.5), (14, 0.4)),
        gain=2.6,
        onset_s=0.12,
        decay_s=1.0,
    ),
    "opinion": Cue(
        words=("right", "exactly", "true", "obviously", "agree"),
        axes=((0, 0.3), (15, 0.3)),
        gain=0.6,
        onset_s=0.3,
        decay_s=1.2,
        nod=True,
    ),
}
"""Speaker cue words -> the listener's reaction."""

TEMPLATES = (
    "you know what was {cue} about {topic}",
    "so I told my {person} about {topic} and it was {cue}",
    "honestly the whole thing with {topic} was {cue}",
    "and then my {person} said {topic} is {cue}",
    "I mean {topic} is just {cue} you know",
    "we went to {topic} and it was {cue}",
    "my {person} thinks {topic} is {cue}",
    "it is {cue} because {topic} never changes",
)
_TOPICS = (
    "the election",
    "the airport",
    "the neighbour's dog",
    "the new phone",
    "the weather",
    "the dinner party",
    "high school",
    "the traffic",
    "the football game",
    "the hospital",
    "the wedding",
    "the internet",
)
_PERSONS = ("mom", "uncle", "friend", "boss", "roommate", "teacher", "doctor", "cousin")


def _direction(cue: Cue) -> np.ndarray:
    vec = np.zeros(EXP_DIM)
    for dim, weight in cue.axes:
        vec[dim] += weight
    return vec / math.sqrt(float((vec * vec).sum()))


@dataclass
class _Word:
    text: str
    start: float
    end: float
    cue: str | None
    sentence_end: bool


def _speech(rng: np.random.Generator, seconds: float) -> list[_Word]:
    """The speaker's timed words from 0 s to ``seconds``: sentences separated by pauses."""
    words: list[_Word] = []
    t = float(rng.uniform(0.2, 1.0))
    names = list(CUES)
    while t < seconds:
        category = names[int(rng.integers(len(names)))]
        cue_word = CUES[category].words[int(rng.integers(len(CUES[category].words)))]
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        sentence = template.format(
            cue="{cue}",
            topic=_TOPICS[int(rng.integers(len(_TOPICS)))],
            person=_PERSONS[int(rng.integers(len(_PERSONS)))],
        ).split()
        for i, token in enumerate(sentence):
            text = cue_word if token == "{cue}" else token
            duration = 0.10 + 0.055 * len(text) + float(rng.uniform(0.0, 0.08))
            words.append(
                _Word(text, round(t, 3), round(t + duration, 3), category if token == "{cue}" else None, False)
            )
            t += duration + float(rng.uniform(0.03, 0.12))
        words[-1].sentence_end = True
        t += float(rng.uniform(0.4, 1.4))
    return [w for w in words if w.end < seconds]


def _ar1(rng: np.random.Generator, n: int, dim: int, rho: float, sd: float) -> np.ndarray:
    """Stationary AR(1) noise, float64 ``(n, dim)``."""
    e = rng.standard_normal((n, dim)) * (sd * math.sqrt(1.0 - rho * rho))
    e[0] /= math.sqrt(1.0 - rho * rho)
    for t in range(1, n):
        e[t] += rho * e[t - 1]
    return e


def _episode(rng: np.random.Generator, n_frames: int) -> tuple[list[_Word], np.ndarray, np.ndarray]:
    """Words, listener frames and speaker frames (std units, ``(n_frames, 56)``) of one episode video."""
    words = _speech(rng, n_frames / FPS)
    t = np.arange(n_frames) / FPS
    listener = _ar1(rng, n_frames, _FEAT, 0.97, 0.35)
    speaker = _ar1(rng, n_frames, _FEAT, 0.95, 0.30)
    for w in words:
        i0, i1 = int(w.start * FPS), min(n_frames, int(math.ceil(w.end * FPS)))
        if i1 > i0:  # speaking: syllable-rate mouth and jaw motion
            phase = 2.0 * math.pi * float(rng.uniform(4.0, 6.0)) * (t[i0:i1] - w.start)
            speaker[i0:i1, _JAW.start] += 1.2 * (0.5 - 0.5 * np.cos(phase))
            speaker[i0:i1, 1] += 0.4 * np.sin(phase)
        if w.cue is not None:
            cue = CUES[w.cue]
            onset = w.end + float(rng.uniform(0.2, 0.6))
            dt = t - onset
            live = dt >= 0
            env = np.zeros(n_frames)
            env[live] = (1.0 - np.exp(-dt[live] / cue.onset_s)) * np.exp(-dt[live] / cue.decay_s)
            amp = cue.gain * float(rng.uniform(0.7, 1.3))
            listener[:, :EXP_DIM] += (amp * env)[:, None] * _direction(cue)[None, :]
            if cue.laugh:
                listener[:, _JAW.start] += amp * 0.6 * env * (0.5 - 0.5 * np.cos(2.0 * math.pi * 5.0 * dt))
                speaker[:, 0] += 0.3 * env  # the speaker smiles at their own joke
            if cue.nod:
                _nod(listener, t, onset, n=2)
        elif w.sentence_end and rng.random() < 0.5:  # back-channel nod
            _nod(listener, t, w.end + float(rng.uniform(0.1, 0.4)), n=1)
    return words, listener, speaker


def _nod(frames: np.ndarray, t: np.ndarray, at: float, n: int) -> None:
    """``n`` head nods (pitch down and up, 0.45 s each) starting at ``at`` seconds, added in place."""
    dt = t - at
    live = (dt >= 0) & (dt < 0.45 * n)
    frames[live, _ROT.start] += 2.5 * np.sin(2.0 * math.pi * dt[live] / 0.45) ** 2


def _scale(z: np.ndarray) -> np.ndarray:
    """Std units -> code values: expression and jaw with the EmoAva release statistics, head rotation in radians."""
    mean = np.asarray(RELEASE_MEAN, dtype=np.float64)
    std = np.asarray(RELEASE_STD, dtype=np.float64)
    out = np.empty_like(z)
    out[:, :EXP_DIM] = mean[:EXP_DIM] + std[:EXP_DIM] * z[:, :EXP_DIM]
    out[:, _ROT] = 0.04 * z[:, _ROT]
    out[:, _JAW] = mean[EXP_DIM:] + std[EXP_DIM:] * z[:, _JAW]
    return np.round(out, 4)


def _word_dicts(words: list[_Word]) -> list[dict]:
    return [{"text": w.text, "start": w.start, "end": w.end} for w in words]


def _segments(
    rng: np.random.Generator,
    n: int,
    split: str,
    min_frames: int,
    max_frames: int,
    shapes: tuple[np.ndarray, np.ndarray],
) -> list[dict]:
    """``n`` segment dicts of the release format, two per episode video."""
    import torch

    out: list[dict] = []
    episode = 0
    while len(out) < n:
        k = min(2, n - len(out))
        lengths = rng.integers(min_frames, max_frames + 1, size=k)
        gaps = rng.integers(60, 300, size=k)
        starts = np.cumsum(gaps + np.concatenate([[0], lengths[:-1]]))  # segment i starts after gap i
        total = int(starts[-1] + lengths[-1] + 30)
        words, listener, speaker = _episode(rng, total)
        listener, speaker = _scale(listener), _scale(speaker)
        fname = f"trevor_synthetic/{split}/{episode:03d}Episode/{episode:03d}Episode.mp4"
        for s, n_frames in zip(starts.tolist(), lengths.tolist()):
            e = s + n_frames
            t0, t1 = s / FPS, e / FPS

            def frames(x: np.ndarray, cols: slice) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(x[s:e, cols], dtype=np.float32))

            out.append(
                {
                    "fname": fname,
                    "split_start_frame": int(s),
                    "split_end_frame": int(e),
                    "p0_exp": frames(listener, slice(0, EXP_DIM)),
                    "p0_pose": frames(listener, slice(EXP_DIM, _FEAT)),
                    "p0_shape": torch.from_numpy(np.repeat(shapes[0][None], n_frames, axis=0)),
                    "p1_exp": frames(speaker, slice(0, EXP_DIM)),
                    "p1_pose": frames(speaker, slice(EXP_DIM, _FEAT)),
                    "p1_shape": torch.from_numpy(np.repeat(shapes[1][None], n_frames, axis=0)),
                    "before_words": _word_dicts([w for w in words if t0 - 10.0 < w.end <= t0]),
                    "during_words": _word_dicts([w for w in words if w.end > t0 and w.start < t1]),
                }
            )
        episode += 1
    return out


def _torch_bytes(obj: object) -> bytes:
    """``torch.save`` into memory: the zip's record prefix is then always ``archive/``, so equal data
    gives equal bytes whatever the file is called."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _is_generated_release(path: Path) -> bool:
    doc = emoava.json_object_or_none(Path(path) / MARKER)
    return doc is not None and doc.get("generator") == "facelab.data.synth_lm_listener.generate_release"


def generate_release(
    release_dir: Path,
    *,
    n_train: int = 16,
    n_val: int = 8,
    seed: int = 0,
    min_segment_frames: int = 300,
    max_segment_frames: int = 720,
    force: bool = False,
) -> dict:
    """Write a synthetic LM-Listener release (``segments_{train,val}.pth``, ``mean.npy``, ``std.npy``,
    ``p0_``/``p1_`` statistics and a ``synthetic.json`` provenance file) to ``release_dir``.

    ``n_train`` / ``n_val`` segments of ``min_segment_frames``..``max_segment_frames`` frames at 30 fps.
    ``release_dir`` must not exist, be empty or be an earlier output of this function, unless ``force``.
    Returns the generator parameters.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 2 <= min_segment_frames <= max_segment_frames:
        raise ValueError(
            f"need 2 <= min_segment_frames <= max_segment_frames, got {min_segment_frames}, {max_segment_frames}"
        )
    release_dir = Path(release_dir)
    emoava.claim_output_dir(
        release_dir, owned=_is_generated_release, what="a synthetic LM-Listener release", marker=MARKER, force=force
    )
    root = np.random.SeedSequence(seed)
    shape_ss, train_ss, val_ss = root.spawn(3)
    shape_rng = np.random.default_rng(shape_ss)
    shapes = (
        np.round(shape_rng.standard_normal(SHAPE_DIM), 4).astype(np.float32),
        np.round(shape_rng.standard_normal(SHAPE_DIM), 4).astype(np.float32),
    )
    splits = {
        "train": _segments(
            np.random.default_rng(train_ss), n_train, "train", min_segment_frames, max_segment_frames, shapes
        ),
        "val": _segments(np.random.default_rng(val_ss), n_val, "val", min_segment_frames, max_segment_frames, shapes),
    }
    release_dir.mkdir(parents=True, exist_ok=True)
    for split, segments in splits.items():
        data = _torch_bytes(segments)
        emoava._atomic_write(release_dir / f"segments_{split}.pth", lambda fh, data=data: fh.write(data))
    for person in ("p0", "p1"):  # the release's statistics files (56-d exp | pose over the training split)
        feats = np.concatenate(
            [np.concatenate([s[f"{person}_exp"].numpy(), s[f"{person}_pose"].numpy()], 1) for s in splits["train"]]
        ).astype(np.float64)
        stats = {"mean": feats.mean(axis=0), "std": feats.std(axis=0)}
        for key, value in stats.items():
            buf = io.BytesIO()
            np.save(buf, np.round(value, 6).astype(np.float32), allow_pickle=False)
            names = [f"{person}_{key}.npy"] + ([f"{key}.npy"] if person == "p0" else [])
            for fname in names:
                emoava._atomic_write(release_dir / fname, lambda fh, b=buf.getvalue(): fh.write(b))
    params = {
        "seed": int(seed),
        "n_train": int(n_train),
        "n_val": int(n_val),
        "min_segment_frames": int(min_segment_frames),
        "max_segment_frames": int(max_segment_frames),
        "cues": sorted(CUES),
    }
    marker = {
        "generator": "facelab.data.synth_lm_listener.generate_release",
        "generator_version": GENERATOR_VERSION,
        "fps": FPS,
        "params": params,
    }
    emoava._write_json(release_dir / MARKER, marker)
    return params


def build_lm_listener(
    out_dir: Path,
    *,
    release_dir: Path | None = None,
    n_train: int = 16,
    n_val: int = 8,
    seed: int = 0,
    min_segment_frames: int = 300,
    max_segment_frames: int = 720,
    window: int = WINDOW,
    delay_start: int = DELAY_START,
    min_frames: int = MIN_FRAMES,
    max_time_before: float = MAX_TIME_BEFORE,
    dev_fraction: float = 0.1,
    force: bool = False,
) -> dict:
    """The ``lm_listener`` DVC stage: :func:`generate_release` into ``release_dir`` (default: ``out_dir``'s
    sibling ``<name>_release``), then :func:`~facelab.data.lm_listener_data.import_release` of it into
    ``out_dir`` (train/dev/test windows, speaker frames, stats). Both directories are claimed before any
    work (see :func:`facelab.data.emoava.claim_output_dir`). Returns the import's summary with the
    generator parameters."""
    from facelab.data.lm_listener_data import claim_lm_listener_output

    out_dir = Path(out_dir)
    release_dir = Path(release_dir) if release_dir is not None else out_dir.with_name(out_dir.name + "_release")
    if release_dir.resolve() == out_dir.resolve():
        raise DataError(f"{out_dir}: the release directory and the output directory must differ")
    claim_lm_listener_output(out_dir, force)
    params = generate_release(
        release_dir,
        n_train=n_train,
        n_val=n_val,
        seed=seed,
        min_segment_frames=min_segment_frames,
        max_segment_frames=max_segment_frames,
        force=force,
    )
    summary = import_release(
        release_dir,
        out_dir,
        window=window,
        delay_start=delay_start,
        min_frames=min_frames,
        max_time_before=max_time_before,
        dev_fraction=dev_fraction,
        force=force,
        source="synthetic",
        provenance={"generator": "facelab.data.synth_lm_listener", "generator_version": GENERATOR_VERSION, **params},
    )
    summary["release_dir"] = str(release_dir)
    summary["params"] = params
    return summary
