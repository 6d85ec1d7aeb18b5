"""herd serve: an OpenAI-compatible server over a continuous-batching engine.

- `server.py`: the FastAPI app (chat, completions, models, health, metrics), with `protocol.py`
  (requests and responses), `prompts.py`, `text.py` (detokenizing, stop strings),
  `tool_calls.py`, `structured.py` (response_format through llguidance), `media.py` (untrusted
  images), `metrics.py`, `client.py` (`herd chat --url`);
- `engine.py`: Engine (one scheduler step: schedule, run the model, sample, events), AsyncEngine,
  the request and event types;
- `scheduler.py`: decode rows, prefill chunks, preemption, prefix reuse, chunked-layer windows;
- `paged.py`: the block pool and the model over the paged KV store (graphs per batch bucket);
- `sampling.py`: each row's token from its own settings.
"""
