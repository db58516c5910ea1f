"""HTTP request/response schemas (pydantic; FastAPI turns violations into 422s naming the field)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TEXT_CHARS = 2000
MAX_SAMPLES = 16
MAX_FRAMES = 1024


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str
    run_id: str | None = None
    job_kind: str
    metric: str | None = None
    metric_value: str | None = None


class ExpressionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., max_length=MAX_TEXT_CHARS, description="The utterance to animate (non-empty).")
    num_samples: int = Field(1, ge=1, le=MAX_SAMPLES, description="Independent samples from the CVAE prior.")
    max_frames: int = Field(256, ge=1, le=MAX_FRAMES, description="Upper bound on frames per sequence (25 fps).")
    seed: int | None = Field(None, ge=0, le=2**53, description="Seed for reproducible sampling; null = random.")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text must contain non-whitespace characters")
        return v


class Sequence(BaseModel):
    frames: list[list[float]]


class ExpressionResponse(BaseModel):
    model: ModelInfo
    fps: int = 25
    sequences: list[Sequence]
