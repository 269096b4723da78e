"""Rows to a float64 matrix, and one model call's answers as columns."""

from __future__ import annotations

import numpy as np
import pytest

from server.errors import ApiError
from server.model.predict import Columns, predict_columns, to_matrix
from server.model.registry import ModelRegistry
from tests.answers import assert_rows_close, tree_based


def test_to_matrix_orders_named_features(registry: ModelRegistry) -> None:
    lv = registry.resolve("iris", "1")
    X = to_matrix(lv, [{"petal_width": 4, "petal_length": 3, "sepal_width": 2,
                        "sepal_length": 1}], ["features"])
    assert X.dtype == np.dtype("<f8") and X.tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize(("model", "version"), [("iris", "1"), ("iris", "2"),
                                                ("diabetes", "1"), ("breast_cancer", "1")])
def test_columns_hold_the_per_row_answers(registry: ModelRegistry, model: str,
                                          version: str) -> None:
    lv = registry.resolve(model, version)
    X = np.random.default_rng(5).normal(0.5, 1.0, (40, lv.n_features or 1))
    columns = predict_columns(lv, X)
    rows = columns.rows()
    assert len(columns) == len(rows) == 40
    assert Columns.from_rows(rows).rows() == rows
    chunked = Columns.concat([predict_columns(lv, X[:15]), predict_columns(lv, X[15:])]).rows()
    if tree_based(lv.estimator):
        assert chunked == rows  # forests and trees give the same bits in any chunking
    else:
        # A linear model's matrix product rounds with the BLAS kernel and the rows in the
        # call (seen on AMD EPYC: diabetes' Ridge split 15 + 25 moved the last bits).
        assert_rows_close(chunked, rows)
    if columns.probabilities is not None:
        assert columns.probability_maps() == [r["probabilities"] for r in rows]


def test_list_rows_take_one_numpy_pass_and_ragged_rows_are_named(
        registry: ModelRegistry) -> None:
    lv = registry.resolve("iris", "1")
    rows: list[list[float]] = [[1.0, 2.0, 3.0, 4.0], [5, 6, 7, 8]]
    assert to_matrix(lv, rows, ["instances"]).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ApiError) as err:
        to_matrix(lv, [*rows, [1.0, 2.0]], ["instances"])
    assert err.value.status == 422
    assert (err.value.details or [{}])[0]["loc"] == ["instances", 2]
