"""Request bodies as pydantic models: strict numbers, finite only, no unknown fields."""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, TypeAdapter

LIST_TAG = "[list]"
OBJECT_TAG = "[object]"


def _row_kind(value: Any) -> str:
    return OBJECT_TAG if isinstance(value, dict) else LIST_TAG


Row = Annotated[
    Union[
        Annotated[list[float], Tag(LIST_TAG)],
        Annotated[dict[str, float], Tag(OBJECT_TAG)],
    ],
    Discriminator(_row_kind),
]


def _version(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError("version must be a string or an integer")


Version = Annotated[Optional[str], BeforeValidator(_version)]

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class PredictRequest(BaseModel):
    """One row: ``features`` in the model's feature order, or keyed by feature name."""

    model_config = _STRICT
    model: str | None = Field(None, description="Model name (or the path's).")
    version: Version = Field(None, description="Version number, label or 'latest'.")
    features: Row


class BatchRequest(BaseModel):
    """Up to MAX_BATCH rows predicted with one model call."""

    model_config = _STRICT
    model: str | None = None
    version: Version = None
    instances: list[Row] = Field(min_length=1)


def _user_id(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError("user_id must be a non-empty string or an integer")


UserId = Annotated[str, BeforeValidator(_user_id), Field(max_length=256)]


class ABRequest(BaseModel):
    """A prediction through an experiment: the user's arm picks the version."""

    model_config = _STRICT
    experiment: str = Field(min_length=1)
    user_id: UserId
    features: Row


class OutcomeRequest(BaseModel):
    """An observed outcome for a user: 0/1 (conversion) or any number (revenue, time...)."""

    model_config = _STRICT
    user_id: UserId
    value: float


BareRow = TypeAdapter(Row, config=_STRICT)


def error_details(errors: list[Any]) -> list[dict[str, Any]]:
    """pydantic errors as ``{"loc", "msg"}`` with the union tags taken out of the path."""
    return [
        {"loc": [p for p in e["loc"] if p not in (LIST_TAG, OBJECT_TAG)],
         "msg": e["msg"].removeprefix("Value error, ")}
        for e in errors
    ]
