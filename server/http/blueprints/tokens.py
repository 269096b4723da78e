"""POST /auth/stream-token: a short-lived token for browsers, which cannot put an API key on
an EventSource or a WebSocket; SSE endpoints and WebSockets accept it as ``?token=``."""

from __future__ import annotations

from flask import Blueprint, Response

from server.http.auth import issue_stream_token, require_api_key
from server.http.context import json_response, state

bp = Blueprint("tokens", __name__)
bp.before_request(require_api_key)


@bp.post("/auth/stream-token")
def stream_token() -> Response:
    return json_response({"token": issue_stream_token(),
                          "expires_in": state().settings.stream_token_seconds},
                         headers={"Cache-Control": "no-store"})
