"""herd serve: an OpenAI-compatible server (server.py) over a continuous-batching engine (engine.py)."""
