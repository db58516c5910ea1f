"""Ray Serve application: a FastAPI ingress serving ``models:/<name>@champion``.

Endpoints (OpenAPI at ``/docs``): ``GET /healthz``, ``GET /v1/models``, ``POST /v1/expressions``.
The replica downloads the champion's files from the MLflow registry once at start and rebuilds the
model from safetensors + config.json (no pickle). Bad input is answered with a 4xx whose JSON
``detail`` names the field; the replica never dies from a request.
"""


import tempfile
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from facelab.serve.schemas import ExpressionRequest, ExpressionResponse, ModelInfo

api = FastAPI(title="facelab", description="Text → facial expression sequences (FLAME, 53-d).", version="1")

MAX_BODY_BYTES = 64 * 1024  # a request is a short text and three numbers


@api.middleware("http")
async def _bounded_body(request: Request, call_next):
    """Refuse oversized bodies with 413 before they are parsed (declared or streamed length)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        return JSONResponse(status_code=413, content={"detail": [{"field": "body", "msg": f"body larger than {MAX_BODY_BYTES} bytes", "type": "too_large"}]})
    if declared is None and request.method in ("POST", "PUT", "PATCH"):
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return JSONResponse(status_code=413, content={"detail": [{"field": "body", "msg": f"body larger than {MAX_BODY_BYTES} bytes", "type": "too_large"}]})
        request._body = body  # already consumed; let FastAPI read it from here
    return await call_next(request)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    detail = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        detail.append({"field": loc, "msg": err.get("msg", "invalid"), "type": err.get("type")})
    return JSONResponse(status_code=422, content={"detail": detail})


@serve.deployment(
    max_ongoing_requests=8,
    max_queued_requests=64,           # overload gets a quick 503 instead of an unbounded queue
    health_check_period_s=10,
    graceful_shutdown_timeout_s=5,
)
@serve.ingress(api)
class ExpressionServer:
    def __init__(self, model_name: str, tracking_uri: str, alias: str = "champion"):
        import torch

        from facelab import tracking
        from facelab.models.loading import load_servable

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self._tmp = tempfile.TemporaryDirectory(prefix="facelab-serve-")
        local, info = tracking.download_model(tracking.client(tracking_uri), model_name, alias, Path(self._tmp.name))
        self.model, self.config = load_servable(local)
        self.info = ModelInfo(**{k: (str(v) if v is not None else None) for k, v in info.items()})
        self.max_frames = int(self.config["data"]["max_frames"])

    def check_health(self) -> None:  # Serve restarts a replica whose model is unusable
        if self.model is None:
            raise RuntimeError("model not loaded")

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model": self.info.name, "version": self.info.version}

    @api.get("/v1/models", response_model=ModelInfo)
    def models(self) -> ModelInfo:
        return self.info

    @api.post("/v1/expressions", response_model=ExpressionResponse)
    def expressions(self, req: ExpressionRequest) -> ExpressionResponse:
        import torch

        gen = torch.Generator()
        gen.manual_seed(req.seed if req.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
        max_frames = min(req.max_frames, self.max_frames)
        with torch.no_grad():
            seqs = self.model.generate([req.text] * req.num_samples, max_frames=max_frames, generator=gen)
        frames = [s.float().cpu().tolist() for s in seqs]
        for f in frames:
            if not all(all(v == v and abs(v) != float("inf") for v in row) for row in f):
                raise HTTPException(status_code=500, detail="model produced non-finite frames")
        return ExpressionResponse(model=self.info, sequences=[{"frames": f} for f in frames])


def build_app(model_name: str, tracking_uri: str, alias: str = "champion"):
    return ExpressionServer.bind(model_name, tracking_uri, alias)
