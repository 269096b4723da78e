"""WebSocket: /ws/predict (JSON predictions, id echoed) and /ws/monitor (live figures)."""

from __future__ import annotations

from typing import Any

import orjson
import pydantic_core
from flask import Blueprint
from flask_sock import Sock
from pydantic import ValidationError
from simple_websocket import ConnectionClosed

from server.errors import ApiError
from server.http.auth import require_api_key
from server.http.body import refuse_deep_json
from server.http.context import state
from server.runtime import figures as monitor
from server.schemas import PredictRequest, error_details

bp = Blueprint("ws", __name__)
bp.before_request(require_api_key)
sock = Sock()


def _answer(message: Any) -> dict[str, Any]:
    """One message's answer; every failure becomes ``{"error", "code"}``, never a raise."""
    msg_id = None
    try:
        refuse_deep_json(message.encode() if isinstance(message, str) else message)
        try:
            payload = pydantic_core.from_json(message, allow_inf_nan=True)
        except ValueError as exc:
            raise ApiError(400, "bad_json", f"malformed JSON: {exc}") from exc
        if isinstance(payload, dict):
            msg_id = payload.pop("id", None)
        try:
            req = PredictRequest.model_validate(payload)
        except ValidationError as exc:
            details = error_details(exc.errors())
            raise ApiError(422, "validation_error", details[0]["msg"], details) from exc
        st = state()
        name = req.model or st.settings.default_model
        if not name:
            raise ApiError(422, "validation_error", "name a model", [{"loc": ["model"],
                                                                      "msg": "required"}])
        outcome = st.dataplane.predict(name, req.version, [req.features], ["features"])
        body: dict[str, Any] = {"model": outcome.model.name, "version": outcome.model.version,
                                **outcome.results[0], "cached": bool(outcome.cached)}
    except ApiError as err:
        body = {**err.body(), "status": err.status}
    if msg_id is not None:
        body["id"] = msg_id
    return body


@sock.route("/ws/predict", bp=bp)
def ws_predict(ws: Any) -> None:
    while True:
        message = ws.receive()
        if message is None:
            continue
        ws.send(orjson.dumps(_answer(message)).decode())


@sock.route("/ws/monitor", bp=bp)
def ws_monitor(ws: Any) -> None:
    runtime = state().events.dir
    try:
        while True:
            ws.send(orjson.dumps(monitor.summary(runtime)).decode())
            # receive() doubles as the one-second sleep and notices a closed socket.
            if ws.receive(timeout=1.0) is None and not ws.connected:
                return
    except ConnectionClosed:
        return
