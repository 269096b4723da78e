"""Who and where a prediction came from, for the prediction log: taken while the request is
at hand (a stream's rows are logged after the view has returned)."""

from __future__ import annotations

from server.http.app import REQUEST_ID_RE
from server.http.auth import client_key
from server.http.context import request_id as current_request_id
from server.http.context import state
from server.serving.predlog import Origin


def origin(door: str, experiment: str | None = None, arm: str | None = None,
           request_id: str | None = None) -> Origin | None:
    """The request's id (or the protocol's own, e.g. a V2 request's ``id`` or a WebSocket
    message's ``request_id``), the door, and the API key's hash (never the key); None when
    the prediction log is off, so that nothing is computed for it."""
    if state().front.log is None:
        return None
    # A protocol's own id (a V2 request's ``id``) is free text: only a well-formed one is
    # kept, so that one client's odd bytes can never make the database refuse a batch.
    rid = request_id if isinstance(request_id, str) and REQUEST_ID_RE.match(request_id) \
        else current_request_id()
    return Origin(rid, door, key_hash(), experiment, arm)


def key_hash() -> str | None:
    """The hash of the request's API key under API_KEYS (never the key), else None."""
    key = client_key() if state().settings.api_key_list else ""
    return key[4:] if key.startswith("key:") else None
