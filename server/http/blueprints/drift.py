"""GET /models/<m>/versions/<v>/drift: the version's live traffic against its training data."""

from __future__ import annotations

from flask import Blueprint, Response, g

from server.errors import ApiError
from server.http.auth import require_api_key
from server.http.context import json_response, state

bp = Blueprint("drift", __name__)
bp.before_request(require_api_key)


@bp.get("/models/<model>/versions/<version>/drift")
def drift(model: str, version: str) -> Response:
    """Per-feature and prediction PSI over the window, summed over the workers (and, with
    Redis, the instances); the version may be a number or a label."""
    front = state().front
    g.model = model
    lv = front.resolve(model, version)
    g.version = lv.version
    if front.drift is None:
        raise ApiError(404, "drift_off", "drift monitoring is off on this server (DRIFT=off)")
    return json_response(front.drift.report(lv))
