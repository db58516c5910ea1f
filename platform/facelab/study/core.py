"""Create a blind ranking study from a finished sweep, and keep its raters' answers.

CTEG §4.5 (Figure 4): "we randomly sample 50 sentences from the test set and generate the
corresponding expression sequence with a maximum length of 128 … rendered as an avatar video at 24
frames per second and shown to five participants … rank the outputs based on the emotional
consistency". :func:`create` does the sampling and generation; :mod:`facelab.study.server` shows the
outputs to raters; :mod:`facelab.study.stats` and :mod:`facelab.study.report` summarise the answers.

A study directory holds plain JSON (nothing pickled):

* ``study.json`` -- the sweep, its parent run, the methods (``m0``, ``m1`` … each a variant's trial:
  name, run id), the items (``i000`` … each a sampled test text, or a test script for keyframe
  models), the seed and the settings;
* ``outputs/<item>.json`` -- ``{method id: output}``: an expressions output is ``{"frames": (T, 53)}``
  (T <= ``max_frames``), a keyframes output ``{"keyframes": (K, 61)}`` (ARKit); ``"gif"`` names an
  avatar video under ``media/`` when ``FACELAB_FLAME_MODEL`` was set at creation;
* ``responses/<rater>.json`` -- one file per rater, ``{"rater", "ranks": {item: {method id: rank}}}``,
  replaced atomically (temporary file + rename) on every submission.

**Blindness.** A rater sees item ``i`` with the K outputs labelled A, B, C … in an order shuffled
per (rater, item) by a generator seeded from the study's seed, the rater's name and the item
(:func:`order`): reproducible, different between raters, never the sweep's order. What a rater
receives (:func:`rater_item`) holds no method name or id, and media files are named by an opaque
digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

VERSION = 1
STUDY_FILE = "study.json"
FPS = 24  # CTEG §4.5: the avatar videos play at 24 frames per second
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
RATER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""A rater's name: letters, digits, ``_`` and ``-`` (1-64 characters, not starting with a symbol). It
names the rater's response file, so nothing that could leave ``responses/`` (``/``, ``..``) passes."""


class StudyError(ValueError):
    """A bad study directory, argument or submission; the message names the field."""


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file in the same directory and a rename,
    so a reader never sees half a file and a crash leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, allow_nan=False, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the study from a colleague's report
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(study_dir: str | os.PathLike) -> dict:
    """The study's ``study.json``, checked enough to serve and report it."""
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise StudyError(f"{path}: no study here (make one with `facelab study create SWEEP`)")
    try:
        study = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StudyError(f"{path}: not a readable JSON study file ({exc})") from None
    for key in ("version", "task", "seed", "methods", "items"):
        if key not in study:
            raise StudyError(f"{path}: missing field '{key}'")
    if study["version"] != VERSION:
        raise StudyError(f"{path}: version {study['version']!r}, this facelab reads version {VERSION}")
    if not 2 <= len(study["methods"]) <= len(LABELS):
        raise StudyError(f"{path}: methods: need 2 to {len(LABELS)} methods, got {len(study['methods'])}")
    return study


def outputs(study_dir: str | os.PathLike, item_id: str) -> dict:
    return json.loads((Path(study_dir) / "outputs" / f"{item_id}.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------
# Blind presentation
# ------------------------------------------------------------------------------------------------


def check_rater(rater) -> str:
    if not isinstance(rater, str) or not RATER_RE.fullmatch(rater):
        raise StudyError(
            f"rater: {rater!r} is not a valid rater name (1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit)"
        )
    return rater


def _rng(*parts) -> random.Random:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def order(study: dict, rater: str, item_id: str) -> list[str]:
    """The method ids in the order rater ``rater`` sees item ``item_id`` (label A first): a shuffle
    seeded by (study seed, rater, item) -- the same every time, different between raters."""
    ids = [m["id"] for m in study["methods"]]
    _rng("facelab.study", study["seed"], rater, item_id).shuffle(ids)
    return ids


def media_name(study: dict, item_id: str, method_id: str, ext: str) -> str:
    """An output's media file name: a digest that tells nothing about the method."""
    h = hashlib.sha256(f"facelab.study|{study['seed']}|{study.get('sweep')}|{item_id}|{method_id}".encode())
    return f"{h.hexdigest()[:20]}.{ext}"


def item_index(study: dict, i) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        try:
            i = int(str(i))
        except ValueError:
            raise StudyError(f"item: {i!r} is not an item number") from None
    if not 0 <= i < len(study["items"]):
        raise StudyError(f"item: {i} is not an item of this study (0 to {len(study['items']) - 1})")
    return i


def rater_item(study_dir: str | os.PathLike, study: dict, rater: str, i) -> dict:
    """What rater ``rater`` is shown for item number ``i`` (0-based): the text and the K outputs
    labelled A, B, C … in the rater's order; no method name or id. ``ranks``: the rater's earlier
    answer for this item by label, if any."""
    check_rater(rater)
    i = item_index(study, i)
    item = study["items"][i]
    outs = outputs(study_dir, item["id"])
    seen = order(study, rater, item["id"])
    before = responses_of(study_dir, rater).get(item["id"], {})
    options = []
    for label, mid in zip(LABELS, seen):
        out = {k: v for k, v in outs[mid].items() if k in ("frames", "keyframes")}
        if "gif" in outs[mid]:
            out["gif"] = f"media/{outs[mid]['gif']}"
        options.append({"label": label, **out})
    shown = {k: item[k] for k in ("text", "background", "emotion", "descriptions") if k in item}
    return {
        "index": i,
        "n_items": len(study["items"]),
        **shown,
        "options": options,
        "ranks": {label: before[mid] for label, mid in zip(LABELS, seen) if mid in before},
    }


# ------------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()


def _response_path(study_dir, rater: str) -> Path:
    return Path(study_dir) / "responses" / f"{check_rater(rater)}.json"


def responses_of(study_dir, rater: str) -> dict[str, dict[str, int]]:
    """``{item id: {method id: rank}}`` of one rater (empty for a new rater)."""
    path = _response_path(study_dir, rater)
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8")).get("ranks", {})


def submit(study_dir: str | os.PathLike, study: dict, rater: str, i, ranks) -> dict:
    """Record rater ``rater``'s ranking of item ``i``: ``ranks`` maps each shown label (A, B …) to a
    rank 1..K, every rank used once. Checked completely before anything is written; a rater may
    change an earlier answer. Returns ``{"done": items ranked, "n_items"}``."""
    check_rater(rater)
    i = item_index(study, i)
    k = len(study["methods"])
    labels = list(LABELS[:k])
    if not isinstance(ranks, dict):
        raise StudyError(f"ranks: expected an object mapping each of {labels} to a rank, got {type(ranks).__name__}")
    if set(ranks) != set(labels):
        missing, extra = sorted(set(labels) - set(ranks)), sorted(set(ranks) - set(labels))
        raise StudyError(
            f"ranks: need exactly the labels {labels}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {extra}" if extra else "")
        )
    clean = {}
    for label in labels:
        r = ranks[label]
        if isinstance(r, str) and r.strip().isdigit():
            r = int(r)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= k:
            raise StudyError(f"ranks.{label}: {r!r} is not a rank from 1 to {k}")
        clean[label] = r
    if len(set(clean.values())) != k:
        dup = sorted({r for r in clean.values() if list(clean.values()).count(r) > 1})
        raise StudyError(f"ranks: each rank 1..{k} must be used once; rank {dup[0]} is given twice or more")
    item_id = study["items"][i]["id"]
    by_method = {mid: clean[label] for label, mid in zip(labels, order(study, rater, item_id))}
    with _LOCK:
        mine = responses_of(study_dir, rater)
        mine[item_id] = by_method
        write_json_atomic(
            _response_path(study_dir, rater),
            {"rater": rater, "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ranks": mine},
        )
    return {"done": len(mine), "n_items": len(study["items"])}


def all_responses(study_dir: str | os.PathLike, study: dict) -> tuple[dict, dict]:
    """``(complete, partial)``: ``{rater: {item id: {method name: rank}}}`` of the raters who ranked
    every item, and ``{rater: items ranked}`` of those who did not (left out of the statistics: Fleiss'
    kappa needs the same raters on every subject)."""
    names = {m["id"]: m["name"] for m in study["methods"]}
    items = [it["id"] for it in study["items"]]
    complete, partial = {}, {}
    folder = Path(study_dir) / "responses"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        rater = path.stem
        if not RATER_RE.fullmatch(rater):
            continue
        ranks = json.loads(path.read_text(encoding="utf-8")).get("ranks", {})
        if all(it in ranks for it in items):
            complete[rater] = {it: {names[mid]: r for mid, r in ranks[it].items()} for it in items}
        else:
            partial[rater] = sum(it in ranks for it in items)
    return complete, partial


# ------------------------------------------------------------------------------------------------
# Creation
# ------------------------------------------------------------------------------------------------


def pick_trials(parent, trials, variants: list[str] | None) -> list:
    """One trial per variant: the best finished trial by the sweep's metric (else its first finished
    one), variants in the sweep's order; ``variants`` (names) picks and orders a subset. Trials
    without a model (baseline rows) are left out."""
    from facelab.core import tracking

    metric = parent.data.params.get("sweep.metric.name", "val/loss")
    goal = parent.data.params.get("sweep.metric.goal", "minimize")
    sweep_order = json.loads(parent.data.tags.get("facelab.variants", "[]"))
    modelled = [t for t in trials if t.params.get("eval.baseline", "None") in ("None", "")]
    known = list(dict.fromkeys([*[v for v in sweep_order if any(t.variant == v for t in modelled)],
                                *sorted({t.variant for t in modelled})]))  # fmt: skip
    wanted = variants or known
    unknown = [v for v in wanted if v not in known]
    if unknown:
        raise StudyError(f"--variants: {unknown} not in this sweep's variants with a model: {known}")
    if len(set(wanted)) != len(wanted):
        raise StudyError(f"--variants: a variant is named twice: {wanted}")
    out = []
    for v in wanted:
        pool = [t for t in modelled if t.variant == v]
        best = tracking.best_trial(pool, metric, goal) or next((t for t in pool if t.status == "FINISHED"), None)
        if best is None:
            raise StudyError(f"variant {v!r} has no finished trial")
        out.append(best)
    if len(out) < 2:
        raise StudyError(f"a ranking study needs at least 2 methods; this sweep gives {[t.variant for t in out]}")
    if len(out) > len(LABELS):
        raise StudyError(f"--variants: at most {len(LABELS)} methods, got {len(out)}")
    return out


def _load_model(c, trial, root: Path, tmp: Path):
    from facelab.families import registry

    ckpt = Path(c.download_artifacts(trial.run_id, "checkpoint", str(tmp / trial.run_id)))
    model, config = registry.load_servable(ckpt, device="cpu", root=root)
    return model, config, registry.get(config["kind"]).task


def _sample_items(task: str, data_dir: Path, n: int, seed: int) -> list[dict]:
    if task == "expressions":
        from facelab.data.emoava import load_split

        texts = load_split(data_dir, "test").texts
        make = lambda j: {"index": j, "text": texts[j]}  # noqa: E731
        total = len(texts)
    else:
        from facelab.data.keyframeface import load_split as load_scripts

        scripts = load_scripts(data_dir, "test")
        total = len(scripts)

        def make(j):
            s = scripts[j]
            desc = [kf.descriptions["original"] for kf in s.keyframes]
            text = " ".join(p for p in (s.background.strip(), s.emotion.strip()) if p)
            return {"index": j, "script_id": s.script_id, "text": text, "background": s.background,
                    "emotion": s.emotion, "descriptions": desc}  # fmt: skip

    if not 1 <= n <= total:
        raise StudyError(f"--items: {n} items asked, the test split of {data_dir} has {total}")
    picked = sorted(random.Random(seed).sample(range(total), n))
    return [{"id": f"i{k:03d}", **make(j)} for k, j in enumerate(picked)]


def _expressions(model, texts: list[str], max_frames: int, seed: int) -> list[dict]:
    """One sequence per text, decoded as one batch (chunks of 16) from a generator seeded with ``seed``."""
    import numpy as np
    import torch

    cap = getattr(getattr(model, "cfg", None), "max_frames", max_frames)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(texts), 16):
        with torch.no_grad():
            seqs = model.generate(texts[start : start + 16], max_frames=min(max_frames, cap), generator=gen)
        for seq in seqs:
            frames = np.nan_to_num(seq.float().cpu().numpy().astype(np.float64))
            out.append({"frames": np.round(frames, 4).tolist()})
    return out


def _keyframes(model, config, items: list[dict], data_dir: Path) -> list[dict]:
    """The keyframes of each item's test script, each model reading its own annotation type."""
    import numpy as np

    annotation = config.get("data", {}).get("annotation", "original")
    scripts = None
    out = []
    for item in items:
        descriptions = item["descriptions"]
        if annotation != "original":
            from facelab.data.keyframeface import load_split as load_scripts

            scripts = scripts or load_scripts(data_dir, "test")
            kfs = scripts[item["index"]].keyframes
            descriptions = [kf.descriptions.get(annotation, kf.descriptions["original"]) for kf in kfs]
        results = model.keyframes(item["background"], item["emotion"], list(descriptions))
        rows = [np.nan_to_num(np.asarray(r.values, dtype=np.float64)) for r in results]
        out.append({"keyframes": [np.round(r, 4).tolist() for r in rows]})
    return out


def create(
    c,
    parent,
    trials,
    out: str | os.PathLike,
    *,
    root: Path,
    variants: list[str] | None = None,
    items: int = 50,
    seed: int = 0,
    max_frames: int = 128,
    force: bool = False,
    log=print,
) -> Path:
    """Write a study directory ``out`` for the sweep of ``parent`` (see the module docstring):
    ``items`` test texts sampled with ``seed``, one output per (item, method) -- expression models
    decode at most ``max_frames`` frames (CTEG §4.5: 128; capped by the model's own maximum), keyframe
    models answer the test script's keyframe descriptions. Each method decodes the items as one batch
    from a generator seeded with ``seed``, so the same arguments give the same study."""
    import shutil

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise StudyError(f"{out}: already exists (another study?); pass --force to replace it")
        if not (out / STUDY_FILE).is_file():
            raise StudyError(f"{out}: not a study directory; refusing to replace it")
    if items < 1:
        raise StudyError(f"--items: must be >= 1, got {items}")
    if max_frames < 1:
        raise StudyError(f"--max-frames: must be >= 1, got {max_frames}")
    chosen = pick_trials(parent, trials, variants)
    from facelab.viewer import flame

    flame_model = flame.configured_model()
    work = out.with_name(f".{out.name}.partial")
    if work.exists():
        shutil.rmtree(work)
    (work / "outputs").mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory() as d:
            models = []
            for t in chosen:
                log(f"loading {t.variant!r} (run {t.run_id})")
                models.append(_load_model(c, t, root, Path(d)))
            tasks = {task for _m, _c, task in models}
            if len(tasks) != 1 or None in tasks:
                raise StudyError(f"--variants: the methods must serve one task, got {sorted(map(str, tasks))}")
            task = tasks.pop()
            paths = {Path(cfg["data"]["path"]) for _m, cfg, _t in models}
            data_dir = paths.pop()
            if paths:
                raise StudyError(f"--variants: the methods were trained on different datasets ({data_dir}, {paths})")
            data_dir = data_dir if data_dir.is_absolute() else root / data_dir
            sampled = _sample_items(task, data_dir, items, seed)
            methods = [
                {"id": f"m{k}", "name": t.variant, "variant": t.variant, "run_id": t.run_id, "seed": t.seed}
                for k, t in enumerate(chosen)
            ]
            study = {
                "version": VERSION,
                "title": f"{parent.data.tags.get('facelab.sweep', '')}: rank by emotional consistency",
                "sweep": parent.data.tags.get("facelab.sweep", parent.info.run_name),
                "parent_run_id": parent.info.run_id,
                "task": task,
                "seed": seed,
                "max_frames": max_frames,
                "fps": FPS,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "methods": methods,
                "items": sampled,
            }
            per_method = {}
            for m, (model, config, _task) in zip(methods, models):
                log(f"generating {len(sampled)} outputs of {m['name']!r}")
                if task == "expressions":
                    per_method[m["id"]] = _expressions(model, [it["text"] for it in sampled], max_frames, seed)
                else:
                    per_method[m["id"]] = _keyframes(model, config, sampled, data_dir)
            for k, item in enumerate(sampled):
                outs = {mid: gens[k] for mid, gens in per_method.items()}
                if flame_model is not None and task == "expressions":
                    import numpy as np

                    (work / "media").mkdir(exist_ok=True)
                    for mid, o in outs.items():
                        name = media_name(study, item["id"], mid, "gif")
                        flame.render_gif(flame_model, np.asarray(o["frames"]), work / "media" / name, FPS)
                        o["gif"] = name
                write_json_atomic(work / "outputs" / f"{item['id']}.json", outs)
        (work / "responses").mkdir()
        write_json_atomic(work / STUDY_FILE, study)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no half-made study left behind
        raise
    if out.exists():  # the old study (--force) goes only once the new one is complete
        shutil.rmtree(out)
    work.rename(out)
    return out
