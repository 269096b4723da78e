"""What the web side checks before a job is queued: its format, its header, its chunk size;
and that a job is found for its owner only."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from server.errors import ApiError
from server.jobs.service import JobService, chunk_rows, input_columns, sniff_format
from server.jobs.store import JobRecord, JobStore
from server.model.registry import ModelRegistry


def test_formats_are_told_by_their_bytes(tmp_path: Path) -> None:
    csv_file = tmp_path / "a"
    csv_file.write_text("a,b\n1,2\n")
    parquet = tmp_path / "b"
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_parquet(parquet)
    assert sniff_format(csv_file) == "csv" and sniff_format(parquet) == "parquet"
    assert input_columns(csv_file, "csv") == (["a", "b"], None)
    assert input_columns(parquet, "parquet") == (["a", "b"], 1)


@pytest.mark.parametrize(("content", "fmt", "message"), [
    (b"", "csv", "the CSV body is empty"),
    (b"\n\n", "csv", "the CSV body is empty"),
    (b"a,b\n1,2\n", "parquet", "not a readable Parquet file"),
])
def test_unreadable_uploads_are_422(tmp_path: Path, content: bytes, fmt: str,
                                    message: str) -> None:
    path = tmp_path / "in"
    path.write_bytes(content)
    with pytest.raises(ApiError) as err:
        input_columns(path, fmt)
    assert err.value.status == 422 and message in err.value.message


@pytest.mark.parametrize(("raw", "rows"), [(None, 50_000), ("", 50_000), ("1000", 1000),
                                           ("1000000", 1_000_000)])
def test_chunk_rows_in_range(raw: str | None, rows: int) -> None:
    assert chunk_rows(raw) == rows


@pytest.mark.parametrize("raw", ["999", "1000001", "ten", "-5", "1e4"])
def test_chunk_rows_out_of_range_is_422(raw: str) -> None:
    with pytest.raises(ApiError) as err:
        chunk_rows(raw)
    assert err.value.status == 422


def test_a_header_without_a_feature_is_refused_and_leaves_nothing(
        store: JobStore, jobs_root: Path, registry: ModelRegistry) -> None:
    service = JobService(store, jobs_root, lambda job_id: None, 10**6, 2)
    job_id, folder = service.staging()
    upload = folder / "input.upload"
    upload.write_text("sepal_length,sepal_width,petal_length\n1,2,3\n")
    with pytest.raises(ApiError) as err:
        service.submit("key:a", job_id, upload, None, registry.resolve("iris", "1"), 1000)
    assert err.value.status == 422 and "petal_width" in err.value.message
    assert not folder.exists() and store.get(job_id) is None


def test_a_job_that_cannot_be_queued_fails_and_answers_503(
        store: JobStore, jobs_root: Path, registry: ModelRegistry) -> None:
    def broken(job_id: str) -> None:
        raise ConnectionError("broker down")

    service = JobService(store, jobs_root, broken, 10**6, 2)
    job_id, folder = service.staging()
    (folder / "input.upload").write_text("a,sepal_length,sepal_width,petal_length,petal_width\n")
    with pytest.raises(ApiError) as err:
        service.submit("key:a", job_id, folder / "input.upload", "csv",
                       registry.resolve("iris", "1"), 1000)
    assert err.value.status == 503 and err.value.code == "queue_unavailable"
    record = store.get(job_id)
    assert record is not None and record.state == "failed" and "broker down" in record.error  # type: ignore[operator]


def test_a_job_is_found_for_its_owner_only(store: JobStore, jobs_root: Path) -> None:
    service = JobService(store, jobs_root, lambda job_id: None, 10**6, 2)
    record = JobRecord("d" * 32, "key:a", "queued", "iris", "1", "csv", 1000, 1, time.time())
    store.create(record, 2)
    assert service.get("key:a", record.id).id == record.id
    for who, job_id in (("key:b", record.id), ("key:a", "e" * 32), ("key:a", "../etc")):
        with pytest.raises(ApiError) as err:
            service.get(who, job_id)
        assert err.value.status == 404 and err.value.code == "job_not_found"
    with pytest.raises(ApiError) as err:
        service.output("key:a", record.id, "result")
    assert err.value.status == 409
    assert service.cancel("key:a", record.id).state == "cancelled"
    with pytest.raises(ApiError) as err:
        service.cancel("key:a", record.id)
    assert err.value.status == 409 and err.value.code == "job_finished"
