"""POST /predict, /predict/<model>, /predict/<model>/versions/<v>, /predict/batch."""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from server.http.auth import require_api_key
from server.http.blueprints.experiments import through_experiment
from server.http.body import query_version, read_json, read_target, row_features
from server.http.context import adopt_request_id, json_response, request_id, state
from server.http.origin import origin
from server.protocols import native
from server.schemas import BatchRequest, PredictRequest
from server.serving.dataplane import Outcome

bp = Blueprint("predict", __name__)
bp.before_request(require_api_key)


def _note(outcome: Outcome) -> None:
    g.version = outcome.model.version
    g.cache = "HIT" if outcome.cached else "MISS"
    g.model_seconds = outcome.model_seconds


@bp.post("/predict")
@bp.post("/predict/<model>")
@bp.post("/predict/<model>/versions/<version>")
def predict(model: str | None = None, version: str | None = None) -> Response:
    g.model = model
    payload = read_json(form_ok=True)
    if isinstance(payload, list) and model is not None:
        payload = {"features": payload}  # the source guides' clients send a bare list
    front = state().front
    req = native.validate(PredictRequest, payload, row_features(front, payload, model, version))
    adopt_request_id(req.request_id)
    user_id = req.user_id or (request.args.get("user_id") if request.query_string else None)
    if user_id and not (version or req.version or query_version()):
        # The guides' A/B clients: POST /predict?user_id=... on the model an experiment targets
        name = front.model_name(model or req.model, "'model' in the body or /predict/<model>")
        experiment = state().dataplane.experiments.targeting(name)
        if experiment is not None:
            return through_experiment(experiment.name, user_id, req.features)
    lv = read_target(front, model, req.model, version, req.version,
                     "'model' in the body or /predict/<model>")
    outcome = front.predict(lv, front.matrix(lv, [req.features], ["features"]), ["features"],
                            origin("native"))
    _note(outcome)
    return json_response(native.predict_answer(outcome, request_id()),
                         headers={"X-Cache": g.cache})


@bp.post("/predict/batch")
def batch() -> Response:
    front = state().front
    payload = read_json(form_ok=True)
    front.check_rows(native.row_count(payload), ["instances"])
    req = native.validate(BatchRequest, payload, row_features(front, payload))
    adopt_request_id(req.request_id)
    lv = read_target(front, None, req.model, None, req.version, "'model' in the body")
    outcome = front.predict(lv, front.matrix(lv, req.instances, ["instances"]), ["instances"],
                            origin("batch"))
    _note(outcome)
    return json_response(native.batch_answer(outcome, request_id()))
