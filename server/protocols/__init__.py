"""Transport-free codecs and answer shapes: native JSON, TF Serving, Open Inference, CSV
rows and SSE framing."""
