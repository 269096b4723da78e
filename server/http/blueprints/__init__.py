"""Thin HTTP layers, one module per feature, each exposing ``bp``."""
