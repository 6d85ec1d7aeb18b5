"""A small client of a running `herd serve` (or any OpenAI-compatible server) for `herd chat --url`:
the standard library only, streaming chat completions as Server-Sent Events."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


class ServerError(Exception):
    """The server answered with an error: `status`, and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class ChatClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600):
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _request(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers,
                                         method="GET" if body is None else "POST")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            try:
                detail = json.loads(error.read()).get("error", {})
            except (json.JSONDecodeError, AttributeError):
                detail = {}
            raise ServerError(error.code, detail.get("message") or str(error), detail.get("param")) from None

    def model_name(self) -> str:
        """The first model the server serves."""
        with self._request("/models") as reply:
            models = json.loads(reply.read())["data"]
        if not models:
            raise ServerError(404, "the server lists no model")
        return models[0]["id"]

    def stream_chat(self, model: str, messages: list[dict[str, Any]], **fields: Any) -> Iterator[str]:
        """The answer's text pieces as they come. Closing the iterator (Ctrl-C) closes the connection,
        which makes the server abort the request."""
        body = {"model": model, "messages": messages, "stream": True,
                **{name: value for name, value in fields.items() if value is not None}}
        reply = self._request("/chat/completions", body)
        try:
            for raw in reply:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise ServerError(500, chunk["error"].get("message", "the server failed mid-answer"))
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text
        finally:
            reply.close()
