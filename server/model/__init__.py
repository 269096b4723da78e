"""Models: the repository on disk, loaded versions and their fast paths, the registry,
rows -> matrix -> one model call -> columns, and the ONNX backend."""
