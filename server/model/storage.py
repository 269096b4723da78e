"""``MODEL_DIR=s3://bucket/prefix``: the repository mirrored into MODEL_CACHE_DIR.

Before each scan the bucket is listed (boto3; any S3-compatible endpoint through the standard
AWS variables, ``AWS_ENDPOINT_URL`` included). Objects whose ETag differs from the one
recorded are downloaded beside their target, checked (an ETag without ``-`` is the object's
MD5) and renamed into place; files whose object is gone are deleted. The scan then reads the
mirror like any local repository, so loading, the atomic swap and FAILED isolation are
the same. The workers of one host share the mirror: a lock file serialises the syncs (the
second finds everything current and downloads nothing). When storage cannot be reached,
the mirror is left as it was, what is loaded goes on serving, and ``status`` says why.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from server.config import Settings
from server.model.repository import ModelRepository

log = logging.getLogger(__name__)

LOCK_WAIT_SECONDS = 60.0
MANIFEST = ".etags.json"


def open_repository(settings: Settings) -> ModelRepository:
    """MODEL_DIR's repository: the folder, or an s3:// URL's mirror, synced before each
    scan."""
    if not settings.model_dir_remote:
        return ModelRepository(settings.model_path, settings.allow_pickle)
    mirror = S3Mirror(settings.model_dir, settings.model_path)
    return ModelRepository(settings.model_path, settings.allow_pickle, mirror=mirror)


class S3Mirror:
    """One s3:// repository and its local mirror under ``cache_root``."""

    def __init__(self, url: str, local: Path, client: Any = None) -> None:
        parsed = urlparse(url)
        self.url = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.local = Path(local)
        self.local.mkdir(parents=True, exist_ok=True)
        self._client = client
        self.error: str | None = None
        self.last_sync: float | None = None
        self.downloads = 0

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", config=Config(
                connect_timeout=2, read_timeout=10, retries={"max_attempts": 2}))
        return self._client

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "state": "ok" if self.error is None else "degraded",
                "error": self.error, "last_sync": self.last_sync}

    def sync(self) -> None:
        """Bring the mirror in step with the bucket; never raises (the error is kept)."""
        try:
            with _Locked(self.local / ".lock"):
                self._sync()
            if self.error is not None:
                log.info("model storage reachable again", extra={"url": self.url})
            self.error = None
            self.last_sync = time.time()
        except Exception as exc:  # noqa: BLE001 - an outage must never stop the serving
            message = f"{type(exc).__name__}: {exc}"[:300]
            if message != self.error:
                log.error("model storage unreachable: serving what is loaded",
                          extra={"url": self.url, "err": message})
            self.error = message

    def _sync(self) -> None:
        listed: dict[str, str] = {}  # relative path -> ETag
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(self.prefix) + 1 if self.prefix else 0:]
                if _safe(rel):
                    listed[rel] = obj["ETag"].strip('"')
        manifest_path = self.local / MANIFEST
        try:
            known: dict[str, str] = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            known = {}
        for rel, etag in sorted(listed.items()):
            target = self.local / rel
            if known.get(rel) == etag and target.exists():
                continue
            self._download(rel, etag, target)
            known[rel] = etag
        for rel in sorted(set(known) - set(listed)):
            gone = self.local / rel
            gone.unlink(missing_ok=True)
            del known[rel]
            for folder in gone.parents:  # a deleted version leaves no empty folder behind
                if folder == self.local or not folder.is_relative_to(self.local):
                    break
                try:
                    folder.rmdir()
                except OSError:
                    break
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, sort_keys=True))
        tmp.replace(manifest_path)

    def _download(self, rel: str, etag: str, target: Path) -> None:
        key = f"{self.prefix}/{rel}" if self.prefix else rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.download"
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        digest = hashlib.md5(usedforsecurity=False)
        with tmp.open("wb") as out:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if "-" not in etag and digest.hexdigest() != etag:  # a multipart ETag is not an MD5
            tmp.unlink(missing_ok=True)
            raise OSError(f"{key}: downloaded bytes do not match the ETag {etag}")
        tmp.replace(target)  # atomic: a scan sees the old file or the whole new one
        self.downloads += 1
        log.info("model file downloaded", extra={"key": key, "etag": etag})


def _safe(rel: str) -> bool:
    """Only plain relative paths land in the mirror (no ``..``, no hidden parts)."""
    parts = rel.split("/")
    return bool(rel) and not rel.endswith("/") and all(
        p and p not in (".", "..") and not p.startswith(".") for p in parts)


class _Locked:
    """An exclusive lock file, waited for by polling, so that under gevent a worker waiting
    for another's download goes on serving (time.sleep yields)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _Locked:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or \
                        time.monotonic() > deadline:
                    os.close(self.fd)
                    raise
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
