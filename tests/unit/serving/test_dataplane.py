"""The data plane below the HTTP layer: rows counted, only one-row requests micro-batched,
big matrices predicted in chunks with the model time checked between them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server.errors import ApiError
from server.model.loaded import LoadedVersion
from server.model.predict import Columns, predict_matrix
from server.model.registry import ModelRegistry
from server.serving.batching import MicroBatcher
from server.serving.dataplane import DataPlane
from tests.answers import assert_rows_close, tree_based


def rows(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(4.0, 2.5, (n, 4))


def test_dataplane_counts_rows(registry: ModelRegistry) -> None:
    plane = DataPlane(registry)
    out = plane.predict("iris", "1", [[5.1, 3.5, 1.4, 0.2]] * 3, ["instances"])
    assert len(out.results) == 3 and plane.predictions == 3


def test_dataplane_batches_only_one_row_requests(registry: ModelRegistry) -> None:
    calls: list[int] = []

    def predict(lv: LoadedVersion, X: np.ndarray) -> list[dict[str, Any]]:
        calls.append(len(X))
        return predict_matrix(lv, X)

    plane = DataPlane(registry, batcher=MicroBatcher(predict, max_size=8, max_delay_ms=1000))
    out = plane.predict("iris", "2", rows(3).tolist(), ["instances"])
    assert len(out.results) == 3 and calls == []  # a batch request goes straight to the model
    plane.predict("iris", "2", [rows(1)[0].tolist()], ["features"])
    assert calls == [1]


@pytest.mark.parametrize("version", ["1", "2"])
def test_big_matrices_in_chunks_give_the_whole_calls_answers(registry: ModelRegistry,
                                                             version: str) -> None:
    lv = registry.resolve("iris", version)
    X = rows(101)  # chunks of 10 would leave one row alone: it joins the chunk before
    chunked, seconds = DataPlane(registry, chunk_rows=10)._call(lv, X, ["instances"])
    assert seconds > 0
    assert isinstance(chunked, Columns)
    if tree_based(lv.estimator):  # v2, a forest: the same bits in any chunking
        assert chunked.rows() == predict_matrix(lv, X)
    else:  # v1, LogisticRegression: 10-row products may round unlike one 101-row product
        assert_rows_close(chunked.rows(), predict_matrix(lv, X))


def test_model_time_over_the_limit_is_504_at_a_chunk_boundary(registry: ModelRegistry) -> None:
    plane = DataPlane(registry, chunk_rows=10, model_timeout=1e-9)
    with pytest.raises(ApiError) as err:
        plane.predict("iris", "2", rows(50).tolist(), ["instances"])
    assert err.value.status == 504 and err.value.code == "model_timeout"
    assert "10 of 50 rows" in err.value.message
    assert len(DataPlane(registry, chunk_rows=10).predict("iris", "2", rows(50).tolist(),
                                                          ["instances"]).results) == 50
