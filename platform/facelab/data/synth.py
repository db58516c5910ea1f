"""Embedded synthetic EmoAva corpus: text -> 53-d expression sequences, calibrated to the release.

The real EmoAva training data are not redistributable, so the platform ships this generator. It
writes a corpus in exactly the on-disk format of :mod:`facelab.data.emoava` and is calibrated to the
release on every number we can check:

* per-dimension mean / std equal the release's ``stage1_mean.npy`` / ``stage1_std.npy`` (embedded
  below as :data:`RELEASE_MEAN` / :data:`RELEASE_STD`; ``stats_dir`` may override them);
* sequence lengths average ~52 frames at 25 fps with ~1.2 % longer than 256 frames (paper: 782,471
  frames / 15,000 sequences, 184 over 256);
* ~15 % of instances share their text with other instances (paper: 2,270 one-to-many instances,
  N from 2 to 76 sequences per text);
* the test split reproduces the paper's ground-truth row (Table 2: DoT 9.24, FgD 1.26,
  Variation 0.28, as defined in :mod:`facelab.tasks.expressions.metrics`).

**The text really determines the expression.** Every sentence contains one emotion word from
:data:`EMOTIONS` and optionally an intensity adverb from :data:`INTENSITIES`. The emotion fixes a
direction in the 53-d space (in units of the per-dimension std) and its dynamics (onset speed,
relaxation after the apex, oscillation); the adverb scales the offset. On top come a per-sequence
idiosyncratic offset (speaker / style), speech-rate mouth motion, and AR(1) noise that gives the
sequences their temporal smoothness. :func:`parse_text` recovers ``(emotion, intensity)`` from a
sentence, so tests and probes can check what a model learned.

Generation is deterministic for a seed and byte-stable across machines: it uses only numpy's
PCG64 generator and element-wise float64 arithmetic (no BLAS), rounds every value to 4 decimals
before saving, and writes ``.npz`` files with fixed zip metadata.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facelab.data.emoava import (
    EXPR_DIM,
    DataError,
    EmoAvaSplit,
    claim_emoava_output,
    load_stats,
    save_split,
    save_stats,
    summarize,
    write_meta,
)

GENERATOR_VERSION = 1

# Per-dimension mean and std of the EmoAva release expression codes (stage1_mean.npy /
# stage1_std.npy, float32 [53]: 50 FLAME expression coefficients + 3 jaw pose values). These are
# dataset statistics, embedded so the generator needs no download.
RELEASE_MEAN: tuple[float, ...] = (
    0.44357138872146606,
    0.6243296265602112,
    0.48958468437194824,
    1.0208576917648315,
    -0.6485021710395813,
    -0.71254563331604,
    -1.1232353448867798,
    0.3859899938106537,
    -0.4834526777267456,
    0.4822261929512024,
    0.5454195737838745,
    1.2780773639678955,
    -1.3052563667297363,
    1.615800142288208,
    0.5098908543586731,
    -0.3943757116794586,
    -0.5400627255439758,
    -1.125939130783081,
    -0.8928267955780029,
    0.830346405506134,
    0.7316847443580627,
    -0.8427643775939941,
    -0.062305595725774765,
    -1.510060429573059,
    0.15260541439056396,
    0.33888861536979675,
    -0.26410818099975586,
    -0.24144230782985687,
    -0.2880841791629791,
    -0.08794862776994705,
    -0.6160391569137573,
    -1.3466628789901733,
    0.449407696723938,
    -1.351900339126587,
    0.0931759774684906,
    -0.9425095915794373,
    0.03156650811433792,
    -0.1440144032239914,
    0.06400512158870697,
    0.40577343106269836,
    -0.23711997270584106,
    0.7572982907295227,
    0.19338293373584747,
    -0.5530006289482117,
    -0.3769773542881012,
    0.36928045749664307,
    -0.4291017949581146,
    0.9175972938537598,
    0.9830336570739746,
    0.7715225219726562,
    0.03433689475059509,
    0.007029795087873936,
    -0.006891939323395491,
)
RELEASE_STD: tuple[float, ...] = (
    0.8584180474281311,
    0.9393919110298157,
    0.9187402725219727,
    0.8669680953025818,
    0.9722288846969604,
    0.9281131625175476,
    0.9052254557609558,
    1.4966650009155273,
    1.0327200889587402,
    1.078420877456665,
    1.244823932647705,
    1.4506508111953735,
    1.1915289163589478,
    1.2361091375350952,
    1.0546214580535889,
    1.3670880794525146,
    0.7822767496109009,
    0.8091922998428345,
    0.8102670311927795,
    0.9736381769180298,
    0.840794026851654,
    0.8916135430335999,
    0.9646192193031311,
    0.7631752490997314,
    1.1388694047927856,
    0.8695557117462158,
    0.5745407938957214,
    0.9195977449417114,
    0.9023877382278442,
    0.9168866276741028,
    1.2061831951141357,
    1.0256092548370361,
    0.7762557864189148,
    0.8825202584266663,
    0.7234287261962891,
    0.5894486904144287,
    1.2700029611587524,
    0.6260905861854553,
    0.6324986815452576,
    0.7261790633201599,
    0.7454733848571777,
    0.7417905330657959,
    0.9282845854759216,
    0.5296012759208679,
    0.5926299095153809,
    0.6629179120063782,
    0.9352853894233704,
    0.7251492142677307,
    1.4354534149169922,
    0.9507150053977966,
    0.06488580256700516,
    0.019918475300073624,
    0.04465244337916374,
)


# --------------------------------------------------------------------------------------------
# Vocabulary: emotions, intensities, sentence templates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmotionSpec:
    """How one emotion shows on the face, in units of the per-dimension std.

    ``axes`` is a sparse direction ``((dim, weight), ...)`` (normalised to unit length by
    :meth:`direction`); the offset at intensity ``k`` is ``gain * k * direction``. Over time the
    offset ramps in with time constant ``onset_s`` seconds, then fades by ``relax`` (fraction of
    the apex, time constant 1 s), and oscillates along the same direction at ``osc_hz`` with
    relative amplitude ``osc_amp``. The dimensions are synthetic, not FLAME semantics.
    """

    words: tuple[str, ...]
    axes: tuple[tuple[int, float], ...]
    gain: float
    onset_s: float
    relax: float
    osc_hz: float
    osc_amp: float

    def direction(self) -> np.ndarray:
        """Unit-norm direction, float64 ``(53,)``."""
        vec = np.zeros(EXPR_DIM, dtype=np.float64)
        for dim, weight in self.axes:
            vec[dim] += weight
        return vec / math.sqrt(float((vec * vec).sum()))

    def offset(self, intensity: float = 1.0) -> np.ndarray:
        """Apex offset at ``intensity``, in std units, float64 ``(53,)``."""
        return self.gain * intensity * self.direction()


EMOTIONS: dict[str, EmotionSpec] = {
    "happy": EmotionSpec(
        words=("happy", "glad", "delighted", "thrilled"),
        axes=((0, 1.0), (2, 0.7), (5, -0.5), (9, 0.5), (50, 0.4)),
        gain=2.6,
        onset_s=0.40,
        relax=0.0,
        osc_hz=1.5,
        osc_amp=0.25,
    ),
    "sad": EmotionSpec(
        words=("sad", "upset", "heartbroken", "miserable"),
        axes=((0, -0.8), (1, -0.7), (4, 0.6), (12, 0.5), (17, -0.4)),
        gain=2.4,
        onset_s=1.20,
        relax=0.0,
        osc_hz=0.3,
        osc_amp=0.05,
    ),
    "angry": EmotionSpec(
        words=("angry", "furious", "mad", "annoyed"),
        axes=((1, 0.9), (3, -0.7), (6, 0.6), (10, -0.5), (52, 0.3)),
        gain=2.6,
        onset_s=0.25,
        relax=0.0,
        osc_hz=2.0,
        osc_amp=0.15,
    ),
    "surprised": EmotionSpec(
        words=("surprised", "shocked", "amazed", "stunned"),
        axes=((2, -0.6), (3, 0.9), (7, 0.7), (50, 0.8), (14, 0.4)),
        gain=2.8,
        onset_s=0.12,
        relax=0.5,
        osc_hz=0.5,
        osc_amp=0.05,
    ),
    "afraid": EmotionSpec(
        words=("afraid", "scared", "terrified", "nervous"),
        axes=((1, 0.5), (4, -0.8), (7, 0.5), (11, 0.6), (19, -0.5)),
        gain=2.4,
        onset_s=0.30,
        relax=0.0,
        osc_hz=3.0,
        osc_amp=0.20,
    ),
    "disgusted": EmotionSpec(
        words=("disgusted", "repulsed", "sickened", "revolted"),
        axes=((5, 0.9), (6, -0.6), (8, 0.7), (13, -0.5), (21, 0.4)),
        gain=2.4,
        onset_s=0.50,
        relax=0.0,
        osc_hz=0.8,
        osc_amp=0.10,
    ),
    "calm": EmotionSpec(
        words=("calm", "relaxed", "peaceful", "serene"),
        axes=((0, 0.3), (9, -0.3), (15, 0.3), (16, -0.2)),
        gain=0.8,
        onset_s=1.50,
        relax=0.0,
        osc_hz=0.2,
        osc_amp=0.03,
    ),
}
"""Emotion vocabulary -> encoded expression (direction, gain, dynamics)."""

INTENSITIES: dict[str, float] = {
    "slightly": 0.5,
    "somewhat": 0.75,
    "quite": 1.0,
    "really": 1.3,
    "very": 1.45,
    "extremely": 1.8,
}
"""Intensity adverbs (placed right before the emotion word) -> offset scale; no adverb = 1.0."""

_ADVERB_CHOICES = ("", "", "slightly", "somewhat", "quite", "really", "very", "extremely")

# Each template has exactly one {emo} slot, preceded by the {adv} slot; no other template word
# is an emotion word or an intensity adverb. {topic} / {event} / {name} give combinatorial room.
_TEMPLATES = (
    "I am {adv}{emo} about {topic} right now.",
    "Honestly, {name} looked {adv}{emo} when {event}.",
    "You know, I feel {adv}{emo} every time {event}.",
    "Wait, why are you {adv}{emo} about {topic} today?",
    "We were all {adv}{emo} when we heard about {topic}.",
    "Oh my god, I am {adv}{emo}, {event}!",
    "To be honest, {topic} makes me {adv}{emo}.",
    "Everyone at the party was {adv}{emo} about {topic}.",
    "{name}, stop it, you are making me {adv}{emo}.",
    "When {event}, I got {adv}{emo} for a moment.",
    "My mother was {adv}{emo} when she saw {topic}.",
    "I guess {name} is just {adv}{emo} about the whole thing.",
    "Please tell {name} that I am {adv}{emo} about {topic}.",
    "{name} and I were {adv}{emo} after {event}.",
    "Seriously, I cannot help feeling {adv}{emo} about {topic}.",
    "Look at {name}, he is {adv}{emo} because {event}.",
    "I was {adv}{emo} the moment {event}.",
    "Do not tell me you are {adv}{emo} about {topic} again.",
    "So {name} called, and she sounded {adv}{emo} on the phone.",
    "After all these years, {topic} still leaves me {adv}{emo}.",
)
_TOPICS = (
    "the new apartment",
    "the job interview",
    "the wedding plans",
    "the test results",
    "the trip to Vegas",
    "the coffee shop",
    "the old photos",
    "the birthday dinner",
    "the museum job",
    "the audition",
    "the baby",
    "my brother's car",
    "the lottery ticket",
    "the neighbours",
    "that documentary",
    "the final exam",
    "your haircut",
    "the breakup",
    "the promotion",
    "the dinosaur exhibit",
    "the hospital bill",
    "the road trip",
    "the soap opera",
    "the thanksgiving turkey",
    "the holiday party",
)
_EVENTS = (
    "the lights went out",
    "the phone rang",
    "the results came in",
    "we opened the door",
    "the meeting ended",
    "Alex walked in",
    "the music stopped",
    "I read the message",
    "the plane landed",
    "the dog ran off",
    "the boss showed up",
    "the cake fell over",
    "she said yes",
    "he left the room",
    "the letter arrived",
    "the movie ended",
    "we got the keys",
    "the doctor called back",
    "the train was late",
    "they told the truth",
)
_NAMES = (
    "Alex",
    "Sam",
    "Jordan",
    "Taylor",
    "Morgan",
    "Riley",
    "Casey",
    "Jamie",
    "Chris",
    "Pat",
    "Robin",
    "Drew",
)

_WORD_TO_EMOTION = {w: name for name, spec in EMOTIONS.items() for w in spec.words}
_TOKEN_RE = re.compile(r"[a-z']+")


def parse_text(text: str) -> tuple[str, float] | None:
    """``(emotion, intensity)`` encoded in a generated sentence, or ``None`` if it has no emotion word.

    The first emotion word found decides the emotion; an adverb from :data:`INTENSITIES` right
    before it sets the intensity (1.0 without one).
    """
    tokens = _TOKEN_RE.findall(text.lower())
    for i, tok in enumerate(tokens):
        emotion = _WORD_TO_EMOTION.get(tok)
        if emotion is not None:
            intensity = INTENSITIES.get(tokens[i - 1], 1.0) if i > 0 else 1.0
            return emotion, intensity
    return None


# --------------------------------------------------------------------------------------------
# Calibration constants (tuned so the default test split matches the paper's GT row). Lengths,
# _NOISE_RHO and _SMOOTH are per frame and were calibrated at 25 fps; emotion and speech dynamics
# are in seconds and follow ``fps``.
# --------------------------------------------------------------------------------------------

_LEN_MEDIAN = 36.2  # frames; log-normal length model ...
_LEN_SIGMA = 0.86  # ... gives mean ~52 and ~1.2 % over 256 frames
_LEN_WORD_EXP = 0.5  # longer sentences -> longer sequences: T ~ (words / 11) ** 0.5
_LEN_MIN, _LEN_MAX = 8, 640
_GROUP_ALPHA = 2.3  # one-to-many group sizes N in [2, 76], P(N) ~ N ** -alpha
_GROUP_MAX = 76
_STYLE_SD = 0.83  # per-sequence idiosyncratic offset (speaker / style), std units
_STYLE_SPREAD = 0.65  # log-normal spread of per-sequence expressiveness (scales style offset)
_NOISE_SD = 1.10  # stationary std of the AR(1) within-sequence motion
_NOISE_RHO = 0.87  # lag-1 autocorrelation of that motion at 25 fps (drift)
_SMOOTH = 0.62  # exponential-moving-average factor applied on top (smoothness)
_SPEECH_AXES = ((50, 1.0), (0, 0.4), (3, 0.3), (7, 0.3))
_SPEECH_GAIN = 0.55  # mouth motion while talking, along _SPEECH_AXES
_SPEECH_HZ = (2.5, 4.5)  # syllable-rate range
_RELAX_S = 1.0  # time constant of the post-apex relaxation


@dataclass
class _Plan:
    """Texts and per-sequence conditioning of one split."""

    texts: list[str]
    emotion: np.ndarray  # int (n,) index into EMOTIONS
    intensity: np.ndarray  # float (n,)
    lengths: np.ndarray  # int64 (n,)


def _draw_sentence(u: np.ndarray) -> tuple[str, int, float]:
    """Build one sentence from 7 uniforms in [0, 1)."""
    names = list(EMOTIONS)

    def pick(seq, x):
        return seq[min(int(x * len(seq)), len(seq) - 1)]

    template = pick(_TEMPLATES, u[0])
    emo_idx = min(int(u[1] * len(names)), len(names) - 1)
    spec = EMOTIONS[names[emo_idx]]
    word = pick(spec.words, u[2])
    adverb = pick(_ADVERB_CHOICES, u[3])
    text = template.format(
        adv=f"{adverb} " if adverb else "",
        emo=word,
        topic=pick(_TOPICS, u[4]),
        event=pick(_EVENTS, u[5]),
        name=pick(_NAMES, u[6]),
    )
    return text, emo_idx, INTENSITIES.get(adverb, 1.0)


def _group_sizes(rng: np.random.Generator, n_shared: int) -> list[int]:
    """Sizes (>= 2, <= 76) of one-to-many groups whose sum is ``n_shared`` (0 or >= 2)."""
    sizes = np.arange(2, _GROUP_MAX + 1)
    p = sizes.astype(np.float64) ** -_GROUP_ALPHA
    p /= p.sum()
    out: list[int] = []
    left = n_shared
    while left >= 2:
        size = int(rng.choice(sizes, p=p))
        size = min(size, left)
        if left - size == 1:  # never leave a single instance behind
            size = size + 1 if size < _GROUP_MAX else size - 1
        out.append(size)
        left -= size
    return out


def _plan_split(rng: np.random.Generator, n: int, one_to_many_frac: float, mean_len: float, used: set[str]) -> _Plan:
    """Texts (unique across the corpus except one-to-many groups), conditioning and lengths."""
    n_shared = int(round(one_to_many_frac * n))
    if n_shared == 1:
        n_shared = 2 if n >= 2 else 0
    groups = _group_sizes(rng, n_shared)
    n_unique = n - sum(groups)
    texts: list[str] = []
    emotion: list[int] = []
    intensity: list[float] = []

    def fresh() -> tuple[str, int, float]:
        while True:
            text, e, k = _draw_sentence(rng.random(7))
            if text not in used:
                used.add(text)
                return text, e, k

    for size in groups:
        text, e, k = fresh()
        texts += [text] * size
        emotion += [e] * size
        intensity += [k] * size
    for _ in range(n_unique):
        text, e, k = fresh()
        texts.append(text)
        emotion.append(e)
        intensity.append(k)

    order = rng.permutation(n)
    texts = [texts[i] for i in order]
    emo = np.asarray(emotion, dtype=np.int64)[order]
    inten = np.asarray(intensity, dtype=np.float64)[order]

    words = np.fromiter((len(t.split()) for t in texts), dtype=np.float64, count=n)
    median = _LEN_MEDIAN * mean_len / 52.0
    log_len = np.log(median) + _LEN_WORD_EXP * np.log(words / 11.0) + _LEN_SIGMA * rng.standard_normal(n)
    lengths = np.clip(np.rint(np.exp(log_len)), _LEN_MIN, _LEN_MAX).astype(np.int64)
    return _Plan(texts=texts, emotion=emo, intensity=inten, lengths=lengths)


def _synthesize(rng: np.random.Generator, plan: _Plan, fps: int) -> np.ndarray:
    """Raw expression frames in std units (before standardisation), float64 ``(sum T_i, 53)``."""
    n = len(plan.texts)
    if n == 0:
        return np.zeros((0, EXPR_DIM), dtype=np.float64)
    lengths = plan.lengths
    total = int(lengths.sum())
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    seq_id = np.repeat(np.arange(n), lengths)  # (N,)
    t = np.arange(total, dtype=np.float64) - np.repeat(offsets[:-1], lengths)  # frame index in sequence

    # 1. within-sequence motion: AR(1) drift with a stationary start, x[t] = rho x[t-1] + e[t],
    #    then smoothed by an exponential moving average, y[t] = s y[t-1] + (1 - s) x[t]
    z = rng.standard_normal((total, EXPR_DIM))  # (N, 53)
    z *= _NOISE_SD * math.sqrt(1.0 - _NOISE_RHO**2)
    z[offsets[:-1]] *= 1.0 / math.sqrt(1.0 - _NOISE_RHO**2)
    by_len = np.argsort(-lengths, kind="stable")
    starts_sorted, len_sorted = offsets[:-1][by_len], lengths[by_len]
    active = np.searchsorted(-len_sorted, -np.arange(1, int(lengths.max())), side="left")  # seqs longer than t
    for step, count in enumerate(active, start=1):
        rows = starts_sorted[:count] + step
        z[rows] += _NOISE_RHO * z[rows - 1]
    for step, count in enumerate(active, start=1):
        rows = starts_sorted[:count] + step
        z[rows] *= 1.0 - _SMOOTH
        z[rows] += _SMOOTH * z[rows - 1]

    # 2. per-sequence idiosyncratic offset, scaled by a log-normal expressiveness
    scale = np.exp(_STYLE_SPREAD * rng.standard_normal(n) - _STYLE_SPREAD**2)  # (n,)
    style = rng.standard_normal((n, EXPR_DIM)) * (_STYLE_SD * scale)[:, None]  # (n, 53)
    z += style[seq_id]

    # 3. emotion: offset from the text, with the emotion's onset / relaxation / oscillation
    specs = list(EMOTIONS.values())
    directions = np.stack([s.gain * s.direction() for s in specs])  # (E, 53)
    onset = np.array([s.onset_s for s in specs])[plan.emotion] * fps  # (n,) frames
    relax = np.array([s.relax for s in specs])[plan.emotion]
    osc_hz = np.array([s.osc_hz for s in specs])[plan.emotion]
    osc_amp = np.array([s.osc_amp for s in specs])[plan.emotion]
    phase = rng.random(n) * (2.0 * math.pi)
    envelope = (
        (1.0 - np.exp(-(t + 1.0) / onset[seq_id]))
        * (1.0 - relax[seq_id] * (1.0 - np.exp(-t / (_RELAX_S * fps))))
        * (1.0 + osc_amp[seq_id] * np.sin(2.0 * math.pi * osc_hz[seq_id] * t / fps + phase[seq_id]))
    )
    envelope *= plan.intensity[seq_id]  # (N,)
    emo = directions[plan.emotion][seq_id]  # (N, 53)
    emo *= envelope[:, None]
    z += emo
    del emo

    # 4. speech: syllable-rate mouth motion with a per-sequence rate, phase and loudness
    rate = _SPEECH_HZ[0] + (_SPEECH_HZ[1] - _SPEECH_HZ[0]) * rng.random(n)
    loud = _SPEECH_GAIN * (0.5 + rng.random(n))
    sphase = rng.random(n) * (2.0 * math.pi)
    wave = loud[seq_id] * np.sin(2.0 * math.pi * rate[seq_id] * t / fps + sphase[seq_id])  # (N,)
    for dim, weight in _SPEECH_AXES:
        z[:, dim] += weight * wave
    return z


def _load_target_stats(stats_dir: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    if stats_dir is None:
        return np.asarray(RELEASE_MEAN, dtype=np.float64), np.asarray(RELEASE_STD, dtype=np.float64), "embedded-release"
    stats_dir = Path(stats_dir)
    mean_npy, std_npy = stats_dir / "stage1_mean.npy", stats_dir / "stage1_std.npy"
    if mean_npy.is_file() and std_npy.is_file():
        try:
            mean = np.load(mean_npy, allow_pickle=False).astype(np.float64).reshape(-1)
            std = np.load(std_npy, allow_pickle=False).astype(np.float64).reshape(-1)
        except (OSError, ValueError) as exc:
            raise DataError(f"{stats_dir}: unreadable stage1_mean.npy / stage1_std.npy: {exc}") from None
        if mean.shape != (EXPR_DIM,) or std.shape != (EXPR_DIM,) or not (std > 0).all():
            raise DataError(f"{stats_dir}: stage1_mean/std must be [{EXPR_DIM}] with std > 0")
        return mean, std, "stats_dir:release-npy"
    mean32, std32 = load_stats(stats_dir)
    return mean32.astype(np.float64), std32.astype(np.float64), "stats_dir:stats.json"


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return h.hexdigest()[:16]


def generate_emoava(
    out_dir: Path,
    *,
    n_train: int = 12000,
    n_dev: int = 1500,
    n_test: int = 1500,
    seed: int = 0,
    fps: int = 25,
    mean_len: float = 52.0,
    one_to_many_frac: float = 0.15,
    stats_dir: Path | None = None,
    force: bool = False,
) -> dict:
    """Write a synthetic EmoAva corpus (train/dev/test splits, ``stats.json``, ``meta.json``) to ``out_dir``.

    ``mean_len`` sets the average sequence length in frames (the length model keeps a ~1.2 % tail
    past 256 frames at the default); ``one_to_many_frac`` is the fraction of instances whose text is
    shared by 2 to 76 sequences of the same split; all other texts are unique across the corpus.
    ``stats_dir`` replaces the embedded release statistics with a directory's ``stage1_mean.npy`` /
    ``stage1_std.npy`` or ``stats.json``. The corpus is standardised so that, over all its frames,
    every dimension has exactly the target mean and std; ``stats.json`` stores the train split's
    own statistics (as the release's were computed from its data). ``out_dir`` must not exist, be
    empty or hold an EmoAva dataset written here -- e.g. this stage's previous output -- unless
    ``force`` (see :func:`facelab.data.emoava.claim_output_dir`). Returns :func:`summarize` of the
    written directory plus the generator parameters.
    """
    counts = {"train": n_train, "dev": n_dev, "test": n_test}
    for name, n in counts.items():
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n_{name} must be a non-negative integer, got {n!r}")
    if sum(counts.values()) < 2:
        raise ValueError("need at least 2 sequences in total")
    if not 0.0 <= one_to_many_frac < 1.0:
        raise ValueError(f"one_to_many_frac must be in [0, 1), got {one_to_many_frac}")
    if fps <= 0 or mean_len <= 1.0:
        raise ValueError("fps must be > 0 and mean_len > 1")
    claim_emoava_output(Path(out_dir), force)  # before the work: a wrong --out fails at once
    target_mean, target_std, stats_source = _load_target_stats(stats_dir)

    root = np.random.SeedSequence(seed)
    plan_seeds = root.spawn(len(counts))
    used: set[str] = set()
    plans: dict[str, _Plan] = {}
    raw: dict[str, np.ndarray] = {}
    for (name, n), ss in zip(counts.items(), plan_seeds):
        text_ss, frame_ss = ss.spawn(2)
        plans[name] = _plan_split(np.random.default_rng(text_ss), n, one_to_many_frac, mean_len, used)
        raw[name] = _synthesize(np.random.default_rng(frame_ss), plans[name], fps)

    # Standardise over the whole corpus, then map onto the target statistics. The constants are
    # rounded to 1e-9 so that summation-order differences between machines cannot leak into the bytes.
    n_frames = sum(len(z) for z in raw.values())
    mu = np.round(sum(z.sum(axis=0) for z in raw.values()) / n_frames, 9)  # (53,)
    var = sum(np.square(z - mu).sum(axis=0) for z in raw.values()) / n_frames
    sd = np.round(np.sqrt(var), 9)
    a = np.round(target_std / sd, 9)
    for name, z in raw.items():
        z -= mu
        z *= a
        z += target_mean
        np.round(z, 4, out=z)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, plan in plans.items():
        frames = raw[name].astype(np.float32)  # (N, 53)
        bounds = np.cumsum(plan.lengths)[:-1]
        split = EmoAvaSplit(texts=plan.texts, sequences=list(np.split(frames, bounds)) if len(plan.texts) else [])
        save_split(split, out_dir, name)

    stat_frames = raw["train"] if len(raw["train"]) else np.concatenate(list(raw.values()))
    stat_frames = stat_frames.astype(np.float32).astype(np.float64)
    save_stats(out_dir, np.round(stat_frames.mean(axis=0), 6), np.round(stat_frames.std(axis=0), 6))

    params = {
        "seed": int(seed),
        "fps": int(fps),
        "mean_len": float(mean_len),
        "one_to_many_frac": float(one_to_many_frac),
        "n_train": int(n_train),
        "n_dev": int(n_dev),
        "n_test": int(n_test),
        "stats_source": stats_source,
        "stats_digest": _digest(target_mean, target_std),
        "emotions": sorted(EMOTIONS),
        "intensities": dict(sorted(INTENSITIES.items())),
    }
    write_meta(
        out_dir,
        {
            "source": "synthetic",
            "generator": "facelab.data.synth.generate_emoava",
            "generator_version": GENERATOR_VERSION,
            "expr_dim": EXPR_DIM,
            "fps": int(fps),
            "counts": {k: int(v) for k, v in counts.items()},
            "params": params,
        },
    )
    summary = summarize(out_dir)
    summary["params"] = params
    return summary
