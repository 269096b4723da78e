"""A scoring job's files in JOBS_DIR, shared by the web servers and the queue workers, and the
sweep that removes the files of jobs that are gone.

``JOBS_DIR/<job id>/``:

- ``input.csv`` or ``input.parquet``: the upload (``input.*.upload`` while it arrives);
- ``result.<fmt>.parts/``: the offline scorer's resumable parts (``server.jobs.parts``);
- ``result.<fmt>`` and ``rejects.csv``: what ``/result`` and ``/rejects`` serve.

The input and the parts are deleted when a job ends; the result and rejects stay until the
job's hash expires (JOB_RESULT_TTL), after which ``sweep`` deletes the folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("server.jobs")

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
FORMATS = ("csv", "parquet")
MEDIA = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}
# A folder whose job has no hash is left alone this long after its last write: an upload in
# progress has no hash yet (a stalled client is cut off after CLIENT_TIMEOUT_SECONDS).
ORPHAN_GRACE_SECONDS = 600.0


class JobFiles:
    def __init__(self, root: Path, job_id: str, fmt: str) -> None:
        assert JOB_ID_RE.match(job_id) and fmt in FORMATS
        self.dir = root / job_id
        self.fmt = fmt

    @property
    def input(self) -> Path:
        return self.dir / f"input.{self.fmt}"

    @property
    def upload(self) -> Path:
        return self.dir / f"input.{self.fmt}.upload"

    @property
    def result(self) -> Path:
        return self.dir / f"result.{self.fmt}"

    @property
    def rejects(self) -> Path:
        return self.dir / "rejects.csv"

    def attempt(self, token: str) -> Path:
        """Where one worker writes the concatenated result before renaming it into place:
        never a file another worker (a duplicate delivery) may be writing too."""
        return self.dir / f"result.{token}.{self.fmt}"

    def remove_work(self) -> None:
        """The input, the parts and what a killed attempt left half written, once the job
        has ended."""
        for path in (self.input, self.upload,
                     *self.dir.glob(f"result.{'[0-9a-f]' * 16}.{self.fmt}*")):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.dir / f"result.{self.fmt}.parts", ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def last_write(folder: Path) -> float:
    """The newest mtime of a job folder and the files in it."""
    newest = folder.stat().st_mtime
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except OSError:
                continue
    return newest


def sweep(root: Path, known: Callable[[Iterable[str]], set[str]],
          now: float | None = None, grace: float = ORPHAN_GRACE_SECONDS) -> list[str]:
    """Delete the folders of jobs whose hash is gone (expired after JOB_RESULT_TTL, or never
    created because the upload failed) once untouched for ``grace`` seconds. Returns the ids
    removed. ``known`` says which ids still have a hash (one Redis round trip)."""
    now = time.time() if now is None else now
    try:
        ids = [e.name for e in os.scandir(root) if e.is_dir() and JOB_ID_RE.match(e.name)]
    except FileNotFoundError:
        return []
    alive = known(ids)
    removed = []
    for job_id in ids:
        if job_id in alive:
            continue
        folder = root / job_id
        try:
            if now - last_write(folder) < grace:
                continue
        except FileNotFoundError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(job_id)
    if removed:
        log.info("swept the files of %d expired jobs", len(removed))
    return removed
