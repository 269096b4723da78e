"""CSV rows as every CSV front door reads them: rejected with a reason, never truncated or
padded, and the reasons the JSON doors give for the same values."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from server.model.predict import value_reason, width_reason
from server.protocols.csvrows import fit_to_header, parse_rows

NAMES = ["a", "b", "c"]


@pytest.mark.parametrize(("row", "reason"), [
    (["1", "2", "3"], ""),
    ([" 1 ", "2e0", "-3.5"], ""),
    (["1", "2", "3", "4"], "expected 3 values, got 4"),
    (["1", "2"], "expected 3 values, got 2"),
    (["1", "", "3"], "missing value for feature 'b'"),
    (["1", "  ", "3"], "missing value for feature 'b'"),
    (["x", "2", "3"], "not a number for feature 'a': 'x'"),
    (["1", "2", "nan"], "NaN or infinity for feature 'c'"),
    (["1", "-inf", "3"], "NaN or infinity for feature 'b'"),
    (["1", "1e999", "3"], "NaN or infinity for feature 'b'"),
    # float() takes these, JSON does not: neither do CSV rows
    (["1_000", "2", "3"], "not a number for feature 'a': '1_000'"),
    (["1", "\u0665", "3"], "not a number for feature 'b': '\u0665'"),
    (["1", "0x1f", "3"], "not a number for feature 'b': '0x1f'"),
])
def test_each_row_is_scored_or_rejected_with_its_reason(row: list[str], reason: str) -> None:
    good = ["0.5", "1.5", "2.5"]
    parsed = parse_rows([good, row, good], [0, 1, 2], 3, NAMES)
    assert parsed.reasons == ["", reason, ""]
    kept = [0, 2] if reason else [0, 1, 2]
    assert parsed.good == kept
    assert parsed.X.shape == (len(kept), 3) and np.isfinite(parsed.X).all()
    if not reason:
        assert parsed.X[1].tolist() == [float(v) for v in row]


def test_feature_columns_are_picked_by_position() -> None:
    parsed = parse_rows([["id-1", "3", "1", "2"]], [2, 3, 1], 4, NAMES)
    assert parsed.X.tolist() == [[1.0, 2.0, 3.0]]


def test_only_bad_rows_leave_an_empty_matrix() -> None:
    parsed = parse_rows([["1"], ["x", "y", "z"]], [0, 1, 2], 3, NAMES)
    assert parsed.good == [] and parsed.X.shape == (0, 3)
    assert parsed.reasons == ["expected 3 values, got 1", "not a number for feature 'a': 'x'"]


def test_a_rejected_row_is_fitted_to_the_header_for_the_output() -> None:
    assert fit_to_header(["1", "2", "3", "4"], 3) == ["1", "2", "3"]
    assert fit_to_header(["1"], 3) == ["1", "", ""]


@pytest.mark.parametrize(("raw", "reason"), [
    (None, "missing value for feature 'f'"), ("", "missing value for feature 'f'"),
    ("abc", "not a number for feature 'f': 'abc'"), (True, "not a number for feature 'f': 'True'"),
    ([1], "not a number for feature 'f': '[1]'"), (math.nan, "NaN or infinity for feature 'f'"),
    ("inf", "NaN or infinity for feature 'f'"),
    ("5.1", "not a number for feature 'f': '5.1'"),  # a JSON string is not a number
])
def test_value_reasons_are_one_wording(raw: Any, reason: str) -> None:
    assert value_reason(raw, "f") == reason


def test_width_reason() -> None:
    assert width_reason(4, 5) == "expected 4 values, got 5"
