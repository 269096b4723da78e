"""The sweep removes the files of jobs that are gone, never those of a live job or of an
upload still arriving."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from server.jobs.files import JobFiles, sweep

LIVE, EXPIRED, UPLOADING = "a" * 32, "b" * 32, "c" * 32


def folder(root: Path, job_id: str, age: float) -> Path:
    path = root / job_id
    path.mkdir()
    (path / "result.csv").write_text("x\n")
    then = time.time() - age
    for p in (path / "result.csv", path):
        os.utime(p, (then, then))
    return path


def test_sweep_removes_only_expired_jobs_once_untouched(jobs_root: Path) -> None:
    folder(jobs_root, LIVE, 10_000)
    folder(jobs_root, EXPIRED, 10_000)
    folder(jobs_root, UPLOADING, 5)
    (jobs_root / "not-a-job").mkdir()
    asked: list[str] = []

    def known(ids: Iterable[str]) -> set[str]:
        asked.extend(ids)
        return {LIVE}

    assert sweep(jobs_root, known, grace=600) == [EXPIRED]
    assert sorted(p.name for p in jobs_root.iterdir()) == sorted([LIVE, UPLOADING,
                                                                  "not-a-job"])
    assert "not-a-job" not in asked


def test_sweep_of_a_missing_root_does_nothing(tmp_path: Path) -> None:
    assert sweep(tmp_path / "none", lambda ids: set()) == []


def test_remove_work_keeps_the_result_and_rejects(jobs_root: Path) -> None:
    files = JobFiles(jobs_root, LIVE, "parquet")
    files.dir.mkdir()
    parts = files.dir / "result.parquet.parts"
    parts.mkdir()
    for path in (files.input, files.result, files.rejects, parts / "part-00000.parquet",
                 files.dir / "result.0123456789abcdef.parquet.tmp"):
        path.write_bytes(b"x")
    files.remove_work()
    assert sorted(p.name for p in files.dir.iterdir()) == ["rejects.csv", "result.parquet"]
    assert files.attempt("t0k3n").name == "result.t0k3n.parquet"
