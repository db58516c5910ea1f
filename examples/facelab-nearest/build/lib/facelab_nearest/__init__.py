"""``nearest``: answer a text with the training sequence of the most similar training text.

A small but real baseline for the expressions task (``POST /v1/expressions``), and the worked example
of a family that lives outside facelab: its job schema (``job``), its model (``model``), its Ray Train
worker loop (``loop``) and this ``FAMILY``, found by facelab through the ``facelab.families`` entry
point in ``pyproject.toml``. Copy this folder to start a family of your own.
"""

from facelab.families.base import Family
from facelab_nearest.job import METRICS, NearestJob

FAMILY = Family(
    kind="nearest",
    job=NearestJob,
    metrics=METRICS,
    task="expressions",
    worker_loop="facelab_nearest.loop:worker_loop",
    load_servable="facelab_nearest.model:load",
    description="nearest-neighbour retrieval: the training sequence of the most similar text (plug-in example)",
)
