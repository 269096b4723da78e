"""``python -m server.score MODEL[:VERSION] INPUT OUTPUT``: offline batch scoring.

The model is loaded and answered exactly as the server does (``ModelRegistry.resolve`` and
``predict_matrix`` on float64 rows); the output is the input's columns plus
``protocols.csvrows.output_columns``. CSV or Parquet in and out, chosen by file extension.

Constant memory and resumable: the input is read in chunks of ``--chunk-rows``; chunk ``k``
is written to ``OUTPUT.parts/part-0000k.<ext>`` (its ``rejects-0000k.csv`` and ``.json``
manifest first, the data part last, each by atomic rename), so a killed run leaves only whole
chunks and a re-run skips them. The parts are then streamed into OUTPUT and their rejects into
``OUTPUT.rejects.csv`` (``row`` counts data rows from 1, header excluded). Parts are kept
so deleting OUTPUT and re-running only concatenates; ``--clean`` removes them at the end.

Bad rows (a field count other than the header's, not a number, NaN/infinity, a missing
value) never abort the run: they keep their place in OUTPUT with the reason in ``error``
and are listed in the rejects file, in the same words as ``POST /predict/csv`` uses. Exit
code 2 when the input (or the model) cannot be used at all, else 0.

``--dask local|tcp://HOST:PORT`` scores the same chunks with ``dask.dataframe``
``map_partitions`` on a cluster (``local``: a LocalCluster of 2 worker processes); the
loaded model is scattered once to every worker, and each worker writes the parts it scores
(so with a remote scheduler, OUTPUT and INPUT must be on storage the workers share). Each
worker reads its partition's CSV lines as a single process does, so both runs give the
same bytes (a quoted field holding a line break is not supported with --dask).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from pandas.io.common import get_handle

from server.config import Settings
from server.errors import ApiError
from server.jobs import missing_extras
from server.jobs.parts import Job, Parts, prediction_type
from server.model.loaded import LoadedVersion
from server.model.predict import predict_matrix, value_reason
from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository
from server.protocols.csvrows import (
    ParsedRows,
    feature_names,
    feature_positions,
    fit_to_header,
    output_columns,
    parse_rows,
)

log = logging.getLogger("server.score")

EXIT_UNREADABLE = 2


class Unusable(Exception):
    """The input or the model cannot be used at all: exit 2 with this message."""


def file_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zst", ".csv.xz")):
        return "csv"
    raise Unusable(f"{path}: unknown format (use .csv or .parquet)")


# --- Scoring one chunk (also what each Dask partition runs) ---------------------------------
def score_frame(lv: LoadedVersion, frame: pd.DataFrame, positions: list[int],
                parsed: ParsedRows | None = None) -> pd.DataFrame:
    """``frame`` with the output columns appended; a row that cannot be scored keeps empty
    predictions and its reason in ``error``. One model call for all good rows. ``parsed``
    holds CSV rows as ``csvrows.parse_rows`` read them (the frame then holds their fields as
    text); without it (Parquet), the frame's feature columns are read here."""
    n = len(frame)
    if parsed is None:
        parsed = frame_numbers(lv, frame, positions)
    reasons = np.array(parsed.reasons, dtype=object)
    good = np.asarray(parsed.good, dtype=np.intp)
    keys = [c for c in output_columns(lv) if c != "error"]
    results = _predict(lv, parsed.X, reasons, good) if len(good) else []
    scored = frame.copy()
    for k in keys:
        answers = [None if r is None else r.get(k) for r in results]
        if len(good) == n:
            scored[k] = pd.Series(answers, index=frame.index, dtype=object)
        else:
            column = np.full(n, None, dtype=object)
            for i, a in zip(good, answers):
                column[i] = a
            scored[k] = column
    scored["error"] = reasons
    return scored


def frame_numbers(lv: LoadedVersion, frame: pd.DataFrame, positions: list[int]) -> ParsedRows:
    """A typed frame's (Parquet's) feature columns as the model's matrix, bad rows named."""
    n = len(frame)
    X = np.empty((n, len(positions)), dtype="<f8")
    reasons = np.full(n, "", dtype=object)
    names = lv.feature_names or tuple(str(frame.columns[p]) for p in positions)
    for j, pos in enumerate(positions):
        column = frame.iloc[:, pos]
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype="<f8", na_value=np.nan)
        X[:, j] = values
        bad = ~np.isfinite(values)
        if bad.any():  # rare: a Python loop over the bad rows only
            for i in np.flatnonzero(bad & (reasons == "")):
                reasons[i] = value_reason(_raw(column.iat[i]), names[j])
    good = np.flatnonzero(reasons == "")
    return ParsedRows(X[good], good.tolist(), reasons.tolist())


def score_partition_to_part(frame: pd.DataFrame, lv: LoadedVersion, positions: list[int],
                            parts: Parts, columns: list[str] | None = None,
                            partition_info: dict[str, Any] | None = None) -> pd.DataFrame:
    """What a Dask worker runs: score partition k and write it as part k. With ``columns``
    (CSV input), the partition holds raw lines, read here as a single process reads them."""
    assert partition_info is not None  # dask passes it because the signature names it
    k = int(partition_info["number"])
    parsed = None
    if columns is not None:
        lines = io.StringIO("\n".join(frame["line"].tolist()))
        frame, parsed = rows_frame(list(csv.reader(lines)), columns, positions, lv)
    bad = parts.write(k, score_frame(lv, frame, positions, parsed))
    return pd.DataFrame({"rows": [len(frame)], "bad": [bad]})


def _predict(lv: LoadedVersion, X: np.ndarray, reasons: np.ndarray,
             where: np.ndarray) -> list[dict[str, Any] | None]:
    try:
        return list(predict_matrix(lv, X))
    except (ValueError, TypeError):
        pass
    # The model refused the chunk (e.g. an overflowing output): find the rows row by row.
    results: list[dict[str, Any] | None] = []
    for i, row in zip(where, X):
        try:
            results.append(predict_matrix(lv, row[None, :])[0])
        except (ValueError, TypeError) as exc:
            reasons[i] = f"model rejected the input: {exc}"[:300]
            results.append(None)
    return results


def _raw(value: Any) -> Any:
    """A Parquet null (None, NaN or pandas.NA) is a missing value; anything else as read."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


# --- Reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    path: Path
    fmt: str
    columns: list[str]
    total_rows: int | None  # known for Parquet
    size: int


def open_source(path: Path) -> Source:
    fmt = file_format(path)
    try:
        size = path.stat().st_size
        if fmt == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            names = list(meta.schema.to_arrow_schema().names)
            return Source(path, fmt, names, meta.num_rows, size)
        with get_handle(path, "r", compression="infer", encoding="utf-8-sig",
                        errors="replace") as handle:
            header = next(filter(None, csv.reader(handle.handle)), None)
        if header is None:
            raise ValueError("the file is empty: it needs a header row")
    except (OSError, ValueError, ImportError, csv.Error) as exc:  # pandas/pyarrow errors too
        raise Unusable(f"cannot read {path}: {exc}") from exc
    return Source(path, fmt, [str(c) for c in header], None, size)


def csv_lines(source: Source, chunk_rows: int) -> Any:
    """A CSV input as a Dask frame of raw lines (one ``line`` column, the header skipped),
    each partition read by ``rows_frame`` on its worker: field counts and numbers are checked
    there as in a single process, undecodable bytes replaced alike. Dask cuts partitions at
    newlines, as its own CSV reader does: a quoted field holding a line break is not
    supported with --dask."""
    import dask.dataframe as dd

    return dd.read_csv(source.path, blocksize=_blocksize(source.path, chunk_rows), sep="\x1f",
                       header=0, names=["line"], quoting=csv.QUOTE_NONE, dtype=str,
                       keep_default_na=False, na_filter=False, skip_blank_lines=False,
                       encoding="utf-8-sig", encoding_errors="replace")


def rows_frame(rows: list[list[str]], columns: list[str], positions: list[int],
               lv: LoadedVersion) -> tuple[pd.DataFrame, ParsedRows]:
    """CSV rows as ``/predict/csv`` reads them (``csvrows.parse_rows``), and the frame of
    their fields as text for the output: a rejected row keeps its place, fitted to the
    header so that the output stays aligned."""
    rows = [r for r in rows if r]  # a blank line is no row
    width = len(columns)
    parsed = parse_rows(rows, positions, width, feature_names(lv, columns, positions))
    fitted = [r if len(r) == width else fit_to_header(r, width) for r in rows]
    return pd.DataFrame(fitted, columns=columns, dtype=str), parsed


Chunk = tuple[pd.DataFrame, ParsedRows | None, float]


def read_chunks(source: Source, chunk_rows: int, positions: list[int],
                lv: LoadedVersion) -> Iterator[Chunk]:
    """(chunk, its rows as read (CSV) or None (Parquet), fraction of the input read so far).
    CSV rows are read as ``/predict/csv`` reads them (``rows_frame``)."""
    if source.fmt == "parquet":
        import pyarrow.parquet as pq

        done = 0
        for batch in pq.ParquetFile(source.path).iter_batches(batch_size=chunk_rows):
            done += batch.num_rows
            yield batch.to_pandas(), None, done / max(source.total_rows or 1, 1)
        return
    # pandas opens the file, decompressing by extension, with newline="" as csv wants
    with get_handle(source.path, "r", compression="infer", encoding="utf-8-sig",
                    errors="replace") as handle:
        raw = handle.handle
        reader = filter(None, csv.reader(raw))  # a blank line is no row
        next(reader, None)  # the header, read by open_source
        compressed = not source.path.name.lower().endswith(".csv")
        while chunk := [row for _, row in zip(range(chunk_rows), reader)]:
            frame, parsed = rows_frame(chunk, source.columns, positions, lv)
            read = 0 if compressed else _bytes_read(raw)
            yield frame, parsed, min(read / max(source.size, 1), 1.0)


def _bytes_read(text: Any) -> int:
    """How far into an uncompressed file the reader is (its read-ahead included)."""
    try:
        return int(text.buffer.tell())
    except (AttributeError, OSError, ValueError):
        return 0


# --- Progress --------------------------------------------------------------------------------
class Progress:
    """tqdm (rows/s, ETA) on a terminal, else one plain log line per chunk."""

    def __init__(self, total: int | None, stream: IO[str] | None = None) -> None:
        stream = stream if stream is not None else sys.stderr
        self.stream, self.total, self.rows, self.started = stream, total, 0, time.monotonic()
        self.bar: Any = None
        self.mode = "log"
        if stream.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="rows", unit_scale=True, file=stream,
                                dynamic_ncols=True)
                self.mode = "tqdm"
            except ImportError:
                self.mode = "line"  # a simple \r line

    def update(self, chunk: int, rows: int, bad: int, fraction: float, skipped: bool) -> None:
        self.rows += rows
        elapsed = max(time.monotonic() - self.started, 1e-9)
        total = self.total or (round(self.rows / fraction) if fraction > 0 else None)
        rate = self.rows / elapsed
        eta = (total - self.rows) / rate if total and rate else 0.0
        if self.mode == "tqdm":
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.update(rows)
        elif self.mode == "line":
            self.stream.write(f"\r{self.rows:,}/{total or '?'} rows  {rate:,.0f} rows/s  "
                              f"ETA {eta:,.0f} s ")
            self.stream.flush()
        else:
            what = "skipped (already written)" if skipped else f"scored, {bad} bad"
            self.stream.write(f"chunk {chunk}: {rows} rows {what}; {self.rows:,}/"
                              f"{total or '?'} rows, {rate:,.0f} rows/s, ETA {eta:,.0f} s\n")
            self.stream.flush()

    def close(self) -> None:
        if self.mode == "tqdm":
            self.bar.close()
        elif self.mode == "line":
            self.stream.write("\n")


# --- Runs ------------------------------------------------------------------------------------
def load_model(model_dir: Path, spec: str) -> LoadedVersion:
    name, _, version = spec.partition(":")
    registry = ModelRegistry(ModelRepository(model_dir))
    registry.reload()
    try:
        return registry.resolve(name, version or None)
    except ApiError as exc:
        raise Unusable(f"{exc.message} (model dir {model_dir})") from exc


def run_single(lv: LoadedVersion, source: Source, parts: Parts, positions: list[int],
               chunk_rows: int) -> int:
    progress = Progress(source.total_rows)
    k = -1
    try:
        for k, (chunk, parsed, fraction) in enumerate(read_chunks(source, chunk_rows,
                                                                       positions, lv)):
            if parts.done(k):
                progress.update(k, len(chunk), 0, fraction, skipped=True)
                continue
            bad = parts.write(k, score_frame(lv, chunk, positions, parsed))
            progress.update(k, len(chunk), bad, fraction, skipped=False)
    finally:
        progress.close()
    return k + 1


def run_dask(lv: LoadedVersion, source: Source, parts: Parts, positions: list[int],
             chunk_rows: int, address: str) -> int:
    import dask.dataframe as dd
    from dask.distributed import Client, LocalCluster, as_completed

    columns = None
    if source.fmt == "parquet":
        ddf = dd.read_parquet(source.path, split_row_groups=True)
    else:
        ddf, columns = csv_lines(source, chunk_rows), source.columns
    logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.WARNING) \
        if address == "local" else None
    client = Client(cluster if cluster is not None else address)
    progress = Progress(None)
    try:
        # The model travels once to each worker; every partition task refers to that copy.
        model = client.scatter(lv, broadcast=True, hash=False)
        meta = pd.DataFrame({"rows": pd.Series(dtype="int64"), "bad": pd.Series(dtype="int64")})
        # Each worker writes its partition's part itself (atomic rename, as single-process):
        # only two numbers come back, not the scored rows.
        pieces = ddf.map_partitions(score_partition_to_part, model, positions, parts, columns,
                                    meta=meta).to_delayed()
        todo = [k for k in range(len(pieces)) if not parts.done(k)]
        finished = 0
        for k in range(len(pieces)):
            if parts.done(k):
                finished += 1
                progress.update(k, parts.rows(k), 0, finished / len(pieces), skipped=True)
        window = 4 * max(len(client.scheduler_info()["workers"]), 1)
        pending = iter(todo)
        running = as_completed()
        chunk_of: dict[Any, int] = {}

        def submit(k: int) -> None:
            future = client.compute(pieces[k])
            chunk_of[future.key] = k
            running.add(future)

        for k in [k for _, k in zip(range(window), pending)]:
            submit(k)
        for future in running:
            k = chunk_of.pop(future.key)
            counts = future.result()
            finished += 1
            progress.update(k, int(counts["rows"].iloc[0]), int(counts["bad"].iloc[0]),
                            finished / len(pieces), skipped=False)
            future.release()
            nxt = next(pending, None)
            if nxt is not None:
                submit(nxt)
        return len(pieces)
    finally:
        progress.close()
        client.close()
        if cluster is not None:
            cluster.close()


def _blocksize(path: Path, chunk_rows: int) -> int:
    """Bytes per Dask partition so one holds about ``chunk_rows`` rows."""
    with path.open("rb") as fh:
        sample = fh.read(1 << 20)
    lines = max(sample.count(b"\n"), 1)
    return max(int(len(sample) / lines * chunk_rows), 1 << 10)


def score(model_dir: Path, spec: str, input_path: Path, output: Path, chunk_rows: int,
          dask: str | None = None, clean: bool = False) -> int:
    try:
        out_fmt = file_format(output)
        source = open_source(input_path)
        lv = load_model(model_dir, spec)
        try:
            positions = feature_positions(lv, source.columns)
        except ApiError as exc:
            raise Unusable(f"{input_path}: {exc.message}") from exc
    except Unusable as exc:
        print(f"score: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    st = input_path.stat()
    job = Job(str(input_path.resolve()), st.st_size, st.st_mtime_ns, lv.name, lv.version,
              lv.sha256, chunk_rows, "dask" if dask else "single", out_fmt)
    parts = Parts(output, out_fmt, job,
                  prediction_type(lv) if out_fmt == "parquet" else None)
    started = time.monotonic()
    try:
        if dask:
            count = run_dask(lv, source, parts, positions, chunk_rows, dask)
        else:
            count = run_single(lv, source, parts, positions, chunk_rows)
    except (OSError, ValueError, csv.Error) as exc:  # a file that breaks part way
        print(f"score: cannot read {input_path} past the chunks already written: {exc}",
              file=sys.stderr)
        return EXIT_UNREADABLE
    if count == 0:  # a header and no rows: still an OUTPUT with every column
        empty = pd.DataFrame({c: pd.Series(dtype=str) for c in source.columns})
        parts.write(0, score_frame(lv, empty, positions))
        count = 1
    rows, bad = parts.concatenate(count)
    if clean:
        shutil.rmtree(parts.dir)
    elapsed = time.monotonic() - started
    print(f"score: {rows:,} rows ({bad:,} rejected) with {lv.name} v{lv.version} in "
          f"{elapsed:.1f} s ({rows / max(elapsed, 1e-9):,.0f} rows/s) -> {output}",
          file=sys.stderr)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="MODEL or MODEL:VERSION (a number or a label)")
    parser.add_argument("input", type=Path, help=".csv or .parquet")
    parser.add_argument("output", type=Path, help=".csv or .parquet")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the model repository (default: MODEL_DIR, as the server reads it)")
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--dask", metavar="SCHEDULER", default=None,
                        help="'local' (LocalCluster, 2 worker processes) or tcp://HOST:PORT")
    parser.add_argument("--clean", action="store_true",
                        help="remove OUTPUT.parts after a complete run (no resume then)")
    args = parser.parse_args(argv)
    if args.chunk_rows < 1:
        parser.error("--chunk-rows must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.dask:
        try:
            import_module("distributed")
        except ModuleNotFoundError:
            print(missing_extras("dask.distributed"), file=sys.stderr)
            return EXIT_UNREADABLE
    model_dir = args.model_dir if args.model_dir is not None else Settings().model_path
    return score(model_dir, args.model, args.input, args.output, args.chunk_rows,
                 args.dask, args.clean)



if __name__ == "__main__":
    raise SystemExit(main())
