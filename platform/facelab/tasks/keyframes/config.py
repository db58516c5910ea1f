"""Job blocks every keyframes-task family shares: the KeyframeFace data block."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from facelab.core.config import Strict


class KeyframeData(Strict):
    path: str = Field("data/keyframeface", description="Dataset directory (DVC output), relative to the project root.")
    annotation: Literal["original", "arkit", "image"] = Field(
        "arkit",
        description="Keyframe description type in the prompt (§3: original, ARKit-based or image-based annotation).",
    )
    train_subset: int | None = Field(
        None, ge=1, description="Use only the first N training scripts (quick runs); null = all."
    )
    val_subset: int | None = Field(None, ge=1, description="Use only the first N validation scripts; null = all.")
    test_subset: int | None = Field(None, ge=1, description="Evaluate on the first N test scripts only; null = all.")
