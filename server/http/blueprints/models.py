"""GET /models, /models/<name>: versions, labels, features, classes, sha256, load state."""

from __future__ import annotations

from flask import Blueprint, Response

from server.http.auth import require_api_key
from server.http.context import json_response, state

bp = Blueprint("models", __name__)
bp.before_request(require_api_key)


@bp.get("/models")
def list_models() -> Response:
    models = state().registry.models
    return json_response({"models": [models[n].describe() for n in sorted(models)]})


@bp.get("/models/<name>")
def one_model(name: str) -> Response:
    return json_response(state().registry.get(name).describe())
