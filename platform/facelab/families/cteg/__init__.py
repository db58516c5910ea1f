"""CTEG (Xu et al., "When Words Smile", EMNLP 2025): text → a sequence of 53-d FLAME expression vectors.

A CVAE-based autoregressive transformer: the Expression-wise Attention input block (§3.3, ``ewa``),
the CVAD decoder with Latent Temporal Attention (§3.4, ``cvad``), the target-guided loss (§3.5,
``model``), and KV-cached decoding with a stop criterion (§3.6, ``decoding``). ``job`` is its
schema, ``loop`` its Ray Train worker loop, ``servable`` builds and reloads it.
"""

from facelab.families.base import Family
from facelab.families.cteg.job import METRICS, CTEGJob

FAMILY = Family(
    kind="cteg",
    job=CTEGJob,
    metrics=METRICS,
    task="expressions",
    worker_loop="facelab.families.cteg.loop:worker_loop",
    load_servable="facelab.families.cteg.servable:load",
    description="CTEG: CVAE autoregressive transformer, text → 53-d FLAME sequences (EMNLP 2025)",
)
