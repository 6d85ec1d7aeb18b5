"""Tools around the models that transformers keeps under `transformers.utils` (same import paths)."""
