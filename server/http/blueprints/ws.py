"""WebSocket: /ws/predict (JSON predictions, id echoed) and /ws/monitor (live figures)."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from server.errors import ApiError
from server.http.auth import require_api_key_or_token
from server.http.body import refuse_deep_json, row_features
from server.http.context import state
from server.protocols import native
from server.runtime import figures
from server.schemas import PredictRequest

bp = Blueprint("ws", __name__)
bp.before_request(require_api_key_or_token)
# A socket opened while draining would only be cut at the graceful timeout: 503 instead.
bp.before_request(lambda: state().front.refuse_when_draining())
sock = Sock()


def _answer(message: Any) -> dict[str, Any]:
    """One message's answer; every failure becomes ``{"error", "code", "status"}``, never a
    raise, and the socket stays open."""
    msg_id = None
    try:
        refuse_deep_json(message.encode() if isinstance(message, str) else message)
        payload = native.parse_json(message)
        if isinstance(payload, dict):
            msg_id = payload.pop("id", None)
        front = state().front
        req = native.validate(PredictRequest, payload, row_features(front, payload))
        lv = front.resolve(front.model_name(req.model, "'model' in the message"), req.version)
        X = front.matrix(lv, [req.features], ["features"])
        body = native.predict_answer(front.predict(lv, X, ["features"]))
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
            ws.send(orjson.dumps(figures.summary(runtime)).decode())
            # receive() doubles as the one-second sleep and notices a closed socket.
            if ws.receive(timeout=1.0) is None and not ws.connected:
                return
    except ConnectionClosed:
        return
