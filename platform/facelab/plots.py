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
    """A simple schematic face from 61 ARKit values: eyelids (blink/wide), gaze (eye yaw/pitch),
    brows (inner up, outer up, down), mouth (jaw open, smile/frown, pucker/funnel, stretch), cheek
    puff, head roll. Enough to see at a glance what a keyframe does; not a renderer."""
    import numpy as np
    from matplotlib.patches import Ellipse

    from facelab.data.arkit import INDEX

    g = lambda n: float(v[INDEX[n]])  # noqa: E731
    roll = g("HeadRoll") * 25.0
    t = np.deg2rad(roll)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])

    def P(x, y):
        x, y = rot @ np.array([np.asarray(x, float), np.asarray(y, float)])
        return x + g("HeadYaw") * 0.25, y + g("HeadPitch") * 0.2

    puff = g("CheekPuff") * 0.12
    ax.add_patch(Ellipse(P(0, 0), 2.0 + puff, 2.6, angle=roll, fill=False, lw=2, color="#333333"))
    for side, sx in (("Left", -1), ("Right", 1)):
        cx, cy = 0.42 * sx, 0.35
        open_ = max(0.05, 1.0 - g(f"EyeBlink{side}") + 0.5 * g(f"EyeWide{side}") - 0.4 * g(f"EyeSquint{side}"))
        ax.add_patch(Ellipse(P(cx, cy), 0.34, 0.16 * open_, angle=roll, fill=False, lw=1.5, color="#333333"))
        yaw, pitch = g(f"{side}EyeYaw"), g(f"{side}EyePitch")
        if open_ > 0.2:
            ax.plot(*P(cx + 0.1 * yaw, cy + 0.05 * pitch), "o", ms=3, color="#333333")
        inner = 0.12 * g("BrowInnerUp") - 0.1 * g(f"BrowDown{side}")
        outer = 0.12 * g(f"BrowOuterUp{side}") - 0.05 * g(f"BrowDown{side}")
        xs = [cx - 0.2 * sx, cx + 0.2 * sx]
        ax.plot(*P(xs, [cy + 0.2 + inner, cy + 0.2 + outer]), lw=2, color="#774422")
    smile = 0.5 * (g("MouthSmileLeft") + g("MouthSmileRight")) - 0.5 * (g("MouthFrownLeft") + g("MouthFrownRight"))
    width = (
        0.5
        + 0.25 * 0.5 * (g("MouthStretchLeft") + g("MouthStretchRight"))
        - 0.25 * g("MouthPucker")
        - 0.15 * g("MouthFunnel")
    )
    openness = 0.5 * g("JawOpen") + 0.1 * g("MouthFunnel")
    xs = np.linspace(-width / 2, width / 2, 21)
    upper = -0.55 + 0.18 * smile * (xs / (width / 2)) ** 2
    lower = upper - openness * (1 - (xs / (width / 2)) ** 2)
    ax.plot(*P(xs, upper), lw=2, color="#aa3333")
    ax.plot(*P(xs, lower), lw=2, color="#aa3333")
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.5, 1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=7)


def keyframe_preview(gt, pred, texts: list[str], out: Path) -> Path:
    """Ground truth (top) and generated (bottom) keyframes drawn as schematic faces."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(gt))
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.6), squeeze=False)
    for i in range(len(gt)):
        draw_face(axes[0][i], gt[i], "\n".join(textwrap.wrap(texts[i], 34)[:3]) + "\n(ground truth)")
        draw_face(axes[1][i], pred[i], "generated")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
