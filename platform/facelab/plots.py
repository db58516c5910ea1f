"""Plots logged as MLflow artifacts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def loss_curves(
    c, run_id: str, out: Path, keys=("train/loss", "val/loss", "train/mse", "val/mse", "train/kl", "val/kl")
) -> Path | None:
    """Per-epoch loss curves of one run, read back from the MLflow store (the record of truth); None
    where matplotlib is not installed (a minimal GPU bundle): the run is complete without the picture."""
    try:
        import matplotlib
    except ImportError:
        return None

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


def trajectories(
    texts: list[str], generated: list, truth: list, out: Path, dims: tuple[int, ...] = (0, 1, 2, 50), fps: int = 25
) -> Path:
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


# ------------------------------------------------------------------------------------------------
# KeyframeFace: per-channel errors and a keyframe preview
# ------------------------------------------------------------------------------------------------


def _region_colors():
    from facelab.data.arkit import CHANNELS, REGIONS

    palette = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#000000", "#ee8866"]
    color_of = {}
    for i, (region, names) in enumerate(REGIONS.items()):
        for n in names:
            color_of[n] = palette[i % len(palette)]
    return [color_of.get(n, "#888888") for n in CHANNELS], {r: palette[i % len(palette)] for i, r in enumerate(REGIONS)}


def per_channel_errors_plot(per_channel: dict, out: Path, metric: str = "mae") -> Path:
    """Bar chart of one error per ARKit channel (release order), coloured by facial region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from facelab.data.arkit import CHANNELS

    colors, legend = _region_colors()
    values = per_channel[metric]
    fig, ax = plt.subplots(figsize=(14, 3.8))
    ax.bar(range(len(CHANNELS)), values, color=colors)
    ax.set_xticks(range(len(CHANNELS)))
    ax.set_xticklabels(CHANNELS, rotation=90, fontsize=6)
    ax.set_ylabel(metric.upper())
    ax.set_title(f"per-channel {metric.upper()} on the test keyframes")
    ax.legend(
        handles=[Patch(color=c, label=r) for r, c in legend.items()], fontsize=7, ncol=len(legend), loc="upper right"
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_face(ax, v, title: str = "") -> None:
    """The schematic face of 61 ARKit values on a matplotlib axis: every channel moves its part (brows,
    lids, gaze, cheeks, nose, every mouth shape, jaw, tongue, head and eye pose), drawn by the same rig
    as the HTML viewer (:func:`facelab.viewer.rig.draw_face`), with the strongest channels under it."""
    from facelab.viewer.rig import draw_face as draw

    draw(ax, v, title)


def keyframe_preview(gt, pred, texts: list[str], out: Path) -> Path:
    """Ground truth (top) and generated (bottom) keyframes drawn as schematic faces (:func:`draw_face`)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(gt))
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 7.0), squeeze=False)
    for i in range(len(gt)):
        draw_face(axes[0][i], gt[i], "\n".join(textwrap.wrap(texts[i], 34)[:3]) + "\n(ground truth)")
        draw_face(axes[1][i], pred[i], "generated")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
