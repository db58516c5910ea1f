"""Tasks: what a family serves and how it is scored. A task owns its HTTP route, the health probe a
model must pass before it answers users, its metrics and its paper tables; every family of a task
(CTEG and LM-Listener; the LoRA LM and Express4D-MDM; a team's own) shares them.

* ``expressions`` — ``POST /v1/expressions``: text → 53-d FLAME expression sequences; the CTEG
  paper's six metrics and Table 2 layout.
* ``keyframes`` — ``POST /v1/keyframes``: script → 61-channel ARKit keyframes; KeyframeFace's
  metrics and Tables 2-4.
"""

from __future__ import annotations

import importlib

ROUTES = {"expressions": "/v1/expressions", "keyframes": "/v1/keyframes"}
"""Task → the HTTP route that answers it."""


class ModelUnhealthy(RuntimeError):
    """A loaded model failed its task's health probe (the message says how)."""


def probe(task: str, model) -> None:
    """One small real request through ``model`` (shapes and finite values), or :class:`ModelUnhealthy`."""
    if task not in ROUTES:
        raise ModelUnhealthy(f"task {task!r}: no route serves it")
    importlib.import_module(f"facelab.tasks.{task}.serving").probe(model)
