"""HTTP request/response schemas (pydantic; FastAPI turns violations into 422s naming the field).

Counts are strict integers: ``true``, ``"3"`` or ``3.0`` are refused rather than coerced."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from facelab.data.arkit import CHANNELS

MAX_TEXT_CHARS = 2000
MAX_SAMPLES = 16
MAX_FRAMES = 1024


MAX_KEYFRAMES = 5  # the KeyframeFace scripts hold 1–5 keyframes
MAX_DESCRIPTION_CHARS = 1000


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str
    run_id: str | None = None
    job_kind: str
    metric: str | None = None
    metric_value: str | None = None
    base_model: str | None = None
    note: str | None = None  # e.g. "tiny random-init Qwen3-architecture model — not a pretrained LM"


class ExpressionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., max_length=MAX_TEXT_CHARS, description="The utterance to animate (non-empty).")
    num_samples: int = Field(
        1, strict=True, ge=1, le=MAX_SAMPLES, description="Independent samples from the CVAE prior."
    )
    max_frames: int = Field(
        256, strict=True, ge=1, le=MAX_FRAMES, description="Upper bound on frames per sequence (25 fps)."
    )
    seed: int | None = Field(
        None, strict=True, ge=0, le=2**53, description="Seed for reproducible sampling; null = random."
    )

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


def _blank(v: str, what: str) -> str:
    if not v.strip():
        raise ValueError(f"{what} must contain non-whitespace characters")
    return v


class KeyframeRequest(BaseModel):
    """A KeyframeFace script: background, emotion and 1–5 keyframe descriptions (§3)."""

    model_config = ConfigDict(extra="forbid")

    background: str = Field(..., max_length=MAX_TEXT_CHARS, description="Contextual background of the script.")
    emotion: str = Field(..., max_length=MAX_TEXT_CHARS, description="The (possibly complex) emotion.")
    keyframes: list[str] = Field(
        ..., min_length=1, max_length=MAX_KEYFRAMES, description="One description per keyframe, in order (1–5)."
    )

    @field_validator("background", "emotion")
    @classmethod
    def _not_blank(cls, v: str, info) -> str:
        return _blank(v, info.field_name)

    @field_validator("keyframes")
    @classmethod
    def _descriptions(cls, v: list[str]) -> list[str]:
        for i, d in enumerate(v):
            if len(d) > MAX_DESCRIPTION_CHARS:
                raise ValueError(f"keyframes[{i}]: longer than {MAX_DESCRIPTION_CHARS} characters")
            _blank(d, f"keyframes[{i}]")
        return v


class KeyframeOut(BaseModel):
    index: int
    valid: bool = Field(..., description="The model's answer parsed completely (false: missing values were set to 0).")
    blendshapes: dict[str, float] = Field(
        ..., description=f"The {len(CHANNELS)} ARKit channels in the release's order."
    )


class KeyframeResponse(BaseModel):
    model: ModelInfo
    keyframes: list[KeyframeOut]
