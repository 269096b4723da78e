"""POST /predict, /predict/<model>, /predict/<model>/versions/<v>, /predict/batch."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g

from server.http.auth import require_api_key
from server.http.body import choose_target, read_json, read_rows, validate
from server.http.context import json_response, request_id, state
from server.schemas import BatchRequest, PredictRequest
from server.serving.dataplane import Outcome

bp = Blueprint("predict", __name__)
bp.before_request(require_api_key)


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
    req = read_rows(BatchRequest, state().settings.max_batch)
    name, chosen = choose_target(None, req.model, None, req.version)
    outcome = state().dataplane.predict(name, chosen, req.instances, ["instances"])
    _note(outcome)
    columns = outcome.columns
    body: dict[str, Any] = {
        "model": outcome.model.name, "version": outcome.model.version, "count": len(columns),
        "predictions": columns.predictions,
    }
    classifier = {"labels": columns.labels, "confidences": columns.confidences,
                  "probabilities": columns.probability_maps()}
    body.update({key: value for key, value in classifier.items() if value is not None})
    body["cached"] = outcome.cached
    body["request_id"] = request_id()
    return json_response(body)
