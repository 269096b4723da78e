"""Request validation: errors carry clean field paths."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.schemas import BatchRequest, PredictRequest, error_details


@pytest.mark.parametrize(("payload", "loc"), [
    ({"features": [1, "a"]}, ["features", 1]),
    ({"features": {"a": None}}, ["features", "a"]),
    ({"features": [1], "version": 1.5}, ["version"]),
    ({"features": [1], "extra": 1}, ["extra"]),
    ({}, ["features"]),
])
def test_validation_errors_carry_clean_field_paths(payload: dict, loc: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError) as info:
        PredictRequest.model_validate(payload)
    assert error_details(info.value.errors())[0]["loc"] == loc


def test_batch_paths_include_row_index() -> None:
    with pytest.raises(ValidationError) as info:
        BatchRequest.model_validate({"instances": [[1, 2], [1, float("nan")]]})
    assert error_details(info.value.errors())[0]["loc"] == ["instances", 1, 1]
