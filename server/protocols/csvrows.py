"""CSV in, CSV out: rows read from a (spooled) body in chunks, predicted, written back with
prediction columns appended. Constant memory whatever the file size."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np

from server.errors import ApiError
from server.model.loaded import LoadedVersion

CHUNK_ROWS = 1000


def output_columns(lv: LoadedVersion) -> list[str]:
    if lv.task == "classification" and lv.classes is not None:
        return ["prediction", "label"] + (["confidence"] if lv.has_proba else []) + ["error"]
    return ["prediction", "error"]


def feature_positions(lv: LoadedVersion, header: list[str]) -> list[int]:
    """Where each model feature sits in the CSV's columns (extra columns pass through)."""
    if lv.feature_names is None:
        if lv.n_features is not None and len(header) < lv.n_features:
            raise ApiError(422, "validation_error",
                           f"CSV has {len(header)} columns, model takes {lv.n_features}")
        return list(range(lv.n_features or len(header)))
    index = {name.strip(): i for i, name in enumerate(header)}
    missing = [n for n in lv.feature_names if n not in index]
    if missing:
        raise ApiError(422, "validation_error", f"CSV header lacks feature '{missing[0]}'",
                       [{"loc": ["header", n], "msg": "missing feature column"} for n in missing])
    return [index[n] for n in lv.feature_names]


def _parse(row: list[str], positions: list[int]) -> list[float] | str:
    try:
        values = [float(row[p]) for p in positions]
    except IndexError:
        return f"expected at least {max(positions) + 1} columns, got {len(row)}"
    except ValueError as exc:
        return f"not a number: {exc}".replace("could not convert string to float: ", "")
    if not all(math.isfinite(v) for v in values):
        return "NaN or infinity"
    return values


def score_csv(
    lv: LoadedVersion,
    body: IO[bytes],
    predict: Callable[[np.ndarray], list[dict[str, Any]]],
    positions: list[int],
    header: list[str],
    reader: Iterator[list[str]],
) -> Iterator[tuple[str, int, int, int]]:
    """Yield (csv text of a chunk, rows so far, bad rows so far, bytes read so far)."""
    columns = output_columns(lv)
    keys = [c for c in columns if c != "error"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*header, *columns])
    rows = bad = 0
    while True:
        chunk = [r for _, r in zip(range(CHUNK_ROWS), reader)]
        if not chunk:
            break
        parsed = [_parse(r, positions) for r in chunk]
        good = [p for p in parsed if not isinstance(p, str)]
        results = iter(predict(np.asarray(good, dtype="<f8")) if good else [])
        for raw, p in zip(chunk, parsed):
            if isinstance(p, str):
                bad += 1
                writer.writerow([*raw, *([""] * len(keys)), p])
            else:
                r = next(results)
                writer.writerow([*raw, *(r.get(k, "") for k in keys), ""])
        rows += len(chunk)
        yield out.getvalue(), rows, bad, body.tell()
        out.seek(0)
        out.truncate()
    if out.getvalue():
        yield out.getvalue(), rows, bad, body.tell()


def open_csv(body: IO[bytes]) -> tuple[list[str], Iterator[list[str]]]:
    text = io.TextIOWrapper(body, encoding="utf-8-sig", errors="replace", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        raise ApiError(422, "validation_error", "CSV body is empty: send a header row") from None
    return header, reader
