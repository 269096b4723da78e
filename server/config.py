"""Every knob of the server, typed, read from the environment once in ``create_app``."""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server settings. Each field is read from the upper-cased environment variable."""

    model_config = SettingsConfigDict(protected_namespaces=(), extra="ignore", case_sensitive=False)

    # A folder or s3://bucket/prefix: a str, since a Path would fold "s3://" into "s3:/".
    model_dir: str = Field("models", description="The model repository (MODEL_DIR).")

    @field_validator("model_dir", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value
    allow_pickle: bool = Field(
        True, description="false refuses .joblib and .pkl artifacts (FAILED, with the "
        "reason): only .skops (trusted scikit-learn, numpy and scipy types) and ONNX load."
    )
    model_memory_mb: float = Field(
        0, ge=0, description="Per-worker budget for loaded versions: versions load on their "
        "first request and the least recently used are unloaded beyond it (those named by a "
        "label or an experiment stay). 0 = no limit, everything loads at start."
    )
    model_load_wait_seconds: float = Field(
        30.0, gt=0, description="Longest a request waits for its version to load under "
        "MODEL_MEMORY_MB (503 + Retry-After beyond)."
    )
    model_cache_dir: str = Field(
        "", description="Where a worker keeps the artifacts of an s3:// MODEL_DIR (shared "
        "by the workers of one host); unset = DATA_DIR/model-cache."
    )
    redis_url: str = Field("", description="redis://host:port/db; empty = per-worker memory cache.")
    cache: str = Field(
        "on", description="'on': each version is cached when that costs less than computing "
        "its answer (decided at load, shown in /models); 'always': every version; 'off' "
        "disables the prediction cache.")
    cache_ttl: int = Field(3600, ge=1, description="Seconds a cached prediction lives (SETEX).")
    cache_max_mb: float = Field(
        64, gt=0, description="Megabytes the per-worker memory cache may hold (LRU beyond); "
        "an iris row with probabilities costs about 370 bytes."
    )
    redis_timeout: float = Field(
        0.25, gt=0, description="Socket connect/read timeout for Redis, in seconds."
    )
    redis_pool_size: int = Field(64, ge=1, description="Redis connections per worker process.")
    redis_breaker_seconds: float = Field(
        2.0, ge=0, description="How long Redis is skipped after a failure (circuit breaker)."
    )
    max_batch: int = Field(1000, ge=1, description="Most rows in one /predict/batch.")
    batch_max_size: int = Field(
        32, ge=1, description="Micro-batching: most one-row requests predicted in one call "
        "(per worker and model version); 1 turns micro-batching off."
    )
    batch_max_delay_ms: float = Field(
        2.0, ge=0, description="Micro-batching: longest a request waits for its batch to close."
    )
    blas_threads: int = Field(
        1, ge=1, description="BLAS/OpenMP threads per worker (threadpoolctl): workers are the "
        "parallelism; more threads per worker only fight over the same cores."
    )
    model_timeout_seconds: float = Field(
        30.0, ge=0, description="Model time one request may use, checked between chunks of "
        "STREAM_CHUNK_ROWS rows (504 model_timeout beyond); 0 = no limit."
    )
    max_body_bytes: int = Field(8_388_608, ge=1, description="Largest JSON body (413 beyond).")
    stream_max_rows: int = Field(100_000, ge=1, description="Most rows in one /predict/stream.")
    stream_chunk_rows: int = Field(
        256, ge=2, description="Rows predicted per model call in a stream or a big batch (the "
        "worker serves its other requests between chunks)."
    )
    max_streams: int = Field(
        500, ge=1,
        description="Most open SSE and CSV streams per worker (503 + Retry-After beyond)."
    )
    heartbeat_seconds: float = Field(5.0, gt=0, description="SSE ': ping' interval while idle.")
    max_websockets: int = Field(
        0, ge=0, description="Most open WebSockets per worker (handshake 503 + Retry-After "
        "beyond); 0 = a quarter of WORKER_CONNECTIONS, so plain HTTP always has room."
    )
    ws_idle_seconds: float = Field(
        120.0, gt=0, description="A /ws/predict socket that sends no message for this long is "
        "closed (1001)."
    )
    ws_ping_seconds: float = Field(
        25.0, ge=0, description="Interval of WebSocket pings; a peer that stops answering them "
        "is dropped. 0 = no pings."
    )
    csv_max_bytes: int = Field(
        268_435_456, ge=1, description="Largest /predict/csv upload, counted as it arrives "
        "(413 beyond); bigger files belong to offline scoring."
    )
    csv_spool_mb: float = Field(
        512, gt=0, description="Megabytes of CSV uploads one worker may hold on disk at once "
        "(503 + Retry-After beyond)."
    )
    rate_limit: str = Field(
        "", description="Per API key (or client address) limit, e.g. '100/second;5000/minute'; "
        "empty = off. Counted in Redis when REDIS_URL is set (shared by workers and hosts)."
    )
    trusted_proxies: int = Field(
        0, ge=0, le=10, description="Proxy hops whose X-Forwarded-For is believed for the "
        "client address (nginx in front: 1); 0 = the socket's peer."
    )
    cors_origins: str = Field(
        "", description="Comma list of origins allowed by CORS ('*' for any); empty = CORS off."
    )
    metrics_key: str = Field(
        "", description="When set, GET /metrics needs it as X-API-Key or a Bearer token."
    )
    api_keys: str = Field("", description="Comma list of API keys; empty = model endpoints open.")
    stream_token_seconds: int = Field(
        300, ge=1, le=86400, description="Life of a stream token (POST /auth/stream-token) "
        "that SSE endpoints and WebSockets accept as ?token= under API_KEYS."
    )
    admin_token: str = Field("", description="Admin bearer token; empty = admin endpoints 403.")
    default_model: str = Field("", description="Model used by POST /predict when none is named.")
    model_poll_seconds: float = Field(
        2.0, ge=0, description="Seconds between repository scans; 0 turns the poll off."
    )
    runtime_dir: str = Field(
        "", description="Directory shared by the workers of one server: reload signal, events, "
        "live figures, Prometheus files (gunicorn.conf.py makes one when unset)."
    )
    log_level: str = Field("INFO", description="Python log level name.")
    drift: str = Field(
        "on", description="'off' turns live drift monitoring off (no counting on the "
        "request path)."
    )
    drift_window_seconds: int = Field(
        3600, ge=60, le=7 * 86400, description="The sliding window drift scores cover, in "
        "one-minute buckets."
    )
    drift_min_rows: int = Field(
        500, ge=1, description="Fewer served rows than this in the window: the scores are "
        "null, with the reason."
    )
    drift_sample_rows_per_second: int = Field(
        1000, ge=1, description="Rows per second and worker counted into the drift "
        "histograms; batches, streams and CSV beyond it are sampled."
    )
    job_max_bytes: int = Field(
        10 * 1024**3, ge=1, description="Largest scoring-job upload (POST /jobs), counted as "
        "it streams to disk (413 beyond)."
    )
    job_max_active_per_key: int = Field(
        4, ge=1, description="Queued or running scoring jobs one API key (or client address) "
        "may have (429 beyond)."
    )
    job_result_ttl: int = Field(
        86400, ge=60, description="Seconds a finished job's result and rejects are kept."
    )
    job_lease_seconds: float = Field(
        10.0, gt=0, description="Seconds a queue worker that died keeps its running job "
        "before another worker may take it (the lease, renewed every third of it while the "
        "job runs)."
    )
    jobs_dir: str = Field(
        "", description="Directory shared by the server and the queue workers for job inputs "
        "and results; unset = DATA_DIR/jobs."
    )
    data_dir: Path = Field(
        Path("data"), description="Where the server keeps its own files: the SQLite "
        "prediction log (predictions.db) unless PREDICTION_LOG names another place."
    )
    prediction_log: str = Field(
        "", description="The prediction log: sqlite:///path, postgresql://user:pass@host/db, "
        "or 'off'; unset = sqlite under DATA_DIR."
    )
    prediction_log_sample: float = Field(
        1.0, ge=0, le=1, description="Share of requests whose rows are logged (0-1)."
    )
    prediction_log_inputs: str = Field(
        "on", description="'off' stores a SHA-256 of each row's features instead of the "
        "features (inputs may be personal data; training from feedback then needs them)."
    )
    prediction_log_retention_days: float = Field(
        7, ge=0, description="Rows older than this are deleted by a periodic pass; 0 = keep."
    )
    prediction_log_buffer_rows: int = Field(
        20_000, ge=1, description="Rows one worker buffers while the database is slow or "
        "down; beyond it the oldest are dropped (prediction_log_dropped_total)."
    )
    prediction_log_flush_seconds: float = Field(
        0.5, gt=0, description="How often a worker writes its buffered rows (one transaction)."
    )
    # The deepest legitimate body is 5 levels (the Open Inference envelope around a 2-D
    # tensor); 32 leaves room for any client while staying far below the parser's own
    # limit (~255, with a vaguer message) and anything a recursive walk could trip on.
    max_json_depth: int = Field(
        32, ge=1, description="Deepest nesting of arrays and objects in a JSON body (400 beyond)."
    )

    @property
    def cache_enabled(self) -> bool:
        return self.cache.strip().lower() not in {"off", "0", "false", "no"}

    @property
    def cache_policy(self) -> str:
        """'off', 'always' (every version) or 'on' (where caching pays: serving.cachepolicy)."""
        value = self.cache.strip().lower()
        return "off" if not self.cache_enabled else "always" if value == "always" else "on"

    @property
    def model_path(self) -> Path:
        """The local folder of MODEL_DIR: itself, or for s3:// its mirror, a folder of
        MODEL_CACHE_DIR named after the URL (two repositories never share one)."""
        if not self.model_dir_remote:
            return Path(self.model_dir)
        return self.model_cache_path / hashlib.sha256(self.model_dir.encode()).hexdigest()[:16]

    @property
    def model_dir_remote(self) -> bool:
        return self.model_dir.startswith("s3://")

    @property
    def model_cache_path(self) -> Path:
        return Path(self.model_cache_dir) if self.model_cache_dir else self.data_dir / "model-cache"

    @property
    def jobs_path(self) -> Path:
        return Path(self.jobs_dir) if self.jobs_dir else self.data_dir / "jobs"

    @property
    def drift_enabled(self) -> bool:
        return self.drift.strip().lower() not in {"off", "0", "false", "no"}

    @property
    def prediction_log_url(self) -> str:
        """PREDICTION_LOG, '' when off, sqlite under DATA_DIR when unset."""
        url = self.prediction_log.strip()
        if url.lower() in {"off", "0", "false", "no"}:
            return ""
        return url or f"sqlite:///{self.data_dir / 'predictions.db'}"

    @cached_property
    def websocket_cap(self) -> int:
        """MAX_WEBSOCKETS, or a quarter of gunicorn's WORKER_CONNECTIONS when 0."""
        if self.max_websockets:
            return self.max_websockets
        return max(1, int(os.environ.get("WORKER_CONNECTIONS", "1000")) // 4)

    @cached_property  # read on every request that needs a key: split once
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]


# --- docs/configuration.md ----------------------------------------------------------------
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def settings_table() -> str:
    """Every setting as a markdown table: variable, default, meaning (the field's docstring)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default in ("", None) else f"`{default}`"
        rows.append(f"| `{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)


def write_settings_table(page: Path) -> bool:
    """Put the table between the markers of ``page``; True when that changed the page."""
    text = page.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    fresh = f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}"
    if fresh != text:
        page.write_text(fresh)
    return fresh != text


if __name__ == "__main__":  # python -m server.config: refresh docs/configuration.md
    target = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    print(f"{target}: {'updated' if write_settings_table(target) else 'already current'}")
