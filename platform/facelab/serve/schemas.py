"""HTTP request/response schemas (pydantic), and the OpenAPI contract of the routes: every error body
is an :class:`ErrorResponse`, and :func:`error_responses` documents each status a route answers.

Counts are integers: ``true``, ``"3"`` or ``3.5`` are refused rather than coerced; ``3.0`` is the
integer 3 (JSON has one number type, and JSON Schema's ``integer`` holds it: :data:`Count`). Texts are
capped in characters *and* in UTF-8 bytes (an emoji is one character but four bytes, and several
tokens): the byte caps bound what a request can make a tokenizer and a model read. The model's own
limit is in tokens; the server counts them before generating (``prompt_tokens`` of the servable) and
answers 422 naming the field when a prompt is longer than the model takes.

What JSON Schema can state is stated as a constraint, so that the document (``/openapi.json``) is the
contract a client or a fuzzer can check: lengths in characters (``minLength`` / ``maxLength``), the
non-blank rule (``pattern``: at least one character that is not whitespace in Python's sense,
:data:`NON_BLANK`), integer ranges, ``additionalProperties: false``. Bytes and tokens cannot be
stated in JSON Schema; the field descriptions give them, and their 422s say ``too_many_bytes`` /
``too_many_tokens``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from facelab.data.arkit import CHANNELS

MAX_TEXT_CHARS = 2000
MAX_TEXT_BYTES = 4000  # UTF-8: 2000 ASCII characters, 1333 CJK, 1000 emoji
MAX_SAMPLES = 16
MAX_FRAMES = 1024


MAX_KEYFRAMES = 5  # the KeyframeFace scripts hold 1–5 keyframes
MAX_DESCRIPTION_CHARS = 1000
MAX_DESCRIPTION_BYTES = 2000

NON_BLANK = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
"""A text holds at least one character outside this class: the whitespace of Python's ``str.isspace``
(``strip()``), spelt out so that ECMAScript, Python ``re`` and the Rust regex pydantic runs agree (their
``\\s`` differ: ``\\x1c``–``\\x1f``, ``\\x85``, ``\\ufeff``). Unanchored, as JSON Schema's ``pattern``."""

BLANK_MSG = "must contain non-whitespace characters"
"""The 422 message of a :data:`NON_BLANK` mismatch (the server words pydantic's pattern error so)."""


def _integral(v):
    if type(v) is float and v.is_integer():  # 64.0 (also 1e300: then out of range); never NaN or inf
        return int(v)
    return v


Count = Annotated[int, BeforeValidator(_integral)]
"""A strict integer that also takes a JSON number with no fractional part (``64.0``), as JSON Schema's
``integer`` does; ``true``, ``"64"`` and ``6.5`` are refused (``strict=True`` on the field)."""


def _bytes_at_most(v: str, limit: int, what: str) -> str:
    n = len(v.encode("utf-8"))  # a lone surrogate ("\ud800") never gets here: pydantic refuses it (string_unicode)
    if n > limit:
        raise PydanticCustomError(
            "too_many_bytes",
            "{what} is {n} bytes in UTF-8; at most {limit} are allowed",
            {"what": what, "n": n, "limit": limit},
        )
    return v


class ModelInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "cteg-tiny",
                    "version": "3",
                    "alias": "champion",
                    "run_id": "5f0c8d1e2a9b4c7d8e6f1a2b3c4d5e6f",
                    "job_kind": "my_family",  # a placeholder: the served family's kind
                    "metric": "val/cppl",
                    "metric_value": "4.21",
                    "base_model": None,
                    "note": None,
                }
            ]
        }
    )

    name: str = Field(..., description="Registered model name.")
    version: str = Field(..., description="Registered model version served now.")
    alias: str = Field(..., description="The alias followed (`champion`, or `previous` while falling back).")
    run_id: str | None = None
    job_kind: str = Field(..., description="The model family (`cteg`, `keyframe`, ...).")
    metric: str | None = None
    metric_value: str | None = None
    base_model: str | None = None
    note: str | None = None  # e.g. "tiny random-init Qwen3-architecture model — not a pretrained LM"


class ServedModel(BaseModel):
    """One model of a (multi-model) `facelab serve`, as `GET /v1/models` lists it."""

    name: str = Field(..., description="Registered model name.")
    alias: str = Field(..., description="The alias it follows (`champion` unless `--model NAME@ALIAS`).")
    route_prefix: str = Field(..., description="Its routes: `<route_prefix>/v1/...`.")
    header: str | None = Field(
        None,
        description="An adapter of a group (one base model, several LoRA adapters) that is not the default: "
        "send this header with the requests to `route_prefix`.",
    )
    default: bool = Field(..., description="Whether it also answers the plain `/v1/...` routes.")
    status: Literal["ok", "draining", "failed", "unknown"]
    version: str | None = Field(None, description="The version it serves (null: none loaded, or not known).")


class ModelList(ModelInfo):
    """`GET /v1/models`: the model of these routes (as before), and every model the server serves."""

    models: list[ServedModel] = Field(
        default_factory=list, description="Every model this `facelab serve` serves, the default first."
    )


class ExpressionRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "I am so happy to see you again!", "num_samples": 1, "max_frames": 64, "seed": 0},
                {"text": "What? You sold the house?"},
            ]
        },
    )

    text: str = Field(
        ...,
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        pattern=NON_BLANK,
        description=f"The utterance to animate (not blank; at most {MAX_TEXT_CHARS} characters and "
        f"{MAX_TEXT_BYTES} UTF-8 bytes, and no more tokens than the model's text encoder reads — "
        "beyond those: 422 `too_many_bytes` / `too_many_tokens`).",
        examples=["I am so happy to see you again!"],
    )
    num_samples: Count = Field(
        1, strict=True, ge=1, le=MAX_SAMPLES, description="Independent samples from the CVAE prior.", examples=[1]
    )
    max_frames: Count = Field(
        256,
        strict=True,
        ge=1,
        le=MAX_FRAMES,
        description="Upper bound on frames per sequence (25 fps; the model's trained length caps it too).",
        examples=[64],
    )
    seed: Annotated[int | None, BeforeValidator(_integral)] = Field(
        None,
        strict=True,
        ge=0,
        le=2**53,
        description="Seed for reproducible sampling; null = random.",
        examples=[0],
    )

    @field_validator("text")
    @classmethod
    def _text_bytes(cls, v: str) -> str:
        return _bytes_at_most(v, MAX_TEXT_BYTES, "text")


class Sequence(BaseModel):
    frames: list[list[float]] = Field(..., description="(T, 53) FLAME expression parameters, 25 fps.")


class ExpressionResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": ModelInfo.model_config["json_schema_extra"]["examples"][0],
                    "fps": 25,
                    "sequences": [{"frames": [[0.0] * 53, [0.01] * 53]}],
                }
            ]
        }
    )

    model: ModelInfo
    fps: int = 25
    sequences: list[Sequence]


Description = Annotated[str, Field(min_length=1, max_length=MAX_DESCRIPTION_CHARS, pattern=NON_BLANK)]


class KeyframeRequest(BaseModel):
    """A KeyframeFace script: background, emotion and 1–5 keyframe descriptions (§3)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "background": "A student waits outside the interview room.",
                    "emotion": "nervous but hopeful",
                    "keyframes": ["a tight, anxious smile", "eyes wide, a deep breath"],
                }
            ]
        },
    )

    background: str = Field(
        ...,
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        pattern=NON_BLANK,
        description=f"Contextual background of the script (not blank; at most {MAX_TEXT_CHARS} characters, "
        f"{MAX_TEXT_BYTES} UTF-8 bytes).",
        examples=["A student waits outside the interview room."],
    )
    emotion: str = Field(
        ...,
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        pattern=NON_BLANK,
        description=f"The (possibly complex) emotion (not blank; at most {MAX_TEXT_CHARS} characters, "
        f"{MAX_TEXT_BYTES} UTF-8 bytes).",
        examples=["nervous but hopeful"],
    )
    keyframes: list[Description] = Field(
        ...,
        min_length=1,
        max_length=MAX_KEYFRAMES,
        description=f"One description per keyframe, in order (1–{MAX_KEYFRAMES}; each not blank, at most "
        f"{MAX_DESCRIPTION_CHARS} characters, {MAX_DESCRIPTION_BYTES} UTF-8 bytes). Every keyframe's prompt "
        "holds the whole script, and must fit the model's token limit (else 422 `too_many_tokens`).",
        examples=[["a tight, anxious smile", "eyes wide, a deep breath"]],
    )

    @field_validator("background", "emotion")
    @classmethod
    def _text_bytes(cls, v: str, info) -> str:
        return _bytes_at_most(v, MAX_TEXT_BYTES, info.field_name)

    @field_validator("keyframes")
    @classmethod
    def _description_bytes(cls, v: list[str]) -> list[str]:
        for i, d in enumerate(v):
            _bytes_at_most(d, MAX_DESCRIPTION_BYTES, f"keyframes[{i}]")
        return v


class KeyframeOut(BaseModel):
    index: int = Field(..., description="1-based position of the keyframe in the script.")
    valid: bool = Field(..., description="The model's answer parsed completely (false: missing values were set to 0).")
    blendshapes: dict[str, float] = Field(
        ..., description=f"The {len(CHANNELS)} ARKit channels in the release's order."
    )


class KeyframeResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": dict(
                        ModelInfo.model_config["json_schema_extra"]["examples"][0],
                        name="keyframe-tiny",
                        job_kind="my_keyframe_family",
                        metric="val/loss",
                    ),
                    "keyframes": [{"index": 1, "valid": True, "blendshapes": {c: 0.0 for c in CHANNELS}}],
                }
            ]
        }
    )

    model: ModelInfo
    keyframes: list[KeyframeOut]


class ScriptRequest(BaseModel):
    """Free text to be rewritten into a script (KeyframeFace §4.1, Input Standardization)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "She opens the letter, can't believe it, then bursts out laughing.", "max_keyframes": 3},
                {"text": "A tired nurse hears her shift is extended.", "seed": 7},
            ]
        },
    )

    text: str = Field(
        ...,
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        pattern=NON_BLANK,
        description=f"What the face should show, in the user's words (not blank; at most {MAX_TEXT_CHARS} "
        f"characters and {MAX_TEXT_BYTES} UTF-8 bytes, and no more tokens than the script writer takes — "
        "beyond those: 422 `too_many_bytes` / `too_many_tokens`).",
        examples=["She opens the letter, can't believe it, then bursts out laughing."],
    )
    max_keyframes: Count = Field(
        MAX_KEYFRAMES,
        strict=True,
        ge=1,
        le=MAX_KEYFRAMES,
        description=f"The most keyframes the script may hold (1–{MAX_KEYFRAMES}); the writer chooses how many.",
        examples=[3],
    )
    seed: Annotated[int | None, BeforeValidator(_integral)] = Field(
        None, strict=True, ge=0, le=2**53, description="Seed for reproducible sampling; null = random.", examples=[0]
    )

    @field_validator("text")
    @classmethod
    def _text_bytes(cls, v: str) -> str:
        return _bytes_at_most(v, MAX_TEXT_BYTES, "text")


class ScriptWriterInfo(BaseModel):
    model: str = Field(..., description="The writer model (`--script-writer`; default: the tiny test model).")
    tiny: bool = Field(..., description="The untrained tiny test model: its scripts are well-formed, not meaningful.")
    note: str | None = Field(None, description="A warning to show with the script (set for the tiny writer).")


def validate_script(obj) -> dict:
    """A written script checked by the keyframes request's own schema (:class:`KeyframeRequest`: non-blank
    texts, character and byte caps, 1-5 keyframes, no other keys) -> the request as a dict; ``ValueError``
    naming each bad field otherwise (``POST /v1/scripts`` answers only scripts that pass)."""
    from pydantic import ValidationError

    try:
        return KeyframeRequest.model_validate(obj).model_dump()
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'script'}: {e['msg']}" for e in exc.errors()]
        raise ValueError("the script is not a valid keyframes request: " + "; ".join(problems)) from None


class ScriptResponse(BaseModel):
    """`POST /v1/scripts`: a script that is a valid `POST /v1/keyframes` request, and who wrote it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "script": KeyframeRequest.model_config["json_schema_extra"]["examples"][0],
                    "writer": {"model": "Qwen/Qwen3-4B-Instruct-2507", "tiny": False, "note": None},
                    "seed": 0,
                }
            ]
        }
    )

    script: KeyframeRequest = Field(..., description="Edit it, then send it to `POST /v1/keyframes` as is.")
    writer: ScriptWriterInfo
    seed: int = Field(..., description="The seed used (the request's, or the random one drawn).")


class Fallback(BaseModel):
    alias: str
    version: str
    champion: str | None = Field(None, description="The version the champion alias points at (null: none).")


class PeerHealth(BaseModel):
    """One model of the server in `GET /healthz` (`models`): its state and the version it serves."""

    status: Literal["ok", "draining", "failed", "unknown"] = Field(
        ...,
        description="`failed`: no version of it could be loaded (it answers 503; the reason is at its "
        "`/v1/status`); `unknown`: no replica of it has reported for a while (starting, or gone).",
    )
    version: str | None = None
    route_prefix: str = Field(..., description="Where it answers: `/models/<name>` (the default also at `/`).")


class Health(BaseModel):
    """`GET /healthz`: 200 while serving, 503 (same body, `status: draining`) while shutting down, or
    (`status: failed`) while no version of this model could be loaded — the other models of a
    multi-model server keep serving; `models` tells the state of each."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "model": "cteg-tiny",
                    "version": "3",
                    "refused": [],
                    "retrying": [],
                    "fallback": None,
                }
            ]
        }
    )

    status: Literal["ok", "draining", "failed"]
    model: str
    version: str | None = Field(..., description="The version served (null: none could be loaded).")
    refused: list[str] = Field(..., description="Versions refused for good (the reasons: `GET /v1/status`).")
    retrying: list[str] = Field(..., description="Versions that failed to load for a reason that may pass.")
    fallback: Fallback | None = Field(None, description="Set while the champion cannot load and @previous serves.")
    models: dict[str, PeerHealth] = Field(
        default_factory=dict,
        description="Every model this `facelab serve` serves (this one included), by registered name.",
    )


class Retry(BaseModel):
    attempts: int
    next_in_s: float
    reason: str


class ServerStatus(BaseModel):
    """`GET /v1/status` (behind the API key): the reasons `/healthz` leaves out."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "model": "cteg-tiny",
                    "version": "3",
                    "alias": "champion",
                    "refused": {"4": "CheckpointError: model.safetensors: missing"},
                    "retrying": {},
                    "fallback": None,
                    "in_flight": 0,
                    "request_timeout_s": 120.0,
                }
            ]
        }
    )

    status: Literal["ok", "draining", "failed"]
    model: str
    version: str | None = Field(..., description="The version served (null: none could be loaded).")
    alias: str
    load_error: str | None = Field(None, description="Why no version could be loaded (status `failed`).")
    refused: dict[str, str] = Field(..., description="Refused version → why.")
    retrying: dict[str, Retry] = Field(..., description="Version retried with backoff → when and why.")
    fallback: dict[str, str | None] | None = Field(None, description="alias, version, champion, reason.")
    in_flight: int
    request_timeout_s: float


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


class FieldError(BaseModel):
    """One problem with a request."""

    field: str = Field(
        ...,
        description="What is at fault: a body field as a dot path (`text`, `keyframes.1`), `body`, a query "
        "parameter (`query.format`), the `X-API-Key` header, the served `model`, the `request` (its deadline) "
        "or the `server` (draining).",
    )
    msg: str = Field(..., description="What is wrong, for a person.")
    type: str = Field(
        ...,
        description="What is wrong, for a program: pydantic's error type (`missing`, `string_too_long`, "
        "`string_pattern_mismatch`, `int_type`, `extra_forbidden`, `json_invalid`, ...) or facelab's "
        "(`too_many_bytes`, `too_many_tokens`, `too_large`, `unauthorized`, `wrong_model_kind`, `timeout`, "
        "`busy`, `draining`, `model_unavailable`, `unknown_model`).",
    )


class ErrorResponse(BaseModel):
    """Every error body: `detail` lists the problems, each naming its field — or, for errors raised by
    the web framework itself (a body it cannot read: 400; an unknown path or method: 404 / 405), is a
    sentence."""

    detail: list[FieldError] | str


def _err(field: str, msg: str, type_: str) -> dict:
    return {"value": {"detail": [{"field": field, "msg": msg, "type": type_}]}}


_PLAIN = {"text/plain": {"schema": {"type": "string"}, "example": "Request 7f3a timed out after 120.0s."}}

_ERRORS: dict[int, dict] = {
    400: {
        "description": "The body cannot be read as JSON text (not UTF-8, or nested too deeply to parse); "
        "`detail` is a sentence.",
        "examples": {"unreadable": {"value": {"detail": "There was an error parsing the body"}}},
    },
    401: {
        "description": "The server holds an API key and the request did not present it: send "
        "`X-API-Key: <key>` (or `Authorization: Bearer <key>`). Never answered without a key configured.",
        "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
        "examples": {
            "no key": _err(
                "X-API-Key",
                "missing or wrong API key: send the header 'X-API-Key: <key>' (or 'Authorization: Bearer <key>')",
                "unauthorized",
            )
        },
    },
    408: {
        "description": "Generation stopped at the request's deadline (`--request-timeout-s` after the replica "
        "received it). The Ray Serve proxy answers 408 itself, as plain text, when a request outlives its "
        "`request_timeout_s`.",
        "examples": {
            "deadline": _err(
                "request",
                "generation stopped: the request ran past its deadline (120 s, --request-timeout-s)",
                "timeout",
            )
        },
        "plain": True,
    },
    409: {
        "description": "The served model is of the other task (e.g. a keyframe model asked for expressions).",
        "examples": {
            "other task": _err(
                "model",
                "the served model is a 'my_keyframe_family' model; /v1/expressions needs a 'my_family' "
                "model (this one answers /v1/keyframes)",
                "wrong_model_kind",
            )
        },
    },
    413: {
        "description": "The body is larger than 64 KiB (declared in Content-Length, or counted while a "
        "chunked body streams in); nothing of it was parsed.",
        "examples": {"too large": _err("body", "body larger than 65536 bytes", "too_large")},
    },
    422: {
        "description": "The request breaks the schema — one entry per problem, each naming its field: missing, "
        "of the wrong type, out of range, blank, too long in characters, unknown fields, a body that is not "
        "a JSON object or not valid JSON — or a limit JSON Schema cannot state: a text longer than its "
        "UTF-8 byte cap (`too_many_bytes`), or a prompt longer than the served model takes "
        "(`too_many_tokens`, counted before any generation).",
        "examples": {
            "blank text": _err("text", f"text {BLANK_MSG}", "string_pattern_mismatch"),
            "out of range": _err("max_frames", "Input should be less than or equal to 1024", "less_than_equal"),
            "too many tokens": _err(
                "text",
                "the request makes a prompt of 1001 tokens, but this model takes at most 512 (the text "
                "encoder reads at most 512 tokens); text alone is 1001 tokens — shorten it",
                "too_many_tokens",
            ),
        },
    },
    500: {
        "description": "The model produced non-finite values (a broken model, not the request); `detail` is a "
        "sentence.",
        "examples": {"non-finite": {"value": {"detail": "model produced non-finite frames"}}},
    },
    503: {
        "description": "The server is draining (shutting down), the model stayed busy until the request's "
        "deadline, or no version of this model could be loaded (a multi-model server); retry after `Retry-After` seconds. The Ray Serve proxy answers 503 itself, as plain text, "
        "when every replica's queue is full.",
        "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}},
        "examples": {
            "draining": _err("server", "the server is shutting down (draining); retry later", "draining"),
            "busy": _err("request", "the model stayed busy until this request's deadline; retry", "busy"),
            "unavailable": _err(
                "model",
                "models:/keyframe-tiny@champion could not be loaded (see /v1/status); the server's other models "
                "keep serving",
                "model_unavailable",
            ),
        },
        "plain": True,
    },
}


def error_responses(*codes: int) -> dict[int, dict]:
    """``responses=`` of a route: an :class:`ErrorResponse` (with examples) for each status in ``codes``;
    408 and 503 may also come from the Ray Serve proxy as plain text."""
    out = {}
    for code in codes:
        spec = _ERRORS[code]
        content = {"application/json": {"examples": spec["examples"]}}
        if spec.get("plain"):
            content.update(_PLAIN)
        out[code] = {"model": ErrorResponse, "description": spec["description"], "content": content}
        if "headers" in spec:
            out[code]["headers"] = spec["headers"]
    return out
