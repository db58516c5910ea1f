"""What every keyframes-task worker loop shares: the data splits of a job, and the plots, the
per-channel table and the HTML preview (``viewer/preview.html``: ground-truth and generated faces of
the first test keyframes, :mod:`facelab.viewer`) logged with a test-split evaluation (KeyframeFace §5.3)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def load_scripts(data_dir: Path, job: dict):
    from facelab.data.keyframeface import load_split

    d = job["data"]
    return (
        load_split(data_dir, "train")[: d["train_subset"]],
        load_split(data_dir, "val")[: d["val_subset"]],
        load_split(data_dir, "test")[: d["test_subset"]],
    )


def log_eval_artifacts(client, run_id: str, extras: dict) -> None:
    import json

    from facelab.data.arkit import CHANNELS
    from facelab.plots import keyframe_preview, per_channel_errors_plot
    from facelab.viewer.html import keyframe_payload, log_run_preview

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        per_channel_errors_plot(extras["per_channel"], d / "per_channel_error.png")
        keyframe_preview(extras["gt"][:4], extras["pred"][:4], extras["texts"][:4], d / "keyframe_preview.png")
        client.log_artifact(run_id, str(d / "per_channel_error.png"), "plots")
        client.log_artifact(run_id, str(d / "keyframe_preview.png"), "plots")
        table = {name: {k: float(v[i]) for k, v in extras["per_channel"].items()} for i, name in enumerate(CHANNELS)}
        client.log_text(run_id, json.dumps(table, indent=1), "eval/per_channel_errors.json")
    log_run_preview(
        client,
        run_id,
        keyframe_payload(
            extras["gt"],
            extras["pred"],
            extras["texts"],
            title=f"{client.get_run(run_id).info.run_name}: generated vs ground truth",
            subtitle="First test keyframes: the ground-truth face beside the generated one, and all 61 ARKit channels.",
            n=4,
        ),
    )
