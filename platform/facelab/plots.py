"""Plots logged as MLflow artifacts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def loss_curves(c, run_id: str, out: Path, keys=("train/loss", "val/loss", "train/mse", "val/mse", "train/kl", "val/kl")) -> Path | None:
    """Per-epoch loss curves of one run, read back from the MLflow store (the record of truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: c.get_metric_history(run_id, k) for k in keys}
    series = {k: sorted(v, key=lambda m: m.step) for k, v in series.items() if v}
    if not series:
        return None
    groups = sorted({k.split("/", 1)[1] for k in series})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for split, style in (("train", "-o"), ("val", "--s")):
            hist = series.get(f"{split}/{g}")
            if hist:
                ax.plot([m.step for m in hist], [m.value for m in hist], style, ms=3, label=split)
        ax.set_title(g)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    run = c.get_run(run_id)
    fig.suptitle(run.info.run_name or run_id, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
