"""Describe a KeyframeFace-format dataset: the statistics and the paper's dataset figures.

KeyframeFace (Wu et al., "KeyframeFace: From Text to Expressive Facial Keyframes", arXiv 2512.11321)
describes its dataset in four figures; :func:`describe` draws them for any dataset directory in the
platform's format (:mod:`facelab.data.keyframeface`: the synthetic corpus, an imported release):

* **Figure 8**: keyframes per clip (a histogram, stacked by split); always drawn.
* **Figure 9**: recording minutes per actor (bars); needs actor ids and clip durations.
* **Figure 10**: clip durations in seconds (a histogram); needs clip durations.
* **Figure 11**: a t-SNE of the keyframes' ARKit vectors coloured by dominant emotion (needs at
  least :data:`EMBED_MIN_POINTS` keyframes), beside the dominant-emotion counts (bars).

One *clip* is one script (its performance was recorded as one video). What a dataset lacks is never
invented: a figure whose data is missing is skipped and ``summary.json`` / ``summary.md`` say which
and why. In particular:

* **Actor ids.** A script's ``actor`` is known unless it is ``"unknown"``, the placeholder the release
  importer (:func:`facelab.data.keyframeface.import_chat_jsonl`) writes: the release chat JSONL names
  no actor.
* **Clip durations.** The script line schema has no duration, and neither the release inference files
  nor the synthetic corpus carry one. A dataset that has them (e.g. from the release videos) puts
  them in ``meta.json`` as ``"clip_seconds": {script_id: seconds}`` (``write_dataset``'s
  ``extra_meta``); clips without an entry are left out of Figures 9 and 10 and counted.
* **Dominant emotion.** The release's emotion is free text ("Anxiety concealed by a restrained
  smile."). :func:`dominant_emotion` maps it to one of :data:`EMOTION_LABELS` by keyword: the label
  of the keyword that occurs *first* in the text (phrases like the release's put the felt emotion
  first and the mask or modifier after it: "X concealed by Y", "X mixed with Y", "X held back"); ``"other"``
  when no keyword occurs. The paper does not say how it derived its labels; this rule is ours.
* **The embedding.** t-SNE (scikit-learn, which MLflow installs) of the raw 61 ARKit values of the
  keyframes, at most :data:`EMBED_MAX_POINTS` of them (a seeded sample beyond that: t-SNE takes
  about 10 s per 1,000 points on a CPU, and the figure is a picture, not a statistic), seed :data:`SEED`. Where scikit-learn
  is missing the panel is a PCA projection (numpy SVD) and is labelled "PCA", never "t-SNE".

Output directory (replaced as a whole, atomically): ``summary.json`` (format :data:`FORMAT`; also the
marker that lets a re-run, e.g. the DVC stage's, replace it), ``summary.md`` (tables to paste into a
paper), and one PNG per drawn figure (:data:`FIGURES`). Everything is byte-stable for the same input:
fixed seeds, a fixed key order, 4-decimal rounding, PNGs without a software/version stamp.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facelab.data import emoava
from facelab.data.keyframeface import FORMAT as DATASET_FORMAT
from facelab.data.keyframeface import MAX_KEYFRAMES, META_FILE, SPLITS, DataError, Script, load_dataset, load_meta

FORMAT = "facelab-keyframeface-describe/1"
"""Value of ``summary.json``'s ``format``: the marker of a directory this module wrote."""

SUMMARY_FILE = "summary.json"
MARKDOWN_FILE = "summary.md"

UNKNOWN_ACTOR = "unknown"
"""The actor the release importer writes when the data names none; such clips have no actor id."""

DURATIONS_FIELD = "clip_seconds"
"""Optional ``meta.json`` field ``{script_id: seconds}``: clip durations, when a dataset has them."""

SEED = 0
"""Seed of the embedding (t-SNE initialisation and the point sample)."""

EMBED_MIN_POINTS = 10
"""Fewer keyframes than this: no embedding panel (a 2-d map of a handful of points shows nothing)."""

EMBED_MAX_POINTS = 2000
"""At most this many keyframes are embedded (a seeded sample beyond; about 20 s of t-SNE on a CPU)."""

PERPLEXITY = 30.0
"""t-SNE perplexity (scikit-learn's default), lowered to ``(n - 1) / 3`` for small ``n``."""

EMOTION_LABELS = ("happiness", "sadness", "anger", "fear", "surprise", "disgust", "contempt", "other")
"""Dominant-emotion labels: Ekman's six basic emotions plus contempt, and ``other``."""

EMOTION_KEYWORDS: dict[str, tuple[str, ...]] = {
    "happiness": (
        "joy",
        "happy",
        "happi",
        "smil",
        "delight",
        "satisf",
        "pleased",
        "pleasure",
        "tender",
        "playful",
        "mischie",
        "relie",
        "amus",
        "cheer",
        "glee",
        "pride",
        "proud",
        "love",
        "excite",
    ),
    "sadness": ("sad", "grie", "sorrow", "disappoint", "melanchol", "despair", "gloom", "mourn", "longing"),
    "anger": ("anger", "angr", "rage", "furi", "fury", "irrita", "annoy", "frustrat", "resent", "indign"),
    "fear": ("fear", "anxi", "nervous", "panic", "terror", "terrif", "dread", "worr", "scare", "afraid", "apprehens"),
    "surprise": ("surpris", "shock", "astonish", "amaz", "startl"),
    "disgust": ("disgust", "revuls", "repuls", "loath"),
    "contempt": ("contempt", "scorn", "disdain", "sneer"),
}
"""Keyword stems per label, matched at the start of a word, case-insensitively (``"anxi"``: anxiety,
anxious). The first match in the text decides (:func:`dominant_emotion`). Modifiers that are not
an emotion of their own are left out on purpose ("pleasant" in "Pleasant surprise", "bitter" in "Bitter
disappointment")."""

FIGURES: dict[str, tuple[str, str, str]] = {
    "fig8": ("Figure 8", "fig8_keyframes_per_clip.png", "keyframes per clip"),
    "fig9": ("Figure 9", "fig9_minutes_per_actor.png", "recording minutes per actor"),
    "fig10": ("Figure 10", "fig10_clip_durations.png", "clip durations"),
    "fig11": ("Figure 11", "fig11_emotions.png", "emotion embedding and dominant-emotion counts"),
}
"""``key: (paper figure, file name, what it shows)``."""

_KEYWORD_RE = re.compile(
    r"\b("
    + "|".join(sorted({re.escape(k) for ks in EMOTION_KEYWORDS.values() for k in ks}, key=lambda k: (-len(k), k)))
    + r")",
    re.IGNORECASE,
)
_LABEL_OF = {k: label for label, ks in EMOTION_KEYWORDS.items() for k in ks}
_SPLIT_COLORS = {"train": "#4477aa", "val": "#ee6677", "test": "#228833"}
_LABEL_COLORS = dict(
    zip(EMOTION_LABELS, ("#ccbb44", "#4477aa", "#ee6677", "#aa3377", "#66ccee", "#228833", "#ee8866", "#bbbbbb"))
)


def dominant_emotion(text: str) -> str:
    """One of :data:`EMOTION_LABELS` for a script's emotion text: the label of the keyword stem
    (:data:`EMOTION_KEYWORDS`) that starts a word earliest in ``text``; ``"other"`` if none does
    (and for an empty text). ``"Anxiety concealed by a restrained smile."`` -> ``"fear"``."""
    m = _KEYWORD_RE.search(text or "")
    return _LABEL_OF[m.group(1).lower()] if m else "other"


# --------------------------------------------------------------------------------------------
# The output directory
# --------------------------------------------------------------------------------------------


def is_describe_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an earlier output of :func:`describe` (``summary.json`` of :data:`FORMAT`)."""
    doc = emoava.json_object_or_none(Path(path) / SUMMARY_FILE)
    return doc is not None and doc.get("format") == FORMAT


def claim_output(out_dir: str | os.PathLike, force: bool = False, *, dataset_dir: str | os.PathLike | None = None):
    """Refuse ``out_dir`` unless it is absent, empty or an earlier :func:`describe` output, or ``force``
    (the rule of every ``--out``: :func:`facelab.data.emoava.claim_output_dir`). Whatever ``force``
    says, ``out_dir`` may not be ``dataset_dir``, inside it or above it: replacing it would delete or
    change the dataset being described."""
    out = Path(out_dir)
    if dataset_dir is not None:
        o, d = out.resolve(), Path(dataset_dir).resolve()
        if o == d or d in o.parents or o in d.parents:
            raise DataError(
                f"{out}: the output directory may not be the dataset directory {dataset_dir}, inside it or "
                "above it (it is replaced as a whole); choose another --out"
            )
    try:
        emoava.claim_output_dir(
            out,
            owned=is_describe_dir,
            what="a dataset description",
            marker=f"{SUMMARY_FILE} with format {FORMAT!r}",
            force=force,
        )
    except emoava.DataError as exc:
        raise DataError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _r4(x: float) -> float:
    return round(float(x), 4) + 0.0


def _clip_seconds(meta: Mapping[str, Any], ids: set[str], path: Path) -> dict[str, float]:
    """``meta.json``'s optional :data:`DURATIONS_FIELD`, validated against the dataset's script ids."""
    raw = meta.get(DURATIONS_FIELD)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DataError(f"{path}: field {DURATIONS_FIELD!r} must be an object {{script_id: seconds}}")
    out = {}
    for sid, sec in raw.items():
        where = f"{path}: field '{DURATIONS_FIELD}.{sid}'"
        if sid not in ids:
            raise DataError(f"{where}: no script with this id in the dataset")
        if isinstance(sec, bool) or not isinstance(sec, (int, float)) or not math.isfinite(sec) or sec <= 0:
            raise DataError(f"{where}: expected a duration in seconds > 0, got {sec!r}")
        out[sid] = float(sec)
    return out


def _known_actor(script: Script) -> bool:
    return script.actor != UNKNOWN_ACTOR


def _seconds_stats(values: Sequence[float]) -> dict | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {
        "clips": len(a),
        "mean": _r4(a.mean()),
        "median": _r4(np.median(a)),
        "min": _r4(a.min()),
        "max": _r4(a.max()),
        "total_minutes": _r4(a.sum() / 60.0),
    }


def _stats(scripts: Sequence[Script], seconds: Mapping[str, float]) -> dict:
    """Counts of one split (or all): clips, keyframes, the keyframes-per-clip histogram, actors,
    dominant emotions, durations."""
    hist = {str(k): 0 for k in range(1, MAX_KEYFRAMES + 1)}
    emotions = {label: 0 for label in EMOTION_LABELS}
    for s in scripts:
        hist[str(len(s.keyframes))] += 1
        emotions[dominant_emotion(s.emotion)] += 1
    n = len(scripts)
    n_kf = sum(len(s.keyframes) for s in scripts)
    known = {s.actor for s in scripts if _known_actor(s)}
    durations = [seconds[s.script_id] for s in scripts if s.script_id in seconds]
    return {
        "clips": n,
        "keyframes": n_kf,
        "keyframes_per_clip": hist,
        "mean_keyframes_per_clip": _r4(n_kf / n) if n else 0.0,
        "actors": len(known),
        "clips_without_actor": sum(not _known_actor(s) for s in scripts),
        "distinct_emotion_texts": len({s.emotion.strip() for s in scripts}),
        "dominant_emotions": emotions,
        "clip_seconds": _seconds_stats(durations),
        "clips_without_duration": n - len(durations),
    }


def _minutes_per_actor(scripts: Sequence[Script], seconds: Mapping[str, float]) -> dict[str, float]:
    per: dict[str, float] = {}
    for s in scripts:
        if _known_actor(s) and s.script_id in seconds:
            per[s.actor] = per.get(s.actor, 0.0) + seconds[s.script_id]
    return {a: _r4(per[a] / 60.0) for a in sorted(per)}


# --------------------------------------------------------------------------------------------
# The 2-d embedding of Figure 11
# --------------------------------------------------------------------------------------------


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of ``x`` (N, D) by SVD, signs fixed (largest |loading| > 0)."""
    xc = np.asarray(x, dtype=np.float64) - np.asarray(x, dtype=np.float64).mean(axis=0)  # (N, D)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)  # vt (min(N, D), D)
    comps = vt[:2]  # (2, D)
    signs = np.sign(comps[np.arange(len(comps)), np.argmax(np.abs(comps), axis=1)])
    return xc @ (comps * signs[:, None]).T  # (N, 2)


def embed_2d(x: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, dict]:
    """``(coords (N, 2), info)``: t-SNE of ``x`` (N, D) with scikit-learn, else PCA (``info["method"]``
    says which). Deterministic for a seed."""
    x = np.asarray(x, dtype=np.float64)
    try:
        from sklearn.manifold import TSNE
    except ImportError:  # scikit-learn comes with MLflow; a minimal install may lack it: say PCA, not t-SNE
        return pca_2d(x), {"method": "PCA", "reason": "scikit-learn is not installed"}
    perplexity = min(PERPLEXITY, max(1.0, (len(x) - 1) / 3.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x), {"method": "t-SNE", "perplexity": _r4(perplexity), "seed": seed}


# --------------------------------------------------------------------------------------------
# Figures (matplotlib, headless)
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    # No "Software" (matplotlib version) stamp: the same data gives the same bytes on any install.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _pyplot().close(fig)


def plot_keyframes_per_clip(splits: Mapping[str, dict], out: Path) -> Path:
    """Figure 8 of KeyframeFace (arXiv 2512.11321): how many keyframes a clip (script) has, 1 to 5,
    as bars stacked by split with the total on top."""
    plt = _pyplot()
    ks = list(range(1, MAX_KEYFRAMES + 1))
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    bottom = np.zeros(len(ks))
    for name, st in splits.items():
        counts = np.array([st["keyframes_per_clip"][str(k)] for k in ks], dtype=float)
        ax.bar(ks, counts, bottom=bottom, color=_SPLIT_COLORS.get(name, "#888888"), label=f"{name} ({st['clips']})")
        bottom += counts
    for k, total in zip(ks, bottom):
        ax.annotate(f"{int(total)}", (k, total), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(ks)
    ax.set_xlabel("keyframes per clip")
    ax.set_ylabel("clips")
    n, kf = int(bottom.sum()), int(sum(k * c for k, c in zip(ks, bottom)))
    ax.set_title(f"Keyframes per clip (mean {kf / n:.2f})" if n else "Keyframes per clip", fontsize=10)
    ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    return out


def plot_minutes_per_actor(minutes: Mapping[str, float], out: Path) -> Path:
    """Figure 9 of KeyframeFace (arXiv 2512.11321): recorded minutes per actor (the sum of the durations
    of the actor's clips), one bar per actor in id order, with the mean as a dashed line."""
    plt = _pyplot()
    actors = list(minutes)
    values = [minutes[a] for a in actors]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(actors) + 1.5), 3.6))
    ax.bar(range(len(actors)), values, color="#4477aa")
    ax.axhline(float(np.mean(values)), color="0.3", ls="--", lw=1, label=f"mean {np.mean(values):.1f} min")
    ax.set_xticks(range(len(actors)))
    ax.set_xticklabels(actors, rotation=90, fontsize=7)
    ax.set_ylabel("recording minutes")
    ax.set_title(f"Recording minutes per actor ({len(actors)} actors, {sum(values):.1f} min)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    return out


def plot_clip_durations(seconds: Sequence[float], out: Path) -> Path:
    """Figure 10 of KeyframeFace (arXiv 2512.11321): the distribution of clip durations in seconds
    (numpy's "auto" bins), with the mean as a dashed line."""
    plt = _pyplot()
    a = np.asarray(seconds, dtype=np.float64)
    edges = np.histogram_bin_edges(a, bins="auto") if a.min() < a.max() else np.array([a.min() - 0.5, a.max() + 0.5])
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.hist(a, bins=edges, color="#4477aa", edgecolor="white")
    ax.axvline(float(a.mean()), color="0.3", ls="--", lw=1, label=f"mean {a.mean():.1f} s")
    ax.set_xlabel("clip duration (s)")
    ax.set_ylabel("clips")
    ax.set_title(f"Clip durations ({len(a)} clips)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    return out


def plot_emotions(
    coords: np.ndarray | None,
    labels: Sequence[str],
    counts: Mapping[str, int],
    method: str,
    out: Path,
    *,
    n_keyframes: int = 0,
) -> Path:
    """Figure 11 of KeyframeFace (arXiv 2512.11321): left, a 2-d embedding (t-SNE, or PCA where
    scikit-learn is missing, named in the title) of the keyframes' 61 ARKit values coloured by their
    script's dominant emotion; right, the number of clips per dominant emotion. Without ``coords``
    (too few keyframes) only the counts are drawn. ``n_keyframes``: how many keyframes ``coords`` was
    sampled from (named in the title when more)."""
    plt = _pyplot()
    ncols = 1 if coords is None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.4 * ncols, 4.2), squeeze=False)
    if coords is not None:
        ax = axes[0][0]
        labels_a = np.asarray(labels)
        for label in EMOTION_LABELS:
            sel = labels_a == label
            if sel.any():
                ax.scatter(coords[sel, 0], coords[sel, 1], s=5, color=_LABEL_COLORS[label], label=label, alpha=0.8)
        sampled = f" (seeded sample of {n_keyframes})" if n_keyframes > len(coords) else ""
        ax.set_title(f"{method} of {len(coords)} ARKit keyframes{sampled}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax = axes[0][-1]
    ax.bar(range(len(EMOTION_LABELS)), [counts[label] for label in EMOTION_LABELS], color=list(_LABEL_COLORS.values()))
    for i, label in enumerate(EMOTION_LABELS):
        ax.annotate(str(counts[label]), (i, counts[label]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(EMOTION_LABELS)))
    ax.set_xticklabels(EMOTION_LABELS, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("clips")
    ax.set_ylim(0, max(1, max(counts.values())) * 1.12)
    ax.set_title("Dominant emotion per clip", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    return out


# --------------------------------------------------------------------------------------------
# describe
# --------------------------------------------------------------------------------------------


def _markdown(summary: dict) -> str:
    ks = [str(k) for k in range(1, MAX_KEYFRAMES + 1)]
    lines = [
        f"# Dataset description: {summary['dataset']['name']}",
        "",
        "| Split | Clips | Keyframes | Keyframes / clip | "
        + " | ".join(f"K={k}" for k in ks)
        + " | Actors | Minutes |",
        "|---|" + "---:|" * (5 + len(ks)),
    ]
    rows = [*summary["splits"].items(), ("total", summary["total"])]
    for name, st in rows:
        minutes = f"{st['clip_seconds']['total_minutes']:.1f}" if st["clip_seconds"] else "—"
        actors = str(st["actors"]) if st["actors"] else "—"
        hist = " | ".join(str(st["keyframes_per_clip"][k]) for k in ks)
        name = f"**{name}**" if name == "total" else name
        lines.append(
            f"| {name} | {st['clips']} | {st['keyframes']} | {st['mean_keyframes_per_clip']:.2f} | {hist} "
            f"| {actors} | {minutes} |"
        )
    total = summary["total"]
    lines += ["", "| Dominant emotion | Clips | Share |", "|---|---:|---:|"]
    for label, c in total["dominant_emotions"].items():
        share = f"{100.0 * c / total['clips']:.1f} %" if total["clips"] else "—"
        lines.append(f"| {label} | {c} | {share} |")
    lines += ["", "| Paper | Figure | File or reason skipped |", "|---|---|---|"]
    for fig in summary["figures"].values():
        what = f"`{fig['file']}`" if "file" in fig else f"skipped: {fig['skipped']}"
        for panel, reason in fig.get("skipped_panels", {}).items():
            what += f" ({panel} panel skipped: {reason})"
        if "left_out" in fig:
            what += f" (left out: {fig['left_out']})"
        lines.append(f"| {fig['paper']} | {fig['title']} | {what} |")
    lines += ["", f"Dominant emotion: {summary['emotions']['rule']}", ""]
    return "\n".join(lines)


EMOTION_RULE = (
    "the label of the first keyword (stem at a word start, case-insensitive) in the script's emotion "
    f"text; labels {', '.join(EMOTION_LABELS)} ('other': no keyword)"
)


def describe(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False) -> dict:
    """Statistics and Figures 8-11 of KeyframeFace for ``dataset_dir``, written to ``out_dir``.

    The dataset is read and validated by the dataset loader (errors name ``file:line`` and the
    field); ``out_dir`` is claimed first (:func:`claim_output`: absent, empty, an earlier output of
    this function, or ``force``) and then replaced atomically by ``summary.json``, ``summary.md`` and
    the figures that the data supports. Returns the summary (``summary.json``'s content):
    ``{"format", "dataset", "splits": {name: stats}, "total": stats, "minutes_per_actor",
    "emotions", "embedding", "figures": {key: {"paper", "title", "file" | "skipped", ...}}}``.
    """
    data, out = Path(dataset_dir), Path(out_dir)
    claim_output(out, force, dataset_dir=data)  # before the work: a wrong --out fails at once
    meta, splits = load_meta(data), load_dataset(data)
    scripts = [s for name in SPLITS if name in splits for s in splits[name]]
    seconds = _clip_seconds(meta, {s.script_id for s in scripts}, data / META_FILE)
    total = _stats(scripts, seconds)
    summary: dict[str, Any] = {
        "format": FORMAT,
        "dataset": {"name": data.resolve().name, "format": DATASET_FORMAT, "source": meta.get("source")},
        "splits": {name: _stats(splits[name], seconds) for name in splits},
        "total": total,
        "minutes_per_actor": _minutes_per_actor(scripts, seconds),
        "emotions": {"labels": list(EMOTION_LABELS), "rule": EMOTION_RULE},
        "embedding": None,
        "figures": {},
    }
    figures: dict[str, dict] = {k: {"paper": p, "title": t} for k, (p, _, t) in FIGURES.items()}
    draws: list = []  # (key, function, args): drawn into the temporary directory below

    no_clips = "the dataset has no clips"
    no_seconds = (
        f"no clip durations: {META_FILE} has no '{DURATIONS_FIELD}' field (the release chat JSONL "
        "and the synthetic corpus carry none)"
        if not seconds
        else None
    )
    no_actors = f"no actor ids: every clip's actor is '{UNKNOWN_ACTOR}' (the importer's placeholder)"

    if not scripts:
        figures["fig8"]["skipped"] = no_clips
    else:
        draws.append(("fig8", plot_keyframes_per_clip, (summary["splits"],)))

    if not scripts:
        figures["fig9"]["skipped"] = no_clips
    elif no_seconds or not total["actors"]:
        figures["fig9"]["skipped"] = "; ".join(r for r in (no_seconds, None if total["actors"] else no_actors) if r)
    elif not summary["minutes_per_actor"]:
        figures["fig9"]["skipped"] = "no clip has both a known actor and a duration"
    else:
        left_out = sum(not (_known_actor(s) and s.script_id in seconds) for s in scripts)
        if left_out:
            figures["fig9"]["left_out"] = f"{left_out} clips without a known actor or a duration"
        draws.append(("fig9", plot_minutes_per_actor, (summary["minutes_per_actor"],)))

    if not scripts:
        figures["fig10"]["skipped"] = no_clips
    elif no_seconds:
        figures["fig10"]["skipped"] = no_seconds
    else:
        if total["clips_without_duration"]:
            figures["fig10"]["left_out"] = f"{total['clips_without_duration']} clips without a duration"
        draws.append(
            ("fig10", plot_clip_durations, ([seconds[s.script_id] for s in scripts if s.script_id in seconds],))
        )

    if not scripts:
        figures["fig11"]["skipped"] = no_clips
    else:
        x = np.concatenate([s.values for s in scripts])  # (N, 61), clip by clip
        labels = np.array([dominant_emotion(s.emotion) for s in scripts for _ in s.keyframes])
        coords, method = None, ""
        if len(x) < EMBED_MIN_POINTS:
            figures["fig11"]["skipped_panels"] = {
                "embedding": f"only {len(x)} keyframes; the 2-d embedding needs at least {EMBED_MIN_POINTS}"
            }
        else:
            idx = np.arange(len(x))
            if len(x) > EMBED_MAX_POINTS:
                idx = np.sort(np.random.default_rng(SEED).choice(len(x), EMBED_MAX_POINTS, replace=False))
            coords, info = embed_2d(x[idx], SEED)
            method = info["method"]
            summary["embedding"] = {**info, "points": len(idx), "keyframes": len(x)}
            labels = labels[idx]
        draw = functools.partial(plot_emotions, n_keyframes=len(x))
        draws.append(("fig11", draw, (coords, list(labels), total["dominant_emotions"], method)))
    summary["figures"] = figures
    for key, _, _ in draws:
        figures[key]["file"] = FIGURES[key][1]

    _write_atomically(out, summary, draws)
    return summary


def _write_atomically(out: Path, summary: dict, draws: list) -> None:
    def fill(tmp: Path) -> None:
        for key, fn, args in draws:
            fn(*args, tmp / FIGURES[key][1])
        text = json.dumps(summary, ensure_ascii=False, indent=1, allow_nan=False) + "\n"  # insertion order: stable
        (tmp / SUMMARY_FILE).write_bytes(text.encode("utf-8"))
        (tmp / MARKDOWN_FILE).write_bytes(_markdown(summary).encode("utf-8"))

    emoava.replace_dir(out, fill)


def format_report(summary: dict, out_dir: str | os.PathLike) -> str:
    """The short text ``facelab data describe`` prints: totals, each figure's file or why it was skipped."""
    out = Path(out_dir)
    t = summary["total"]
    parts = " / ".join(f"{name} {st['clips']}" for name, st in summary["splits"].items())
    actors = f"{t['actors']} actors" if t["actors"] else "no actor ids"
    minutes = f"{t['clip_seconds']['total_minutes']:.1f} recorded minutes" if t["clip_seconds"] else "no durations"
    lines = [
        f"{summary['dataset']['name']}: {t['clips']} clips ({parts}), {t['keyframes']} keyframes, "
        f"{t['mean_keyframes_per_clip']:.2f} keyframes per clip, {actors}, {minutes}",
        "dominant emotions: " + ", ".join(f"{k} {v}" for k, v in t["dominant_emotions"].items() if v),
    ]
    for fig in summary["figures"].values():
        head = f"  {fig['paper']:<9} {fig['title']:<46}"
        lines.append(f"{head} {out / fig['file']}" if "file" in fig else f"{head} skipped: {fig['skipped']}")
        for panel, reason in fig.get("skipped_panels", {}).items():
            lines.append(f"  {'':<9} {'':<46} ({panel} panel skipped: {reason})")
        if "left_out" in fig:
            lines.append(f"  {'':<9} {'':<46} (left out: {fig['left_out']})")
    lines.append(f"wrote {out / SUMMARY_FILE} and {out / MARKDOWN_FILE}")
    return "\n".join(lines)


__all__ = [
    "FORMAT",
    "SUMMARY_FILE",
    "MARKDOWN_FILE",
    "UNKNOWN_ACTOR",
    "DURATIONS_FIELD",
    "SEED",
    "EMBED_MIN_POINTS",
    "EMBED_MAX_POINTS",
    "PERPLEXITY",
    "EMOTION_LABELS",
    "EMOTION_KEYWORDS",
    "EMOTION_RULE",
    "FIGURES",
    "dominant_emotion",
    "is_describe_dir",
    "claim_output",
    "pca_2d",
    "embed_2d",
    "plot_keyframes_per_clip",
    "plot_minutes_per_actor",
    "plot_clip_durations",
    "plot_emotions",
    "describe",
    "format_report",
]
