"""POST /predict, /predict/<model>, /predict/<model>/versions/<v>, /predict/batch."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, request

from server.errors import ApiError, validation_error
from server.inference import Outcome
from server.schemas import BatchRequest, PredictRequest
from server.web import json_response, read_json, request_id, require_api_key, state, validate

bp = Blueprint("predict", __name__)
bp.before_request(require_api_key)


def choose_target(
    path_model: str | None, body_model: str | None,
    path_version: str | None, body_version: str | None,
) -> tuple[str, str | int | None]:
    """Model and version of a request: the path wins over the body, the body over ``?version=``."""
    if path_model and body_model and body_model != path_model:
        raise validation_error(f"body names model '{body_model}' but the path '{path_model}'",
                               ["model"])
    name = path_model or body_model or state().settings.default_model
    if not name:
        raise validation_error("name a model: 'model' in the body or /predict/<model>", ["model"])
    version = path_version or body_version or request.args.get("version") or None
    g.model = name
    return name, version


def _note(outcome: Outcome) -> None:
    g.version = outcome.model.version
    g.cache = "HIT" if outcome.cached else "MISS"


@bp.post("/predict")
@bp.post("/predict/<model>")
@bp.post("/predict/<model>/versions/<version>")
def predict(model: str | None = None, version: str | None = None) -> Response:
    g.model = model
    payload = read_json()
    if isinstance(payload, list) and model is not None:
        payload = {"features": payload}  # the source guides' clients send a bare list
    req = validate(PredictRequest, payload)
    name, chosen = choose_target(model, req.model, version, req.version)
    outcome = state().dataplane.predict(name, chosen, [req.features], ["features"])
    _note(outcome)
    body: dict[str, Any] = {"model": outcome.model.name, "version": outcome.model.version,
                            **outcome.results[0], "cached": bool(outcome.cached),
                            "request_id": request_id()}
    return json_response(body, headers={"X-Cache": g.cache})


@bp.post("/predict/batch")
def batch() -> Response:
    payload = read_json()
    limit = state().settings.max_batch
    rows = payload.get("instances") if isinstance(payload, dict) else None
    if isinstance(rows, list) and len(rows) > limit:
        raise ApiError(413, "too_many_rows", f"{len(rows)} rows sent, at most {limit} allowed",
                       [{"loc": ["instances"], "msg": f"at most {limit} rows"}])
    req = validate(BatchRequest, payload)
    name, chosen = choose_target(None, req.model, None, req.version)
    outcome = state().dataplane.predict(name, chosen, req.instances, ["instances"])
    _note(outcome)
    results = outcome.results
    body: dict[str, Any] = {
        "model": outcome.model.name, "version": outcome.model.version, "count": len(results),
        "predictions": [r["prediction"] for r in results],
    }
    for column, key in (("labels", "label"), ("confidences", "confidence"),
                        ("probabilities", "probabilities")):
        if key in results[0]:
            body[column] = [r[key] for r in results]
    body["cached"] = outcome.cached
    body["request_id"] = request_id()
    return json_response(body)
