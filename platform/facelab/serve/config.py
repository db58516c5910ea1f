"""The serve config file (``facelab serve --config FILE``): the models of one server and, per model,
the settings ``--replicas`` & co. give all of them (issue #22: each model keeps its own replica count,
batching and limits).

```yaml
default: cteg-tiny                 # optional: also at the plain /v1/... routes (default: the first)
models:
  - cteg-tiny                      # NAME[@ALIAS], or NAME+NAME... (LoRA adapters of one base)
  - model: keyframe-tiny@champion
    replicas: 2
    max_batch_size: 1
    cpus_per_replica: 0.5
    script_writer: Qwen/Qwen3-4B-Instruct-2507   # POST /v1/scripts (§4.1); default: the tiny test writer
```

A key left out takes the command line's value (its default, or what the flag says); the proxy's
``--request-timeout-s``, host, port and API key are the server's, not a model's. Unknown keys and
bad values are refused with their key path (``models[1].replicas: ...``), all at once, before Ray
starts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator

from facelab.core.config import Strict

SETTINGS = (
    "replicas",
    "max_ongoing_requests",
    "max_queued_requests",
    "max_batch_size",
    "batch_wait_ms",
    "gpus_per_replica",
    "cpus_per_replica",
    "watch_champion",
    "max_adapters",
    "script_writer",
)
"""The per-model keys: the ``facelab serve`` flags of the same name (``--replicas`` ...)."""


class ModelSettings(Strict):
    """One model of the server and its own settings (null / left out: the command line's)."""

    model: str = Field(..., min_length=1, description="NAME[@ALIAS], or NAME[@ALIAS]+NAME[@ALIAS]... (adapters).")
    replicas: int | None = Field(None, ge=1, description="Serve replicas of this model.")
    max_ongoing_requests: int | None = Field(None, ge=1, description="Requests one replica runs at once.")
    max_queued_requests: int | None = Field(None, ge=0, description="Requests waiting beyond those.")
    max_batch_size: int | None = Field(None, ge=1, description="Expression requests decoded as one batch.")
    batch_wait_ms: float | None = Field(None, ge=0, description="Hold a lone request this long for company.")
    gpus_per_replica: float | None = Field(None, ge=0, description="GPUs each replica reserves.")
    cpus_per_replica: float | None = Field(None, gt=0, description="CPUs each replica reserves.")
    watch_champion: float | None = Field(None, ge=0, description="Seconds between looks for a new champion.")
    max_adapters: int | None = Field(None, ge=1, description="Adapters one replica of a group holds at once.")
    script_writer: str | None = Field(
        None, min_length=1, description="A keyframes model's POST /v1/scripts LM (--script-writer; §4.1)."
    )


class ServeConfig(Strict):
    """``facelab serve --config FILE``."""

    default: str | None = Field(None, description="The model also at the plain /v1/... routes.")
    models: list[ModelSettings] = Field(..., min_length=1, description="The models to serve, in order.")

    @field_validator("models", mode="before")
    @classmethod
    def _names(cls, v):
        """A bare ``NAME[@ALIAS]`` stands for ``{model: NAME[@ALIAS]}``."""
        return [{"model": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    def settings(self) -> dict[str, dict]:
        """Per entry (by its first model's name): the settings it gives (those left out are not there)."""
        return {
            m.model.split("+")[0].partition("@")[0].strip(): m.model_dump(exclude={"model"}, exclude_none=True)
            for m in self.models
        }


class ServeConfigError(ValueError):
    """A serve config file that cannot be used: every problem, each with its key path."""


def load_serve_config(path: Path) -> ServeConfig:
    """Read and validate a serve config file; :class:`ServeConfigError` naming the file and every bad key."""
    import yaml

    from facelab.spec.loading import pydantic_problems

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ServeConfigError(f"--config {path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as exc:
        problems = pydantic_problems(exc, model_cls=ServeConfig)
        raise ServeConfigError(f"--config {path}: " + "; ".join(problems)) from None
