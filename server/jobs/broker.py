"""The Celery settings both sides share, and the web side's client: it only sends tasks by
name (``TASK``), so a web server imports none of the scoring code."""

from __future__ import annotations

from typing import Any

from celery import Celery

from server.config import Settings

TASK = "server.jobs.score"
QUEUE = "jobs"
# Kombu's Redis transport hands a message nobody acknowledged to another worker after this
# long. A job's message is acknowledged only when the job ends (acks_late), so a job that
# runs longer is delivered twice; the lease keeps the second delivery from scoring it
# again, and a dead worker's jobs are queued again by the sweep (JOB_LEASE_SECONDS), not by
# this: it is the backstop for a message taken by a worker that died before it started.
VISIBILITY_TIMEOUT = 6 * 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery on the Redis broker, one job per worker process at a time, each message
    acknowledged when its job ends, redelivered when the process running it dies."""
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT,
                                     "socket_timeout": 10, "socket_connect_timeout": 5},
        # Publishing waits a bounded time when Redis is down (503 for POST /jobs).
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0,
                                      "interval_step": 0.5, "interval_max": 1},
        "task_default_queue": QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,  # the job's state lives in its own hash
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def make_client(settings: Settings) -> Celery:
    """The web side's Celery: sends ``TASK`` messages; made in ``create_app``, per worker."""
    client = Celery("server.jobs.client", set_as_current=False)
    client.conf.update(celery_config(settings))
    return client


def enqueue(client: Celery, job_id: str) -> None:
    client.send_task(TASK, args=[job_id], queue=QUEUE)
