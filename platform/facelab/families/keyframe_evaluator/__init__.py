"""The contrastive text–motion evaluator of KeyframeFace (Appendix C): the feature space of FID,
R-Precision, MMD and Diversity. Trained and registered like any family; keyframes-task jobs pin one
version (``eval.evaluator``) and score through it. Not served on a route of its own."""

from facelab.families.base import Family
from facelab.families.keyframe_evaluator.job import METRICS, EvaluatorJob

FAMILY = Family(
    kind="keyframe_evaluator",
    job=EvaluatorJob,
    metrics=METRICS,
    task=None,
    worker_loop="facelab.families.keyframe_evaluator.loop:worker_loop",
    load_servable="facelab.families.keyframe_evaluator.model:load_servable",
    description="KeyframeFace Appendix C text–motion evaluator (InfoNCE), scores keyframes-task models",
)
