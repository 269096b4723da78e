"""Open Inference Protocol (KServe V2, Triton, MLServer) on the same port and data plane."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, request

from server.http.app import error_handlers
from server.http.auth import require_api_key
from server.http.context import json_response, state
from server.http.origin import origin
from server.model.loaded import LoadedVersion
from server.protocols import oip

bp = Blueprint("v2_oip", __name__, url_prefix="/v2")
# The health probes stay open, like /health and /ready: orchestrators send no key.
OPEN = frozenset({"v2_oip.live", "v2_oip.ready"})
bp.before_request(lambda: None if request.endpoint in OPEN else require_api_key())
error_handlers(bp, oip.error_answer)

SERVER_NAME = "model-server"
SERVER_VERSION = "1.0"


def _resolve(model: str, version: str | None) -> LoadedVersion:
    g.model = model
    lv = state().front.resolve(model, version)
    g.version = lv.version
    return lv


@bp.get("")
def server_metadata() -> Response:
    return json_response({"name": SERVER_NAME, "version": SERVER_VERSION,
                          "extensions": ["binary_tensor_data"]})


@bp.get("/health/live")
def live() -> Response:
    return json_response({"live": True})


@bp.get("/health/ready")
def ready() -> Response:
    ok = state().front.readiness().ok
    return json_response({"ready": ok}, 200 if ok else 503)


@bp.get("/models/<model>")
@bp.get("/models/<model>/versions/<version>")
def model_metadata(model: str, version: str | None = None) -> Response:
    lv = _resolve(model, version)
    versions = state().registry.get(model).servable
    return json_response(oip.metadata(lv, versions))


@bp.get("/models/<model>/ready")
@bp.get("/models/<model>/versions/<version>/ready")
def model_ready(model: str, version: str | None = None) -> Response:
    lv = _resolve(model, version)
    ready = not state().front.draining  # a stopping instance takes no new work
    return json_response({"name": lv.name, "version": lv.version, "ready": ready},
                         200 if ready else 503)


@bp.post("/models/<model>/infer")
@bp.post("/models/<model>/versions/<version>/infer")
def infer(model: str, version: str | None = None) -> Response:
    front = state().front
    lv = _resolve(model, version)
    # Clients of the binary extension may send no (or any) Content-Type: read the bytes.
    req = oip.parse_request(request.get_data(cache=False),
                            request.headers.get("Inference-Header-Content-Length"))
    front.check_rows(oip.declared_rows(req), ["inputs"])  # before decoding the tensors
    X = oip.to_matrix(lv, req)
    front.check_rows(len(X), ["inputs"])
    outcome = front.predict(lv, X, ["inputs"], origin("v2", request_id=req.id))
    g.cache = f"{outcome.cached}/{len(outcome.results)}"
    g.model_seconds = outcome.model_seconds
    body, header_length = oip.encode_response(lv, req, outcome.results)
    if header_length is None:
        return Response(body, mimetype="application/json")
    headers: dict[str, Any] = {"Inference-Header-Content-Length": str(header_length)}
    return Response(body, mimetype="application/octet-stream", headers=headers)
