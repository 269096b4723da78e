"""Work outside a request: the demo repository, offline scoring, training."""
