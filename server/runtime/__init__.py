"""The process around the app: gunicorn worker, Prometheus, live figures, events, logs."""
