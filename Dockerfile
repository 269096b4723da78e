# The prediction server with the demo models baked in.
#   docker build -t model-server .
#   docker run -p 8000:8000 model-server
# Serve your own repository instead: -v "$PWD/models:/app/models:ro"
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The server runs as this user. It needs to write nothing under /app: code and models stay
# owned by root, so a compromised worker cannot replace an artifact (artifacts are pickles,
# i.e. code). RUNTIME_DIR is created under /tmp by gunicorn.conf.py.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app

WORKDIR /app

# Dependencies first, so code changes don't reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY server/ ./server/
COPY wsgi.py gunicorn.conf.py ./

# Demo models, fitted on scikit-learn's bundled data sets (nothing downloaded); world-readable.
RUN python -m server.demo /app/models && chmod -R a+rX /app

ENV BIND=0.0.0.0:8000 \
    MODEL_DIR=/app/models

USER app
EXPOSE 8000

# No curl in slim images: python's urllib does the probe; any error or non-2xx exits non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
