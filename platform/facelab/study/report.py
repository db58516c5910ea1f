"""The study's results: CTEG Figure 4's preference heat map, the average ranks and Fleiss' kappa.

:func:`report` reads the raters' answers (:func:`facelab.study.core.all_responses`; raters who did not
rank every item are listed and left out), computes :func:`facelab.study.stats.summary`, writes
``report.md`` and ``preference.png`` into the study directory and, with ``log``, logs to the sweep's
parent MLflow run: metrics ``study/kappa``, ``study/raters``, ``study/items`` and
``study/avg_rank/<method>``, and the table and heat map under ``study/``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from facelab.study import core, stats


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def table(summary: dict, partial: dict | None = None) -> str:
    """Markdown: one row per method, the share of votes at each rank (Figure 4), the average rank; then
    the number of items and raters and Fleiss' kappa."""
    k = len(summary["methods"])
    head = "| Method | " + " | ".join(f"Rank {r}" for r in range(1, k + 1)) + " | Avg. rank ↓ |"
    lines = [head, "|---|" + "---:|" * (k + 1)]
    best = min(summary["avg_rank"].values()) if summary["raters"] else None
    for m, row in zip(summary["methods"], summary["preference"]):
        avg = summary["avg_rank"][m]
        cell = "–" if math.isnan(avg) else f"{avg:.2f}"
        if best is not None and not math.isnan(avg) and avg == best:
            cell = f"**{cell}**"
        lines.append(f"| {_md(m)} | " + " | ".join(f"{100 * p:.1f}%" for p in row) + f" | {cell} |")
    kappa = summary["kappa"]
    lines += [
        "",
        f"{summary['items']} items, {summary['raters']} raters; Fleiss' κ = "
        + ("– (needs 2 raters)" if math.isnan(kappa) else f"{kappa:.3f}")
        + " (subjects: item × method outputs, categories: ranks 1..K).",
    ]
    if partial:
        lines.append(
            "Left out (did not rank every item): "
            + ", ".join(f"{_md(r)} ({n}/{summary['items']})" for r, n in sorted(partial.items()))
            + "."
        )
    return "\n".join(lines) + "\n"


def heatmap(summary: dict, out: Path, title: str = "") -> Path:
    """Figure 4: methods (rows) × ranks (columns), each cell the share of votes, annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pref = np.asarray(summary["preference"], dtype=float)
    k = len(summary["methods"])
    fig, ax = plt.subplots(figsize=(1.3 * k + 2.8, 0.6 * k + 1.6))
    im = ax.imshow(pref, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(k), [f"Rank {r}" for r in range(1, k + 1)])
    ax.set_yticks(range(k), summary["methods"])
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{100 * pref[i, j]:.0f}%", ha="center", va="center",
                    color="white" if pref[i, j] > 0.6 else "black", fontsize=9)  # fmt: skip
    kappa = summary["kappa"]
    ax.set_title(title + (f"  (Fleiss' κ = {kappa:.3f})" if not math.isnan(kappa) else ""), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def metric_key(name: str) -> str:
    """A method name as an MLflow metric name part (letters, digits, ``_ - . /`` and spaces kept)."""
    return re.sub(r"[^A-Za-z0-9_\-. ]+", "_", name).strip() or "_"


def compute(study_dir: Path) -> tuple[dict, dict, dict]:
    study = core.load(study_dir)
    complete, partial = core.all_responses(study_dir, study)
    methods = [m["name"] for m in study["methods"]]
    items = [it["id"] for it in study["items"]]
    return study, stats.summary(complete, methods, items), partial


def report(study_dir, *, log: bool = False, client=None) -> tuple[str, dict]:
    """``(markdown table, summary)``; writes ``report.md`` and ``preference.png`` in the study
    directory; with ``log`` (and an MLflow ``client``), logs them and the metrics to the sweep's run."""
    study_dir = Path(study_dir)
    study, summary, partial = compute(study_dir)
    text = table(summary, partial)
    (study_dir / "report.md").write_text(text, encoding="utf-8")
    png = heatmap(summary, study_dir / "preference.png", title=str(study.get("sweep") or ""))
    if log:
        if client is None:
            raise core.StudyError("log: no MLflow client")
        run_id = study.get("parent_run_id")
        if not run_id:
            raise core.StudyError(f"{study_dir / core.STUDY_FILE}: no parent_run_id to log to")
        metrics = {"study/raters": summary["raters"], "study/items": summary["items"]}
        if not math.isnan(summary["kappa"]):
            metrics["study/kappa"] = summary["kappa"]
        for m, v in summary["avg_rank"].items():
            if not math.isnan(v):
                metrics[f"study/avg_rank/{metric_key(m)}"] = v
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
        client.log_text(run_id, text, "study/report.md")
        client.log_artifact(run_id, str(png), "study")
    return text, summary
