"""LM-Listener (Ng et al. 2023, "Can Language Models Learn to Listen?"), the CTEG paper's learned
baseline: a VQ-VAE over FLAME expression sequences and a text-conditioned code LM (``model``),
trained in two stages by one Ray Train run (``loop``). Served on ``/v1/expressions`` like CTEG."""

from facelab.families.base import Family
from facelab.families.lm_listener.job import METRICS, LMListenerJob

FAMILY = Family(
    kind="lm_listener",
    job=LMListenerJob,
    metrics=METRICS,
    task="expressions",
    worker_loop="facelab.families.lm_listener.loop:worker_loop",
    load_servable="facelab.families.lm_listener.model:load_servable",
    description="LM-Listener baseline: VQ-VAE + text-conditioned code LM (Ng et al. 2023)",
)
