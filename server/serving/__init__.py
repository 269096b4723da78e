"""The data plane: the front-door core, micro-batching, the prediction cache, A/B
experiments and the reloader."""
