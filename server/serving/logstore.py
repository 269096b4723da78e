"""The prediction log's database: SQLite (the standard library's) or PostgreSQL (psycopg 3),
one schema, migrations recorded in a ``schema_version`` table.

Every call blocks: under gevent, callers run it in the hub's threadpool
(``server.runtime.offload``), so a slow or dead database never stalls the event loop. The
writer keeps one connection; reads open their own, so no connection is shared by threads.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

COLUMNS = ("ts", "request_id", "row_index", "model", "version", "door", "experiment", "arm",
           "api_key", "features", "features_hash", "output", "predicted", "value", "model_ms",
           "cache_hit")

# Each migration: (version, statements). {id}, {real} and {text} are filled per dialect.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE predictions (
            id {id},
            ts {real} NOT NULL,
            request_id {text} NOT NULL,
            row_index INTEGER NOT NULL,
            model {text} NOT NULL,
            version {text} NOT NULL,
            door {text} NOT NULL,
            experiment {text},
            arm {text},
            api_key {text},
            features {text},
            features_hash {text},
            output {text} NOT NULL,
            predicted {text},
            value {real},
            model_ms {real},
            cache_hit INTEGER,
            true_label {text},
            true_value {real},
            feedback_ts {real}
        )""",
        "CREATE INDEX predictions_request ON predictions (request_id, row_index)",
        "CREATE INDEX predictions_model_ts ON predictions (model, version, ts)",
        "CREATE INDEX predictions_ts ON predictions (ts)",
    ]),
]
TYPES = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL", "text": "TEXT"},
    "postgresql": {"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
                   "real": "DOUBLE PRECISION", "text": "TEXT"},
}
# Any fixed number: PostgreSQL serialises concurrent migrations of several instances on it.
MIGRATION_LOCK = 0x5052_4544


class LogUnavailable(Exception):
    """The database cannot be reached, is locked or busy, or refused the statement."""


class LogRefused(LogUnavailable):
    """The database is there and refused these rows (a value it cannot store): retrying the
    same rows would fail again."""


def _refused(exc: BaseException) -> bool:
    if isinstance(exc, (sqlite3.DataError, sqlite3.IntegrityError, OverflowError)):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - a dependency
        return False
    return isinstance(exc, (psycopg.DataError, psycopg.IntegrityError))


def _no_schema(exc: BaseException) -> bool:
    """The log's tables are not there yet: a read before any worker's writer migrated."""
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).startswith("no such table")
    try:
        import psycopg
    except ImportError:  # pragma: no cover - a dependency
        return False
    return isinstance(exc, psycopg.errors.UndefinedTable)


@dataclass(frozen=True)
class Query:
    model: str | None = None
    version: str | None = None
    since: float | None = None
    until: float | None = None
    request_id: str | None = None
    before: tuple[float, int] | None = None  # the cursor: rows after this (ts, id), newest first
    limit: int = 100


def describe(url: str) -> tuple[str, str]:
    """(dialect, where) of a PREDICTION_LOG url, the password left out of ``where``."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return "sqlite", _sqlite_path(url)
    if parts.scheme in ("postgresql", "postgres"):
        host = parts.hostname or "localhost"
        return "postgresql", f"{host}:{parts.port or 5432}{parts.path}"
    raise ValueError(f"PREDICTION_LOG must be sqlite:///path, postgresql://... or off, not "
                     f"{parts.scheme or url!r}")


FEATURES, OUTPUT = COLUMNS.index("features"), COLUMNS.index("output")


def _as_text(row: Sequence[Any]) -> list[Any]:
    """A row with its features and output as JSON text."""
    out = list(row)
    for i in (FEATURES, OUTPUT):
        if out[i] is not None and not isinstance(out[i], str):
            out[i] = orjson.dumps(out[i]).decode()
    return out


# Rows per INSERT on SQLite: as many as its bound-variable limit allows (2,047 rows of 16).
# The sqlite3 module keeps each distinct statement it prepared (128 of them): one per batch
# size held ~240 MB per worker. Statements of VALUES_ROWS rows and, for the rest, of powers
# of two below it keep at most twelve (~4 MB). Fewer, bigger statements matter under load:
# the writer thread waits for the GIL (up to the 5 ms switch interval while the event loop
# is busy) before and after each one; with 256-row statements a saturated worker's log
# wrote a quarter fewer rows.
VALUES_ROWS = 2047


def statement_rows(left: int, most: int = VALUES_ROWS) -> int:
    """How many of ``left`` rows the next INSERT takes: ``most``, else the largest power of
    two not above ``left``."""
    return most if left >= most else 1 << (max(left, 1).bit_length() - 1)


@functools.lru_cache(maxsize=16)
def _values_sql(rows: int) -> str:
    """SQLite's ``INSERT`` of ``rows`` rows of bound values (one text per batch size)."""
    row = "(" + ",".join("?" * len(COLUMNS)) + ")"
    return f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES " + ",".join([row] * rows)


def _sqlite_path(url: str) -> str:
    # sqlite:///relative/path and sqlite:////absolute/path, as SQLAlchemy reads them.
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite://"):]


class LogStore:
    """One connection to the log's database (opened on first use, reopened after a failure)."""

    def __init__(self, url: str, timeout: float = 2.0, reader: bool = False,
                 read_seconds: float = 10.0) -> None:
        """``reader``: a connection for one read (GET /predictions, quality, export). It
        never migrates (the workers' writers do, at start), so a read takes no write lock;
        on SQLite a read is cut at ``read_seconds`` (PostgreSQL: statement_timeout)."""
        self.url = url
        self.dialect, self.where = describe(url)
        self.timeout = timeout
        self.read_seconds = read_seconds
        self._conn: Any = None
        self._migrated = reader
        self._reader = reader
        self._created = False
        self._deadline = 0.0

    # -- connection --------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            path = Path(_sqlite_path(self.url))
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            if self._reader:
                # Called every 10,000 steps: a statement past its deadline is interrupted.
                conn.set_progress_handler(lambda: time.monotonic() > self._deadline, 10_000)
            try:
                conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writers
                conn.execute("PRAGMA synchronous=NORMAL")  # consistent; fsync per checkpoint
                conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            except BaseException:
                conn.close()
                raise
            return conn
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.timeout)),
                               options=f"-c statement_timeout={int(self.timeout * 5000)}")

    def connection(self) -> Any:
        if self._conn is None:
            try:
                self._conn = self._connect()
            except Exception as exc:
                raise LogUnavailable(_reason(exc)) from exc
        return self._conn

    def close(self) -> None:
        if not self._reader:
            self._migrated = False  # the database may be a new one when we reconnect
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken connection
                pass

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    def _run(self, fn: Any, write: bool = True) -> Any:
        """``fn(conn)`` in one transaction; any database error closes the connection (the next
        call reconnects) and becomes LogUnavailable. SQLite: a write transaction takes the
        write lock at once (no deadlock upgrading it later); a read never takes it."""
        conn = self.connection()
        self._deadline = time.monotonic() + self.read_seconds
        try:
            if self.dialect == "sqlite":
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    out = fn(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return out
            with conn.transaction():
                return fn(conn)
        except LogUnavailable:
            raise
        except Exception as exc:
            if self._reader and not self._created and _no_schema(exc):
                # A fresh database read before any writer's first flush: create the schema
                # (once, serialised as the writers' migration is) and read the empty log.
                self._created, self._migrated = True, False
                self.migrate()
                return self._run(fn, write)
            self.close()
            raise (LogRefused if _refused(exc) else LogUnavailable)(_reason(exc)) from exc

    # -- schema ------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply the migrations this database lacks, in one transaction, serialised between
        workers and instances (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock)."""
        if self._migrated:
            return MIGRATIONS[-1][0]

        def apply(conn: Any) -> int:
            if self.dialect == "postgresql":
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = row[0] or 0
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    conn.execute(statement.format(**TYPES[self.dialect]))
                conn.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"),
                             (version,))
                current = version
            return int(current)

        version = int(self._run(apply))
        self._migrated = True
        return version

    # -- writes ------------------------------------------------------------------------------
    def insert(self, rows: Iterable[Sequence[Any]]) -> None:
        """Rows in COLUMNS order (``features`` and ``output`` as JSON text or as the list and
        object themselves), in one transaction and as few statements as the database takes:
        SQLite gets multi-row ``INSERT ... VALUES`` of up to its bound-parameter limit (about
        2,000 rows each), PostgreSQL one JSON array that ``json_array_elements`` unpacks.
        Few statements mean few waits on the database, so the native thread writing gives
        the GIL back to the event loop once per statement, not once per row (``executemany``
        released and re-took it per row, which cost a busy worker about a fifth of its
        requests). On SQLite, bound values cost a third less than unpacking JSON
        (``json_extract`` parses each row's JSON once per column)."""
        self.migrate()
        rows = rows if isinstance(rows, list) else list(rows)
        if self.dialect == "postgresql":
            payload = orjson.dumps(rows).decode()
            self._run(lambda conn: conn.execute(self._insert_sql, (payload,)))
            return
        self._run(lambda conn: self._insert_values(conn, rows))

    def _insert_values(self, conn: Any, rows: list[Sequence[Any]]) -> None:
        most = min(VALUES_ROWS, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(COLUMNS))
        start = 0
        while start < len(rows):
            size = statement_rows(len(rows) - start, most)
            part = rows[start:start + size]
            start += size
            if not all(isinstance(r[FEATURES], str | None) and isinstance(r[OUTPUT], str)
                       for r in part):  # the writer sends JSON text; others may send objects
                part = [_as_text(r) for r in part]
            conn.execute(_values_sql(size), list(itertools.chain.from_iterable(part)))

    @property
    def _insert_sql(self) -> str:
        """PostgreSQL's insert of one JSON array of rows."""
        casts = {"ts": "float8", "row_index": "int", "value": "float8",
                 "model_ms": "float8", "cache_hit": "int"}
        picks = ", ".join(f"(r->>{i})::{casts[c]}" if c in casts else f"r->>{i}"
                          for i, c in enumerate(COLUMNS))
        return (f"INSERT INTO predictions ({', '.join(COLUMNS)}) SELECT {picks} "
                "FROM json_array_elements(%s::json) AS r")

    def purge(self, before: float, batch: int = 10_000) -> int:
        """Delete rows older than ``before`` in batches of ``batch`` (each its own short
        transaction, so the writers are never held up for long)."""
        self.migrate()
        removed = 0
        sql = self._sql("DELETE FROM predictions WHERE id IN "
                        "(SELECT id FROM predictions WHERE ts < ? LIMIT ?)")
        while True:
            count = self._run(lambda conn: conn.execute(sql, (before, batch)).rowcount)
            removed += max(count, 0)
            if count < batch:
                return removed

    def feedback(self, items: Sequence[tuple[str, int, str | None, float | None]],
                 api_key: str | None = None) -> list[int]:
        """Attach true labels or values: (request_id, row, label, value) per item; the number
        of logged rows each one matched. With ``api_key`` (a key's hash) only the rows that
        key was answered: one client cannot label another's predictions."""
        self.migrate()
        scope = "" if api_key is None else " AND api_key = ?"
        sql = self._sql("UPDATE predictions SET true_label = ?, true_value = ?, feedback_ts = ? "
                        "WHERE request_id = ? AND row_index = ?" + scope)
        now = time.time()
        extra = () if api_key is None else (api_key,)

        def write(conn: Any) -> list[int]:
            return [conn.execute(sql, (label, value, now, rid, row, *extra)).rowcount
                    for rid, row, label, value in items]

        return list(self._run(write))

    # -- reads -------------------------------------------------------------------------------
    def query(self, q: Query) -> list[dict[str, Any]]:
        self.migrate()
        where, args = _filters(q)
        if q.before is not None:
            where.append("(ts < ? OR (ts = ? AND id < ?))")
            args += [q.before[0], q.before[0], q.before[1]]
        sql = self._sql(
            "SELECT id, " + ", ".join(COLUMNS) + ", true_label, true_value, feedback_ts "
            "FROM predictions" + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY ts DESC, id DESC LIMIT ?")
        names = ("id", *COLUMNS, "true_label", "true_value", "feedback_ts")
        rows = self._run(lambda conn: conn.execute(sql, (*args, q.limit)).fetchall(), False)
        return [dict(zip(names, r)) for r in rows]

    def confusion(self, model: str, version: str, since: float | None
                  ) -> list[tuple[str, str, int]]:
        """(predicted, true label, count) over the labelled rows of one version."""
        self.migrate()
        where, args = _filters(Query(model=model, version=version, since=since))
        sql = self._sql("SELECT predicted, true_label, COUNT(*) FROM predictions WHERE "
                        + " AND ".join([*where, "true_label IS NOT NULL"])
                        + " GROUP BY predicted, true_label")
        return [(str(p), str(t), int(n))
                for p, t, n in self._run(lambda conn: conn.execute(sql, args).fetchall(), False)]

    def errors(self, model: str, version: str, since: float | None) -> tuple[int, float, float]:
        """(count, mean absolute error, mean squared error) over the labelled regressor rows."""
        self.migrate()
        where, args = _filters(Query(model=model, version=version, since=since))
        sql = self._sql(
            "SELECT COUNT(*), AVG(ABS(value - true_value)), "
            "AVG((value - true_value) * (value - true_value)) FROM predictions WHERE "
            + " AND ".join([*where, "true_value IS NOT NULL", "value IS NOT NULL"]))
        n, mae, mse = self._run(lambda conn: conn.execute(sql, args).fetchone(), False)
        return int(n or 0), float(mae or 0.0), float(mse or 0.0)

    def labelled(self, model: str, version: str | None = None, since: float | None = None,
                 batch: int = 10_000) -> Iterator[tuple[str, str | None, float | None]]:
        """(features JSON, true label, true value) of every labelled row with its features
        logged, oldest first, in pages of ``batch``."""
        self.migrate()
        where, args = _filters(Query(model=model, version=version, since=since))
        where += ["features IS NOT NULL", "(true_label IS NOT NULL OR true_value IS NOT NULL)",
                  "id > ?"]
        sql = self._sql("SELECT id, features, true_label, true_value FROM predictions WHERE "
                        + " AND ".join(where) + " ORDER BY id LIMIT ?")
        last = 0
        while True:
            page = (*args, last, batch)
            rows = self._run(lambda conn, page=page: conn.execute(sql, page).fetchall(), False)
            for _id, features, label, value in rows:
                yield features, label, value
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def ping(self) -> None:
        self._run(lambda conn: conn.execute("SELECT 1").fetchone(), False)


def _filters(q: Query) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("model", q.model), ("version", q.version),
                          ("request_id", q.request_id)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if q.since is not None:
        where.append("ts >= ?")
        args.append(q.since)
    if q.until is not None:
        where.append("ts < ?")
        args.append(q.until)
    return where, args


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]

