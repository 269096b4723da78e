"""WebSocket: /ws/predict (JSON predictions, id echoed) and /ws/monitor (live figures).

A socket holds one of the worker's connections (WORKER_CONNECTIONS) for as long as it is
open, so each worker takes at most ``settings.websocket_cap`` of them (503 beyond) and plain
HTTP always has room; a /ws/predict socket silent for WS_IDLE_SECONDS is closed (1001), and
a peer that stops answering pings (WS_PING_SECONDS, SOCK_SERVER_OPTIONS) is dropped. Each
message counts against RATE_LIMIT like a request, and one over MAX_BODY_BYTES closes the
socket (1009) as soon as that many bytes have arrived (simple_websocket's max_message_size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Blueprint, current_app, g
from flask.blueprints import BlueprintSetupState
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from server.errors import ApiError
from server.http.auth import message_limiter, require_api_key_or_token
from server.http.body import refuse_deep_json, row_features
from server.http.context import new_request_id, state
from server.http.origin import origin
from server.protocols import native
from server.runtime import figures
from server.schemas import PredictRequest

GOING_AWAY = 1001

bp = Blueprint("ws", __name__)
sock = Sock()


@dataclass
class OpenSockets:
    """How many WebSockets this worker holds open (both routes); in ``app.extensions``."""

    count: int = 0


@bp.record_once
def _count_sockets(setup: BlueprintSetupState) -> None:
    setup.app.extensions["websockets"] = OpenSockets()


def _take_slot() -> None:
    """Refuse the handshake when this worker already holds its cap of sockets, else hold a
    slot until the request ends (``_free_slot``). Check and count in one step, with no
    switch to another greenlet between them, so concurrent handshakes cannot pass the cap."""
    sockets: OpenSockets = current_app.extensions["websockets"]
    cap = state().settings.websocket_cap
    if sockets.count >= cap:
        raise ApiError(503, "too_many_websockets",
                       f"this worker holds {sockets.count} WebSockets (MAX_WEBSOCKETS {cap}); "
                       "retry shortly", headers={"Retry-After": "1"})
    sockets.count += 1
    g.websocket_slot = True


@bp.teardown_request
def _free_slot(_: BaseException | None) -> None:
    if g.pop("websocket_slot", False):
        current_app.extensions["websockets"].count -= 1


bp.before_request(require_api_key_or_token)
# A socket opened while draining would only be cut at the graceful timeout: 503 instead.
bp.before_request(lambda: state().front.refuse_when_draining())
bp.before_request(_take_slot)  # last: a handshake refused for another reason takes no slot


def _answer(message: Any, over_limit: Callable[[], ApiError | None] | None) -> dict[str, Any]:
    """One message's answer; every failure becomes ``{"error", "code", "status"}``, never a
    raise, and the socket stays open. Every message is counted against the rate limit, a bad
    one too (as HTTP counts a bad request); one over it is answered with its id echoed."""
    refused = over_limit() if over_limit is not None else None
    msg_id = None
    try:
        refuse_deep_json(message.encode() if isinstance(message, str) else message)
        payload = native.parse_json(message)
        if isinstance(payload, dict):
            msg_id = payload.pop("id", None)
        if refused is not None:
            raise refused
        front = state().front
        req = native.validate(PredictRequest, payload, row_features(front, payload))
        lv = front.resolve(front.model_name(req.model, "'model' in the message"), req.version)
        X = front.matrix(lv, [req.features], ["features"])
        # Each message is a request of its own: its rows are logged under its own id (the
        # message's request_id, else a fresh one), which the answer names for feedback.
        rid = req.request_id or new_request_id()
        body = native.predict_answer(
            front.predict(lv, X, ["features"], origin("websocket", request_id=rid)), rid)
    except ApiError as err:
        body = {**err.body(), "status": err.status}
    if msg_id is not None:
        body["id"] = msg_id
    return body


@sock.route("/ws/predict", bp=bp)
def ws_predict(ws: Any) -> None:
    idle = state().settings.ws_idle_seconds
    over_limit = message_limiter()  # the identity is the handshake's, for the socket's life
    try:
        while True:
            message = ws.receive(timeout=idle)
            if message is None:  # silent for WS_IDLE_SECONDS: give the slot back
                ws.close(GOING_AWAY, f"idle for {idle:g} s (WS_IDLE_SECONDS)")
                return
            ws.send(orjson.dumps(_answer(message, over_limit)).decode())
    except (ConnectionClosed, OSError):  # the peer went away, or stopped answering pings
        return


@sock.route("/ws/monitor", bp=bp)
def ws_monitor(ws: Any) -> None:
    runtime = state().events.dir
    try:
        while True:
            ws.send(orjson.dumps(figures.summary(runtime)).decode())
            # receive() doubles as the one-second sleep and notices a closed socket.
            if ws.receive(timeout=1.0) is None and not ws.connected:
                return
    except (ConnectionClosed, OSError):
        return
