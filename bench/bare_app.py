"""The framework ceiling: a bare Flask app with the same body handling as ours and no model.

``POST /predict`` reads the body, parses it with orjson and answers a constant JSON object
shaped like a real iris answer (so both servers write about as many bytes). Served by the
same gunicorn.conf.py and gevent workers as the real server, what it reaches is the most any
Flask route can do on this machine; bench/core.py reports our server as a fraction of it.

    BIND=127.0.0.1:8001 WORKERS=2 gunicorn -c gunicorn.conf.py bench.bare_app:app
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Flask, Response, request

app = Flask(__name__)

# The shape of a real single-row answer; dumped per request, as our server does.
ANSWER: dict[str, Any] = {
    "model": "iris", "version": "1", "prediction": 0, "label": "setosa",
    "confidence": 0.97, "probabilities": {"setosa": 0.97, "versicolor": 0.02, "virginica": 0.01},
    "cached": False, "request_id": "0" * 32,
}


@app.post("/predict")
def predict() -> Response:
    # Parse the body for real: reading and decoding JSON is part of any predict request.
    orjson.loads(request.get_data())
    return Response(orjson.dumps(ANSWER), mimetype="application/json")
