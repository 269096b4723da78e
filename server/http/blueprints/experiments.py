"""A/B: POST /predict/ab (alias /predict/ab-test), GET /experiments[/<name>], outcomes."""

from __future__ import annotations

from flask import Blueprint, Response, g

from server.http.auth import require_api_key
from server.http.body import read_json
from server.http.context import adopt_request_id, json_response, request_id, state
from server.http.origin import origin
from server.model.predict import RowInput
from server.protocols import native
from server.schemas import ABRequest, OutcomeRequest

bp = Blueprint("experiments", __name__)
bp.before_request(require_api_key)


@bp.post("/predict/ab")
@bp.post("/predict/ab-test")
def predict_ab() -> Response:
    req = native.validate(ABRequest, read_json(form_ok=True))
    adopt_request_id(req.request_id)
    return through_experiment(req.experiment, req.user_id, req.features)


def through_experiment(experiment: str, user_id: str, features: RowInput) -> Response:
    """One row predicted with the arm ``user_id`` lands in (/predict/ab, and /predict with a
    ``user_id``), the answer naming the experiment and the arm."""
    st = state()
    plane = st.dataplane
    outcome, exp, arm = plane.predict_ab(experiment, user_id, [features], ["features"])
    if outcome.X is not None:  # counted for drift, and logged unless the log is off
        st.front.record(outcome, outcome.X, origin("ab", exp.name, arm.name))
    g.model, g.version = exp.model, outcome.model.version
    g.cache = "HIT" if outcome.cached else "MISS"
    g.model_seconds = outcome.model_seconds
    body = native.predict_answer(outcome, request_id(), experiment=exp.name, arm=arm.name)
    response = json_response(body, headers={"X-Cache": g.cache})
    if exp.shadow is not None:
        # Runs once the answer has been written: the shadow never slows the caller.
        response.call_on_close(lambda: plane.shadow(exp, [features], outcome))
    return response


@bp.get("/experiments")
def list_experiments() -> Response:
    experiments = state().dataplane.experiments
    return json_response({
        "experiments": [experiments.view(name) for name in sorted(experiments.items)],
        "counts_scope": experiments.stats.scope,
        "file_error": experiments.file_error,
    })


@bp.get("/experiments/<name>")
def one_experiment(name: str) -> Response:
    return json_response(state().dataplane.experiments.view(name))


@bp.post("/experiments/<name>/outcome")
def record_outcome(name: str) -> Response:
    req = native.validate(OutcomeRequest, read_json())
    # Once per user the experiment served (409 otherwise), against the arm that served them.
    arm = state().dataplane.experiments.record_outcome(name, req.user_id, req.value)
    return json_response({"experiment": name, "user_id": req.user_id, "arm": arm.name,
                          "value": req.value, "recorded": True, "request_id": request_id()})
