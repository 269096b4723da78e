"""``python -m server.export MODEL [--version V] [--since T] [--out FILE] [--log URL]``: the
labelled rows of the prediction log as a training table, to train a model elsewhere.

A labelled row is a logged prediction that got its truth through ``POST /feedback`` and whose
features were logged (``PREDICTION_LOG_INPUTS=on``). The table has the model's feature names
and ``target``, as ``MODEL_DIR/<model>/data/train.csv`` has: a classifier's labels are mapped
back to the class values of the model's latest version (``setosa`` -> ``0``), a regressor's
target is the true value. Rows that do not fit (a label that is not a class, features of
another length) are skipped and counted. ``POST /train/stream {"source": "feedback"}`` trains
on exactly this table: the server writes it with ``feedback_csv``, the CLI with ``main``.

Output: CSV (``--out FILE.csv``, or standard output without ``--out``) or Parquet
(``--out FILE.parquet``, needs pyarrow from requirements-score.txt), written aside and renamed
into place, so a failed run leaves no half file. An empty log gives a file with the header
only. Exit codes: 0 written, 1 the log's database could not be read, 2 unusable arguments
(unknown model or version, bad time, unknown format, no log).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import ValidationError

from server.config import Settings
from server.errors import ApiError, echo, not_found
from server.jobs.training import TARGET
from server.model.loaded import LoadedVersion
from server.model.registry import ModelEntry, ModelRegistry
from server.model.repository import VERSION_RE, ModelOnDisk, ModelRepository
from server.schemas import parse_time
from server.serving.logstore import LogStore, LogUnavailable, describe

MIN_ROWS = 4  # server.jobs.training.read_csv refuses fewer
PARQUET_BATCH = 10_000  # rows per Parquet row group: bounded memory whatever the log holds
EXIT_DATABASE = 1
EXIT_UNUSABLE = 2

# Why a labelled row was left out, as the first training event and the CLI's summary say it.
SKIPPED = {
    "not_a_class": "a label that is not a class of the model",
    "no_label": "a true value but no label (the model is a classifier)",
    "no_value": "a label but no true value (the model is a regressor)",
    "bad_features": "features that do not fit the model (another feature count)",
}


@dataclass(frozen=True)
class Layout:
    """How labelled rows of one model become training rows: its feature columns and, for a
    classifier, the class value that each label names."""

    model: str
    features: tuple[str, ...]
    targets: dict[str, int | float] | None  # None: a regressor (the target is the value)

    @property
    def columns(self) -> list[str]:
        return [*self.features, TARGET]


def layout(lv: LoadedVersion) -> Layout:
    """The layout of ``lv`` (the latest version: the one training builds on)."""
    features = lv.feature_names or tuple(f"f{i}" for i in range(lv.n_features or 0))
    if not features:
        raise ApiError(422, "feedback_unusable", f"model '{lv.name}' version {lv.version} "
                       "does not say how many features it takes")
    if lv.task != "classification":
        return Layout(lv.name, features, None)
    classes = lv.classes or []
    # The trainer reads 'target' as numbers and needs integer class values.
    if not classes or not all(isinstance(c, (int, float)) and not isinstance(c, bool)
                              and float(c).is_integer() for c in classes):
        raise ApiError(422, "feedback_unusable", f"model '{lv.name}' has classes "
                       f"{echo(str(classes))}: training from feedback needs integer class "
                       "values (train it from a CSV instead)")
    names = lv.class_names or [str(c) for c in classes]
    return Layout(lv.name, features, dict(zip(names, classes)))


def latest_layout(entry: ModelEntry) -> Layout:
    latest = entry.latest
    if latest is None:
        raise ApiError(503, "version_unavailable", f"model '{entry.name}' has no version that "
                       "loads: its feature names and classes are unknown")
    return layout(entry.versions[latest])


def logged_version(entry: ModelEntry, version: str | None) -> str | None:
    """The version number whose rows to take: a number as is (its rows stay in the log after
    the version leaves the repository), a label or ``latest`` as the model names it now."""
    if version is None:
        return None
    wanted = entry.labels.get(version, version)
    if wanted == "latest":
        wanted = entry.latest or ""
    if not VERSION_RE.match(wanted):
        raise not_found("version", f"model '{entry.name}' has no version or label "
                        f"'{echo(version)}'")
    return wanted


@dataclass
class Tally:
    """What became of the labelled rows read."""

    rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    unknown_labels: list[str] = field(default_factory=list)  # a few, to show
    classes: Counter[Any] = field(default_factory=Counter)  # rows per class value written

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def note(self, model: str) -> str | None:
        """The skipped rows in words (None when none was)."""
        if not self.skipped:
            return None
        parts = []
        for reason, count in self.skipped.most_common():
            part = f"{count} with {SKIPPED[reason]}"
            if reason == "not_a_class":
                part += " (" + ", ".join(f"'{echo(x, 40)}'" for x in self.unknown_labels) + ")"
            parts.append(part)
        total = sum(self.skipped.values())
        return f"{total} labelled row(s) of '{model}' skipped: " + "; ".join(parts)


def training_rows(labelled: Iterable[tuple[str, str | None, float | None]], lay: Layout,
                  tally: Tally) -> Iterator[list[Any]]:
    """``LogStore.labelled`` rows as ``[*features, target]``, one at a time."""
    width = len(lay.features)
    for features, label, value in labelled:
        try:
            x = orjson.loads(features)
        except orjson.JSONDecodeError:
            x = None
        if not (isinstance(x, list) and len(x) == width and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in x)):
            tally.skip("bad_features")
            continue
        y: Any
        if lay.targets is not None:
            if label is None:
                tally.skip("no_label")
                continue
            y = lay.targets.get(label)
            if y is None:
                tally.skip("not_a_class")
                if label not in tally.unknown_labels and len(tally.unknown_labels) < 5:
                    tally.unknown_labels.append(label)
                continue
            tally.classes[y] += 1
        else:
            if value is None or not math.isfinite(value):
                tally.skip("no_value")
                continue
            y = float(value)
        tally.rows += 1
        yield [*x, y]


def write_csv(rows: Iterable[list[Any]], lay: Layout, out: IO[str]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(lay.columns)
    writer.writerows(rows)  # str(float) is the shortest text that reads back the same


def write_parquet(rows: Iterable[list[Any]], lay: Layout, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    classes = list((lay.targets or {}).values())
    target = pa.int64() if classes and all(isinstance(c, int) for c in classes) \
        else pa.float64()
    schema = pa.schema([*(pa.field(n, pa.float64()) for n in lay.features),
                        pa.field(TARGET, target)])

    def table(batch: list[list[Any]]) -> Any:
        columns: list[Any] = list(zip(*batch)) if batch else [[] for _ in schema]
        return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, schema)],
                                    schema=schema)

    with pq.ParquetWriter(path, schema) as writer:
        batch: list[list[Any]] = []
        wrote = False
        for row in rows:
            batch.append(row)
            if len(batch) == PARQUET_BATCH:
                writer.write_table(table(batch))
                batch, wrote = [], True
        if batch or not wrote:
            writer.write_table(table(batch))


def feedback_csv(store: LogStore, lay: Layout, version: str | None, since: float | None,
                 path: Path) -> Tally:
    """The labelled rows as a training CSV at ``path``, streamed (blocks: run it offloaded)."""
    tally = Tally()
    with path.open("w", newline="") as fh:
        write_csv(training_rows(store.labelled(lay.model, version, since), lay, tally), lay, fh)
    return tally


def require_trainable(tally: Tally, lay: Layout, inputs_logged: bool) -> None:
    """A 422 saying why when the rows cannot train a model."""
    note = tally.note(lay.model)
    if tally.rows == 0 and not inputs_logged:
        raise ApiError(422, "features_not_logged", "the prediction log stores a hash of each "
                       "row's features, not the features (PREDICTION_LOG_INPUTS=off): training "
                       "from feedback needs them; rows logged once it is on can be used")
    if tally.rows < MIN_ROWS:
        raise ApiError(422, "not_enough_feedback", f"model '{lay.model}' has {tally.rows} "
                       "usable labelled row(s) with their features logged: training needs at "
                       f"least {MIN_ROWS} (POST /feedback)" + (f"; {note}" if note else ""))
    if lay.targets is not None and len(tally.classes) < 2:
        named = {v: k for k, v in lay.targets.items()}
        only = ", ".join(f"'{named[c]}'" for c in tally.classes)
        raise ApiError(422, "not_enough_feedback", f"all {tally.rows} usable labelled rows of "
                       f"'{lay.model}' are of one class ({only}): training needs two")


# --- the command ----------------------------------------------------------------------------


class _OneModel(ModelRepository):
    """The repository seen through one model: loading it loads no other model."""

    def __init__(self, root: Path, name: str) -> None:
        super().__init__(root)
        self.name = name

    def scan(self) -> dict[str, ModelOnDisk]:
        return {k: v for k, v in super().scan().items() if k == self.name}


class Unusable(Exception):
    """Exit with this message and code."""

    def __init__(self, message: str, code: int = EXIT_UNUSABLE) -> None:
        super().__init__(message)
        self.code = code


def _since(raw: str) -> float:
    try:
        return parse_time(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the model whose labelled rows to export")
    parser.add_argument("--version", default=None,
                        help="only rows predicted by this version (a number or a label); "
                        "default: every version")
    parser.add_argument("--since", type=_since, default=None,
                        help="only rows predicted at or after this time (ISO 8601, no zone = "
                        "UTC, or Unix seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="FILE.csv or FILE.parquet; default: CSV on standard output")
    parser.add_argument("--log", default=None,
                        help="the log's URL (sqlite:///path, postgresql://...); default: "
                        "PREDICTION_LOG, as the server reads it")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the model repository (default: MODEL_DIR, as the server reads "
                        "it)")
    return parser.parse_args(argv)


def output_format(path: Path | None) -> str:
    if path is None:
        return "csv"
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    raise Unusable(f"{path}: unknown format (use .csv or .parquet)")


def open_log(url: str) -> LogStore:
    if url.strip().lower() in {"", "off", "0", "false", "no"}:
        raise Unusable("the prediction log is off (PREDICTION_LOG=off): name one with --log")
    try:
        dialect, where = describe(url)
    except ValueError as exc:
        raise Unusable(str(exc)) from None
    # Reading must not leave an empty database behind a mistyped path.
    if dialect == "sqlite" and not Path(where).is_file():
        raise Unusable(f"no prediction log at {where}")
    return LogStore(url, timeout=5.0)


def load_entry(model_dir: Path, model: str) -> ModelEntry:
    registry = ModelRegistry(_OneModel(model_dir, model))
    registry.reload()
    try:
        return registry.get(model)
    except ApiError as exc:
        raise Unusable(f"{exc.message} (model dir {model_dir})") from None


def export(args: argparse.Namespace) -> str:
    """Write the table; the summary line to print."""
    fmt = output_format(args.out)
    if fmt == "parquet":
        import_module("pyarrow.parquet")  # missing: the shim prints the pip line, nothing written
    model_dir, url = args.model_dir, args.log
    if model_dir is None or url is None:
        try:
            settings = Settings()
        except ValidationError as exc:
            raise Unusable(f"bad setting in the environment: {exc.errors()[0]['msg']} "
                           f"({'.'.join(map(str, exc.errors()[0]['loc']))})") from None
        model_dir = settings.model_path if model_dir is None else model_dir
        url = settings.prediction_log_url if url is None else url
    entry = load_entry(model_dir, args.model)
    try:
        lay = latest_layout(entry)
        version = logged_version(entry, args.version)
    except ApiError as exc:
        raise Unusable(exc.message) from None
    store = open_log(url)
    tally = Tally()
    out: Path | None = args.out
    partial = None if out is None else out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        rows = training_rows(store.labelled(lay.model, version, args.since), lay, tally)
        if partial is None:
            write_csv(rows, lay, sys.stdout)
            sys.stdout.flush()
        elif fmt == "parquet":
            write_parquet(rows, lay, partial)
        else:
            with partial.open("w", newline="") as fh:
                write_csv(rows, lay, fh)
        if partial is not None and out is not None:
            os.replace(partial, out)
    except LogUnavailable as exc:
        raise Unusable(f"the prediction log's database is unavailable: {exc}",
                       EXIT_DATABASE) from None
    except OSError as exc:
        raise Unusable(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        store.close()
        if partial is not None:
            partial.unlink(missing_ok=True)
    where = "standard output" if out is None else str(out)
    summary = f"{lay.model}: {tally.rows} labelled row(s) written to {where}"
    if tally.rows == 0 and not tally.skipped:
        summary += (" (the header only: no row has both feedback, POST /feedback, and its "
                    "features logged, PREDICTION_LOG_INPUTS=on)")
    note = tally.note(lay.model)
    return summary + (f"; {note}" if note else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = export(args)
    except Unusable as exc:
        print(f"python -m server.export: {exc}", file=sys.stderr)
        return exc.code
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
