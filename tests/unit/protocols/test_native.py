"""The native codec: bodies refused in the same words as CSV rows, answers built in one place."""

from __future__ import annotations

from typing import Any

import pytest

from server.errors import ApiError
from server.protocols import native
from server.schemas import BatchRequest, PredictRequest

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


@pytest.mark.parametrize(("payload", "loc", "msg"), [
    ({"instances": [[1, 2, 3, 4], [1, "abc", 3, 4]]}, ["instances", 1, 1],
     "not a number for feature 'sepal_width': 'abc'"),
    ({"instances": [[1, 2, None, 4]]}, ["instances", 0, 2],
     "missing value for feature 'petal_length'"),
    ({"instances": [{"sepal_length": "x"}]}, ["instances", 0, "sepal_length"],
     "not a number for feature 'sepal_length': 'x'"),
])
def test_a_bad_row_value_names_its_feature(payload: dict[str, Any], loc: list[Any],
                                           msg: str) -> None:
    with pytest.raises(ApiError) as err:
        native.validate(BatchRequest, payload, lambda: FEATURES)
    assert err.value.status == 422
    assert err.value.details is not None and err.value.details[0] == {"loc": loc, "msg": msg}


def test_without_features_pydantic_words_stay() -> None:
    with pytest.raises(ApiError) as err:
        native.validate(PredictRequest, {"features": [1, "x"]})
    assert err.value.details == [{"loc": ["features", 1], "msg": "Input should be a valid number"}]


@pytest.mark.parametrize("payload", ["iris", 42, [1, 2], None])
def test_a_body_that_is_not_an_object_is_refused_first(payload: Any) -> None:
    for check in (native.require_object, native.named_target):
        with pytest.raises(ApiError) as err:
            check(payload)
        assert err.value.details == [{"loc": [], "msg": "expected an object"}]


@pytest.mark.parametrize(("payload", "target"), [
    ({"model": "iris", "version": 2}, ("iris", "2")),
    ({"model": "iris", "version": "stable"}, ("iris", "stable")),
    ({"model": 5, "version": [1]}, (None, None)),  # left for validation to refuse
    ({}, (None, None)),
])
def test_named_target(payload: dict[str, Any], target: tuple[str | None, str | None]) -> None:
    assert native.named_target(payload) == target


@pytest.mark.parametrize(("raw", "code"), [(b"", "empty_body"), (b"  ", "empty_body"),
                                           (b"{", "bad_json")])
def test_unreadable_json_is_400(raw: bytes, code: str) -> None:
    with pytest.raises(ApiError) as err:
        native.parse_json(raw)
    assert (err.value.status, err.value.code) == (400, code)


def test_nan_parses_so_that_it_is_refused_as_a_value() -> None:
    assert native.parse_json(b"[NaN]")[0] != native.parse_json(b"[NaN]")[0]
