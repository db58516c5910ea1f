"""The base of every typed config: strict pydantic models and the one error type for spec problems.

A family's job schema is built from :class:`Strict` models (unknown keys are errors, values are
validated on assignment); :class:`SpecError` carries every problem found, with key paths.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SpecError(ValueError):
    """One or more problems in a job or sweep spec; ``problems`` lists them with key paths."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class Strict(BaseModel):
    """Base model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Train(Strict):
    """The epoch-loop settings most families share (epochs, seed, caps, checkpoints, restarts, logging)."""

    epochs: int = Field(50, ge=1, description="Training epochs.")
    seed: int = Field(0, description="Seed for weights, data order and sampling (a sweep sets it per trial).")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="Cap on optimizer steps per epoch (quick runs); null = full epoch."
    )
    max_val_batches: int | None = Field(
        None, ge=1, description="Cap on validation batches; null = the whole dev split."
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="Ray Train keeps this many newest checkpoints per trial.")
    max_failures: int = Field(
        1, ge=0, description="Worker-group restarts allowed per trial (resumes from the last checkpoint)."
    )
    log_every_steps: int = Field(
        10, ge=1, description="Per-step loss terms (KL curve, Figure 5) are logged every N optimizer steps."
    )
