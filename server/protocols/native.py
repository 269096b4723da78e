"""The native JSON API's codec: request bodies in, answer bodies out. No Flask here.

Requests are validated by the pydantic models in ``server.schemas``; a row's bad value is
reported in the same words as the CSV front doors use (``model.predict.value_reason``) once
the model, and so the feature names, are known.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from server.errors import ApiError
from server.model.predict import value_reason
from server.schemas import error_details
from server.serving.dataplane import Outcome

M = TypeVar("M", bound=BaseModel)

# pydantic's error types for a value that is not a finite number
NUMBER_ERRORS = frozenset({"float_type", "float_parsing", "finite_number"})


def parse_json(raw: bytes | str) -> Any:
    """A JSON document (NaN and Infinity parse, so that they are refused as values, 422)."""
    if not raw.strip():
        raise ApiError(400, "empty_body", "request body is empty: send a JSON object")
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=True)
    except ValueError as exc:
        raise ApiError(400, "bad_json", f"malformed JSON: {exc}") from exc


def require_object(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object",
                       [{"loc": [], "msg": "expected an object"}])
    return payload


Features = Callable[[], tuple[str, ...] | None]


def validate(schema: type[M], payload: Any, features: Features | None = None) -> M:
    """``payload`` as ``schema``, or a 422 naming every bad field. ``features`` gives the
    model's feature names, asked only on failure: a row's bad value then says which feature
    and why, as CSV rows do."""
    require_object(payload)
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors()
        details = error_details(errors)
        names = features() if features is not None else None
        if names:
            for detail, error in zip(details, errors):
                feature = _feature_at(detail["loc"], names)
                if feature is not None and error["type"] in NUMBER_ERRORS:
                    detail["msg"] = value_reason(error.get("input"), feature)
        first = details[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "validation_error", f"{where}: {first['msg']}", details) from exc


def _feature_at(loc: list[Any], features: tuple[str, ...]) -> str | None:
    """The feature a row value's path ends in: a list position or an object key."""
    if len(loc) < 2 or loc[0] not in ("features", "instances"):
        return None
    last = loc[-1]
    if isinstance(last, int) and not isinstance(last, bool):
        return features[last] if 0 <= last < len(features) else None
    return last if isinstance(last, str) and last in features else None


def named_target(payload: Any) -> tuple[str | None, str | None]:
    """``model`` and ``version`` of a body (an object) before it is validated, when they are
    strings or (the version) an integer; whatever else is there is refused by validation."""
    require_object(payload)
    model = payload.get("model")
    version = payload.get("version", payload.get("model_version"))
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    return (model if isinstance(model, str) else None,
            version if isinstance(version, str) else None)


def predict_answer(outcome: Outcome, request_id: str | None = None,
                   **extra: Any) -> dict[str, Any]:
    """One row's answer: model, version, the row's result, cached, then ``extra``."""
    body: dict[str, Any] = {"model": outcome.model.name, "version": outcome.model.version,
                            **outcome.results[0], "cached": bool(outcome.cached), **extra}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def batch_answer(outcome: Outcome, request_id: str) -> dict[str, Any]:
    """A batch's answer, column by column (classifier-only columns when there are any)."""
    columns = outcome.columns
    body: dict[str, Any] = {
        "model": outcome.model.name, "version": outcome.model.version, "count": len(columns),
        "predictions": columns.predictions,
    }
    classifier = {"labels": columns.labels, "confidences": columns.confidences,
                  "probabilities": columns.probability_maps()}
    body.update({key: value for key, value in classifier.items() if value is not None})
    body["cached"] = outcome.cached
    body["request_id"] = request_id
    return body


def error_answer(err: ApiError, request_id: str) -> tuple[int, dict[str, Any]]:
    """The native error shape: ``{"error", "code", "details"?, "request_id"}``."""
    body = err.body()
    body["request_id"] = request_id
    return err.status, body


def row_count(payload: Any) -> int:
    """How many rows ``instances`` holds (0 when it is not a list): limits come first."""
    rows = payload.get("instances") if isinstance(payload, dict) else None
    return len(rows) if isinstance(rows, list) else 0
