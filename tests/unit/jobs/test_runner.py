"""A queue worker's job, run in this process: the offline scorer's bytes, a killed attempt
resumed from its last part (none scored twice, no row twice), a cancel within one chunk, a
removed version, a lease another worker holds."""

from __future__ import annotations

import csv
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from server.config import Settings
from server.jobs import runner
from server.jobs.files import JobFiles
from server.jobs.runner import WorkerContext, run_job
from server.jobs.score import main as score_main
from server.jobs.store import JobRecord, JobStore
from server.model.predict import predict_matrix
from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROWS, CHUNK = 5_500, 1_000  # 6 parts
BAD = {17: ["x", "3", "1", "0.2"], 2_500: ["5", "3"]}


@pytest.fixture
def models(demo_repo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_repo, tmp_path / "models"))


@pytest.fixture
def ctx(store: JobStore, jobs_root: Path, models: Path) -> WorkerContext:
    settings = Settings(model_dir=str(models), jobs_dir=str(jobs_root), redis_url="redis://x")
    return WorkerContext(settings, store, ModelRegistry(ModelRepository(models)), "test")


@pytest.fixture
def rows_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    X = np.round(rng.normal([5.8, 3, 3.7, 1.2], [0.8, 0.4, 1.7, 0.7], (ROWS, 4)), 2)
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", *FEATURES])
        for i, row in enumerate(X.tolist()):
            writer.writerow([f"r{i}", *BAD.get(i, row)])
    return path


def submit(ctx: WorkerContext, source: Path, fmt: str = "csv", version: str = "1",
           rows_total: int | None = None) -> JobFiles:
    job_id = secrets.token_hex(16)
    files = JobFiles(ctx.settings.jobs_path, job_id, fmt)
    files.dir.mkdir(parents=True)
    shutil.copy(source, files.input)
    record = JobRecord(job_id, "key:a", "queued", "iris", version, fmt, CHUNK,
                       files.input.stat().st_size, time.time(), rows_total=rows_total)
    assert ctx.store.create(record, 10) is None
    return files


def job_id(files: JobFiles) -> str:
    return files.dir.name


def record(ctx: WorkerContext, files: JobFiles) -> JobRecord:
    found = ctx.store.get(job_id(files))
    assert found is not None
    return found


class Chunks:
    """Counts the chunks scored, and runs ``then(n)`` after the n-th."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, then: Any = None) -> None:
        self.n = 0
        real = runner.score_frame

        def counted(*args: Any, **kw: Any) -> pd.DataFrame:
            out = real(*args, **kw)
            self.n += 1
            if then is not None:
                then(self.n)
            return out

        monkeypatch.setattr(runner, "score_frame", counted)


def test_a_job_gives_the_offline_scorers_bytes(ctx: WorkerContext, rows_csv: Path,
                                               tmp_path: Path) -> None:
    files = submit(ctx, rows_csv)
    assert run_job(job_id(files), ctx) == "succeeded"
    done = record(ctx, files)
    assert (done.state, done.rows_done, done.rows_total, done.rejects) == \
        ("succeeded", ROWS, ROWS, len(BAD))
    assert done.started and done.finished and done.eta_seconds == 0
    offline = tmp_path / "offline.csv"
    assert score_main(["iris:1", str(rows_csv), str(offline), "--model-dir",
                       str(ctx.settings.model_dir), "--chunk-rows", str(CHUNK)]) == 0
    assert files.result.read_bytes() == offline.read_bytes()
    assert files.rejects.read_bytes() == Path(f"{offline}.rejects.csv").read_bytes()
    assert pd.read_csv(files.rejects)["row"].tolist() == [i + 1 for i in sorted(BAD)]
    # the input and the parts are gone, the result and rejects stay
    assert sorted(p.name for p in files.dir.iterdir()) == ["rejects.csv", "result.csv"]
    assert run_job(job_id(files), ctx) == "succeeded"  # a redelivery changes nothing


def test_a_killed_attempt_resumes_from_its_last_part(ctx: WorkerContext, rows_csv: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    files = submit(ctx, rows_csv)

    def die(n: int) -> None:
        if n == 4:  # while scoring chunk 3: parts 0-2 are written
            raise SystemExit("killed")

    Chunks(monkeypatch, die)
    with pytest.raises(SystemExit):
        run_job(job_id(files), ctx)
    assert record(ctx, files).state == "running" and record(ctx, files).rows_done == 3 * CHUNK
    parts = files.dir / "result.csv.parts"
    written = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.csv")}
    assert sorted(written) == [f"part-{k:05d}.csv" for k in range(3)]
    monkeypatch.undo()
    rewritten: set[str] = set()

    def check(n: int) -> None:
        rewritten.update(name for name, ns in written.items()
                         if (parts / name).stat().st_mtime_ns != ns)

    again = Chunks(monkeypatch, check)
    assert run_job(job_id(files), ctx) == "succeeded"
    assert again.n == 3 and not rewritten  # chunks 3, 4, 5 only; parts 0-2 untouched
    out = pd.read_csv(files.result, dtype=str, keep_default_na=False)
    assert out["id"].tolist() == [f"r{i}" for i in range(ROWS)]  # each row once, in order
    done = record(ctx, files)
    assert done.rows_done == ROWS and done.attempts == 2


def test_cancel_stops_within_one_chunk(ctx: WorkerContext, rows_csv: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    files = submit(ctx, rows_csv)
    Chunks(monkeypatch, lambda n: ctx.store.cancel(job_id(files)) if n == 2 else None)
    assert run_job(job_id(files), ctx) == "cancelled"
    done = record(ctx, files)
    assert done.state == "cancelled" and done.rows_done == 2 * CHUNK and done.finished
    assert not files.input.exists() and not files.result.exists()


@pytest.mark.parametrize("when", [0, 2])
def test_a_removed_version_fails_the_job(ctx: WorkerContext, rows_csv: Path,
                                         monkeypatch: pytest.MonkeyPatch, when: int) -> None:
    version = ctx.settings.model_path / "iris" / "9"
    shutil.copytree(ctx.settings.model_path / "iris" / "1", version)
    files = submit(ctx, rows_csv, version="9")
    if when == 0:
        shutil.rmtree(version)
    Chunks(monkeypatch, lambda n: shutil.rmtree(version) if n == when else None)
    assert run_job(job_id(files), ctx) == "failed"
    done = record(ctx, files)
    assert done.state == "failed" and done.error is not None
    if when == 0:
        assert done.error == "model 'iris' version 9 is no longer in the model repository"
    else:
        assert done.error == ("model 'iris' version 9 was removed from the model repository "
                              "while the job ran, after 2,000 rows")


def test_a_lease_held_by_a_live_worker_is_left_to_it(ctx: WorkerContext, rows_csv: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    files = submit(ctx, rows_csv)
    assert ctx.store.acquire(job_id(files)) is not None  # another worker's, for 10 s
    monkeypatch.setattr(ctx.store, "lease_seconds", 0.2)  # this worker waits 0.2 + 2 s for it
    started = time.monotonic()
    assert run_job(job_id(files), ctx) == "held elsewhere"
    assert time.monotonic() - started < 5
    assert record(ctx, files).state == "queued"


def test_a_parquet_job_answers_as_predict_matrix(ctx: WorkerContext, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    X = np.round(rng.normal([5.8, 3, 3.7, 1.2], [0.8, 0.4, 1.7, 0.7], (2_345, 4)), 2)
    frame = pd.DataFrame(X, columns=FEATURES)
    frame.loc[5, "petal_width"] = np.nan
    source = tmp_path / "rows.parquet"
    frame.to_parquet(source)
    files = submit(ctx, source, "parquet", version="2", rows_total=len(frame))
    assert run_job(job_id(files), ctx) == "succeeded"
    out = pd.read_parquet(files.result)
    lv = ctx.registry.resolve("iris", "2")
    good = np.isfinite(X).all(axis=1) & (np.arange(len(X)) != 5)
    want = predict_matrix(lv, X[good])
    assert out["prediction"][good].tolist() == [w["prediction"] for w in want]
    assert out["error"][5] == "missing value for feature 'petal_width'"
    assert record(ctx, files).rejects == 1


def test_a_job_whose_worker_keeps_dying_fails_instead_of_looping(
        ctx: WorkerContext, rows_csv: Path) -> None:
    files = submit(ctx, rows_csv)
    ctx.store.client.hset(f"job:{job_id(files)}", "attempts", runner.MAX_ATTEMPTS)
    assert run_job(job_id(files), ctx) == "failed"
    assert record(ctx, files).error == (
        "stopped after 5 attempts: the worker scoring it stopped each time (killed, or out "
        "of memory?)")


def test_a_worker_without_the_servers_jobs_dir_says_so(ctx: WorkerContext,
                                                       rows_csv: Path) -> None:
    files = submit(ctx, rows_csv)
    files.input.unlink()
    assert run_job(job_id(files), ctx) == "failed"
    assert "the server and the queue workers must share it" in str(record(ctx, files).error)


def test_a_model_that_breaks_fails_the_job_with_its_error(
        ctx: WorkerContext, rows_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kw: Any) -> pd.DataFrame:
        raise MemoryError("no room")

    monkeypatch.setattr(runner, "score_frame", broken)
    files = submit(ctx, rows_csv)
    assert run_job(job_id(files), ctx) == "failed"
    assert record(ctx, files).error == "internal error: MemoryError: no room"
