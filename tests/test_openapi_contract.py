"""The OpenAPI document is the contract (``/openapi.json``): Schemathesis, with every check (as
``st run --checks all``), finds no difference between what the document promises and what the server
answers — request schemas that say what is refused (blank texts, lengths), each status with its body
(`ErrorResponse`), the 200 bodies.

Fast tier: the FastAPI app ``facelab serve`` runs in each replica, built in this process without Ray
(:func:`facelab.serve.app.asgi_app`) on a tiny model of each task — a random-init CTEG (expressions)
and a LoRA adapter on a tiny random Qwen3-architecture LM (keyframes) — and tested over ASGI with a
fixed seed. Slow tier (in tests/test_serve_faults.py, on that module's server): the ``st`` CLI over
HTTP against a real ``facelab serve`` (Ray Serve) with an API key.

Every check runs with Schemathesis' defaults. One kind of failure is dropped (:func:`filter_failure`,
also loaded by the CLI through ``SCHEMATHESIS_HOOKS``), and only that kind: a request refused for a
limit JSON Schema cannot state — UTF-8 bytes, tokens, the 64 KiB body — which the document states in
words and the refusal names (``too_many_bytes``, ``too_many_tokens``, ``too_large``). Such a request
may be valid by the schema (then "valid data rejected" is not a mismatch), and a 413 is a refusal
(Schemathesis' list of rejection statuses lacks it)."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import pytest
import schemathesis
from pydantic import Field
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.openapi.checks import RejectedPositiveData

from conftest import REPO

LIMITS_NOT_IN_JSON_SCHEMA = frozenset({"too_many_bytes", "too_many_tokens", "too_large"})

ST_CONFIG = """
seed = 20240816

[generation]
max-examples = {max_examples}
deterministic = true  # no example database either
"""


@schemathesis.hook
def filter_failure(ctx, failure, case, response) -> bool:
    """Keep every failure but a refusal for a limit JSON Schema cannot state (see the module doc)."""
    if response.status_code not in (413, 422) or not isinstance(failure, (RejectedPositiveData, AcceptedNegativeData)):
        return True
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return True
    return not (isinstance(detail, list) and detail and all(d.get("type") in LIMITS_NOT_IN_JSON_SCHEMA for d in detail))


def _config(max_examples: int, headers: dict[str, str] | None = None):
    top = "".join(f'headers.{k} = "{v}"\n' for k, v in (headers or {}).items())  # before the first table
    return schemathesis.Config.from_str(top + ST_CONFIG.format(max_examples=max_examples))


# ---------------------------------------------------------------------------------------------
# tiny models of each task, served in this process
# ---------------------------------------------------------------------------------------------


def _cteg_served(d: Path):
    import torch
    import yaml

    from facelab.core import checkpoint as ckpt
    from facelab.families import registry
    from facelab.families.cteg.servable import build_cteg
    from facelab.serve.app import served_from

    job = registry.get("cteg").job.model_validate(yaml.safe_load((REPO / "jobs" / "cteg_tiny.yaml").read_text()))
    job = job.model_dump(mode="json")
    torch.manual_seed(0)
    ckpt.save(d / "ckpt", build_cteg(job, torch.linspace(-0.2, 0.2, 53)).eval(), job, keep_encoder=False)
    model, config = registry.load_servable(d / "ckpt")
    info = {"name": "cteg-tiny", "version": "1", "alias": "champion", "run_id": None, "job_kind": "cteg"}
    return served_from(model, config, info)


def _keyframe_served(d: Path):
    import yaml

    from facelab.core import checkpoint as ckpt
    from facelab.families import registry
    from facelab.families.keyframe_lm.servable import build_keyframe_lm, keyframe_lm_state
    from facelab.families.keyframe_lm.tiny import build_tiny_lm
    from facelab.serve.app import served_from

    tiny = dict(vocab_size=400, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
    build_tiny_lm(d / "lm", ["A student waits outside the interview room, nervous."], intermediate_size=32, **tiny)
    raw = yaml.safe_load((REPO / "jobs" / "keyframe_tiny.yaml").read_text())
    raw["model"]["base_model"] = str(d / "lm")
    job = registry.get("keyframe").job.model_validate(raw).model_dump(mode="json")
    model, _tok, _info = build_keyframe_lm(job, None, "cpu", trainable=False)
    ckpt.save_tensors(d / "ckpt", keyframe_lm_state(model, job), job)
    model, config = registry.load_servable(d / "ckpt")
    info = {"name": "keyframe-tiny", "version": "1", "alias": "champion", "run_id": None, "job_kind": "keyframe"}
    return served_from(model, config, info)


def run_schemathesis(schema) -> tuple[list[str], dict[str, int]]:
    """Every phase and check of ``st run`` on ``schema``, in this process: (a report line per failure or
    error, counts of what ran)."""
    from schemathesis.engine import Status, events, from_schema

    problems, counts = [], {"scenarios": 0, "cases": 0, "checks": 0, "dropped": 0}
    for ev in from_schema(schema).execute():
        if isinstance(ev, events.ScenarioFinished):
            rec = ev.recorder
            counts["scenarios"] += 1
            counts["cases"] += len(rec.cases)
            counts["dropped"] += sum(rec.filtered_failures.values())
            for inter in rec.interactions.values():
                if inter.response is not None:
                    key = f"{inter.request.method} {urlsplit(inter.request.uri).path} {inter.response.status_code}"
                    counts[key] = counts.get(key, 0) + 1
            for case_id, checks in rec.checks.items():
                counts["checks"] += len(checks)
                for c in checks:
                    if c.status != Status.FAILURE or c.failure_info is None:
                        continue
                    inter = rec.interactions.get(case_id)
                    sent = answer = ""
                    if inter is not None:
                        sent = f"{inter.request.method} {inter.request.uri} {(inter.request.body or b'')[:300]!r}"
                        if inter.response is not None:
                            answer = f"{inter.response.status_code} {inter.response.content[:300]!r}"
                    f = c.failure_info.failure
                    problems.append(
                        f"[{ev.phase.value}] {rec.label}: {c.name}: {f.title}: {f.message}\n    {sent}\n    → {answer}"
                    )
            if ev.status == Status.ERROR:
                problems.append(f"[{ev.phase.value}] {rec.label}: error")
        elif isinstance(ev, events.NonFatalError):
            problems.append(f"[{ev.phase}] {ev.label}: {ev.value.__class__.__name__}: {ev.value}")
        elif isinstance(ev, events.FatalError):
            problems.append(f"fatal: {ev.exception.__class__.__name__}: {ev.exception}")
    return problems, counts


def _contract(served, max_examples: int, api_key: str | None = None) -> None:
    from facelab.serve import app as serve_app

    t0 = time.perf_counter()
    app = serve_app.asgi_app(served, api_key=api_key)
    try:
        headers = {"X-API-Key": api_key} if api_key else {}
        paths = app.openapi()["paths"]
        assert ("security" in paths[served.route]["post"]) == bool(api_key)  # asked for only when one is set
        assert "security" not in paths["/healthz"]["get"]
        config = _config(max_examples, headers)
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config, headers=headers)
        problems, counts = run_schemathesis(schema)
    finally:
        serve_app._API_KEY_CHECK = None  # the key check is per process, as in a replica
    print(f"\n{served.info.name}: {counts} in {time.perf_counter() - t0:.1f}s")
    assert not problems, f"{len(problems)} contract failures:\n" + "\n".join(problems[:40])
    assert counts["checks"] > 1000, counts  # every phase ran
    ok = f"POST {served.route} 200"
    assert counts.get(ok, 0) >= 10, counts  # the model answered, not only the validation
    if api_key:
        assert counts.get(f"POST {served.route} 401", 0) > 0, counts  # ignored_auth tried without the key


def test_expressions_server_keeps_its_openapi_contract(tmp_path):
    _contract(_cteg_served(tmp_path), max_examples=30)


def test_keyframes_server_keeps_its_openapi_contract_behind_an_api_key(tmp_path):
    _contract(_keyframe_served(tmp_path), max_examples=30, api_key=secrets.token_urlsafe(16))


# ---------------------------------------------------------------------------------------------
# the document itself
# ---------------------------------------------------------------------------------------------


def test_non_blank_pattern_is_pythons_whitespace_in_every_regex_engine():
    """``NON_BLANK`` (the schema's pattern, in Python ``re`` and in the Rust regex pydantic runs) finds a
    character in a string exactly when ``str.strip()`` leaves one — checked for every code point."""
    from pydantic import TypeAdapter, ValidationError

    from facelab.serve.schemas import NON_BLANK

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    rx = re.compile(NON_BLANK)
    assert [c for c in chars if bool(rx.search(c)) == c.isspace()] == []
    with pytest.raises(ValidationError) as err:
        TypeAdapter(list[Annotated[str, Field(pattern=NON_BLANK)]]).validate_python(chars)
    refused = {e["loc"][0] for e in err.value.errors()}
    assert {chars[i] for i in refused} == {c for c in chars if c.isspace()}  # 29 characters


def test_document_declares_each_status_with_its_body():
    from facelab.serve.app import api

    doc = api.openapi()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas  # FastAPI's 422 shape
    assert schemas["FieldError"]["required"] == ["field", "msg", "type"]
    want = {
        ("/v1/expressions", "post"): {"200", "400", "401", "408", "409", "413", "422", "500", "503"},
        ("/v1/keyframes", "post"): {"200", "400", "401", "408", "409", "413", "422", "500", "503"},
        ("/v1/scripts", "post"): {"200", "400", "401", "408", "409", "413", "422", "503"},  # §4.1's script writer
        ("/v1/models", "get"): {"200", "401", "503"},
        ("/v1/status", "get"): {"200", "401"},
        ("/healthz", "get"): {"200", "503"},
    }
    for (path, method), codes in want.items():
        responses = doc["paths"][path][method]["responses"]
        assert set(responses) == codes, (path, sorted(responses))
        for code, r in responses.items():
            if code != "200" and path != "/healthz":
                assert r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
                assert r["content"]["application/json"]["examples"], (path, code)
        body = doc["paths"][path][method].get("requestBody")
        if body is not None:
            assert body["content"]["application/json"]["examples"], path
    text = schemas["ExpressionRequest"]["properties"]["text"]
    assert text["minLength"] == 1 and text["maxLength"] == 2000 and text["pattern"]
    kf = schemas["KeyframeRequest"]["properties"]
    assert kf["keyframes"]["items"]["pattern"] == kf["emotion"]["pattern"] == kf["background"]["pattern"]
    assert kf["keyframes"]["items"]["maxLength"] == 1000 and kf["keyframes"]["maxItems"] == 5
    assert all("security" not in op for ops in doc["paths"].values() for op in ops.values())  # no key here


# The slow tier — the `st` CLI over HTTP against a real `facelab serve` with an API key — runs in
# tests/test_serve_faults.py on that module's server A (no second training and server just for it).
