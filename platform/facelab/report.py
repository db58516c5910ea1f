"""Paper-layout tables from a finished sweep, chosen by the task of its trials' families.

* **Expressions task** (CTEG, LM-Listener, plug-ins): rows = variants, columns = metrics with ↓/↑/→
  and ± SE. When the trials carry the test-split evaluation (``test/<metric>`` and
  ``test/<metric>_se``, the CTEG paper's six metrics of Appendix D), the columns are those six in the
  paper's order (Table 2); otherwise the validation metrics. The KL term over training steps
  (Figure 5) is plotted beside it. Trials evaluated with ``eval.protocol: listener`` give CTEG's
  Table 5 instead: L2 ↓, FD ↓, Variation →, P-FD ↓ (LM-Listener's evaluation).
* **Keyframes task** (the KeyframeFace LoRA LM, Express4D-MDM, plug-ins): KeyframeFace Tables 2, 3
  and 4 (:func:`keyframe_tables`); a family may name its own Table 3 rows (``Family.report_label``).

Markdown (paste into a paper draft or a PR) or CSV. The tables and plots are logged to the sweep's
parent MLflow run under ``report/``. :func:`sweep_html` writes the sweep's viewer page (faces or
heatmaps, one row per variant; :mod:`facelab.viewer`).

Standard errors: with one seed per variant, the bootstrap SE of the test metric (1,000 resamples,
computed at evaluation); with several seeds, the standard error of the mean over seeds.
Best values are bold: lowest for ↓, highest for ↑, closest to the GT row for → (no → marking
without a GT row).
"""

from __future__ import annotations

import csv
import io
import math
import re
import tempfile
from collections import defaultdict
from pathlib import Path

# Paper order and direction (Table 2 of "When Words Smile"; → = closer to ground truth is better).
TEST_METRICS = ["cppl", "dot", "fgd", "diversity", "mmodality", "variation"]
LABELS = {
    "cppl": "Cppl",
    "dot": "DoT",
    "fgd": "FgD",
    "diversity": "Diversity",
    "mmodality": "MModality",
    "variation": "Variation",
    # eval.protocol: listener — CTEG Table 5, LM-Listener's evaluation (L2, FD, Variation, P-FD)
    "l2": "L2",
    "fd": "FD",
    "pfd": "P-FD",
}
LISTENER_TABLE = ["l2", "fd", "variation", "pfd"]


def directions() -> dict[str, str]:
    try:
        from facelab.tasks.expressions.evaluate import DIRECTIONS
        from facelab.tasks.expressions.listener import DIRECTIONS as LISTENER

        return {**DIRECTIONS, **LISTENER}
    except ImportError:  # pragma: no cover - the metrics module ships with the package
        return {"cppl": "↓"}


def _arrow(metric: str) -> str:
    name = metric.split("/")[-1]
    if metric.startswith("test/"):
        return directions().get(name, "")
    return "↓" if name in ("loss", "mse", "kl", "lg", "cppl") else ""


def _md(text: str) -> str:
    """A Markdown table cell: a ``|`` in a user's variant name would start a new column."""
    return str(text).replace("|", "\\|")


def _label(metric: str) -> str:
    return LABELS.get(metric.removeprefix("test/"), metric) if metric.startswith("test/") else metric


ROW_OF = "facelab.report.row_of"  # a derived row's source variant (ordering only)
_EXTRA_MSL = re.compile(r"^test(\d+)/(\w+?)(_se)?$")


def derived_rows(trials) -> list:
    """Rows a trial carries beside its own (CTEG Table 2), as pseudo-trials with ``test/<m>`` metrics:

    * ``test<N>/<m>`` → "<variant> (MSL = N)": the same trained model decoded with at most N frames
      (an evaluation-only row; its Cppl is "–", as in the paper);
    * ``shuffle/<m>`` → "Shuffle": the trained model scored on shuffled ground-truth sequences
      ("Shuffle (<variant>)" when several variants carry one)."""
    import dataclasses

    out = []
    shuffled = {t.variant for t in trials if any(k.startswith("shuffle/") for k in t.metrics)}
    for t in trials:
        by_msl: dict[str, dict[str, float]] = defaultdict(dict)
        shuffle: dict[str, float] = {}
        for k, v in t.metrics.items():
            m = _EXTRA_MSL.match(k)
            if m and not m.group(2).endswith("time_s"):
                by_msl[m.group(1)][f"test/{m.group(2)}{m.group(3) or ''}"] = v
            elif k.startswith("shuffle/") and not k.endswith("time_s"):
                shuffle[f"test/{k.removeprefix('shuffle/')}"] = v
        tags = {**t.tags, ROW_OF: t.variant}
        for n, metrics in sorted(by_msl.items(), key=lambda kv: -int(kv[0])):
            out.append(dataclasses.replace(t, variant=f"{t.variant} (MSL = {n})", metrics=metrics, tags=tags))
        if shuffle:
            label = "Shuffle" if len(shuffled) == 1 else f"Shuffle ({t.variant})"
            out.append(dataclasses.replace(t, variant=label, metrics=shuffle, tags=tags))
    return out


def searched_keys(trials) -> list[str]:
    """Job keys a sweep's trials were overridden with that take more than one value within a variant
    (the ``parameters:`` search), in a stable order; ``train.seed`` is the seed, not a setting."""
    values: dict[tuple[str, str], set] = defaultdict(set)
    for t in trials:
        for k, v in t.params.items():
            if k.startswith("override.") and k != "override.train.seed":
                values[(t.variant, k.removeprefix("override."))].add(v)
    return sorted({k for (_v, k), vs in values.items() if len(vs) > 1})


def group_of(t, by: list[str]) -> tuple[str, ...]:
    """A trial's value of each grouping key: ``variant`` or a job key (its override, else its param)."""
    return tuple(t.variant if k == "variant" else t.params.get(f"override.{k}", t.params.get(k, "?")) for k in by)


def group_label(keys: list[str], group: tuple[str, ...]) -> str:
    """A row's name: the variant, then the other grouping keys' values, ``CTEG (optim.lr_mul=0.5)``."""
    named = dict(zip(keys, group))
    label = named.pop("variant", None)
    extra = ", ".join(f"{k}={v}" for k, v in named.items())
    return f"{label} ({extra})" if label and extra else (label or extra)  # no "|": a Markdown cell


def aggregate(trials, metrics: list[str], by: list[str] | None = None) -> list[dict]:
    """Mean and standard error per group, in the order the groups first appear.

    A group is one distinct setting: by default the variant *and* the searched parameters
    (:func:`searched_keys`), so ± is taken over seeds only, never across hyperparameters; ``by``
    names the grouping keys instead (``variant`` and/or job keys such as ``optim.lr_mul``)."""
    keys = by or ["variant", *searched_keys(trials)]
    groups: dict[tuple, list] = defaultdict(list)
    for t in trials:
        if t.status == "FINISHED":
            groups[group_of(t, keys)].append(t)
    rows = []
    for g, ts in groups.items():
        row = {
            "variant": group_label(keys, g),
            "n": len(ts),
            "_variant": ts[0].variant,
            "_base": ts[0].tags.get(ROW_OF, ts[0].variant),
        }
        for m in metrics:
            vals = [t for t in ts if m in t.metrics and math.isfinite(t.metrics[m])]
            if not vals:
                continue
            xs = [t.metrics[m] for t in vals]
            mean = sum(xs) / len(xs)
            if len(xs) > 1:
                se = math.sqrt(sum((v - mean) ** 2 for v in xs) / (len(xs) - 1)) / math.sqrt(len(xs))
            else:
                se = vals[0].metrics.get(f"{m}_se", float("nan"))
            row[m] = (mean, se)
        rows.append(row)
    return rows


def best_rows(rows: list[dict], metrics: list[str]) -> dict[str, str]:
    """Variant holding the best value per metric (GT row excluded; → needs a GT row)."""
    gt = next((r for r in rows if r.get("_variant", r["variant"]).strip().lower() in ("gt", "ground truth")), None)
    out = {}
    for m in metrics:
        cands = [r for r in rows if m in r and r is not gt]
        if not cands:
            continue
        arrow = _arrow(m)
        if arrow == "↓":
            out[m] = min(cands, key=lambda r: r[m][0])["variant"]
        elif arrow == "↑":
            out[m] = max(cands, key=lambda r: r[m][0])["variant"]
        elif arrow == "→" and gt is not None and m in gt:
            out[m] = min(cands, key=lambda r: abs(r[m][0] - gt[m][0]))["variant"]
    return out


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1e4 else f"{x:.4g}"


def render(rows: list[dict], metrics: list[str], fmt: str = "md") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["variant", "n_seeds"] + [c for m in metrics for c in (_label(m), f"{_label(m)}_se")])
        for r in rows:
            vals = []
            for m in metrics:
                mean, se = r.get(m, (float("nan"), float("nan")))
                vals += ["" if math.isnan(mean) else f"{mean:.6g}", "" if math.isnan(se) else f"{se:.3g}"]
            w.writerow([r["variant"], r["n"]] + vals)
        return buf.getvalue()
    best = best_rows(rows, metrics)
    head = "| Variant | " + " | ".join(f"{_label(m)} {_arrow(m)}".rstrip() for m in metrics) + " |"
    lines = [head, "|---|" + "---:|" * len(metrics)]
    for r in rows:
        cells = []
        for m in metrics:
            if m not in r:
                cells.append("–")
                continue
            mean, se = r[m]
            txt = _num(mean) + ("" if math.isnan(se) else f" ± {_num(se)}")
            cells.append(f"**{txt}**" if best.get(m) == r["variant"] else txt)
        lines.append(f"| {_md(r['variant'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_metrics(parent, trials) -> list[str]:
    have = {k for t in trials for k in t.metrics}
    if have & {"test/l2", "test/fd", "test/pfd"}:  # the LM-Listener protocol: Table 5's columns and order
        return [f"test/{m}" for m in LISTENER_TABLE if f"test/{m}" in have]
    test = [f"test/{m}" for m in TEST_METRICS if f"test/{m}" in have]
    if test:
        return test
    metric = parent.data.params.get("sweep.metric.name", "val/loss")
    seen = sorted(k for k in have if k.startswith("val/"))
    return [metric] + [m for m in seen if m != metric]


def kl_curves(c, trials, out: Path) -> Path | None:
    """Figure 5: the KL term over training steps, with (solid) and without (dashed) L_g."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn = 0
    for t in trials:
        hist = sorted(c.get_metric_history(t.run_id, "step/kl"), key=lambda m: m.step)
        if not hist:
            continue
        with_lg = t.params.get("model.target_guided", "True") == "True"
        ax.plot(
            [m.step for m in hist],
            [m.value for m in hist],
            "-" if with_lg else "--",
            label=f"{t.variant} (seed {t.seed}){'' if with_lg else ', w.o. L_g'}",
        )
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training step")
    ax.set_ylabel("KL term")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def copy_trajectories(c, trials, parent_run_id: str, tmp: Path) -> int:
    """Each trained trial's generated-vs-ground-truth trajectories, gathered on the parent run."""
    import re

    import mlflow.artifacts

    n = 0
    for t in trials:
        if t.status != "FINISHED":
            continue
        if "plots/trajectories.png" not in {a.path for a in c.list_artifacts(t.run_id, "plots")}:
            continue
        local = mlflow.artifacts.download_artifacts(
            run_id=t.run_id,
            artifact_path="plots/trajectories.png",
            dst_path=str(tmp / t.run_id),
            tracking_uri=c.tracking_uri,
        )
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{t.variant}_seed{t.seed}").strip("_")
        dst = tmp / f"trajectories_{slug}.png"
        Path(local).rename(dst)
        c.log_artifact(parent_run_id, str(dst), "report")
        n += 1
    return n


# ------------------------------------------------------------------------------------------------
# KeyframeFace: Tables 2, 3 and 4
# ------------------------------------------------------------------------------------------------

KF_LABELS = {
    "mse": "MSE",
    "mae": "MAE",
    "rmse": "RMSE",
    "fid": "FID",
    "w_dist": "W-Dist",
    "r_precision_1": "R-Prec@1",
    "r_precision_2": "R-Prec@2",
    "r_precision_3": "R-Prec@3",
    "mmd": "MMD",
    "diversity": "Diversity",
    "validity": "Valid",
    "keyframes_per_s": "Keyframes/s",
    "train/loss": "Train loss",
    "val/loss": "Eval loss",
}
KF_ARROWS = {
    "mse": "↓",
    "mae": "↓",
    "rmse": "↓",
    "fid": "↓",
    "w_dist": "↓",
    "r_precision_1": "↑",
    "r_precision_2": "↑",
    "r_precision_3": "↑",
    "mmd": "↓",
    "diversity": "→",
    "validity": "↑",
    "keyframes_per_s": "↑",
    "train/loss": "↓",
    "val/loss": "↓",
}
KF_ERRORS = ["mse", "mae", "rmse"]
KF_DISTRIBUTION = [
    "fid",
    "w_dist",
    "r_precision_1",
    "r_precision_2",
    "r_precision_3",
    "mmd",
    "diversity",
    "validity",
    "keyframes_per_s",
]


def keyframe_kinds() -> set[str]:
    """Job kinds whose trials fill the KeyframeFace tables: every family of the keyframes task."""
    from facelab.families import registry

    return {k for k, f in registry.families().items() if f.task == "keyframes"}


def _family_label(t, annotation: str) -> str | None:
    """A family's own Table 3 row label (``Family.report_label``), if it declares one."""
    from facelab.families import registry
    from facelab.families.base import FamilyError

    try:
        hook = registry.get(t.tags.get("facelab.job_kind")).hook("report_label")
    except FamilyError:
        return None
    return hook(t, annotation) if hook else None


ANNOTATION_LABELS = {"original": "Original", "arkit": "ARKit-based", "image": "Image-based"}
FORMAT_LABELS = {"semantic": "Semantic", "non_semantic": "Non-semantic"}


def _stage(t) -> str:
    if t.params.get("eval.baseline", "None") == "gt":
        return "GT"
    return "Tuned" if t.params.get("train.finetune", "True") == "True" else "Base"


def _mean_se(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    se = (
        math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))
        if len(xs) > 1
        else float("nan")
    )
    return mean, se


def _cell(ms: tuple[float, float] | None, bold: bool) -> str:
    if ms is None:
        return "–"
    mean, se = ms
    txt = _num(mean) + ("" if math.isnan(se) else f" ± {_num(se)}")
    return f"**{txt}**" if bold else txt


def _pivot(trials, row_key, stages: list[str], metrics: list[str]):
    """{row: {(stage, metric): (mean, se)}} over finished trials, seeds averaged. A metric is read as
    ``test/<metric>``, or by its own name when it has a prefix (``train/loss``, ``val/loss``: the
    last epoch's)."""
    cells: dict = defaultdict(lambda: defaultdict(list))
    for t in trials:
        if t.status != "FINISHED":
            continue
        st = _stage(t)
        if st not in stages:
            continue
        for m in metrics:
            if st == "GT" and m == "keyframes_per_s":
                continue  # nothing is generated for the GT row
            v = t.metrics.get(m if "/" in m else f"test/{m}")
            if v is not None and math.isfinite(v):
                # GT rows repeat once per grid point with identical values: one per seed counts.
                key = ("gt", t.seed) if st == "GT" else ("trial", t.run_id)
                cells[row_key(t, st)][(st, m)].append((key, v))
    return {row: {k: _mean_se(list(dict(v).values())) for k, v in cols.items()} for row, cols in cells.items()}


def _best(table: dict, cols: list[tuple[str, str]], gt: dict | None) -> dict:
    best = {}
    for col in cols:
        stage, m = col
        cands = [(row, v[col][0]) for row, v in table.items() if col in v and row != "GT"]
        if len(cands) < 2:
            continue  # nothing to compare against
        arrow = KF_ARROWS.get(m)
        if arrow == "↓":
            best[col] = min(cands, key=lambda rv: rv[1])[0]
        elif arrow == "↑":
            best[col] = max(cands, key=lambda rv: rv[1])[0]
        elif arrow == "→" and gt and (("GT", m) in gt):
            best[col] = min(cands, key=lambda rv: abs(rv[1] - gt[("GT", m)][0]))[0]
    return best


def _render_pivot(
    title: str,
    row_head: list[str],
    table: dict,
    cols: list[tuple[str, str]],
    fmt: str,
    row_cells,
    gt_first: bool = True,
) -> str:
    gt = table.get("GT")
    rows = sorted(table, key=lambda r: (r != "GT", str(r))) if gt_first else list(table)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(
            row_head + [f"{st} {KF_LABELS[m]}" for st, m in cols] + [f"{st} {KF_LABELS[m]} se" for st, m in cols]
        )
        for r in rows:
            vals = [table[r].get(c) for c in cols]
            w.writerow(
                row_cells(r)
                + [f"{v[0]:.6g}" if v else "" for v in vals]
                + [f"{v[1]:.3g}" if v and not math.isnan(v[1]) else "" for v in vals]
            )
        return f"# {title}\n" + buf.getvalue()
    best = _best(table, cols, gt)
    multi = len({st for st, _ in cols}) > 1
    head = (
        "| "
        + " | ".join(row_head)
        + " | "
        + " | ".join((f"{st} " if multi else "") + f"{KF_LABELS[m]} {KF_ARROWS[m]}" for st, m in cols)
        + " |"
    )
    lines = [f"**{title}**", "", head, "|" + "---|" * len(row_head) + "---:|" * len(cols)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(row_cells(r))
            + " | "
            + " | ".join(_cell(table[r].get(c), best.get(c) == r) for c in cols)
            + " |"
        )
    return "\n".join(lines) + "\n"


def keyframe_tables(trials, fmt: str = "md") -> str:
    """Tables 2, 3, 4 and 5 of KeyframeFace in the paper's layout, from whatever rows the sweep holds.

    * Table 2 — annotation type x prompt format (rows), Base and Tuned (column groups), MSE/MAE/RMSE,
      and the tuned model's training loss (the last epoch's ``train/loss``).
    * Table 3 — one row per method (GT first), the distribution and alignment metrics measured through
      the pinned evaluator: FID, W-Dist, R-Precision@1/2/3, MMD, Diversity (+ the validity rate).
    * Table 4 — base model (rows), Base and Tuned (column groups), MSE/MAE/RMSE and R-Precision@1.
    * Table 5 — base model x annotation type x prompt format (rows), the tuned model's train and eval
      loss (the last epoch's ``train/loss`` and ``val/loss``: answer-token cross-entropy).
    Means over seeds, ± the standard error of the mean when there are several; bold = best
    (↓ lowest, ↑ highest, → closest to GT). Learned baselines of other families (``keyframe_mdm``:
    Express4D-MDM) are rows of Table 3 only, with their generation speed (keyframes/s) beside the
    LoRA model's; Tables 2, 4 and 5 are about the LoRA-tuned LMs."""
    # Tables 2 and 4 compare prompt formats and base models: their rows are the trials whose job
    # has a prompt (the LoRA-tuned LMs); other families of the task are rows of Table 3 only.
    lm_trials = [t for t in trials if "prompt.format" in t.params]

    def base_label(t):
        b = t.params.get("model.base_model", "")
        return b + (" (tiny, random init)" if t.tags.get("facelab.base_model_label") else "")

    stages = ["Base", "Tuned"]
    t2 = _pivot(
        lm_trials,
        lambda t, st: (t.params.get("data.annotation", ""), t.params.get("prompt.format", "")),
        stages,
        KF_ERRORS + ["train/loss"],
    )
    t2 = dict(
        sorted(
            t2.items(),
            key=lambda kv: (list(ANNOTATION_LABELS).index(kv[0][0]) if kv[0][0] in ANNOTATION_LABELS else 9, kv[0][1]),
        )
    )
    cols2 = [(st, m) for st in stages for m in KF_ERRORS + ["train/loss"] if any((st, m) in v for v in t2.values())]
    out = [
        _render_pivot(
            "Table 2 — annotation type and prompt format (test keyframes)",
            ["Annotation", "Format"],
            t2,
            cols2,
            fmt,
            lambda r: [ANNOTATION_LABELS.get(r[0], r[0]), FORMAT_LABELS.get(r[1], r[1])],
            gt_first=False,
        )
    ]

    def method(t, st):
        if st == "GT":
            return "GT"
        own = _family_label(t, ANNOTATION_LABELS.get(t.params.get("data.annotation"), ""))
        if own is not None:
            return own
        return (
            f"{t.variant} ({ANNOTATION_LABELS.get(t.params.get('data.annotation'), '')}, "
            f"{FORMAT_LABELS.get(t.params.get('prompt.format'), '')}, {base_label(t)})"
        )

    t3 = _pivot(trials, method, ["GT", "Base", "Tuned"], KF_DISTRIBUTION)
    t3 = {r: {("", m): v for (st, m), v in cols.items()} for r, cols in t3.items()}
    cols3 = [("", m) for m in KF_DISTRIBUTION if any(("", m) in v for v in t3.values())]
    out.append(
        _render_pivot(
            "Table 3 — distribution and text alignment (pinned evaluator)", ["Method"], t3, cols3, fmt, lambda r: [r]
        )
    )
    t4 = _pivot(lm_trials, lambda t, st: base_label(t), stages, KF_ERRORS + ["r_precision_1"])
    cols4 = [(st, m) for st in stages for m in KF_ERRORS + ["r_precision_1"] if any((st, m) in v for v in t4.values())]
    out.append(
        _render_pivot(
            "Table 4 — base models, Base vs Tuned", ["Base model"], t4, cols4, fmt, lambda r: [r], gt_first=False
        )
    )
    losses = ["train/loss", "val/loss"]
    t5 = _pivot(
        lm_trials,
        lambda t, st: (base_label(t), t.params.get("data.annotation", ""), t.params.get("prompt.format", "")),
        ["Tuned"],
        losses,
    )
    t5 = dict(
        sorted(
            t5.items(),
            key=lambda kv: (
                kv[0][0],
                list(ANNOTATION_LABELS).index(kv[0][1]) if kv[0][1] in ANNOTATION_LABELS else 9,
                kv[0][2],
            ),
        )
    )
    cols5 = [("Tuned", m) for m in losses if any(("Tuned", m) in v for v in t5.values())]
    out.append(
        _render_pivot(
            "Table 5 — training and evaluation loss of the tuned models",
            ["Base model", "Annotation", "Format"],
            t5,
            cols5,
            fmt,
            lambda r: [r[0], ANNOTATION_LABELS.get(r[1], r[1]), FORMAT_LABELS.get(r[2], r[2])],
            gt_first=False,
        )
    )
    return "\n".join(out)


def sweep_table(
    c, parent, trials, fmt: str = "md", log: bool = True, by: list[str] | None = None, out_dir: Path | None = None
) -> str:
    """The sweep's table (and plots) in ``fmt``; logged to the parent run (``log``) and written to
    ``out_dir`` (table.md, table.csv, plots) when given. ``by``: grouping keys (see :func:`aggregate`)."""
    import json
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if any(t.tags.get("facelab.job_kind") in keyframe_kinds() for t in trials):
        text = keyframe_tables(trials, fmt)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "tables.md").write_text(keyframe_tables(trials, "md"))
            (out_dir / "tables.csv").write_text(keyframe_tables(trials, "csv"))
        if log:
            c.log_text(parent.info.run_id, keyframe_tables(trials, "md"), "report/tables.md")
            c.log_text(parent.info.run_id, keyframe_tables(trials, "csv"), "report/tables.csv")
        return text
    metrics = table_metrics(parent, trials)
    rows = aggregate([*trials, *derived_rows(trials)], metrics, by)
    order = json.loads(parent.data.tags.get("facelab.variants", "[]"))  # the sweep YAML's row order
    rows.sort(
        key=lambda r: (order.index(r["_base"]) if r["_base"] in order else len(order), r["_base"] != r["_variant"])
    )
    text = render(rows, metrics, fmt)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "table.md").write_text(render(rows, metrics, "md"))
        (out_dir / "table.csv").write_text(render(rows, metrics, "csv"))
        kl_curves(c, [t for t in trials if t.status == "FINISHED"], out_dir / "kl_curve.png")
    if log:
        run_id = parent.info.run_id
        c.log_text(run_id, render(rows, metrics, "md"), "report/table.md")
        c.log_text(run_id, render(rows, metrics, "csv"), "report/table.csv")
        with tempfile.TemporaryDirectory() as d:
            png = kl_curves(c, [t for t in trials if t.status == "FINISHED"], Path(d) / "kl_curve.png")
            if png is not None:
                c.log_artifact(run_id, str(png), "report")
            copy_trajectories(c, trials, run_id, Path(d))
    return text


# ------------------------------------------------------------------------------------------------
# The sweep's viewer page (facelab.viewer): one row per variant
# ------------------------------------------------------------------------------------------------


def sweep_html(c, parent, trials, out: Path, by: list[str] | None = None, log: bool = False) -> Path | None:
    """The sweep's HTML page (self-contained, :mod:`facelab.viewer`): one row per variant -- the table's
    rows (the variant and the searched settings, or ``by``), each drawn from its first finished seed
    -- and one column per test item, the ground truth in the first row; keyframe sweeps as faces,
    expression sweeps as heatmaps and curves. Built from each trial's ``viewer/preview.json`` (trials
    without one, such as model-free baseline rows, are left out). Written to ``out``; logged to the
    parent run under ``report/`` when ``log``. None when no trial has a preview."""
    import json
    import os

    import mlflow.artifacts

    from facelab.viewer.html import ARTIFACT_DIR, sweep_payload, write_page

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    keys = by or ["variant", *searched_keys(trials)]
    order = json.loads(parent.data.tags.get("facelab.variants", "[]"))
    finished = [t for t in trials if t.status == "FINISHED"]
    finished.sort(key=lambda t: (order.index(t.variant) if t.variant in order else len(order), t.seed))
    runs, seen = [], set()
    with tempfile.TemporaryDirectory() as d:
        for t in finished:
            g = group_of(t, keys)
            if g in seen or f"{ARTIFACT_DIR}/preview.json" not in {
                a.path for a in c.list_artifacts(t.run_id, ARTIFACT_DIR)
            }:
                continue
            local = mlflow.artifacts.download_artifacts(
                run_id=t.run_id,
                artifact_path=f"{ARTIFACT_DIR}/preview.json",
                dst_path=str(Path(d) / t.run_id),
                tracking_uri=c.tracking_uri,
            )
            runs.append((group_label(keys, g), f"seed {t.seed}", json.loads(Path(local).read_text())))
            seen.add(g)
    if not runs:
        return None
    name = parent.data.tags.get("facelab.sweep", parent.info.run_name or "sweep")
    kinds = {p["kind"] for _, _, p in runs}
    if len(kinds) > 1:  # a mixed sweep: the page shows the task of the first row's run
        runs = [r for r in runs if r[2]["kind"] == runs[0][2]["kind"]]
    page = sweep_payload(
        runs,
        title=f"{name}: generated vs ground truth, one row per variant",
        subtitle="The first test items of each variant's first finished seed; the ground truth on top.",
    )
    path = write_page(page, Path(out))
    if log:
        c.log_artifact(parent.info.run_id, str(path), "report")
    return path
