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


def trajectories(texts: list[str], generated: list, truth: list, out: Path,
                 dims: tuple[int, ...] = (0, 1, 2, 50), fps: int = 25) -> Path:
    """A few generated expression trajectories next to the ground truth of the same text.

    One row per text, one column per plotted coefficient (default: the first three FLAME
    expression coefficients and the jaw-open pose, dim 50)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(texts)
    fig, axes = plt.subplots(n, len(dims), figsize=(3.2 * len(dims), 2.3 * n), squeeze=False)
    for i, (text, gen, gt) in enumerate(zip(texts, generated, truth)):
        gen, gt = np.asarray(gen), np.asarray(gt)
        for j, d in enumerate(dims):
            ax = axes[i][j]
            ax.plot(np.arange(len(gt)) / fps, gt[:, d], color="0.3", label="ground truth")
            ax.plot(np.arange(len(gen)) / fps, gen[:, d], color="tab:red", label="generated")
            if i == 0:
                ax.set_title("jaw pose 0" if d == 50 else f"expression {d}", fontsize=9)
            if j == 0:
                ax.set_ylabel((text[:38] + "…") if len(text) > 40 else text, fontsize=7)
            if i == n - 1:
                ax.set_xlabel("seconds")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
