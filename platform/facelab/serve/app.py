"""Ray Serve application: a FastAPI ingress serving ``models:/<name>@champion``.

Endpoints (OpenAPI at ``/docs``): ``GET /healthz``, ``GET /v1/models``, ``POST /v1/expressions``
(CTEG models: text → FLAME expression sequences) and ``POST /v1/keyframes`` (KeyframeFace models:
script → ARKit keyframes as JSON, or ``?format=csv`` for the Live Link Face CSV of the release), and
``POST /v1/scripts`` beside it (KeyframeFace §4.1: free text → a script for ``/v1/keyframes``).
Each endpoint answers 409 when the served model is of the other family.
The replica downloads the champion's files from the MLflow registry at start and rebuilds the
model from safetensors + config.json (no pickle); a model must pass a health probe (one small real
request: shapes and finite values) before it answers users. Following the alias (``watch_s``), a
newly promoted champion is probed beside the one in service and swapped in only if it passes; a
broken one is refused and the previous champion keeps serving (:class:`FacelabServer`). Bad input is answered with a 4xx whose JSON
``detail`` names the field; the replica never dies from a request.

The OpenAPI document (``/openapi.json``) is the contract: every error body is an
:class:`~facelab.serve.schemas.ErrorResponse`, each route lists each status it answers with its body and
examples, and what JSON Schema can state of the request rules (non-blank, lengths, ranges) is stated
there as constraints. :func:`asgi_app` builds this app in-process, without Ray, on a loaded model
(:func:`served_from`) — the contract test runs Schemathesis against it.

Limits: bodies over 64 KiB → 413 (declared or chunked); texts are capped in characters and UTF-8
bytes by the schema, and in tokens here: before any generation the handler asks the served model how
many tokens the request's prompts make (``model.prompt_tokens(request)``, a small method of the
servable; a model without one is not counted) and answers 422 naming the field when a prompt is
longer than the model takes (a KeyframeFace LM: its job's ``prompt.max_tokens`` or the LM's maximum
length, less the answer; a text encoder: its maximum length). Generation is bounded by the schema
(``max_frames`` ≤ the model's trained length, ``num_samples`` ≤ 16, ≤ 5 keyframes) and by a deadline:
``request_timeout_s`` after the replica received the request, or as soon as the client is gone, the
decoding loop stops between two steps (``should_stop``, passed to models that take it) and the model
lock is released — the request is answered 408 (past its deadline) or 503 (it waited for the model
past its deadline). The proxy's ``request_timeout_s`` bounds every request too (408); past
``max_ongoing_requests`` per replica plus ``max_queued_requests`` waiting, Serve answers 503 at once
instead of queueing without bound.

Draining (``facelab serve`` on SIGTERM / SIGINT): the driver sets a flag in Ray's internal KV store
(:func:`start_drain`); every replica polls it, answers 503 to new requests from then on (``/healthz``
too, so load balancers stop sending), reports how many requests it still runs, and the driver stops
Serve once none are left or the drain timeout has passed (:func:`drain_report`).

``/healthz`` (open) tells the status, the version served and only the *numbers* of refused or
retried versions; the reasons — which can hold tracking URIs and paths — are behind the API key at
``GET /v1/status``.

Request batching: expression requests waiting in a replica are decoded together, one batch on the
device, each with its own seed and ``max_frames`` (``max_batch_size``, ``batch_wait_s``; see
:func:`build_app`). Keyframe requests run one at a time.

Several models in one ``facelab serve`` (issue #22): each ``--model`` entry is its own Serve
application (:func:`plan_models`) with its own replicas, watcher, probe, batching and limits, at
``/models/<name>``; the default one is at ``/`` and also answers ``/models/<its name>`` (the
middleware, :func:`_own_prefix`). A model that cannot load answers 503 while the others serve; the
replicas publish their models' state in Ray's internal KV (:func:`publish_state`), so ``/healthz`` and
``GET /v1/models`` of any model tell every model's. An entry ``A+B+...`` is an adapter group: LoRA
models of one base served by one deployment that holds the base once (the family's ``shared_base``
hook), the adapter chosen per request by route or the ``X-Facelab-Model`` header (:class:`Member`).

API key (optional): when one is configured, every route except ``/healthz`` needs ``X-API-Key: <key>``
(or ``Authorization: Bearer <key>``), else 401. The key is given to ``build_app`` by the caller
(``facelab serve`` reads it from an environment variable and drops it from its environment before Ray
starts); the replicas get only a random salt and
HMAC-SHA256(salt, key) as init arguments, compare with ``hmac.compare_digest``, and never see, log or
store the key itself.
"""

import contextvars
import copy
import hashlib
import hmac
import logging
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, HTTPException, Query, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from facelab.serve.schemas import (
    BLANK_MSG,
    NON_BLANK,
    ExpressionRequest,
    ExpressionResponse,
    Health,
    KeyframeOut,
    KeyframeRequest,
    KeyframeResponse,
    ModelInfo,
    ModelList,
    ScriptRequest,
    ScriptResponse,
    ServerStatus,
    error_responses,
    validate_script,
)
from facelab.tasks import ROUTES as TASK_ROUTES
from facelab.tasks import ModelUnhealthy  # noqa: F401 - re-exported: the probe's error

API_KEY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "Bearer": {"type": "http", "scheme": "bearer"},
}
"""How a client presents the API key (either one); the document requires one only when a key is set."""


class _Api(FastAPI):
    """The ingress app. Its OpenAPI document is the contract (``/openapi.json``): every route lists each
    status it answers with its body (:func:`~facelab.serve.schemas.error_responses`); the API key's
    security requirement is stated when this process holds a key (a replica of ``facelab serve`` with
    ``FACELAB_API_KEY`` set) — without one, no route asks for it."""

    def openapi(self) -> dict:
        doc = super().openapi()  # built once, cached by FastAPI
        doc.setdefault("components", {})["securitySchemes"] = API_KEY_SCHEMES
        if _this_module()._API_KEY_CHECK is None:
            return doc
        doc = copy.deepcopy(doc)
        for path, ops in doc["paths"].items():
            if path not in OPEN_PATHS:
                for op in ops.values():
                    op["security"] = [{name: []} for name in API_KEY_SCHEMES]
        return doc


api = _Api(
    title="facelab",
    version="1",
    description="Text → facial expression sequences (CTEG, FLAME 53-d) and script → ARKit keyframes (KeyframeFace, "
    "61 channels). Every error body is an `ErrorResponse`: `detail` lists the problems, each naming its `field`.",
)

MAX_BODY_BYTES = 64 * 1024  # a request is a short text and three numbers
# Answered without an API key: liveness probes, and the viewer page (it holds no data; its form asks for the
# key and sends it with each request it makes).
OPEN_PATHS = frozenset({"/healthz", "/viewer"})
UNCOUNTED_PATHS = frozenset({"/healthz", "/v1/status"})  # not requests to drain: answered while draining
DRAIN_NAMESPACE = "facelab"  # Ray internal-KV namespace of the drain flag and the replicas' reports
DRAIN_POLL_S = 0.2
BOARD_PUBLISH_S = 1.0  # how often each replica publishes its model's state for the server's other models
BOARD_STALE_S = 10.0  # a state older than this is not believed (its replica is gone or stuck)


class _DrainState:
    """Per replica process: whether it drains, and how many requests it runs now (the middleware counts)."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


_DRAIN = _DrainState()

# Set once per replica process by FacelabServer.__init__ (one replica per Ray actor process): the
# salt and HMAC-SHA256 of the API key, or None when the endpoint is open. The key itself never
# reaches the replica, the Serve config or a log — only this salted digest travels in the init args.
_API_KEY_CHECK: tuple[bytes, bytes] | None = None

# Set once per replica process by FacelabServer.__init__: (the registered models it serves — one, or
# the adapters of a group, the first being its default —, whether its application answers at "/" (the
# default model), every model name of this `facelab serve`). The default application also answers
# ``/models/<each of its names>/...``; any other ``/models/<x>`` reaching it is a model this server does
# not serve (404 naming those it does).
_ROUTING: tuple[tuple[str, ...], bool, tuple[str, ...]] | None = None
MODELS_PREFIX = "/models/"
MODEL_HEADER = "x-facelab-model"  # names the adapter of a group a request is for (else the route's model)
# The model of the request being handled in this replica (a member of an adapter group), set by the
# middleware from the route prefix or the header; None: the replica's first model.
_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("facelab_model", default=None)


def route_path(scope: dict) -> str:
    """The request path below the application's route prefix (``scope["root_path"]``, set by Serve's
    proxy to the route prefix): ``/healthz`` for ``/models/<name>/healthz`` too."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def api_key_check(key: str) -> tuple[bytes, bytes]:
    """(salt, HMAC-SHA256(salt, key)) for a key: what the replica is given instead of the key."""
    salt = secrets.token_bytes(16)
    return salt, hmac.new(salt, key.encode(), hashlib.sha256).digest()


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return key


def _this_module():
    # Serve pickles the ingress class by value (``@serve.ingress`` rebinds its module-level name), so
    # a plain ``global`` in the replica's __init__ would land in a copy of this module's namespace;
    # the replica and the middleware both go through the imported module instead.
    import sys

    return sys.modules[__name__]


def _authorized(request: Request) -> bool:
    check = _this_module()._API_KEY_CHECK
    if check is None or route_path(request.scope) in OPEN_PATHS:
        return True
    key = _presented_key(request)
    if key is None:
        return False
    salt, digest = check
    return hmac.compare_digest(hmac.new(salt, key.encode("utf-8", "surrogateescape"), hashlib.sha256).digest(), digest)


def _too_large() -> JSONResponse:
    return JSONResponse(
        status_code=413,
        content={"detail": [{"field": "body", "msg": f"body larger than {MAX_BODY_BYTES} bytes", "type": "too_large"}]},
    )


@api.middleware("http")
async def _guard(request: Request, call_next):
    """API key first (401 before any body is read), then refuse oversized bodies with 413 before they
    are parsed (declared Content-Length, or counted while a chunked body streams in). Before both, the
    default application maps ``/models/<its name>/...`` onto its own routes (:func:`_own_prefix`); a
    request for a model not served here is answered 404 once its key was checked."""
    unknown = _own_prefix(request)
    if not _authorized(request):
        return JSONResponse(
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
            content={
                "detail": [
                    {
                        "field": "X-API-Key",
                        "type": "unauthorized",
                        "msg": "missing or wrong API key: send the header 'X-API-Key: <key>' (or 'Authorization: Bearer <key>')",
                    }
                ]
            },
        )
    if unknown is not None:
        return unknown
    state = _this_module()._DRAIN
    counted = route_path(request.scope) not in UNCOUNTED_PATHS
    if counted and state.draining:
        return JSONResponse(
            status_code=503,
            headers={"Retry-After": "1", "Connection": "close"},
            content={
                "detail": [
                    {
                        "field": "server",
                        "msg": "the server is shutting down (draining); retry later",
                        "type": "draining",
                    }
                ]
            },
        )
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        return _too_large()
    if declared is None and request.method in ("POST", "PUT", "PATCH"):
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _too_large()
        request._body = body  # already consumed; let FastAPI read it from here
    if not counted:
        return await call_next(request)
    state.enter()
    try:
        return await call_next(request)
    finally:
        state.leave()


def _unknown_model(msg: str) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": [{"field": "model", "msg": msg, "type": "unknown_model"}]})


def _own_prefix(request: Request) -> JSONResponse | None:
    """Which of this replica's models a request is for. In the application at ``/`` (the default
    model): a request to ``/models/<a name of its own>/...`` is routed as ``/...`` (its ``root_path``
    becomes that prefix, as Serve's proxy does for the other models' applications); one to
    ``/models/<another name>`` — a model this server does not serve, since each served model's own
    prefix is matched first by the proxy — gets a 404 to answer (naming the models served). The
    ``X-Facelab-Model`` header picks an adapter of a group on any of the group's routes (404 for a name
    it does not serve). The choice is left in :data:`_CURRENT`. None: route the request."""
    routing = _this_module()._ROUTING
    if routing is None:
        return None
    own, at_root, served = routing
    path, name = route_path(request.scope), None
    if at_root and path.startswith(MODELS_PREFIX):
        name = path[len(MODELS_PREFIX) :].split("/", 1)[0]
        if name not in own:
            return _unknown_model(
                f"no model {name!r} is served here; served: {', '.join(served)} (each at {MODELS_PREFIX}<name>/v1/..., "
                f"the default {own[0]!r} also at /v1/...)"
            )
        request.scope["root_path"] = request.scope.get("root_path", "") + MODELS_PREFIX + name
    header = request.headers.get(MODEL_HEADER)
    if header is not None and (header not in own or (name is not None and header != name)):
        return _unknown_model(
            f"X-Facelab-Model {header!r} is not served at this route (it serves {', '.join(own)}); every "
            f"model is at {MODELS_PREFIX}<name>/v1/..., an adapter of a group also with this header on the group's route"
        )
    _this_module()._CURRENT.set(header or name)
    return None


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    """422 with an :class:`~facelab.serve.schemas.ErrorResponse`: one ``{field, msg, type}`` per problem."""
    detail = []
    for err in exc.errors():
        kind = str(err.get("type") or "invalid")
        loc = [p for p in err.get("loc", ()) if p != "body"]
        msg = str(err.get("msg") or "invalid")
        if kind == "json_invalid":  # its loc is the character offset of the JSON error, not a field
            where = f" at character {loc[0]}" if loc else ""
            msg, loc = f"{msg}: {(err.get('ctx') or {}).get('error', 'not JSON')}{where}", []
        field = ".".join(str(p) for p in loc) or "body"
        if kind == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == NON_BLANK:
            msg = f"{field} {BLANK_MSG}"
        detail.append({"field": field, "msg": msg, "type": kind})
    return JSONResponse(status_code=422, content={"detail": detail})


def route_of(kind: str) -> str | None:
    """The route that answers a model of ``kind`` (its family's task), or None."""
    from facelab.families import registry
    from facelab.families.base import FamilyError

    try:
        return TASK_ROUTES.get(registry.get(kind).task)
    except FamilyError:
        return None


def kinds_for(route: str) -> list[str]:
    """Every installed family kind whose task answers ``route``."""
    from facelab.families import registry

    return [k for k, f in registry.families().items() if TASK_ROUTES.get(f.task) == route]


EXPRESSION_EXAMPLES = {
    "one sample": {
        "summary": "One reproducible sample",
        "value": {"text": "I am so happy to see you again!", "num_samples": 1, "max_frames": 64, "seed": 0},
    },
    "defaults": {"summary": "Only the text (1 sample, up to 256 frames, random seed)", "value": {"text": "What?"}},
}
SCRIPT_EXAMPLES = {
    "free text": {
        "summary": "Free text, at most three keyframes, a fixed seed",
        "value": {
            "text": "She opens the letter, can't believe it, then bursts out laughing.",
            "max_keyframes": 3,
            "seed": 0,
        },
    }
}
KEYFRAME_EXAMPLES = {
    "two keyframes": {
        "summary": "A short script",
        "value": {
            "background": "A student waits outside the interview room.",
            "emotion": "nervous but hopeful",
            "keyframes": ["a tight, anxious smile", "eyes wide, a deep breath"],
        },
    }
}


# One model call at a time per replica process: the decoding batches, keyframe requests and the health
# probe of a candidate champion (from the watcher thread). On CUDA a CTEG batch captures a CUDA graph,
# and a capture must not overlap other work of the process on the device.
_MODEL_LOCK = threading.Lock()


def health_probe(model, kind: str) -> None:
    """One small real request through a freshly loaded model, before it may answer users: the right
    shapes and finite values (its task's probe), or :class:`ModelUnhealthy` naming what is wrong (NaN
    weights, a broken decoder, a model of the wrong family)."""
    from facelab.families import registry
    from facelab.families.base import FamilyError
    from facelab.tasks import probe

    if route_of(kind) is None:
        raise ModelUnhealthy(f"unknown job kind {kind!r}: no route serves it")
    try:
        task = registry.get(kind).task
    except FamilyError as exc:
        raise ModelUnhealthy(str(exc)) from None
    with _MODEL_LOCK:
        probe(task, model)


@dataclass(frozen=True)
class Served:
    """One loaded model version and what the routes need of it; swapped as a whole."""

    model: Any
    config: dict
    kind: str
    route: str
    info: ModelInfo
    max_frames: int


class ModelBusy(RuntimeError):
    """The model lock did not come free before the request's deadline (answered 503)."""


def _takes_should_stop(fn) -> bool:
    """Whether a model method accepts ``should_stop`` (a plug-in family's may not: it then runs to the end)."""
    import inspect

    try:
        return "should_stop" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _stopper(deadline: float, abandoned: threading.Event | None = None):
    """``should_stop`` for one request: its deadline (``time.monotonic()``) passed, or its client is gone."""
    return lambda: time.monotonic() > deadline or (abandoned is not None and abandoned.is_set())


def _lock_until(deadline: float) -> None:
    """Take the model lock, waiting at most until ``deadline``; :class:`ModelBusy` otherwise."""
    if not _MODEL_LOCK.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise ModelBusy("the model was busy until this request's deadline passed")


def run_locked(deadline: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under the model lock, taken by ``deadline`` or :class:`ModelBusy`. (A
    module function: Serve pickles the ingress class by value, so its methods must not name the lock.)"""
    _lock_until(deadline)
    try:
        return fn(*args, **kwargs)
    finally:
        _MODEL_LOCK.release()


def check_tokens(model, request: dict) -> dict | None:
    """Count the prompt tokens of ``request`` with the servable's ``prompt_tokens`` (None when it has
    none) and refuse, with a 422 naming the longest field, a prompt longer than the model takes."""
    count = getattr(model, "prompt_tokens", None)
    if count is None:
        return None
    info = count(request)
    if info["prompt"] > info["limit"]:
        fields = info.get("fields") or {"body": info["prompt"]}
        field = max(fields, key=lambda k: fields[k])
        raise HTTPException(
            status_code=422,
            detail=[
                {
                    "field": field,
                    "msg": f"the request makes a prompt of {info['prompt']} tokens, but this model takes at most "
                    f"{info['limit']} ({info['why']}); {field} alone is {fields[field]} tokens — shorten it",
                    "type": "too_many_tokens",
                }
            ],
        )
    return info


def _timed_out(timeout_s: float) -> HTTPException:
    return HTTPException(
        status_code=408,
        detail=[
            {
                "field": "request",
                "msg": f"generation stopped: the request ran past its deadline ({timeout_s:g} s, --request-timeout-s)",
                "type": "timeout",
            }
        ],
    )


def _unavailable(name: str, alias: str) -> HTTPException:
    return HTTPException(
        status_code=503,
        headers={"Retry-After": "30"},
        detail=[
            {
                "field": "model",
                "msg": f"models:/{name}@{alias} could not be loaded (see /v1/status); the server's other models "
                "keep serving",
                "type": "model_unavailable",
            }
        ],
    )


def _busy() -> HTTPException:
    return HTTPException(
        status_code=503,
        headers={"Retry-After": "1"},
        detail=[
            {"field": "request", "msg": "the model stayed busy until this request's deadline; retry", "type": "busy"}
        ],
    )


@dataclass(frozen=True)
class _Decode:
    """One ``POST /v1/expressions`` waiting for its batch."""

    served: Served
    text: str
    num_samples: int
    max_frames: int
    seed: int
    deadline: float = float("inf")  # time.monotonic() past which nobody waits for the answer
    abandoned: threading.Event | None = None  # set when the client has gone

    def stopped(self) -> bool:
        return time.monotonic() > self.deadline or (self.abandoned is not None and self.abandoned.is_set())


class Batcher:
    """Request batching that forms a batch when the model is free: requests queue up while a batch
    runs, and the next batch takes all that are waiting (up to ``max_batch_size``; with ``wait_s`` > 0
    a lone request waits that long for company). ``run(jobs)`` runs in a worker thread, one batch at a
    time, so the replica's event loop keeps accepting requests meanwhile; it returns one answer per job.

    Why not ``@serve.batch``: Ray Serve's batcher cuts a batch as soon as its wait expires, *before*
    the previous batch has finished (its concurrency limit applies afterwards), so with no wait every
    request becomes a batch of one, and with a wait the batches are what arrived within that window
    while latency grows by it. Measured on CPU, 8 clients: 104 of 112 requests decoded alone."""

    def __init__(self, run, max_batch_size: int, wait_s: float = 0.0):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._queue = None  # made on the replica's event loop at the first request
        self._worker = None  # the task running _serve; held here so that it is not garbage-collected

    async def submit(self, job):
        """Queue ``job``; → (its answer, how many jobs its batch held). A failure of the batch is raised
        to each of its requests."""
        import asyncio

        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, fut))
        return await fut

    async def _serve(self) -> None:
        import asyncio

        while True:
            items = [await self._queue.get()]
            if self.wait_s > 0:
                deadline = asyncio.get_running_loop().time() + self.wait_s
                while len(items) < self.max_batch_size:
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0:
                        break
                    try:
                        items.append(await asyncio.wait_for(self._queue.get(), left))
                    except asyncio.TimeoutError:
                        break
            while len(items) < self.max_batch_size and not self._queue.empty():
                items.append(self._queue.get_nowait())
            items = [(job, fut) for job, fut in items if not fut.done()]  # the client gave up (cancelled)
            if not items:
                continue
            try:
                answers = await asyncio.to_thread(self.run, [job for job, _ in items])
            except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error (a 500)
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), answer in zip(items, answers):
                if not fut.done():
                    fut.set_result((answer, len(items)))


def _decode_jobs(jobs: list[_Decode]) -> list:
    """Frames (as lists) per job, None for a job whose frames are not all finite, or the exception
    that ended it (``TimeoutError``: its deadline passed or its client left; :class:`ModelBusy`: the
    model lock stayed taken until its deadline). Jobs are grouped by the model version they were
    accepted under (a swap may fall between two of them); a model with ``generate_groups`` (CTEG)
    decodes a group as one batch, others (LM-Listener) one request after the other. A batch stops
    between two decoding steps once *every* job in it is stopped (``should_stop``)."""
    import math

    import torch

    out: list = [None] * len(jobs)
    live = []
    for i, j in enumerate(jobs):
        if j.stopped():
            out[i] = TimeoutError("the request's deadline passed before it was decoded")
        else:
            live.append(i)
    if not live:
        return out
    try:
        _lock_until(max(jobs[i].deadline for i in live))
    except ModelBusy as exc:
        for i in live:
            out[i] = exc
        return out
    try:
        by_model: dict[int, list[int]] = {}
        for i in live:
            by_model.setdefault(id(jobs[i].served), []).append(i)
        with torch.no_grad():
            for idx in by_model.values():
                model = jobs[idx[0]].served.model
                group = [jobs[i] for i in idx]
                stop = lambda group=group: all(j.stopped() for j in group)  # noqa: E731
                reqs = [([j.text] * j.num_samples, j.max_frames, torch.Generator().manual_seed(j.seed)) for j in group]
                try:
                    if hasattr(model, "generate_groups"):
                        extra = {"should_stop": stop} if _takes_should_stop(model.generate_groups) else {}
                        answers = model.generate_groups(reqs, **extra)
                    else:
                        extra = {"should_stop": stop} if _takes_should_stop(model.generate) else {}
                        answers = [model.generate(t, max_frames=n, generator=g, **extra) for t, n, g in reqs]
                except TimeoutError as exc:
                    for i in idx:
                        out[i] = exc
                    continue
                for i, seqs in zip(idx, answers):
                    frames = [x.float().cpu().tolist() for x in seqs]
                    finite = all(math.isfinite(v) for f in frames for row in f for v in row)
                    out[i] = frames if finite else None
    finally:
        _MODEL_LOCK.release()
    return out


def permanent_load_error(exc: BaseException) -> bool:
    """Whether a failure to load a model version is the version's own fault, for good: its checkpoint
    (:class:`~facelab.core.checkpoint.CheckpointError`), its health probe (:class:`ModelUnhealthy`)
    or its family (:class:`~facelab.families.base.FamilyError`). Anything else (a network blip, a
    registry timeout, an artifact store that does not answer) may pass, and is retried."""
    from facelab.core.checkpoint import CheckpointError
    from facelab.families.base import FamilyError

    return isinstance(exc, (CheckpointError, ModelUnhealthy, FamilyError))


class ChampionFollower:
    """What a replica's watcher does each tick, apart from Ray (unit-testable): read the version the
    alias points at; when it is new, ``load(version)`` it (download, rebuild, health probe, route
    check) and return the result for the caller to swap in. A permanent failure
    (:func:`permanent_load_error`) refuses the version for good: logged, kept in ``refused`` and
    tagged in the registry (``tag(version, reason)``). Any other failure is retried on later ticks,
    ``every`` · 2^(n−1) seconds after the n-th failure (at most :attr:`MAX_BACKOFF_S`), and not tagged."""

    MAX_BACKOFF_S = 300.0

    def __init__(self, model_name: str, alias: str, every: float, read_version, load, tag, clock=time.monotonic):
        self.model_name, self.alias, self.every = model_name, alias, max(float(every), 0.1)
        self.read_version, self.load, self.tag, self.clock = read_version, load, tag, clock
        self.refused: dict[str, str] = {}
        self.retrying: dict[str, dict] = {}  # version -> {"attempts", "next_at", "reason"}
        self.log = logging.getLogger("ray.serve")

    def tick(self, serving: str):
        """One look at the alias while version ``serving`` answers; → a loaded candidate to swap in, or None."""
        try:
            version = str(self.read_version())
        except Exception as exc:  # registry unreachable, alias gone: keep serving what we have, look again later
            self.log.warning(
                "facelab: cannot read models:/%s@%s (%s); still serving version %s",
                self.model_name,
                self.alias,
                exc.__class__.__name__,
                serving,
            )
            return None
        if version == serving or version in self.refused:
            return None
        retry = self.retrying.get(version)
        if retry is not None and self.clock() < retry["next_at"]:
            return None
        try:
            new = self.load(version)
        except Exception as exc:
            reason = f"{exc.__class__.__name__}: {exc}"[:500]
            if permanent_load_error(exc):  # refused: the version in service stays
                self.retrying.pop(version, None)
                self.refused[version] = reason
                self.log.error(
                    "facelab: refused models:/%s/%s (%s); still serving version %s",
                    self.model_name,
                    version,
                    reason,
                    serving,
                )
                try:
                    self.tag(version, reason)
                except Exception:
                    pass
                return None
            attempts = (retry["attempts"] if retry else 0) + 1
            delay = min(self.every * 2 ** (attempts - 1), self.MAX_BACKOFF_S)
            self.retrying[version] = {"attempts": attempts, "next_at": self.clock() + delay, "reason": reason}
            self.log.warning(
                "facelab: could not load models:/%s/%s (%s) — not the version's fault, so not refused; "
                "retry %d in %.0fs; still serving version %s",
                self.model_name,
                version,
                reason,
                attempts,
                delay,
                serving,
            )
            return None
        self.retrying.pop(version, None)
        return new


def load_checked(
    tracking_uri: str,
    model_name: str,
    ref: str,
    by: str,
    root: str | None,
    device: str = "cpu",
    shared: dict | None = None,
) -> Served:
    """Download ``models:/name@alias`` (or ``name/version``), rebuild it on ``device`` and pass the
    health probe. ``shared`` (an adapter group's, else None): the model is added, as adapter
    ``<name>/<version>``, to the group's one base model — ``shared["set"]``, made by the family's
    ``shared_base`` hook at the first load (at most ``shared["max_adapters"]`` adapters at once) — instead
    of being loaded with a base of its own; a model of another base or family is refused for good."""
    from facelab.core import checkpoint as ckpt
    from facelab.core import tracking
    from facelab.families import registry

    with tempfile.TemporaryDirectory(prefix="facelab-serve-") as tmp:  # weights are in memory after loading
        local, info = tracking.download_model(tracking.client(tracking_uri), model_name, ref, Path(tmp), by=by)
        if shared is None:
            model, config = registry.load_servable(local, device=device, root=Path(root) if root else None)
        else:
            d = ckpt.servable_dir(local)
            config = ckpt.load_config(d)
            make = registry.get(config.get("kind")).hook("shared_base")
            if make is None:
                raise ModelUnhealthy(f"a {config.get('kind')!r} model has no adapters that could share a base model")
            if shared.get("set") is None:
                shared["set"] = make(config, Path(root) if root else None, device, shared["max_adapters"])
            model = shared["set"].add(f"{model_name}/{info['version']}", d, pinned=True)
    try:
        return served_from(model, config, info)
    except Exception:
        if shared is not None:  # never served: its slot may go
            shared["set"].release(f"{model_name}/{info['version']}")
        raise


def served_from(model, config: dict, info: dict) -> Served:
    """A loaded model (and its resolved job config) as the routes serve it, once it passed its health
    probe; ``info`` is what ``GET /v1/models`` tells (name, version, alias, run id, job kind, ...)."""
    from facelab.families import registry

    kind = config.get("kind")
    health_probe(model, kind)
    extra = registry.get(kind).hook("servable_info")
    if extra is not None:
        info.update(extra(model, config))
    route = route_of(kind)
    return Served(
        model=model,
        config=config,
        kind=kind,
        route=route,
        info=ModelInfo(**{k: (str(v) if v is not None else None) for k, v in info.items()}),
        max_frames=int(config["data"]["max_frames"]) if route == "/v1/expressions" else 0,
    )


class Member:
    """One registered model of a replica — its only one, or an adapter of a group: the alias it follows,
    the version in service (``served``; None while none could be loaded, with ``load_error``), the
    fallback to ``@previous`` and its :class:`ChampionFollower`."""

    def __init__(self, name: str, alias: str):
        self.name, self.alias = name, alias
        self.served: Served | None = None
        self.fallback: dict | None = None
        self.load_error: str | None = None
        self.follower: ChampionFollower | None = None


@serve.deployment(
    max_ongoing_requests=8,
    max_queued_requests=64,  # overload gets a quick 503 instead of an unbounded queue
    health_check_period_s=10,
    graceful_shutdown_timeout_s=20,  # a replica Serve stops (rolling update, scale-down) finishes its requests
)
@serve.ingress(api)
class FacelabServer:
    """Serves ``models:/<name>@<alias>``. With ``watch_s`` > 0 every replica checks the alias every
    ``watch_s`` seconds; a new version is downloaded, rebuilt and health-probed *beside* the one in
    service and swapped in only when it passes (requests in flight finish on the old one). A version
    that fails for good — missing file, wrong shapes, NaN outputs, another endpoint family — is refused:
    the previous champion keeps serving, the reason is logged, listed by ``/v1/status`` (``/healthz``
    lists the version number) and tagged on the model version (``facelab.serve_refused``), and that
    version is not tried again. A failure that may pass (network, registry timeout) is retried with
    backoff and not tagged (:class:`ChampionFollower`). Serve's own rolling update is not used for this:
    with one replica it stops the old replica before the new one has started, so a broken model would
    leave nothing serving.

    A replica that cannot load ``champion`` at start (its version was deleted, its files are broken)
    falls back to the alias ``previous``, loudly: an error in the log and ``fallback`` in
    ``/healthz``; the watcher moves it back to champion once that loads.

    Several models in one ``facelab serve`` (:func:`plan_models`): each is its own Serve application
    and deployment of this class (route prefix ``/models/<name>``; the default one at ``/``, answering
    ``/models/<its name>`` too). There, ``strict=False``: a replica that can load neither champion nor
    previous still starts, answers 503 (``/healthz`` ``status: failed``, the reason at ``/v1/status``)
    and keeps following the alias, so that the other models serve on and this one recovers once a
    loadable version is promoted. ``peers`` lists every model of the server; each replica publishes its
    state in Ray's internal KV under ``board_key`` (:func:`publish_state`), from which ``/healthz`` and
    ``/v1/models`` tell every model's state."""

    def __init__(
        self,
        model_name: str,
        tracking_uri: str,
        alias: str = "champion",
        root: str | None = None,
        api_key_check: tuple[bytes, bytes] | None = None,
        watch_s: float = 0.0,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.0,
        device: str = "cpu",
        request_timeout_s: float = 120.0,
        drain_key: str | None = None,
        strict: bool = True,
        peers: tuple[dict, ...] | None = None,
        board_key: str | None = None,
        route_prefix: str = "/",
        adapters: tuple[tuple[str, str], ...] = (),
        max_adapters: int = 8,
        script_writer: str | None = None,
    ):
        import importlib

        import torch

        module = importlib.import_module("facelab.serve.app")
        module._API_KEY_CHECK = api_key_check
        members = [(model_name, alias), *adapters]
        self.route_prefix, self.strict, self._board_key = route_prefix, strict, board_key
        self.peers = list(
            peers or (module.peer(n, a, default=route_prefix == "/" and i == 0) for i, (n, a) in enumerate(members))
        )
        module._ROUTING = (tuple(n for n, _ in members), route_prefix == "/", tuple(p["name"] for p in self.peers))
        self._board_cache: tuple[float, dict] = (0.0, {})
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self._batcher = Batcher(_decode_jobs, max_batch_size, batch_wait_s)
        self.tracking_uri, self.root = tracking_uri, root
        self.request_timeout_s = float(request_timeout_s)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("gpus_per_replica > 0, but this replica sees no CUDA device")
        self.device = device
        # An adapter group shares one base model (the family's ``shared_base``), made by the first load.
        self._shared = {"max_adapters": max_adapters} if adapters else None
        self.primary = model_name
        self._members: dict[str, Member] = {}
        for name, member_alias in members:
            m = self._members[name] = module.Member(name, member_alias)
            try:
                m.served = self._load_first(m)  # neither champion nor previous: no replica ...
            except Exception as exc:
                if strict:
                    raise
                m.load_error = f"{exc.__class__.__name__}: {exc}"[:1000]  # ... or a 503 one
                logging.getLogger("ray.serve").error(
                    "facelab: models:/%s@%s cannot be loaded (%s); it answers 503 while the other models serve%s",
                    name,
                    member_alias,
                    m.load_error,
                    "; looking for a new version every %gs" % watch_s if watch_s > 0 else " (--watch-champion 0)",
                )
            m.follower = ChampionFollower(
                name,
                member_alias,
                watch_s,
                lambda m=m: self._alias_version(m),
                lambda v, m=m: self._load_candidate(m, v),
                lambda v, r, m=m: self._tag_refused(m, v, r),
            )
        self._stop = threading.Event()
        self._watcher = None
        if watch_s > 0:
            self._watcher = threading.Thread(target=self._watch, args=(watch_s,), name="facelab-watch", daemon=True)
            self._watcher.start()
        self._drain_key = drain_key
        if drain_key:
            threading.Thread(target=self._poll_drain, args=(drain_key,), name="facelab-drain", daemon=True).start()
        if board_key:
            threading.Thread(target=self._publish, args=(board_key,), name="facelab-board", daemon=True).start()
        self.script_writer, self._writer = script_writer, None  # POST /v1/scripts (§4.1): a keyframes model's
        if any(m.served is not None and m.served.route == "/v1/keyframes" for m in self._members.values()):
            self._script_writer()  # loaded at start: a writer that cannot load stops the replica, naming the option

    # The model a request is for: the replica's only one, or the member of an adapter group its route
    # prefix or ``X-Facelab-Model`` header named (``_CURRENT``, set by the middleware).
    @property
    def _member(self) -> "Member":
        return self._members.get(_this_module()._CURRENT.get() or self.primary) or self._members[self.primary]

    @property
    def model_name(self) -> str:
        return self._member.name

    @property
    def alias(self) -> str:
        return self._member.alias

    @property
    def served(self) -> Served | None:
        return self._member.served

    @property
    def fallback(self) -> dict | None:
        return self._member.fallback

    @property
    def load_error(self) -> str | None:
        return self._member.load_error

    @property
    def _follower(self) -> ChampionFollower:
        return self._member.follower

    @property
    def refused(self) -> dict[str, str]:
        return self._follower.refused

    def _load(self, name: str, ref: str, by: str) -> Served:
        return load_checked(self.tracking_uri, name, ref, by, self.root, self.device, shared=self._shared)

    def _load_first(self, m: "Member") -> Served:
        """``alias`` (champion), or — when it cannot be loaded — ``previous``, loudly (see the class doc)."""
        log = logging.getLogger("ray.serve")
        try:
            return self._load(m.name, m.alias, "alias")
        except Exception as exc:
            if m.alias != "champion":
                raise
            if not permanent_load_error(exc):  # one more try for what may be a blip
                time.sleep(2.0)
                try:
                    return self._load(m.name, m.alias, "alias")
                except Exception as again:
                    exc = again
            reason = f"{exc.__class__.__name__}: {exc}"[:500]
        try:
            served = self._load(m.name, "previous", "alias")
        except Exception as exc:
            raise RuntimeError(
                f"models:/{m.name}@champion cannot be loaded ({reason}), and neither can "
                f"models:/{m.name}@previous ({exc.__class__.__name__}: {exc})"
            ) from None
        champion = None
        try:
            champion = self._alias_version(m)
        except Exception:
            pass  # the alias is gone (its version was deleted)
        m.fallback = {"alias": "previous", "version": served.info.version, "champion": champion, "reason": reason}
        log.error(
            "facelab: FALLBACK: models:/%s@champion%s cannot be loaded (%s); serving models:/%s@previous "
            "(version %s) instead",
            m.name,
            f" (version {champion})" if champion else " (the alias points at no version)",
            reason,
            m.name,
            served.info.version,
        )
        return served

    def _alias_version(self, m: "Member") -> str:
        from facelab.core import tracking

        c = tracking.client(self.tracking_uri)
        return str(c.get_model_version_by_alias(m.name, m.alias).version)

    def _load_candidate(self, m: "Member", version: str) -> Served:
        new = self._load(m.name, version, "version")
        if m.served is not None and new.route != m.served.route:
            raise ModelUnhealthy(f"a {new.kind!r} model answers {new.route}, but this endpoint serves {m.served.route}")
        return new

    def _tag_refused(self, m: "Member", version: str, reason: str) -> None:
        from facelab.core import tracking

        tracking.client(self.tracking_uri).set_model_version_tag(m.name, version, "facelab.serve_refused", reason)

    def _watch(self, every: float) -> None:
        log = logging.getLogger("ray.serve")
        while not self._stop.wait(every):
            for m in list(self._members.values()):
                old = m.served
                new = m.follower.tick(old.info.version if old is not None else "")
                if new is None:
                    continue
                m.served = new  # one reference swap: a request sees one version whole
                if old is not None and self._shared is not None:  # its adapter may be evicted once others need room
                    self._shared["set"].release(f"{m.name}/{old.info.version}")
                if m.fallback is not None:
                    log.warning("facelab: champion of %s loads again; fallback to @previous ended", m.name)
                m.fallback, m.load_error = None, None
                was = old.info.version if old is not None else "none: it could not be loaded"
                log.info("facelab: now serving models:/%s/%s (was %s)", m.name, new.info.version, was)

    def _state(self, m: "Member | None" = None) -> dict:
        """A model of this replica (the request's) as ``/healthz`` tells it: status and version."""
        s = (m or self._member).served
        status = "draining" if _this_module()._DRAIN.draining else ("failed" if s is None else "ok")
        return {"status": status, "version": None if s is None else s.info.version}

    def _publish(self, key: str) -> None:
        """Publish the state of each model of this replica for the server's other models
        (:func:`publish_state`), with why it could load no version (for the ``facelab serve`` driver's
        start-up lines; over HTTP only at ``/v1/status``)."""
        import os
        import socket

        said = False
        while True:
            for m in list(self._members.values()):
                try:
                    me = f"{key}:{socket.gethostname()}:{os.getpid()}:{m.name}"
                    _this_module().publish_state(me, m.name, {**self._state(m), "error": m.load_error})
                except Exception as exc:  # the GCS is going away with the cluster
                    if not said:
                        logging.getLogger("ray.serve").warning("facelab: cannot publish the models' state (%r)", exc)
                        said = True
            if self._stop.wait(BOARD_PUBLISH_S):
                return

    def _models(self) -> list[dict]:
        """Every model of this server, the default first: name, alias, route prefix, whether it is the
        default, and its state (this replica's own, the others' from the board: ``unknown`` when none
        of their replicas reported lately)."""
        now = time.monotonic()
        if self._board_key and now - self._board_cache[0] > 1.0:
            try:
                self._board_cache = (now, _this_module().read_states(self._board_key))
            except Exception:  # noqa: BLE001 - the GCS is going away: tell what is known here
                self._board_cache = (now, {})
        board = self._board_cache[1]
        out = []
        for p in self.peers:
            mine = self._members.get(p["name"])
            state = self._state(mine) if mine is not None else board.get(p["name"])
            state = state or {"status": "unknown", "version": None}
            out.append({**p, "status": state["status"], "version": state["version"]})
        return out

    def _poll_drain(self, key: str) -> None:
        """Follow the driver's drain flag; while draining, report this replica's requests in flight."""
        import os
        import socket

        from ray.experimental import internal_kv

        state = _this_module()._DRAIN
        me = f"{key}:{socket.gethostname()}:{os.getpid()}"
        while not self._stop.wait(DRAIN_POLL_S):
            try:
                if not state.draining and internal_kv._internal_kv_get(key, namespace=DRAIN_NAMESPACE):
                    state.draining = True
                    logging.getLogger("ray.serve").warning("facelab: draining: new requests get 503")
                if state.draining:
                    internal_kv._internal_kv_put(
                        me, f"{state.in_flight} {time.time():.3f}", overwrite=True, namespace=DRAIN_NAMESPACE
                    )
            except Exception:  # the GCS is going away with the cluster: nothing left to report to
                pass

    def __del__(self):
        if getattr(self, "_stop", None) is not None:
            self._stop.set()

    def _require(self, s: Served | None, route: str) -> None:
        if s is None:
            raise _unavailable(self.model_name, self.alias)
        if s.route != route:
            needs = " or ".join(repr(k) for k in kinds_for(route))
            raise HTTPException(
                status_code=409,
                detail=[
                    {
                        "field": "model",
                        "msg": f"the served model is a {s.kind!r} model; {route} needs a {needs} "
                        f"model (this one answers {s.route})",
                        "type": "wrong_model_kind",
                    }
                ],
            )

    def check_health(self) -> None:  # Serve restarts a replica whose model or watcher is gone
        if self.served is None and self.strict:
            raise RuntimeError("model not loaded")
        if self._watcher is not None and not self._watcher.is_alive():
            raise RuntimeError("the champion watcher thread died")

    @api.get(
        "/healthz",
        response_model=Health,
        responses={
            503: {"model": Health, "description": "Draining (shutting down): the same body, `status: draining`."}
        },
    )
    def healthz(self):
        """Open to all (liveness probes): status, the version served and version *numbers* only — the
        reasons are at ``GET /v1/status`` (behind the API key). 503 while draining."""
        f = self.fallback
        body = {
            **self._state(),
            "model": self.model_name,
            "refused": sorted(self._follower.refused, key=int),
            "retrying": sorted(self._follower.retrying, key=int),
            "fallback": None if f is None else {k: f[k] for k in ("alias", "version", "champion")},
            "models": {
                m["name"]: {"status": m["status"], "version": m["version"], "route_prefix": m["route_prefix"]}
                for m in self._models()
            },
        }
        return JSONResponse(status_code=200 if body["status"] == "ok" else 503, content=body)

    @api.get("/viewer", response_class=HTMLResponse, include_in_schema=False)
    def viewer(self) -> HTMLResponse:
        """The browser viewer of this route's model (issue #20; :mod:`facelab.viewer`): one self-contained
        page (no network, no CDN) whose form asks this server's task route and draws the answer -- faces
        and 61 channel bars per keyframe, or heatmaps and curves per sample with the stop frame marked.
        The page holds no model data and no key: a server with an API key gets it from the page's field."""
        from facelab.viewer.html import render_page, serve_payload

        s = self.served
        if s is None:
            raise _unavailable(self.model_name, self.alias)
        prefix = "" if self.route_prefix == "/" else self.route_prefix.rstrip("/")
        task = s.route.rsplit("/", 1)[-1]
        title = f"{s.info.name} v{s.info.version}"
        writer = self._writer.info if getattr(self, "_writer", None) is not None else None  # /v1/scripts's
        return HTMLResponse(
            render_page(serve_payload(task, title=title, endpoint=prefix + s.route, script_writer=writer))
        )

    @api.get("/v1/flame", include_in_schema=False)
    def flame(self) -> Response:
        """The viewer's FLAME mesh (issue #20; :mod:`facelab.viewer.flame_payload`): the packed arrays the
        page poses each answer with, from the user's own model named by ``FACELAB_FLAME_MODEL`` in the
        replica's environment, loaded without executing anything and cached per file version. 404 when
        none is configured, 500 naming the variable and the problem for a file that cannot be used.
        Model data: behind the API key like every data route (not in the API document: a viewer asset)."""
        from facelab.viewer.flame_payload import MEDIA_TYPE, route_answer

        code, body = route_answer()
        if code != 200:
            return JSONResponse(status_code=code, content=body)
        return Response(body, media_type=MEDIA_TYPE, headers={"Cache-Control": "private, no-cache"})

    @api.get("/v1/status", response_model=ServerStatus, responses=error_responses(401))
    def status(self) -> dict:
        """The details (API key required when one is set): why versions were refused, what is retried
        and when, why the replica fell back or could load no version, how many requests it runs."""
        s, f, now = self.served, self.fallback, time.monotonic()
        return {
            **self._state(),
            "model": self.model_name,
            "alias": self.alias if s is None else s.info.alias,
            "load_error": self.load_error,
            "refused": dict(self._follower.refused),
            "retrying": {
                v: {
                    "attempts": r["attempts"],
                    "next_in_s": round(max(0.0, r["next_at"] - now), 1),
                    "reason": r["reason"],
                }
                for v, r in dict(self._follower.retrying).items()
            },
            "fallback": None if f is None else dict(f),
            "in_flight": _this_module()._DRAIN.in_flight,
            "request_timeout_s": self.request_timeout_s,
        }

    @api.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
    def models(self) -> ModelList:
        """The model of these routes (name, version, alias, run id, job kind, ...) and, in ``models``,
        every model this server serves with its route prefix and state."""
        s = self.served
        if s is None:
            raise _unavailable(self.model_name, self.alias)
        return ModelList(**s.info.model_dump(), models=self._models())

    @api.post(
        "/v1/expressions",
        response_model=ExpressionResponse,
        responses={
            200: {
                "description": "One sequence per sample.",
                "headers": {
                    "X-Facelab-Batch": {
                        "description": "How many requests were decoded together with this one.",
                        "schema": {"type": "string"},
                    },
                    "X-Facelab-Text-Tokens": {
                        "description": "Set when the text has more tokens than the model reads: "
                        "`<tokens>; the model reads the first <n>`.",
                        "schema": {"type": "string"},
                    },
                },
            },
            **error_responses(400, 401, 408, 409, 413, 422, 500, 503),
        },
    )
    async def expressions(
        self,
        req: Annotated[ExpressionRequest, Body(openapi_examples=EXPRESSION_EXAMPLES)],
        response: Response,
    ) -> ExpressionResponse:
        import asyncio

        s = self.served
        self._require(s, "/v1/expressions")
        deadline, abandoned = time.monotonic() + self.request_timeout_s, threading.Event()
        tokens = await asyncio.to_thread(check_tokens, s.model, {"text": req.text})
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31 - 1)
        job = _Decode(s, req.text, req.num_samples, min(req.max_frames, s.max_frames), seed, deadline, abandoned)
        try:
            frames, batch = await self._batcher.submit(job)
        except asyncio.CancelledError:  # the client left (or the proxy timed out): stop decoding for it
            abandoned.set()
            raise
        response.headers["X-Facelab-Batch"] = str(batch)  # how many requests were decoded together
        if tokens is not None and tokens.get("read") is not None and tokens["prompt"] > tokens["read"]:
            response.headers["X-Facelab-Text-Tokens"] = (
                f"{tokens['prompt']}; the model reads the first {tokens['read']}"
            )
        if isinstance(frames, TimeoutError):
            raise _timed_out(self.request_timeout_s)
        if isinstance(frames, ModelBusy):
            raise _busy()
        if frames is None:
            raise HTTPException(status_code=500, detail="model produced non-finite frames")
        return ExpressionResponse(model=s.info, sequences=[{"frames": f} for f in frames])

    def _keyframes_now(self, s: Served, req: KeyframeRequest, deadline: float, abandoned: threading.Event):
        fn = s.model.keyframes
        extra = {"should_stop": _stopper(deadline, abandoned)} if _takes_should_stop(fn) else {}
        return run_locked(deadline, fn, req.background, req.emotion, req.keyframes, **extra)

    @api.post(
        "/v1/keyframes",
        response_model=KeyframeResponse,
        responses={
            200: {
                "content": {
                    "text/csv": {
                        "schema": {"type": "string"},
                        "example": "Timecode,BlendshapeCount,EyeBlinkLeft,...\n00:00:00:00.000,61,0.0,...\n",
                    }
                },
                "description": "JSON, or the Live Link Face CSV with ?format=csv (one row per keyframe, one "
                "second apart)",
            },
            **error_responses(400, 401, 408, 409, 413, 422, 500, 503),
        },
    )
    async def keyframes(
        self,
        req: Annotated[KeyframeRequest, Body(openapi_examples=KEYFRAME_EXAMPLES)],
        format: Literal["json", "csv"] = Query(
            "json", description="`csv`: the Live Link Face CSV of the KeyframeFace release instead of JSON."
        ),
    ):
        import asyncio
        import io
        import math

        import numpy as np

        from facelab.data.arkit import mapping_from_vector, write_llf_csv

        s = self.served
        self._require(s, "/v1/keyframes")
        deadline, abandoned = time.monotonic() + self.request_timeout_s, threading.Event()
        request = {"background": req.background, "emotion": req.emotion, "keyframes": list(req.keyframes)}
        await asyncio.to_thread(check_tokens, s.model, request)  # 422 before the model is touched
        results = await self._in_thread(abandoned, self._keyframes_now, s, req, deadline, abandoned)
        rows = np.stack([r.values for r in results])  # (K, 61)
        if not all(math.isfinite(v) for v in rows.ravel().tolist()):
            raise HTTPException(status_code=500, detail="model produced non-finite values")
        if format == "csv":
            buf = io.StringIO()
            write_llf_csv(rows, buf)
            return Response(
                content=buf.getvalue(),
                media_type="text/csv",
                headers={"Content-Disposition": 'attachment; filename="keyframes.csv"'},
            )
        return KeyframeResponse(
            model=s.info,
            keyframes=[
                KeyframeOut(index=i + 1, valid=bool(r.valid), blendshapes=mapping_from_vector(r.values))
                for i, r in enumerate(results)
            ],
        )

    async def _in_thread(self, abandoned: threading.Event, fn, *args):
        """``fn(*args)`` in a worker thread for a request: a client that leaves (or a proxy timeout) sets
        ``abandoned`` so the work stops; a busy model is 503, a passed deadline 408."""
        import asyncio

        try:
            return await asyncio.to_thread(fn, *args)
        except asyncio.CancelledError:
            abandoned.set()
            raise
        except ModelBusy:
            raise _busy() from None
        except TimeoutError:
            raise _timed_out(self.request_timeout_s) from None

    # ---- POST /v1/scripts: KeyframeFace §4.1, free text -> a script (a family's Family.script_writer) ----

    def _script_writer(self):
        """This replica's script writer: ``--script-writer`` (None: the tiny test writer), loaded once."""
        if self._writer is None:
            from facelab.families import registry

            root = Path(self.root) if self.root else None
            self._writer = registry.script_writer()(self.script_writer, root, self.device)
        return self._writer

    def _scripts_now(self, req: ScriptRequest, seed: int, deadline: float, abandoned: threading.Event):
        def write():
            w = self._script_writer()
            check_tokens(w, {"text": req.text, "max_keyframes": req.max_keyframes})  # 422 before decoding
            stop = _stopper(deadline, abandoned)
            script = w.write(req.text, max_keyframes=req.max_keyframes, seed=seed, should_stop=stop)
            return w.info, validate_script(script)  # the writer's decoding guarantees it; checked all the same

        return run_locked(deadline, write)

    @api.post(
        "/v1/scripts",
        response_model=ScriptResponse,
        responses={
            200: {"description": "A script that is a valid `POST /v1/keyframes` request, and who wrote it."},
            **error_responses(400, 401, 408, 409, 413, 422, 503),
        },
    )
    async def scripts(self, req: Annotated[ScriptRequest, Body(openapi_examples=SCRIPT_EXAMPLES)]) -> ScriptResponse:
        """KeyframeFace's first stage (§4.1, Input Standardization): the script writer LM rewrites free
        text into a script -- background, emotion, 1 to ``max_keyframes`` keyframe descriptions -- decoded
        under the script's schema, so the answer's ``script`` can be edited and sent to ``POST
        /v1/keyframes`` as is. ``writer`` names the model; the default tiny one is untrained (``tiny``)."""

        s = self.served
        try:
            self._require(s, "/v1/keyframes")
        except HTTPException as exc:
            if exc.status_code == 409:
                exc.detail[0]["msg"] = "/v1/scripts writes scripts for /v1/keyframes: " + exc.detail[0]["msg"]
            raise
        deadline, abandoned = time.monotonic() + self.request_timeout_s, threading.Event()
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31 - 1)
        writer, script = await self._in_thread(abandoned, self._scripts_now, req, seed, deadline, abandoned)
        return ScriptResponse(script=script, writer=writer, seed=seed)


ExpressionServer = FacelabServer  # the name of the first release


def _route_params(routes, name: str):
    """The parameter ``name`` of every endpoint under ``routes`` (included routers too)."""
    import inspect

    for r in routes:
        endpoint = getattr(r, "endpoint", None)
        if endpoint is not None and name in inspect.signature(endpoint).parameters:
            yield inspect.signature(endpoint).parameters[name]
        sub = getattr(r, "original_router", None)  # FastAPI >= 0.137 nests an included router
        if sub is not None:
            yield from _route_params(sub.routes, name)


def asgi_app(
    served: Served,
    *,
    request_timeout_s: float = 120.0,
    max_batch_size: int = 8,
    batch_wait_s: float = 0.0,
    api_key: str | None = None,
) -> FastAPI:
    """The HTTP app of one replica serving ``served`` (:func:`served_from`), in this process and without
    Ray: the same routes, middleware, error handlers and OpenAPI document as ``facelab serve``, bound to
    a :class:`FacelabServer` object that holds ``served`` (no registry, no champion watcher, no
    draining). A copy of the ingress app, as Serve makes one per replica; for tests and tools (the
    OpenAPI contract test runs Schemathesis on it). ``api_key``: as a replica, the process then
    requires it on every route but ``/healthz`` (one key check per process: it replaces any other)."""
    from ray import cloudpickle

    app = cloudpickle.loads(cloudpickle.dumps(api))  # what @serve.ingress hands each replica
    cls = next(c for c in FacelabServer.func_or_class.__mro__ if "expressions" in vars(c))  # as written
    server = object.__new__(cls)  # Serve's wrapper subclass has an async __init__; ours loads from MLflow
    server.tracking_uri, server.root, server.primary, server._shared = None, None, served.info.name, None
    server.request_timeout_s = float(request_timeout_s)
    server.device, server.strict, server.route_prefix = "cpu", True, "/"
    server._board_key, server._board_cache = None, (0.0, {})
    server.peers = [peer(served.info.name, served.info.alias)]
    if max_batch_size < 1 or batch_wait_s < 0:
        raise ValueError(f"max_batch_size must be >= 1 and batch_wait_s >= 0 (got {max_batch_size}, {batch_wait_s})")
    server._batcher = Batcher(_decode_jobs, max_batch_size, batch_wait_s)
    member = Member(served.info.name, served.info.alias)
    member.served = served
    member.follower = ChampionFollower(
        served.info.name, served.info.alias, 0.0, lambda: served.info.version, None, lambda *_: None
    )
    server._members = {member.name: member}
    server._stop, server._watcher, server._drain_key = threading.Event(), None, None
    server.script_writer, server._writer = None, None  # the tiny script writer, built on first use
    _this_module()._API_KEY_CHECK = api_key_check(api_key) if api_key else None
    # Serve's class-based view gives each route's ``self`` a dependency that returns the replica object
    injects = {p.default.dependency for p in _route_params(app.routes, "self") if isinstance(p.default, params.Depends)}
    if len(injects) != 1:
        raise RuntimeError(f"cannot find how Serve injects the replica into the routes ({len(injects)} candidates)")
    app.dependency_overrides[injects.pop()] = lambda: server
    return app


def batch_size_for(max_batch_size: int | None, max_ongoing_requests: int) -> int:
    """The request-batch limit a replica uses: ``max_batch_size``, by default 8 or
    ``max_ongoing_requests`` if smaller; ValueError when it is < 1 or larger than
    ``max_ongoing_requests`` (a replica never holds more requests than that at once)."""
    if max_batch_size is None:
        return min(8, max_ongoing_requests)
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 (got {max_batch_size})")
    if max_batch_size > max_ongoing_requests:
        raise ValueError(
            f"max_batch_size ({max_batch_size}) is larger than max_ongoing_requests "
            f"({max_ongoing_requests}): a replica never holds that many requests at once"
        )
    return max_batch_size


def build_app(
    model_name: str,
    tracking_uri: str,
    alias: str = "champion",
    root: str | None = None,
    *,
    api_key: str | None = None,
    replicas: int = 1,
    max_ongoing_requests: int = 8,
    max_queued_requests: int = 64,
    watch_s: float = 0.0,
    max_batch_size: int | None = None,
    batch_wait_s: float = 0.0,
    gpus_per_replica: float = 0.0,
    request_timeout_s: float = 120.0,
    drain_key: str | None = None,
    cpus_per_replica: float = 1.0,
    strict: bool = True,
    peers: tuple[dict, ...] | None = None,
    board_key: str | None = None,
    route_prefix: str = "/",
    adapters: tuple[tuple[str, str], ...] = (),
    max_adapters: int = 8,
    script_writer: str | None = None,
):
    """The bound Serve application. ``api_key`` (optional) is turned into a salted HMAC here, in the
    caller's process; replicas receive only that digest. ``replicas`` > 1 keeps answering while one
    replica is replaced (one replica = a short outage when its process dies) at the price of one
    model copy and, by default, one CPU per replica. Per replica, ``max_ongoing_requests`` run at once;
    beyond that up to ``max_queued_requests`` wait at the proxy and the rest get a quick 503. ``watch_s``
    > 0: follow the alias (a newly promoted champion is health-probed, then swapped in; see
    :class:`FacelabServer`). Request batching (``POST /v1/expressions``): up to ``max_batch_size``
    requests waiting in a replica are decoded as one batch (1 = off; default: 8, at most
    ``max_ongoing_requests``); ``batch_wait_s`` > 0 holds the
    first request up to that long for more to arrive (0 = take what is waiting, add no latency). A
    batch is never larger than ``max_ongoing_requests``, so that must be at least ``max_batch_size``.
    ``gpus_per_replica`` > 0: each replica reserves that share of a GPU from Ray and runs its model on
    CUDA (CTEG then decodes with the static KV cache and CUDA-graph step); 0 = on the CPU.
    ``cpus_per_replica``: the CPUs each replica reserves from Ray (several small models on a small
    machine: less than 1).
    ``request_timeout_s``: a request's generation stops this long after its replica received it (the
    deadline; give the proxy's ``request_timeout_s``). ``drain_key``: the Ray internal-KV key the
    replicas poll for the drain flag (:func:`start_drain`; None = no draining but Serve's own).

    One model of several (:func:`plan_models`): ``route_prefix`` is its application's (``/`` for the
    default), ``peers`` every model of the server (:func:`peer`), ``board_key`` where the replicas
    publish their state (:func:`publish_state`), and ``strict=False`` lets a replica that can load no
    version start anyway and answer 503 (see :class:`FacelabServer`).

    ``adapters`` (an adapter group: ``(name, alias)`` of the models beside ``model_name``): every model
    of the group is a LoRA adapter of one base model, held once per replica, the adapter picked per
    request; at most ``max_adapters`` adapters are loaded at once (each model's version in service,
    plus a new champion while it is probed), so it must be at least the group's size.

    ``script_writer``: the LM behind ``POST /v1/scripts`` of a keyframes model (KeyframeFace §4.1; a model
    directory or a Hugging Face id in the local cache, offline; None = the tiny untrained test writer;
    the first family declaring ``Family.script_writer``)."""
    if adapters and max_adapters < 1 + len(adapters):
        raise ValueError(
            f"max_adapters ({max_adapters}) is smaller than the adapter group ({1 + len(adapters)} models)"
        )
    max_batch_size = batch_size_for(max_batch_size, max_ongoing_requests)
    if batch_wait_s < 0:
        raise ValueError(f"batch_wait_s must be >= 0 (got {batch_wait_s})")
    check = api_key_check(api_key) if api_key else None
    if gpus_per_replica < 0:
        raise ValueError(f"gpus_per_replica must be >= 0 (got {gpus_per_replica})")
    if not cpus_per_replica > 0:
        raise ValueError(f"cpus_per_replica must be > 0 (got {cpus_per_replica})")
    if not request_timeout_s > 0:
        raise ValueError(f"request_timeout_s must be > 0 (got {request_timeout_s})")
    dep = FacelabServer.options(
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
    )
    return dep.bind(
        model_name,
        tracking_uri,
        alias,
        root,
        check,
        watch_s,
        max_batch_size,
        batch_wait_s,
        "cuda" if gpus_per_replica > 0 else "cpu",
        request_timeout_s,
        drain_key,
        strict,
        tuple(peers) if peers else None,
        board_key,
        route_prefix,
        tuple(adapters),
        max_adapters,
        script_writer,
    )


def peer(name: str, alias: str = "champion", default: bool = True, group: str | None = None) -> dict:
    """One model of a ``facelab serve`` as its replicas know the others: name, alias followed, route
    prefix (``/models/<name>``; an adapter of the group ``group``: the group's, with the
    ``X-Facelab-Model: <name>`` header) and whether it is the default (also at ``/``)."""
    return {
        "name": name,
        "alias": alias,
        "route_prefix": MODELS_PREFIX + (group or name),
        "header": None if group is None else f"X-Facelab-Model: {name}",
        "default": default,
    }


@dataclass(frozen=True)
class ModelEntry:
    """One model to serve: the registered ``name`` and ``alias`` to follow, its Serve application
    (``app_name``) and that application's ``route_prefix`` (``/`` for the default model)."""

    name: str
    alias: str
    app_name: str
    route_prefix: str
    default: bool
    adapters: tuple[tuple[str, str], ...] = ()  # an adapter group's other models: (name, alias)


DEFAULT_APP = "facelab"  # the default model's Serve application (the only one when one model is served)
_NAME_CHARS = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def plan_models(specs: list[str], default: str | None = None) -> list[ModelEntry]:
    """``--model`` entries (in order; ``default``: the one also answering the plain ``/v1/...`` routes,
    else the first) → one :class:`ModelEntry` each, the default first: the default in application
    :data:`DEFAULT_APP` at ``/`` (so one model serves exactly as before), each other in
    ``facelab-<name>`` at ``/models/<name>``. An entry is ``NAME[@ALIAS]``, or an adapter group
    ``NAME[@ALIAS]+NAME[@ALIAS]...``: LoRA models of one base served by one deployment that holds the
    base once (named after its first model; the others in :attr:`ModelEntry.adapters`). ValueError
    naming the option: an empty or malformed name (letters, digits, ``.``, ``_``, ``-``: it is a URL
    path segment), an empty alias, a model given twice, a ``default`` that is not an entry's name."""
    import re

    if not specs:
        raise ValueError("--model: give at least one registered model name")
    parsed: list[list[tuple[str, str]]] = []
    seen: set[str] = set()
    for spec in specs:
        group = []
        for part in spec.strip().split("+"):
            name, at, alias = part.strip().partition("@")
            if not re.fullmatch(_NAME_CHARS, name):
                raise ValueError(
                    f"--model {spec!r}: NAME[@ALIAS] (or NAME[@ALIAS]+NAME[@ALIAS]... for adapters of one base) "
                    "with names of letters, digits, '.', '_' and '-' (a name becomes the route prefix /models/NAME)"
                )
            if at and not re.fullmatch(_NAME_CHARS, alias):
                raise ValueError(f"--model {spec!r}: the alias after '@' must be a non-empty alias name")
            if name in seen:
                raise ValueError(f"--model {name!r} is given twice: each registered model is served once")
            seen.add(name)
            group.append((name, alias or "champion"))
        parsed.append(group)
    names = [g[0][0] for g in parsed]
    if default is not None and default not in names:
        member = next((g for g in parsed if default in (n for n, _ in g)), None)
        raise ValueError(
            f"--default {default!r} is not one of the --model names ({', '.join(names)})"
            + (f": it is an adapter of the group {member[0][0]!r}, whose first model is its default" if member else "")
        )
    default = default or names[0]
    parsed.sort(key=lambda g: g[0][0] != default)  # stable: the default first, the others in order
    return [
        ModelEntry(
            name=g[0][0],
            alias=g[0][1],
            app_name=DEFAULT_APP if g[0][0] == default else f"{DEFAULT_APP}-{g[0][0]}",
            route_prefix="/" if g[0][0] == default else MODELS_PREFIX + g[0][0],
            default=g[0][0] == default,
            adapters=tuple(g[1:]),
        )
        for g in parsed
    ]


def peers_of(entries: list[ModelEntry]) -> tuple[dict, ...]:
    """Every model of the server as its replicas list it (:func:`peer`): an adapter of a group that is
    not the default is reached on its group's route with the ``X-Facelab-Model`` header; the default
    group's adapters also at ``/models/<name>``."""
    out = []
    for e in entries:
        out.append(peer(e.name, e.alias, e.default))
        for name, alias in e.adapters:
            out.append(peer(name, alias, False, None if e.default else e.name))
    return tuple(out)


def publish_state(key: str, name: str, state: dict) -> None:
    """Write one replica's state (``{"status", "version"}``) of model ``name`` to Ray's internal KV
    under ``key`` (``<board_key>:<host>:<pid>``), stamped with the time (:func:`read_states`)."""
    import json

    from ray.experimental import internal_kv

    value = json.dumps({"name": name, **state, "t": time.time()})
    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=DRAIN_NAMESPACE)


def read_states(board_key: str) -> dict[str, dict]:
    """Every model's state from its replicas' reports under ``board_key`` (those of the last
    :data:`BOARD_STALE_S` seconds): ``ok`` when one of its replicas serves (with that version), else
    ``draining`` or ``failed`` (with the ``error`` its replica reported)."""
    import json

    from ray.experimental import internal_kv

    rank = {"ok": 0, "draining": 1, "failed": 2}
    out: dict[str, dict] = {}
    for k in internal_kv._internal_kv_list(f"{board_key}:", namespace=DRAIN_NAMESPACE):
        raw = internal_kv._internal_kv_get(k, namespace=DRAIN_NAMESPACE)
        try:
            v = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if time.time() - float(v.get("t", 0)) > BOARD_STALE_S or v.get("status") not in rank:
            continue
        best = out.get(v["name"])
        if best is None or rank[v["status"]] < rank[best["status"]]:
            out[v["name"]] = {"status": v["status"], "version": v.get("version"), "error": v.get("error")}
    return out


def drain_key_for(app_name: str) -> str:
    """The internal-KV key of one ``facelab serve``'s drain flag (unique per start)."""
    return f"drain:{app_name}:{secrets.token_hex(6)}"


def start_drain(key: str) -> None:
    """Raise the drain flag (the driver, connected to Ray): replicas answer 503 to new requests from
    their next poll (:data:`DRAIN_POLL_S`) on and report their requests in flight."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, f"{time.time():.3f}", overwrite=True, namespace=DRAIN_NAMESPACE)


def drain_report(key: str) -> tuple[int, int]:
    """(replicas that reported since the drain began, requests they still run)."""
    from ray.experimental import internal_kv

    replicas = running = 0
    for k in internal_kv._internal_kv_list(f"{key}:", namespace=DRAIN_NAMESPACE):
        value = internal_kv._internal_kv_get(k, namespace=DRAIN_NAMESPACE)
        if value:
            replicas += 1
            running += int(value.split()[0])
    return replicas, running


def end_drain(key: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, del_by_prefix=True, namespace=DRAIN_NAMESPACE)


def app_from_env(args: dict[str, str]):
    """Serve application builder for ``serve run`` / a KubeRay RayService (``import_path:
    facelab.serve.app:app_from_env``). Ray Serve passes the config's ``args``; anything not given
    there comes from the environment: ``FACELAB_MODEL``, ``FACELAB_MODEL_ALIAS`` (default champion),
    ``MLFLOW_TRACKING_URI``, ``FACELAB_ROOT`` (where a project-relative base model lives),
    ``FACELAB_WATCH_S`` (how often replicas look for a new champion; default 30, 0 = never),
    ``FACELAB_REQUEST_TIMEOUT_S`` (a request's generation deadline; default 120, as the manifests'
    ``http_options.request_timeout_s``),
    ``FACELAB_GPUS_PER_REPLICA`` (default 0: CPU), ``FACELAB_MAX_BATCH_SIZE`` (default 8) and the API
    key in the variable named by ``api_key_env`` (default ``FACELAB_API_KEY``; unset or empty = open
    endpoint). The key is read here and never written into the Serve config.

    Several models (one RayService application each, ``rayservice.yaml``): ``args.models`` (or
    ``FACELAB_MODELS``) lists them all, comma-separated ``NAME[@ALIAS]``, and ``args.default_model``
    (``FACELAB_DEFAULT_MODEL``; default: the first) names the one at ``/``; ``args.model`` is the one
    this application serves, at the ``route_prefix`` :func:`plan_models` gives it (``/models/<name>``)
    — the config's ``route_prefix`` must say the same. The applications then know each other (``GET
    /v1/models``, ``/healthz``), and one that can load no version answers 503 while the others serve."""
    import os

    model = args.get("model") or os.environ.get("FACELAB_MODEL")
    alias = args.get("alias") or os.environ.get("FACELAB_MODEL_ALIAS") or "champion"
    uri = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    root = args.get("root") or os.environ.get("FACELAB_ROOT") or None
    api_key = os.environ.get(args.get("api_key_env") or "FACELAB_API_KEY") or None
    watch_s = float(args.get("watch_s") or os.environ.get("FACELAB_WATCH_S") or 30)
    gpus = float(args.get("gpus_per_replica") or os.environ.get("FACELAB_GPUS_PER_REPLICA") or 0)
    batch = int(args.get("max_batch_size") or os.environ.get("FACELAB_MAX_BATCH_SIZE") or 8)
    timeout_s = float(args.get("request_timeout_s") or os.environ.get("FACELAB_REQUEST_TIMEOUT_S") or 120)
    missing = [
        n
        for n, v in (
            ("model (args.model or FACELAB_MODEL)", model),
            ("tracking_uri (args.tracking_uri or MLFLOW_TRACKING_URI)", uri),
        )
        if not v
    ]
    if missing:
        raise ValueError("facelab.serve.app:app_from_env needs " + " and ".join(missing))
    several: dict = {}
    listed = args.get("models") or os.environ.get("FACELAB_MODELS")
    if listed:
        entries = plan_models(
            [m for m in listed.split(",") if m.strip()],
            args.get("default_model") or os.environ.get("FACELAB_DEFAULT_MODEL") or None,
        )
        mine = next((e for e in entries if e.name == model), None)
        if mine is None:
            raise ValueError(f"model {model!r} is not one of models ({listed})")
        alias = mine.alias
        several = {
            "strict": False,
            "peers": peers_of(entries),
            "adapters": mine.adapters,
            "board_key": f"board:{DEFAULT_APP}",
            "route_prefix": mine.route_prefix,
        }
    return build_app(
        model,
        uri,
        alias=alias,
        root=root,
        api_key=api_key,
        watch_s=watch_s,
        gpus_per_replica=gpus,
        max_batch_size=batch,
        max_ongoing_requests=max(8, batch),
        request_timeout_s=timeout_s,
        **several,
    )
