"""Paper-style tables from a finished sweep: rows = variants, columns = metrics (mean ± SE over seeds).

Markdown (paste into a paper draft or a PR) or CSV; the table is also logged to the sweep's parent
MLflow run as ``report/table.md`` / ``report/table.csv``.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict

# Direction marks as in the papers' tables: ↓ lower is better, ↑ higher is better.
ARROWS = {"loss": "↓", "mse": "↓", "kl": "↓", "lg": "↓"}


def _arrow(metric: str) -> str:
    return ARROWS.get(metric.split("/")[-1], "")


def aggregate(trials, metrics: list[str]) -> list[dict]:
    """Mean and standard error over seeds, per variant, in the sweep's variant order."""
    by_variant: dict[str, list] = defaultdict(list)
    for t in trials:
        if t.status == "FINISHED":
            by_variant[t.variant].append(t)
    rows = []
    for variant, ts in by_variant.items():
        row = {"variant": variant, "n": len(ts)}
        for m in metrics:
            vals = [t.metrics[m] for t in ts if m in t.metrics and math.isfinite(t.metrics[m])]
            if vals:
                mean = sum(vals) / len(vals)
                se = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) / math.sqrt(len(vals))
                      if len(vals) > 1 else float("nan"))
                row[m] = (mean, se)
        rows.append(row)
    return rows


def render(rows: list[dict], metrics: list[str], fmt: str = "md") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["variant", "n_seeds"] + [c for m in metrics for c in (m, f"{m}_se")])
        for r in rows:
            vals = []
            for m in metrics:
                mean, se = r.get(m, (float("nan"), float("nan")))
                vals += [f"{mean:.6g}", "" if math.isnan(se) else f"{se:.3g}"]
            w.writerow([r["variant"], r["n"]] + vals)
        return buf.getvalue()
    head = "| Variant | " + " | ".join(f"{m} {_arrow(m)}".rstrip() for m in metrics) + " |"
    sep = "|---|" + "---:|" * len(metrics)
    lines = [head, sep]
    for r in rows:
        cells = []
        for m in metrics:
            if m not in r:
                cells.append("–")
                continue
            mean, se = r[m]
            cells.append(f"{mean:.4f}" + ("" if math.isnan(se) else f" ± {se:.4f}"))
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_table(c, parent, trials, fmt: str = "md", log: bool = True) -> str:
    metric = parent.data.params.get("sweep.metric.name", "val/loss")
    seen = sorted({k for t in trials for k in t.metrics if k.startswith("val/")})
    metrics = [metric] + [m for m in seen if m != metric]
    rows = aggregate(trials, metrics)
    text = render(rows, metrics, fmt)
    if log:
        c.log_text(parent.info.run_id, render(rows, metrics, "md"), "report/table.md")
        c.log_text(parent.info.run_id, render(rows, metrics, "csv"), "report/table.csv")
    return text
