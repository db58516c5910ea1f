"""One keyframe answer as every keyframes-task model gives it (the LoRA LM's parsed JSON, a sampled
diffusion keyframe, a team's own model): 61 in-range values plus how they were obtained."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class ParseResult:
    """One parsed answer (see the module docstring for the meaning of the counts). Compared by
    identity: compare ``values`` with ``np.array_equal``."""

    values: np.ndarray  # float32 (61,), always in range
    valid: bool
    n_missing: int
    n_unknown: int
    n_clipped: int
    error: str | None
    keyframe: int | None = None
    """Keyframe number named by the answer's ``Keyframe_x`` key (1-based), if any."""
    text: str = field(default="", repr=False)
    """The answer text that was parsed."""
