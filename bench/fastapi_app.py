"""The guides' FastAPI model server, written the way ../shared/seeds write it: a peer for
``python -m bench.peers``, not part of the product.

A module-level ``joblib.load`` of one artifact (``MODEL_PATH``), a pydantic request model,
an ``async def`` handler that calls ``model.predict`` and ``model.predict_proba`` on the event
loop, and a pydantic response model. Nothing tuned: no orjson response class, no thread pool,
no batching, exactly as the guides show it.

    MODEL_PATH=models/iris/1/model.joblib uvicorn bench.fastapi_app:app --workers 2
"""

import os

import joblib
import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI(title="ML Model API")

model = joblib.load(os.environ["MODEL_PATH"])


class PredictionRequest(BaseModel):
    features: list[float]


class PredictionResponse(BaseModel):
    prediction: int
    probability: list[float]


@app.post("/predict", response_model=PredictionResponse)
async def predict(request: PredictionRequest):
    features = np.array(request.features).reshape(1, -1)
    prediction = model.predict(features)[0]
    probability = model.predict_proba(features)[0].tolist()

    return PredictionResponse(
        prediction=int(prediction),
        probability=probability
    )
