"""CSV in, CSV out: rows read from a (spooled) body in chunks, predicted, written back with
prediction columns appended. Constant memory whatever the file size."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import IO, Any

import numpy as np

from server.errors import ApiError
from server.model.loaded import LoadedVersion
from server.model.predict import parse_number, value_reason, width_reason

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


@dataclass
class ParsedRows:
    """A chunk of CSV rows as the model's matrix: ``X`` holds the good rows (``good`` their
    indexes in the chunk); ``reasons[i]`` says why row ``i`` was rejected ("" when it was not)."""

    X: np.ndarray
    good: list[int]
    reasons: list[str]


def parse_rows(rows: list[list[str]], positions: list[int], width: int,
               names: list[str]) -> ParsedRows:
    """Every CSV front door's one reading of rows (``/predict/csv``, and ``python -m
    server.score`` in one process or on Dask): a row whose field count is not the header's
    ``width`` is rejected, never truncated or padded; a value that is missing, not a number
    (``NUMBER_RE``), NaN or infinite rejects its row with the reason naming the feature.
    Numbers are parsed in one numpy pass."""
    reasons = [""] * len(rows)
    if set(map(len, rows)) <= {width}:  # the usual chunk: every row has the header's width
        good = list(range(len(rows)))
        kept: Sequence[Sequence[str]] = rows
    else:
        good = [i for i, row in enumerate(rows) if len(row) == width]
        for i, row in enumerate(rows):
            if len(row) != width:
                reasons[i] = width_reason(width, len(row))
        kept = [rows[i] for i in good]
    # The feature columns of the kept rows (all of each row when the CSV holds only those).
    cells: Sequence[Sequence[str]] = kept
    if positions != list(range(width)):
        pick = itemgetter(*positions)
        cells = [pick(r) for r in kept] if len(positions) > 1 else [[r[positions[0]]]
                                                                    for r in kept]
    try:
        # numpy parses as float() does, which also takes "1_000" and other scripts' digits:
        # a chunk holding either goes the strict way below.
        text = "".join(chain.from_iterable(cells))
        if "_" in text or not text.isascii():
            raise ValueError(text)
        X = np.array(cells, dtype="<f8").reshape(len(cells), len(positions))
    except ValueError:  # some value is not a number: find which, row by row
        X = np.empty((len(cells), len(positions)), dtype="<f8")
        for j, values in enumerate(cells):
            for k, raw in enumerate(values):
                number = parse_number(raw)
                X[j, k] = math.nan if number is None else number
                if number is None:
                    reasons[good[j]] = reasons[good[j]] or value_reason(raw, names[k])
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        for j in np.flatnonzero(~finite).tolist():
            at = int(np.flatnonzero(~np.isfinite(X[j]))[0])
            reasons[good[j]] = reasons[good[j]] or value_reason(cells[j][at], names[at])
    keep = [j for j, i in enumerate(good) if not reasons[i]]
    if len(keep) != len(good):
        X, good = X[keep], [good[j] for j in keep]
    return ParsedRows(X, good, reasons)


def fit_to_header(row: list[str], width: int) -> list[str]:
    """A rejected row's fields as the output's input columns: its place and its reason are
    kept, and the output stays aligned (the input file has the row as sent)."""
    return row[:width] + [""] * (width - len(row))


def feature_names(lv: LoadedVersion, header: list[str], positions: list[int]) -> list[str]:
    return list(lv.feature_names or (header[p].strip() for p in positions))


def score_csv(
    lv: LoadedVersion,
    body: IO[bytes],
    predict: Callable[[np.ndarray, list[int]], list[dict[str, Any]]],
    positions: list[int],
    header: list[str],
    reader: Iterator[list[str]],
) -> Iterator[tuple[str, int, int, int]]:
    """Yield (csv text of a chunk, rows so far, bad rows so far, bytes read so far).
    ``predict`` gets the good rows' matrix and their numbers among the data rows (0-based:
    a rejected row keeps its number, so the numbers are the file's)."""
    columns = output_columns(lv)
    keys = [c for c in columns if c != "error"]
    width = len(header)
    names = feature_names(lv, header, positions)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*header, *columns])
    rows = bad = 0
    rows_of = filter(None, reader)  # a blank line is no row
    while True:
        chunk = [r for _, r in zip(range(CHUNK_ROWS), rows_of)]
        if not chunk:
            break
        parsed = parse_rows(chunk, positions, width, names)
        results = iter(predict(parsed.X, [rows + i for i in parsed.good])
                       if parsed.good else [])
        for raw, reason in zip(chunk, parsed.reasons):
            if reason:
                bad += 1
                writer.writerow([*fit_to_header(raw, width), *([""] * len(keys)), reason])
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
