"""Paper-layout tables from a finished sweep: rows = variants, columns = metrics with ↓/↑/→ and ± SE.

When the trials carry the test-split evaluation (``test/<metric>`` and ``test/<metric>_se``, CTEG's
six metrics of Appendix D), the columns are those six in the paper's order; otherwise the
validation metrics. Markdown (paste into a paper draft or a PR) or CSV. The table and the plots
(the KL term over training steps, Figure 5) are logged to the sweep's parent MLflow run under
``report/``.

Standard errors: with one seed per variant, the bootstrap SE of the test metric (1,000 resamples,
computed at evaluation); with several seeds, the standard error of the mean over seeds.
Best values are bold: lowest for ↓, highest for ↑, closest to the GT row for → (no → marking
without a GT row).
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections import defaultdict
from pathlib import Path

# Paper order and direction (Table 2 of "When Words Smile"; → = closer to ground truth is better).
TEST_METRICS = ["cppl", "dot", "fgd", "diversity", "mmodality", "variation"]
LABELS = {"cppl": "Cppl", "dot": "DoT", "fgd": "FgD", "diversity": "Diversity", "mmodality": "MModality",
          "variation": "Variation"}


def directions() -> dict[str, str]:
    try:
        from facelab.metrics.cteg_eval import DIRECTIONS

        return dict(DIRECTIONS)
    except ImportError:  # pragma: no cover - the metrics module ships with the package
        return {"cppl": "↓"}


def _arrow(metric: str) -> str:
    name = metric.split("/")[-1]
    if metric.startswith("test/"):
        return directions().get(name, "")
    return "↓" if name in ("loss", "mse", "kl", "lg", "cppl") else ""


def _label(metric: str) -> str:
    return LABELS.get(metric.removeprefix("test/"), metric) if metric.startswith("test/") else metric


def aggregate(trials, metrics: list[str]) -> list[dict]:
    """Mean and standard error per variant, in the order the variants first appear."""
    by_variant: dict[str, list] = defaultdict(list)
    for t in trials:
        if t.status == "FINISHED":
            by_variant[t.variant].append(t)
    rows = []
    for variant, ts in by_variant.items():
        row = {"variant": variant, "n": len(ts)}
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
    gt = next((r for r in rows if r["variant"].strip().lower() in ("gt", "ground truth")), None)
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
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_metrics(parent, trials) -> list[str]:
    have = {k for t in trials for k in t.metrics}
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
        ax.plot([m.step for m in hist], [m.value for m in hist], "-" if with_lg else "--",
                label=f"{t.variant} (seed {t.seed}){'' if with_lg else ', w.o. L_g'}")
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
        local = mlflow.artifacts.download_artifacts(run_id=t.run_id, artifact_path="plots/trajectories.png",
                                                    dst_path=str(tmp / t.run_id), tracking_uri=c.tracking_uri)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{t.variant}_seed{t.seed}").strip("_")
        dst = tmp / f"trajectories_{slug}.png"
        Path(local).rename(dst)
        c.log_artifact(parent_run_id, str(dst), "report")
        n += 1
    return n


def sweep_table(c, parent, trials, fmt: str = "md", log: bool = True) -> str:
    import json
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    metrics = table_metrics(parent, trials)
    rows = aggregate(trials, metrics)
    order = json.loads(parent.data.tags.get("facelab.variants", "[]"))  # the sweep YAML's row order
    rows.sort(key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
    text = render(rows, metrics, fmt)
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
