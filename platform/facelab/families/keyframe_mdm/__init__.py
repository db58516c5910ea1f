"""Express4D-MDM, KeyframeFace's Table 3 baseline: the Motion Diffusion Model's transformer denoiser
over a script's keyframes (DDPM, x0 objective, classifier-free guidance). Served on ``/v1/keyframes``."""

from facelab.families.base import Family
from facelab.families.keyframe_mdm.job import METRICS, KeyframeMDMJob

FAMILY = Family(
    kind="keyframe_mdm",
    job=KeyframeMDMJob,
    metrics=METRICS,
    task="keyframes",
    worker_loop="facelab.families.keyframe_mdm.loop:worker_loop",
    load_servable="facelab.families.keyframe_mdm.model:load_servable",
    report_label="facelab.families.keyframe_mdm.model:report_label",
    description="Express4D-MDM baseline: transformer denoiser over keyframes (KeyframeFace Table 3)",
)
