"""HTTP request/response schemas (pydantic; FastAPI turns violations into 422s naming the field).

Counts are strict integers: ``true``, ``"3"`` or ``3.0`` are refused rather than coerced. Texts are
capped in characters *and* in UTF-8 bytes (an emoji is one character but four bytes, and several
tokens): the byte caps bound what a request can make a tokenizer and a model read. The model's own
limit is in tokens; the server counts them before generating (``prompt_tokens`` of the servable) and
answers 422 naming the field when a prompt is longer than the model takes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from facelab.data.arkit import CHANNELS

MAX_TEXT_CHARS = 2000
MAX_TEXT_BYTES = 4000  # UTF-8: 2000 ASCII characters, 1333 CJK, 1000 emoji
MAX_SAMPLES = 16
MAX_FRAMES = 1024


MAX_KEYFRAMES = 5  # the KeyframeFace scripts hold 1–5 keyframes
MAX_DESCRIPTION_CHARS = 1000
MAX_DESCRIPTION_BYTES = 2000


def _bytes_at_most(v: str, limit: int, what: str) -> str:
    n = len(v.encode("utf-8"))
    if n > limit:
        raise ValueError(f"{what} is {n} bytes in UTF-8; at most {limit} are allowed")
    return v


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

    text: str = Field(
        ...,
        max_length=MAX_TEXT_CHARS,
        description=f"The utterance to animate (non-empty; at most {MAX_TEXT_CHARS} characters and "
        f"{MAX_TEXT_BYTES} UTF-8 bytes, and no more tokens than the model's text encoder reads).",
    )
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
        return _bytes_at_most(v, MAX_TEXT_BYTES, "text")


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

    background: str = Field(
        ...,
        max_length=MAX_TEXT_CHARS,
        description=f"Contextual background of the script (at most {MAX_TEXT_CHARS} characters, {MAX_TEXT_BYTES} UTF-8 bytes).",
    )
    emotion: str = Field(
        ...,
        max_length=MAX_TEXT_CHARS,
        description=f"The (possibly complex) emotion (at most {MAX_TEXT_CHARS} characters, {MAX_TEXT_BYTES} UTF-8 bytes).",
    )
    keyframes: list[str] = Field(
        ...,
        min_length=1,
        max_length=MAX_KEYFRAMES,
        description=f"One description per keyframe, in order (1–5; each at most {MAX_DESCRIPTION_CHARS} characters, "
        f"{MAX_DESCRIPTION_BYTES} UTF-8 bytes). Every keyframe's prompt holds the whole script, and must fit the "
        "model's token limit.",
    )

    @field_validator("background", "emotion")
    @classmethod
    def _not_blank(cls, v: str, info) -> str:
        return _bytes_at_most(_blank(v, info.field_name), MAX_TEXT_BYTES, info.field_name)

    @field_validator("keyframes")
    @classmethod
    def _descriptions(cls, v: list[str]) -> list[str]:
        for i, d in enumerate(v):
            if len(d) > MAX_DESCRIPTION_CHARS:
                raise ValueError(f"keyframes[{i}]: longer than {MAX_DESCRIPTION_CHARS} characters")
            _blank(d, f"keyframes[{i}]")
            _bytes_at_most(d, MAX_DESCRIPTION_BYTES, f"keyframes[{i}]")
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
