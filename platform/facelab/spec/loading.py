"""Sweep specifications and job loading: the sweep schema (pydantic), ``--set`` overrides, validation.

Job schemas are not declared here: each family declares its own (``Family.job``) and the registry
hands it over by the job's ``kind``.

Everything a user writes in YAML is checked here, once, at the entry point. Validation collects
every problem (YAML syntax with its line, unknown keys, wrong types, a missing job file, override
dot-paths that do not exist in the job config, empty search spaces, conflicting options) and
raises a single :class:`SpecError` listing them with their key paths, before Ray or MLflow is
touched. Modules downstream receive typed objects, never raw dicts.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from facelab.core.config import SpecError, Strict
from facelab.families import registry
from facelab.families.base import FamilyError

# --------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------

SWEEP_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
VARIANT_NAME_RE = r"[^\W_][\w .,:;+=()\[\]%-]{0,99}"  # "w.o. EwA", "CTEG (MSL = 64)", "LM-Listener"


class Metric(Strict):
    name: str = Field(..., min_length=1, description="A metric reported by the job, e.g. 'val/loss'.")
    goal: Literal["minimize", "maximize"] = "minimize"


DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform")
"""Search distributions, spelled and meant as in W&B Sweeps: ``uniform`` (min..max), ``int_uniform``
(integers min..max), ``log_uniform_values`` (log-uniform between the *values* min and max)."""

# W&B spellings that mean something facelab does not do the same way: refused with the mapping.
W_AND_B_HINTS = {
    "log_uniform": "W&B's 'log_uniform' takes natural-log exponents (it samples e^min..e^max); write "
    "'log_uniform_values' with the values themselves, e.g. {distribution: log_uniform_values, min: 0.001, max: 0.1}",
    "q_uniform": "quantised distributions are not supported; use 'values' with the grid points",
    "q_log_uniform": "quantised distributions are not supported; use 'values' with the grid points",
    "q_log_uniform_values": "quantised distributions are not supported; use 'values' with the grid points",
    "categorical": "use 'values: [...]' (a categorical dimension)",
    "constant": "use 'value: ...'",
}
METHOD_HINTS = {
    "bayes": "W&B's 'bayes' is a Bayesian search: use method 'optuna' (Ray Tune's OptunaSearch, TPE)",
    "hyperband": "hyperband is early termination, not a search method: use early_terminate: {type: asha}",
}


class Parameter(Strict):
    """One search dimension, W&B-style: ``values`` | ``value`` | ``distribution`` + ``min``/``max``."""

    values: list[Any] | None = None
    value: Any = None
    distribution: str | None = Field(None, description=f"One of {DISTRIBUTIONS} (W&B's meanings).")
    min: float | None = None
    max: float | None = None

    @field_validator("distribution")
    @classmethod
    def _known_distribution(cls, v: str | None) -> str | None:
        if v is None or v in DISTRIBUTIONS:
            return v
        if v in W_AND_B_HINTS:
            raise ValueError(f"{v!r}: {W_AND_B_HINTS[v]}")
        raise ValueError(f"unknown distribution {v!r}; one of {list(DISTRIBUTIONS)}")

    @model_validator(mode="after")
    def _one_form(self) -> "Parameter":
        forms = [self.values is not None, "value" in self.model_fields_set, self.distribution is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of 'values', 'value' or 'distribution' (+ 'min'/'max')")
        if self.values is not None and not self.values:
            raise ValueError("'values' is empty: the search space has no points")
        if self.distribution is not None:
            if self.min is None or self.max is None:
                raise ValueError(f"distribution '{self.distribution}' needs both 'min' and 'max'")
            if not self.min < self.max:
                raise ValueError(f"'min' ({self.min}) must be below 'max' ({self.max})")
            if self.distribution == "log_uniform_values" and self.min <= 0:
                raise ValueError("log_uniform_values needs min > 0")
        elif self.min is not None or self.max is not None:
            raise ValueError("'min'/'max' only go with 'distribution'")
        return self

    def grid_points(self) -> list[Any] | None:
        """The finite list of points, or None for a continuous distribution."""
        if self.values is not None:
            return list(self.values)
        if self.distribution is None:
            return [self.value]
        return None


class EarlyTerminate(Strict):
    type: str = Field("asha", description="'asha' (Ray Tune's ASHAScheduler; W&B's 'hyperband' maps to it).")

    @field_validator("type")
    @classmethod
    def _asha(cls, v: str) -> str:
        if v == "asha":
            return v
        if v == "hyperband":
            raise ValueError(
                "'hyperband': use type 'asha' (Ray Tune's asynchronous successive halving, "
                "the algorithm W&B's hyperband early termination runs); eta → reduction_factor, "
                "min_iter → grace_period"
            )
        raise ValueError(f"unknown early_terminate type {v!r}; use 'asha'")

    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA halving rate.")
    max_t: int | None = Field(None, ge=1, description="Epoch budget for ASHA's rungs; default: the job's train.epochs.")


class Resources(Strict):
    num_workers: int = Field(1, ge=1, le=512, description="Ray Train workers (DDP ranks) per trial.")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker; 0 trains on CPU (gloo).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    driver_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray resources each trial's driver (the Tune trial function and the Ray Train controller it "
        "runs) asks for besides its 0.01 CPU, e.g. a custom resource only the stable nodes offer "
        "(`ray start --resources`): a lost worker node then costs a worker-group restart, never the driver.",
    )

    @field_validator("driver_resources")
    @classmethod
    def _driver_resources(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"amounts must be > 0: {bad}")
        return v


class SweepSpec(Strict):
    name: str = Field(..., pattern=SWEEP_NAME_RE, description="MLflow experiment and sweep id.")
    job: str = Field(..., description="Path of the job YAML, relative to the project root.")
    description: str = ""
    metric: Metric
    show: list[str] = Field(
        default_factory=list,
        description="Metrics printed beside the sweep's metric (the summary, `status`, `ls sweeps`): e.g. the "
        "paper's headline metric when the sweep ranks trials by another one.",
    )
    method: str = Field("grid", description="grid | random | optuna.")
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"default": {}})
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])
    num_samples: int = Field(
        1, ge=1, description="random/optuna: samples per variant x seed (optuna: total trials per variant x seed)."
    )
    early_terminate: EarlyTerminate | None = None
    resources: Resources = Resources()
    max_concurrent_trials: int = Field(1, ge=1)
    max_trial_failures: int = Field(
        0,
        ge=-1,
        description="Restarts of a trial whose driver died (the Tune trial function and the Ray Train controller "
        "it runs, e.g. with their node); the restarted trial resumes from its last checkpoint. A trial whose "
        "training failed for good (the job's train.max_failures worker-group restarts used up) is not restarted. "
        "-1: no limit. Off by default: Ray 2.60 can leave the lost controller's worker reservation in place, "
        "which a small cluster may never free; prefer resources.driver_resources.",
    )

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v in ("grid", "random", "optuna"):
            return v
        if v in METHOD_HINTS:
            raise ValueError(f"{v!r}: {METHOD_HINTS[v]}")
        raise ValueError(f"unknown method {v!r}; one of ['grid', 'random', 'optuna']")

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: dict) -> dict:
        if not v:
            raise ValueError("empty: give at least one variant (e.g. 'default: {}')")
        bad = [name for name in v if not re.fullmatch(VARIANT_NAME_RE, str(name)) or ".." in str(name)]
        if bad:
            raise ValueError(
                f"variant name(s) {bad}: a table row name of up to 100 letters, digits, spaces and "
                "_ . , : ; + = ( ) [ ] % - (it names MLflow runs and artifact paths: no '/', '\\', '..')"
            )
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("empty: give at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicates in {v}")
        return v

    @model_validator(mode="after")
    def _grid_points(self) -> "SweepSpec":
        bad = [k for k, p in self.parameters.items() if p.grid_points() is None]
        if self.method == "grid" and bad:
            raise ValueError(grid_problem(bad[0]))
        return self


def grid_problem(key: str) -> str:
    return (
        f"parameters.{key}: method 'grid' needs 'values' or 'value', not a distribution (use method: random or optuna)"
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping; syntax errors name the file and line."""
    if not path.is_file():
        raise SpecError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(str(path), [f"YAML syntax error at {where}{problem}"]) from None
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), [f"not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(str(path), [f"top level must be a mapping, got {type(data).__name__}"])
    return data


def _fmt_loc(prefix: str, loc: tuple) -> str:
    path = ".".join(str(p) for p in loc)
    return ".".join(x for x in (prefix, path) if x) or "(top level)"


def _fields_at(model_cls: Any, parts) -> list[str]:
    """Field names of the (nested) pydantic model reached by ``parts`` from ``model_cls``."""
    cls = model_cls
    for part in parts:
        fields = getattr(cls, "model_fields", None)
        if fields is None or part not in fields:
            return []
        cls = fields[part].annotation
    return list(getattr(cls, "model_fields", {}) or {})


def did_you_mean(model_cls: Any, dotted: str) -> str:
    """' (did you mean 'x.y'?)' for a dotted key close to a real one of ``model_cls``, else ''."""
    if model_cls is None:
        return ""
    parts = str(dotted).split(".")
    # the longest valid prefix, then the closest name at the first wrong part
    for i in range(len(parts)):
        known = _fields_at(model_cls, parts[:i])
        if parts[i] not in known:
            close = difflib.get_close_matches(parts[i], known, n=1, cutoff=0.6)
            return f" (did you mean '{'.'.join([*parts[:i], close[0]])}'?)" if close else ""
    return ""


def pydantic_problems(exc: ValidationError, prefix: str = "", model_cls: Any = None) -> list[str]:
    out = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(model_cls, ".".join(str(p) for p in err["loc"]))
        elif err["type"] == "missing":
            msg = "required key is missing"
        out.append(f"{_fmt_loc(prefix, err['loc'])}: {msg}")
    return out


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """``KEY=VALUE`` strings → (key, YAML-parsed value) pairs."""
    out, problems = [], []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
            problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted KEY")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    if problems:
        raise SpecError("command line", problems)
    return out


def has_path(model_cls: type[BaseModel], dotted: str) -> bool:
    """Is ``dotted`` a field path of the pydantic model class (nested models followed)?"""
    cls: Any = model_cls
    for part in dotted.split("."):
        fields = getattr(cls, "model_fields", None)
        if fields is None or part not in fields:
            return False
        cls = fields[part].annotation
    return True


def set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[last] = value


def apply_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        set_path(out, key, value)
    return out


def job_class(raw: dict, source: str) -> type[Strict]:
    """The job schema of the family a job YAML names with ``kind:`` (required)."""
    if "kind" not in raw:
        raise SpecError(source, [f"kind: required key is missing; one of {sorted(registry.families())}"])
    try:
        return registry.get(raw["kind"]).job
    except FamilyError as exc:
        raise SpecError(source, [f"kind: {exc}"]) from None


def validate_job(raw: dict, source: str, prefix: str = "") -> Strict:
    cls = job_class(raw, source)
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(source, pydantic_problems(exc, prefix, cls)) from None


def load_job(path: str | Path, sets: list[str] | None = None) -> tuple[Strict, dict]:
    """Load and validate a job YAML with ``--set`` overrides → (typed job, resolved dict)."""
    path = Path(path)
    raw = read_yaml(path)
    cls = job_class(raw, str(path))
    problems = []
    for key, value in parse_set(sets or []):
        if not has_path(cls, key):
            problems.append(f"--set {key}: not a key of the {cls.__name__} config{did_you_mean(cls, key)}")
        else:
            set_path(raw, key, value)
    if problems:
        raise SpecError(str(path), problems)
    job = validate_job(raw, str(path))
    return job, job.model_dump(mode="json")


SWEEP_KEYS = set(SweepSpec.model_fields)


@dataclass
class LoadedSweep:
    spec: SweepSpec
    job: Strict  # the base job, ``--set`` job overrides applied
    job_dict: dict  # same, as a plain dict
    source: Path
    job_path: Path
    trials: list["TrialPlan"] = field(default_factory=list)
    variant_jobs: dict[str, dict] = field(default_factory=dict)  # variants with their own job file → that job

    def job_for(self, variant: str) -> dict:
        """The base job of a variant's trials (its own job file, or the sweep's)."""
        return self.variant_jobs.get(variant, self.job_dict)


@dataclass(frozen=True)
class TrialPlan:
    """One trial as planned before Ray starts (``--dry-run`` prints these)."""

    variant: str
    seed: int
    params: dict[str, Any]  # fixed values, or a '<dist ...>' label for sampled ones

    @property
    def name(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.variant} | seed={self.seed}" + (f" | {extra}" if extra else "")

    def overrides(self, variants: dict[str, dict]) -> dict[str, Any]:
        out = dict(variants[self.variant])
        out.update({k: v for k, v in self.params.items() if not (isinstance(v, str) and v.startswith("<"))})
        out["train.seed"] = self.seed
        return out


def plan_trials(spec: SweepSpec) -> list[TrialPlan]:
    """Expand variants x parameters x seeds into the trial list (sampled dims shown as labels)."""
    fixed, sampled = {}, {}
    for key, p in spec.parameters.items():
        pts = p.grid_points()
        if pts is None:
            sampled[key] = f"<{p.distribution} {p.min}..{p.max}>"
        else:
            fixed[key] = pts
    out = []
    for variant in spec.variants:
        for seed in spec.seeds:
            if spec.method == "grid":
                keys = list(fixed)
                for combo in itertools.product(*(fixed[k] for k in keys)):
                    out.append(TrialPlan(variant, seed, dict(zip(keys, combo))))
            else:
                for _ in range(spec.num_samples):
                    labels = {k: (v[0] if len(v) == 1 else f"<one of {v}>") for k, v in fixed.items()}
                    out.append(TrialPlan(variant, seed, {**labels, **sampled}))
    return out


def load_sweep(path: str | Path, sets: list[str] | None = None, root: Path | None = None) -> LoadedSweep:
    """Load a sweep YAML and its job, apply ``--set``, validate everything, plan the trials.

    ``--set`` keys that are sweep fields (``seeds``, ``resources.num_workers`` …) change the
    sweep; any other key (``train.epochs`` …), or one prefixed ``job.``, changes the base job.
    All problems are collected and raised once as :class:`SpecError`.
    """
    path = Path(path)
    root = root or Path.cwd()
    raw = read_yaml(path)
    problems: list[str] = []
    job_sets: dict[str, Any] = {}
    for key, value in parse_set(sets or []):
        if key.startswith("job."):
            job_sets[key[4:]] = value
        elif key.split(".")[0] in SWEEP_KEYS:
            set_path(raw, key, value)
        else:
            job_sets[key] = value

    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        problems += pydantic_problems(exc, model_cls=SweepSpec)
        spec = None
        if raw.get("method", "grid") == "grid" and isinstance(raw.get("parameters"), dict):
            problems += [
                grid_problem(k) for k, p in raw["parameters"].items() if isinstance(p, dict) and "distribution" in p
            ]

    job_ref = raw.get("job")
    job_path = (root / job_ref) if isinstance(job_ref, str) else None
    variants = raw.get("variants") if isinstance(raw.get("variants"), dict) else {"default": {}}
    params = raw.get("parameters") if isinstance(raw.get("parameters"), dict) else {}
    base_job, cls = (
        _load_job_file(root, job_ref, "job", job_sets, problems) if isinstance(job_ref, str) else (None, None)
    )

    # A variant may name its own job file (``job: jobs/other.yaml``): a different model family
    # in the same sweep, e.g. a learned baseline as one row of a paper table.
    jobs: dict[str, tuple[Strict | None, type[Strict] | None]] = {}
    for vname, overrides in variants.items():
        if not isinstance(overrides, dict):
            continue
        ref = overrides.get("job")
        if ref is None:
            jobs[vname] = (base_job, cls)
        elif not isinstance(ref, str):
            problems.append(f"variants.{vname}.job: must be a job file path, got {ref!r}")
        else:
            jobs[vname] = _load_job_file(root, ref, f"variants.{vname}.job", job_sets, problems)
    unused = [
        k for k in job_sets if not any(c is not None and has_path(c, k) for _j, c in [(base_job, cls), *jobs.values()])
    ]
    for key in unused:
        hint = did_you_mean(cls, key) or did_you_mean(SweepSpec, key)
        problems.append(f"--set {key}: not a sweep key nor a key of any job config of this sweep{hint}")

    # Dot-paths of variants/parameters must exist in the job config and give a valid job.
    for vname, (vjob, vcls) in jobs.items():
        if vcls is None:
            continue
        overrides = {str(k): v for k, v in variants[vname].items() if k != "job"}
        for key in overrides:
            if not has_path(vcls, key):
                problems.append(
                    f"variants.{vname}.{key}: not a key of the {vcls.__name__} config{did_you_mean(vcls, key)}"
                )
        for key in params:
            if not has_path(vcls, str(key)):
                problems.append(
                    f"parameters.{key}: not a key of the {vcls.__name__} config{did_you_mean(vcls, str(key))}"
                    + (f" (variant {vname!r})" if vcls is not cls else "")
                )
        reported = registry.get(vcls.model_fields["kind"].default).metrics
        if reported and isinstance(raw.get("metric"), dict):
            name = raw["metric"].get("name")
            if isinstance(name, str) and name not in reported:
                problems.append(
                    f"metric.name: {name!r} is not reported by the {vcls.model_fields['kind'].default} job"
                    + (f" of variant {vname!r}" if vcls is not cls else "")
                    + f"; choose one of {sorted(reported)}"
                )
        shown = raw.get("show") if isinstance(raw.get("show"), list) else []
        for i, name in enumerate(shown):
            if reported and isinstance(name, str) and name not in reported:
                problems.append(
                    f"show[{i}]: {name!r} is not reported by the {vcls.model_fields['kind'].default} job"
                    + (f" of variant {vname!r}" if vcls is not cls else "")
                    + f"; choose among {sorted(reported)}"
                )
        if vjob is None:
            continue
        # Every concrete override must give a valid job (types, ranges, cross-field rules).
        base = vjob.model_dump(mode="json")
        known = {k: v for k, v in overrides.items() if has_path(vcls, k)}
        try:
            vcls.model_validate(apply_overrides(base, known))
        except ValidationError as exc:
            problems += pydantic_problems(exc, prefix=f"variants.{vname}", model_cls=vcls)
        for key, p in params.items():
            if not (isinstance(p, dict) and has_path(vcls, str(key))):
                continue
            if isinstance(p.get("values"), list):
                points = p["values"]
            elif "value" in p:
                points = [p["value"]]
            else:
                points = [
                    int(b) if p.get("distribution") == "int_uniform" and isinstance(b, (int, float)) else b
                    for b in (p.get("min"), p.get("max"))
                    if b is not None
                ]
            for i, point in enumerate(points):
                try:
                    vcls.model_validate(apply_overrides(base, {str(key): point}))
                except ValidationError as exc:
                    problems += [
                        f"parameters.{key}[{i}] = {point!r}: " + e.split(": ", 1)[1] for e in pydantic_problems(exc)
                    ]
        bs = getattr(getattr(vjob, "optim", None), "batch_size", None)
        if spec is not None and bs is not None and bs < spec.resources.num_workers:
            problems.append(
                f"resources.num_workers: {spec.resources.num_workers} workers cannot split optim.batch_size {bs}"
                + (f" (variant {vname!r})" if vcls is not cls else "")
            )
    if "train.seed" in params:
        problems.append("parameters.train.seed: set seeds with the sweep's 'seeds' list")

    if problems:
        # Keep order, drop exact duplicates (the same bad variant seen for several seeds).
        raise SpecError(str(path), list(dict.fromkeys(problems)))
    assert spec is not None and base_job is not None and job_path is not None
    variant_jobs = {v: j.model_dump(mode="json") for v, (j, _c) in jobs.items() if j is not base_job and j is not None}
    for v in spec.variants:  # from here on a variant is its overrides only
        spec.variants[v] = {k: val for k, val in spec.variants[v].items() if k != "job"}
    return LoadedSweep(
        spec=spec,
        job=base_job,
        job_dict=base_job.model_dump(mode="json"),
        source=path,
        job_path=job_path,
        trials=plan_trials(spec),
        variant_jobs=variant_jobs,
    )


def _load_job_file(
    root: Path, ref: str, where: str, job_sets: dict[str, Any], problems: list[str]
) -> tuple[Strict | None, type[Strict] | None]:
    """Read and validate one job file of a sweep (``--set`` job overrides applied where the key
    exists in its config); problems are appended, prefixed with ``where``."""
    job_path = root / ref
    if not job_path.is_file():
        problems.append(f"{where}: job file '{ref}' does not exist (relative to {root.name or root}/)")
        return None, None
    try:
        job_raw = read_yaml(job_path)
        cls = job_class(job_raw, str(ref))
    except SpecError as exc:
        problems += [f"{where} ({ref}): {p}" for p in exc.problems]
        return None, None
    for key, value in job_sets.items():
        if has_path(cls, key):
            set_path(job_raw, key, value)
    try:
        return cls.model_validate(job_raw), cls
    except ValidationError as exc:
        problems += pydantic_problems(exc, prefix=f"{where} ({ref})", model_cls=cls)
        return None, cls


# Metrics the cteg worker loop reports each epoch (``metric.name`` must be one of them).

# lm_listener: val/loss and train/loss are the current stage's objective (stage 1 VQ-VAE, stage 2 code LM).
