"""The prediction log's database, on SQLite files and on a real PostgreSQL (a fresh database
per test): schema, writes, reads, the cursor, and failures turned into LogUnavailable."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.serving.logstore import (
    COLUMNS,
    VALUES_ROWS,
    LogStore,
    LogUnavailable,
    Query,
    describe,
    statement_rows,
)
from tests.conftest import PostgresServer, free_port

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="module")
def postgres_database(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a database of this module's own, dropped after it."""
    import psycopg

    name = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres_server.url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def postgres_db(postgres_database: str) -> str:
    """That database as if new: the log's tables dropped (much cheaper than a database per
    test, which copies template1)."""
    import psycopg

    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS predictions, schema_version")
    return postgres_database


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'log.db'}"
    else:
        url = request.getfixturevalue("postgres_db")
    s = LogStore(url, timeout=2)
    yield s
    s.close()


def row(ts: float, request_id: str = "r", row_index: int = 0, **over: Any) -> tuple[Any, ...]:
    """One row in COLUMNS order: an iris prediction unless ``over`` says otherwise."""
    values: dict[str, Any] = {
        "ts": ts, "request_id": request_id, "row_index": row_index, "model": "iris",
        "version": "1", "door": "native", "experiment": None, "arm": None, "api_key": None,
        "features": "[5.1,3.5,1.4,0.2]", "features_hash": "ab" * 16,
        "output": '{"prediction":0,"label":"setosa"}', "predicted": "setosa", "value": None,
        "model_ms": 0.25, "cache_hit": 0,
    }
    assert set(over) <= set(values), set(over) - set(values)
    values.update(over)
    return tuple(values[c] for c in COLUMNS)


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{r['request_id']}/{r['row_index']}" for r in rows]


# -- schema --------------------------------------------------------------------------------
def test_migrate_records_each_version_once_across_stores(store: LogStore) -> None:
    assert store.migrate() == 1
    again = LogStore(store.url)
    try:
        assert again.migrate() == 1  # a second worker over the same database
        versions = again.connection().execute("SELECT version FROM schema_version").fetchall()
    finally:
        again.close()
    assert [v for (v,) in versions] == [1]


def test_a_reader_before_any_writer_sees_an_empty_log_not_an_error(store: LogStore) -> None:
    # A dashboard asks for quality as the workers boot, before any writer's first flush.
    reader = LogStore(store.url, reader=True)
    try:
        assert reader.query(Query()) == []
        assert reader.confusion("iris", "1", None) == []
        assert reader.feedback([("nobody", 0, "setosa", None)]) == [0]
    finally:
        reader.close()
    assert store.migrate() == 1  # the writer finds the schema in place


# -- writes and reads ----------------------------------------------------------------------
def test_insert_keeps_every_column_and_feedback_starts_empty(store: LogStore) -> None:
    written = row(1000.5, "req-1", 3, model="diabetes", version="7", door="ab",
                  experiment="exp", arm="b", api_key="k" * 16, features=None,
                  output='{"prediction":151.6}', predicted=None, value=151.6, cache_hit=None)
    store.insert([written])
    [got] = store.query(Query())
    assert {c: got[c] for c in COLUMNS} == dict(zip(COLUMNS, written))
    assert (got["true_label"], got["true_value"], got["feedback_ts"]) == (None, None, None)
    assert isinstance(got["id"], int)


def test_inserts_of_any_size_use_a_few_statement_sizes() -> None:
    """The sqlite3 module keeps every statement it prepared: one per batch size held ~240 MB
    per worker. Any count is cut into VALUES_ROWS rows and powers of two below it."""
    allowed = {VALUES_ROWS} | {1 << k for k in range(VALUES_ROWS.bit_length())
                               if 1 << k < VALUES_ROWS}
    assert len(allowed) <= 12
    for n in [*range(1, 600), 2047, 5000, 20_001]:
        sizes, left = [], n
        while left:
            sizes.append(statement_rows(left))
            left -= sizes[-1]
        assert set(sizes) <= allowed and sum(sizes) == n, n
    assert statement_rows(100, most=62) == 62 and statement_rows(40, most=62) == 32


def test_a_batch_of_an_odd_size_is_written_whole(store: LogStore) -> None:
    n = VALUES_ROWS * 2 + 37
    store.insert([row(1000.0 + i, "odd", i) for i in range(n)])
    counted = store.connection().execute(store._sql(
        "SELECT count(*), count(DISTINCT row_index), min(row_index), max(row_index) "
        "FROM predictions WHERE request_id = ?"), ("odd",)).fetchone()
    assert tuple(counted) == (n, n, 0, n - 1)


def test_query_pages_newest_first_with_the_ts_id_cursor(store: LogStore) -> None:
    # Ties in ts (rows of one request) are ordered by id, so no page skips or repeats one.
    store.insert([row(1.0, "a", 0), row(2.0, "b", 0), row(2.0, "b", 1), row(2.0, "b", 2),
                  row(3.0, "c", 0)])
    pages: list[list[str]] = []
    before: tuple[float, int] | None = None
    while True:
        page = store.query(Query(limit=2, before=before))
        if not page:
            break
        pages.append(ids(page))
        before = (page[-1]["ts"], page[-1]["id"])
    assert pages == [["c/0", "b/2"], ["b/1", "b/0"], ["a/0"]]


@pytest.mark.parametrize(("query", "expected"), [
    (Query(), ["c/0", "b/0", "a/1", "a/0"]),
    (Query(model="diabetes"), ["c/0"]),
    (Query(model="iris", version="2"), ["b/0"]),
    (Query(request_id="a"), ["a/1", "a/0"]),
    (Query(since=2.0), ["c/0", "b/0"]),  # since is inclusive
    (Query(until=2.0), ["a/1", "a/0"]),  # until is exclusive
    (Query(since=1.5, until=2.5, model="iris"), ["b/0"]),
])
def test_query_filters_rows(store: LogStore, query: Query, expected: list[str]) -> None:
    store.insert([row(1.0, "a", 0), row(1.0, "a", 1), row(2.0, "b", 0, version="2"),
                  row(3.0, "c", 0, model="diabetes")])
    assert ids(store.query(query)) == expected


def test_feedback_returns_matched_row_counts_and_attaches_truth(store: LogStore) -> None:
    store.insert([row(1.0, "a", 0), row(1.0, "a", 1), row(2.0, "dup", 0), row(2.0, "dup", 0)])
    started = time.time()
    matched = store.feedback([("a", 1, "virginica", None), ("dup", 0, None, 3.5),
                              ("a", 9, "setosa", None), ("nobody", 0, "setosa", None)])
    assert matched == [1, 2, 0, 0]
    truth = {f"{r['request_id']}/{r['row_index']}": (r["true_label"], r["true_value"])
             for r in store.query(Query())}
    assert truth == {"a/0": (None, None), "a/1": ("virginica", None), "dup/0": (None, 3.5)}
    stamped = [r["feedback_ts"] for r in store.query(Query()) if r["feedback_ts"] is not None]
    assert len(stamped) == 3 and all(started - 1 <= t <= time.time() + 1 for t in stamped)


def test_confusion_counts_labelled_rows_of_one_version_since(store: LogStore) -> None:
    store.insert([
        row(1.0, "old", predicted="setosa"),  # before `since`
        row(2.0, "a", 0, predicted="setosa"), row(2.0, "a", 1, predicted="setosa"),
        row(2.0, "a", 2, predicted="setosa"), row(2.0, "a", 3, predicted="virginica"),
        row(2.0, "unlabelled", predicted="setosa"),
        row(2.0, "v2", version="2", predicted="setosa"),
        row(2.0, "other", model="wine", predicted="setosa"),
    ])
    store.feedback([("old", 0, "setosa", None), ("a", 0, "setosa", None),
                    ("a", 1, "setosa", None), ("a", 2, "versicolor", None),
                    ("a", 3, "virginica", None), ("v2", 0, "setosa", None),
                    ("other", 0, "setosa", None)])
    assert sorted(store.confusion("iris", "1", since=1.5)) == [
        ("setosa", "setosa", 2), ("setosa", "versicolor", 1), ("virginica", "virginica", 1)]
    assert sorted(store.confusion("iris", "1", since=None))[0] == ("setosa", "setosa", 3)
    assert store.confusion("iris", "9", since=None) == []


def test_errors_average_over_labelled_regressor_rows(store: LogStore) -> None:
    store.insert([row(1.0, "a", 0, model="diabetes", predicted=None, value=100.0),
                  row(1.0, "a", 1, model="diabetes", predicted=None, value=150.0),
                  row(1.0, "a", 2, model="diabetes", predicted=None, value=200.0),
                  row(1.0, "unlabelled", model="diabetes", predicted=None, value=1e6)])
    store.feedback([("a", 0, None, 110.0), ("a", 1, None, 150.0), ("a", 2, None, 170.0)])
    # |errors| 10, 0, 30: MAE 40/3; squares 100, 0, 900: MSE 1000/3.
    n, mae, mse = store.errors("diabetes", "1", since=None)
    assert (n, mae, mse) == (3, pytest.approx(40 / 3), pytest.approx(1000 / 3))
    assert store.errors("diabetes", "1", since=2.0) == (0, 0.0, 0.0)


@pytest.mark.parametrize("batch", [1, 2, 100])  # a page per row, an empty last page, one page
def test_labelled_yields_every_labelled_row_with_features_oldest_first(
        store: LogStore, batch: int) -> None:
    store.insert([row(float(i), f"r{i}", features=f"[{i}]") for i in range(5)]
                 + [row(9.0, "hidden", features=None), row(9.0, "unlabelled", features="[9]"),
                    row(9.0, "v2", version="2", features="[8]")])
    store.feedback([("r0", 0, "setosa", None), ("r1", 0, None, 1.5), ("r3", 0, "x", 2.5),
                    ("r4", 0, "y", None), ("hidden", 0, "setosa", None),
                    ("v2", 0, "virginica", None)])
    expected = [("[0]", "setosa", None), ("[1]", None, 1.5), ("[3]", "x", 2.5), ("[4]", "y", None)]
    assert list(store.labelled("iris", "1", batch=batch)) == expected
    assert list(store.labelled("iris", batch=batch)) == [*expected, ("[8]", "virginica", None)]
    assert list(store.labelled("iris", "1", since=3.0, batch=batch)) == expected[2:]


@pytest.mark.parametrize(("old", "batch"), [(7, 3), (6, 3), (0, 3), (2, 10_000)])
def test_purge_deletes_rows_older_than_before_in_batches(
        store: LogStore, old: int, batch: int) -> None:
    store.insert([row(float(i), f"old{i}") for i in range(old)]
                 + [row(100.0, "kept", i) for i in range(3)])
    assert store.purge(before=50.0, batch=batch) == old
    assert ids(store.query(Query())) == ["kept/2", "kept/1", "kept/0"]


# -- failures ------------------------------------------------------------------------------
CALLS: dict[str, Callable[[LogStore], Any]] = {
    "migrate": lambda s: s.migrate(),
    "ping": lambda s: s.ping(),
    "insert": lambda s: s.insert([row(1.0)]),
    "query": lambda s: s.query(Query()),
    "feedback": lambda s: s.feedback([("r", 0, "setosa", None)]),
    "confusion": lambda s: s.confusion("iris", "1", None),
    "errors": lambda s: s.errors("iris", "1", None),
    "labelled": lambda s: list(s.labelled("iris")),
    "purge": lambda s: s.purge(1.0),
}


def _sqlite_under_a_file(tmp_path: Path) -> str:
    (tmp_path / "file").write_text("not a directory")
    return f"sqlite:///{tmp_path / 'file' / 'sub' / 'log.db'}"


def _postgres_on_a_closed_port(tmp_path: Path) -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("unreachable", [_sqlite_under_a_file, _postgres_on_a_closed_port])
def test_unreachable_database_raises_log_unavailable_quickly(
        tmp_path: Path, unreachable: Callable[[Path], str], call: str) -> None:
    s = LogStore(unreachable(tmp_path), timeout=1)
    started = time.monotonic()
    try:
        with pytest.raises(LogUnavailable):
            CALLS[call](s)
    finally:
        s.close()
    assert time.monotonic() - started < 2


def test_sqlite_failure_closes_the_connection_and_the_next_call_reconnects(
        tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    s = LogStore(f"sqlite:///{path}", timeout=0.05)
    try:
        s.insert([row(1.0, "before")])
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            with pytest.raises(LogUnavailable, match="locked"):
                s.insert([row(2.0, "refused")])
            locker.execute("ROLLBACK")
        finally:
            locker.close()
        s.insert([row(3.0, "after")])
        assert ids(s.query(Query())) == ["after/0", "before/0"]
    finally:
        s.close()


def test_postgres_dropped_connection_fails_once_then_reconnects(
        postgres_db: str, postgres_server: PostgresServer) -> None:
    import psycopg

    s = LogStore(postgres_db, timeout=1)
    try:
        s.insert([row(1.0, "before")])
        pid = s.connection().info.backend_pid
        with psycopg.connect(postgres_server.url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(LogUnavailable):
            s.insert([row(2.0, "refused")])
        s.insert([row(3.0, "after")])
        assert ids(s.query(Query())) == ["after/0", "before/0"]
        assert s.connection().info.backend_pid != pid
    finally:
        s.close()


# -- urls ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:///data/predictions.db", ("sqlite", "data/predictions.db")),
    ("sqlite:////var/lib/log.db", ("sqlite", "/var/lib/log.db")),
    ("postgresql://app:s3cret@db.internal:6543/log", ("postgresql", "db.internal:6543/log")),
    ("postgres://app@db/log", ("postgresql", "db:5432/log")),
    ("postgresql:///log", ("postgresql", "localhost:5432/log")),
])
def test_describe_names_the_database_without_the_password(
        url: str, expected: tuple[str, str]) -> None:
    assert describe(url) == expected
    assert LogStore(url).where == expected[1]


@pytest.mark.parametrize("url", ["mysql://db/log", "redis://localhost/0", "/data/log.db",
                                 "log.db", ""])
def test_describe_rejects_other_schemes(url: str) -> None:
    with pytest.raises(ValueError, match="PREDICTION_LOG must be"):
        describe(url)
    with pytest.raises(ValueError, match="PREDICTION_LOG must be"):
        LogStore(url)
