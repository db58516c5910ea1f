"""The base of every typed config: strict pydantic models and the one error type for spec problems.

A family's job schema is built from :class:`Strict` models (unknown keys are errors, values are
validated on assignment); :class:`SpecError` carries every problem found, with key paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


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


def dataclass_from(cls: type[T], section: dict[str, Any], where: str, **extra: Any) -> T:
    """A model's typed config (a dataclass) from a job section, strictly: a key that is not a field of
    ``cls`` is an error naming it, never silently dropped (the job schema and the model's config
    must not drift apart; each family's tests pin that their fields agree)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(f"{where}: {unknown} are not fields of {cls.__name__} (known: {sorted(names)})")
    return cls(**section, **extra)
