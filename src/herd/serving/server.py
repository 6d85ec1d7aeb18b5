"""The OpenAI-compatible HTTP API (FastAPI) over an AsyncEngine.

The engine works on token ids; everything text-level lives here: the chat template and images
(prompts.py), detokenizing and stop strings (text.py), n choices as n engine requests with seeds
derived from the request's, tool-call parsing (tool_calls.py), JSON grammars (structured.py), and
the OpenAI response and SSE chunk formats. A request that fails gets OpenAI's error body with a
4xx naming the bad field; the others go on.

Logprobs describe the returned text: a token's entry is handed out with the text it begins (a
token whose text is held back, as the possible start of a stop string, waits with it). When a stop
string cuts the text, the tokens that begin at or after the cut get no entry (chat's
`logprobs.content` and completions' legacy lists alike, streamed or not); the token the cut falls
inside keeps its entry, whole (its text and logprob are the whole token's), as vLLM returns the
token that ends its text. Completions' `text_offset` is where each token's text begins in the
choice's `text` (the echoed prompt included), so a token the text does not show (a skipped special
token) has the offset of the text after it. With `echo` and `logprobs` the prompt's tokens come
first, the first with a null logprob and null top_logprobs, the others from the model's
log-softmax over the prompt (the engine's prompt_logprobs, as vLLM's); `echo` with `max_tokens`
0 answers the prompt alone. Completions' `top_logprobs` hold the k most likely tokens and the
chosen one (up to k + 1 entries, as OpenAI's reference says and vLLM returns); chat's hold the k.

States: "loading" (503 until `attach` gives it an engine), "ready", "draining" (503 for new
requests while the in-flight ones finish, on shutdown).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineRequest, QueueFull, SamplingParams, TokenEvent
from .media import MediaPolicy
from .metrics import CONTENT_TYPE, ServerMetrics
from .prompts import PromptBuilder
from .protocol import (
    APIError,
    Sampling,
    bad,
    parse_chat_request,
    parse_completion_request,
)
from .structured import GrammarCompiler
from .text import TextAssembler
from .tool_calls import CALL_MARKERS, call_may_start, parse_tool_calls

logger = logging.getLogger("herd.serving")

# Seeds of the n choices of one request: choice i gets seed + i * SEED_STRIDE (distinct samples,
# each reproducible alone).
SEED_STRIDE = 1_000_003
# A temperature below this is greedy (vLLM's sampling epsilon): dividing the logits by less overflows.
GREEDY_BELOW = 1e-5


@dataclass
class ModelInfo:
    """What the server needs to know about the model besides the engine."""

    tokenizer: Any
    processor: Any = None
    eos_token_ids: tuple[int, ...] = ()
    vocab_size: int = 0
    max_model_len: int | None = None
    # the model's generation_config sampling defaults (temperature, top_p, top_k), used when a request leaves them out
    sampling_defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Echo:
    """A completion prompt echoed before each of its choices: its text, its ids, and the choice
    whose request computes the prompt's logprobs (the first of its n; its first event carries them)."""

    text: str
    ids: list[int]
    source: Any  # a _Choice
    entries: list[dict[str, Any]] | None = None  # its legacy logprob entries, once made


@dataclass
class _Choice:
    """One engine request of an API request, and the text made of its tokens."""

    index: int
    request: EngineRequest
    assembler: TextAssembler
    param: str = "messages"  # the request field a refused prompt is blamed on
    events: Any = None  # the engine's async iterator
    first: TokenEvent | None = None
    finished: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    # logprob entries not handed out yet, each with where its token's text begins in the answer
    pending: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


def _now() -> int:
    return int(time.time())


def _sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _finite(logprob: float | None) -> float | None:
    """A logprob JSON can carry: -inf (a token masked by a grammar, a prompt id past the head) is
    -9999.0, as vLLM and OpenAI write it."""
    return None if logprob is None else max(logprob, -9999.0)


def _with_chosen(top: dict[str, float | None], token: str, logprob: float | None) -> dict[str, float | None]:
    """A legacy (completions) top_logprobs entry: the k most likely tokens and the chosen one, up to
    k + 1 entries, as OpenAI's reference says and vLLM returns (logprobs 0: the chosen token alone)."""
    if token not in top:
        top[token] = logprob
    return top


class _ToolStream:
    """A streamed answer that may hold tool calls: text is sent up to where a call may start
    (tool_calls.call_may_start), without the leading and trailing white space the non-streamed
    content loses. From a call marker the rest waits for the whole answer; from a `[` or `{` only
    until the answer shows it opens no call (prose brackets: "[1]", "[a link](url)")."""

    def __init__(self):
        self.whole = ""  # the answer so far
        self.sent = ""  # the content sent so far
        self.candidate = 0  # where the last look found the first place a call may start
        self.holding = False  # a call marker came: nothing more is sent before the end

    def add(self, text: str) -> str:
        """The content to send now, after `text`."""
        self.whole += text
        if self.holding:
            return ""
        start = call_may_start(self.whole, self.candidate)
        if start is not None:
            self.candidate = start
            self.holding = self.whole.startswith(CALL_MARKERS, start)  # a marker's first characters only wait
        # white space at the ends waits: the non-streamed content is stripped
        ready = self.whole[: len(self.whole) if start is None else start].strip()
        if not ready.startswith(self.sent):
            return ""
        piece = ready[len(self.sent):]
        self.sent = ready
        return piece

    def rest_of(self, content: str | None) -> str:
        """What the final `content` adds to what was sent (content always begins with it)."""
        content = content or ""
        return content[len(self.sent):] if content.startswith(self.sent) else ""


# The endpoints /metrics counts by name; any other path under /v1 counts as "other" (a label per path a
# client made up would grow the registry without bound).
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


def _endpoint(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class _StatusCounter:
    """Counts the /v1 answers by endpoint and status (plain ASGI: it leaves the request's receive alone,
    which the disconnect watch reads)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(_endpoint(scope["path"]), str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)


class Server:
    def __init__(self, *, model_name: str, api_key: str | None = None, media: MediaPolicy | None = None,
                 engine: Any = None, model: ModelInfo | None = None):
        self.model_name = model_name
        self.api_key = api_key
        self.media = media or MediaPolicy()
        self.state = "loading"
        self.engine = None
        self.model: ModelInfo | None = None
        self.prompts: PromptBuilder | None = None
        self._grammar: GrammarCompiler | None = None
        self._pending = (engine, model) if engine is not None else None
        self.created = _now()
        self.metrics = ServerMetrics(self._engine_stats)
        self.in_flight = 0  # requests started and not yet answered to the end (streams included)
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.app = self._build_app()

    # -- life cycle --

    async def attach(self, engine: Any, model: ModelInfo) -> None:
        """Start serving with this engine (the server answers 503 until then)."""
        await engine.start()
        self.engine, self.model = engine, model
        self.prompts = PromptBuilder(model.tokenizer, model.processor, self.media)
        self.state = "ready"

    def attach_from_thread(self, engine: Any, model: ModelInfo, timeout_s: float = 600) -> None:
        """attach() from another thread than the server's (the CLI loads the model while the server answers 503)."""
        if self._loop is None:
            raise RuntimeError("the server is not running yet: attach after its startup")
        asyncio.run_coroutine_threadsafe(self.attach(engine, model), self._loop).result(timeout_s)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests (503), let the running ones finish, then stop the engine."""
        self.state = "draining"
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine is not None:
            await self.engine.stop()

    def _engine_stats(self) -> dict[str, float]:
        return self.engine.stats() if self.engine is not None else {}

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        self._loop = asyncio.get_running_loop()
        if self._pending is not None:
            await self.attach(*self._pending)
        yield
        await self.drain()

    # -- the app --

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="herd", lifespan=self._lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(APIError)
        async def api_error(request: Request, error: APIError):
            return JSONResponse(error.body(), status_code=error.status)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, error: StarletteHTTPException):
            return JSONResponse(APIError(error.status_code, str(error.detail), type="invalid_request_error").body(),
                                status_code=error.status_code)

        @app.exception_handler(Exception)
        async def server_error(request: Request, error: Exception):
            logger.exception("request failed")
            return JSONResponse(APIError(500, f"internal error: {type(error).__name__}: {error}",
                                         type="server_error").body(), status_code=500)

        app.add_middleware(_StatusCounter, metrics=self.metrics)

        @app.get("/health")
        async def health():
            if self.state != "ready":
                return JSONResponse({"status": self.state}, status_code=503)
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(), media_type=CONTENT_TYPE)

        @app.get("/v1/models")
        async def models(request: Request):
            self._check_key(request)
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str, request: Request):
            self._check_key(request)
            self._check_model(name)
            return self._model_card()

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self._chat(request)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._completion(request)

        return app

    def _model_card(self) -> dict[str, Any]:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "herd"}
        if self.model is not None and self.model.max_model_len:
            card["max_model_len"] = self.model.max_model_len
        return card

    # -- checks --

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        # in constant time: how long a comparison takes says nothing of how much of the key was right
        if not hmac.compare_digest(header.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    def _check_ready(self) -> None:
        if self.state != "ready":
            message = "the model is still loading; retry shortly" if self.state == "loading" else \
                "the server is shutting down; send the request to another server"
            raise APIError(503, message, type="service_unavailable", code=self.state)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model: {name!r} is not served here; this server serves {self.model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    async def _body(self, request: Request) -> Any:
        self._check_key(request)
        self._check_ready()
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None
        except RecursionError:  # arrays or objects nested thousands deep
            raise APIError(400, "the request body is nested too deeply to parse; send a flatter JSON object") \
                from None

    @property
    def grammar(self) -> GrammarCompiler:
        if self._grammar is None:
            self._grammar = GrammarCompiler(self.model.tokenizer, self.model.vocab_size, list(self.model.eos_token_ids))
        return self._grammar

    # -- from the API's sampling fields to the engine's --

    def _sampling_params(self, sampling: Sampling, prompt_length: int, choice: int, param: str) -> SamplingParams:
        defaults = self.model.sampling_defaults
        limit = self.model.max_model_len
        room = None if limit is None else limit - prompt_length
        if room is not None and room < 1:
            raise bad(param, f"the prompt is {prompt_length} tokens, which leaves no room in the model's context of "
                             f"{limit} tokens; shorten it")
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            max_tokens = room if room is not None else 256
            if sampling.default_max_tokens is not None:
                max_tokens = min(max_tokens, sampling.default_max_tokens)
        elif room is not None and max_tokens > room:
            name = sampling.max_tokens_param
            raise bad(name, f"the prompt is {prompt_length} tokens and {max_tokens} new tokens were asked for, over the "
                            f"model's context of {limit} tokens; ask for at most {room}")
        vocab = self.model.vocab_size
        if vocab and any(token >= vocab for token in sampling.logit_bias):
            raise bad("logit_bias", f"holds token ids outside the vocabulary of {vocab} tokens")
        temperature = sampling.temperature if sampling.temperature is not None else defaults.get("temperature", 1.0)
        if temperature < GREEDY_BELOW:  # logits / 1e-300 are infinite: the draw would be NaN
            temperature = 0.0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=sampling.top_p if sampling.top_p is not None else defaults.get("top_p", 1.0),
            top_k=sampling.top_k if sampling.top_k is not None else defaults.get("top_k", 0),
            min_p=sampling.min_p or 0.0,
            seed=None if sampling.seed is None else sampling.seed + choice * SEED_STRIDE,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            logprobs=sampling.logprobs,
            stop_token_ids=tuple(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            logit_bias=tuple(sorted(sampling.logit_bias.items())),
        )

    def _choice(self, index: int, prompt_ids: list[int], sampling: Sampling, *, param: str, model_inputs=None,
                constraint=None, keep_special_tokens: bool = False) -> _Choice:
        params = self._sampling_params(sampling, len(prompt_ids), index, param)
        request = EngineRequest(f"req-{uuid.uuid4().hex}", prompt_ids, params, model_inputs=model_inputs,
                                constraint=constraint)
        hidden = frozenset(self.model.eos_token_ids) | frozenset(sampling.stop_token_ids)
        assembler = TextAssembler(self.model.tokenizer, sampling.stop, skip_special_tokens=not keep_special_tokens,
                                  hidden_ids=hidden)
        return _Choice(index, request, assembler, param)

    # -- running choices --

    async def _start(self, choices: list[_Choice]) -> bool:
        """Send every choice to the engine, then wait for each one's first event (so that a full queue or a
        refused prompt is a 429/400 before any response starts). The choices are queued before any first
        event is awaited, so that the n choices (and the prompts of a list) are prefilled together, not one
        behind the other's first token; when the waiting queue fills up, the next one is queued once an
        earlier one of the request has started (a request larger than the queue is never its own 429)."""

        def refused(choice: _Choice, error: Exception) -> APIError:
            choice.finished = True
            if isinstance(error, QueueFull):
                return APIError(429, "the server is busy (its request queue is full); retry later",
                                type="rate_limit_exceeded", code="queue_full")
            return APIError(400, f"{choice.param}: {error}", param=choice.param)

        async def first_event(choice: _Choice) -> None:
            try:
                choice.first = await choice.events.__anext__()
            except (QueueFull, ValueError) as error:
                raise refused(choice, error) from None
            except StopAsyncIteration:
                choice.finished = True

        queued: collections.deque[_Choice] = collections.deque()  # queued, first event not awaited yet
        try:
            for choice in choices:
                while choice.events is None:
                    try:
                        choice.events = self.engine.generate(choice.request)
                    except QueueFull as error:
                        if not queued:
                            raise refused(choice, error) from None
                        await first_event(queued.popleft())  # one of ours leaves the waiting queue
                    except ValueError as error:
                        raise refused(choice, error) from None
                queued.append(choice)
            while queued:
                await first_event(queued.popleft())
        except BaseException:
            await self._close(choices)
            raise
        return True

    async def _close(self, choices: list[_Choice]) -> None:
        """Abort the choices still running (client gone, stop string, error): the engine frees their blocks."""
        for choice in choices:
            if choice.events is not None and not choice.finished:
                choice.finished = True
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await choice.events.aclose()

    async def _pieces(self, choice: _Choice, started: float, logprob_format: str) -> AsyncIterator[tuple[str, list, str | None]]:
        """(text, logprob entries, finish_reason) as the choice's tokens come; the last one has a finish_reason.
        Tokens that are already waiting when one is handed out go out together (one chunk of a stream):
        when the server falls behind the engine it sends fewer, longer chunks instead of falling further
        behind."""
        event = choice.first
        waiting = ""  # text of tokens taken together with the next one
        while True:
            if event is None:
                event = TokenEvent(None, finish_reason="abort")
            choice.prompt_tokens = event.prompt_tokens or choice.prompt_tokens
            choice.cached_tokens = event.cached_prompt_tokens or choice.cached_tokens
            text = ""
            if event.token_id is not None:
                if choice.completion_tokens == 0:
                    self.metrics.ttft.observe(time.perf_counter() - started)
                choice.completion_tokens += 1
                self.metrics.count_tokens()
                begins = len(choice.assembler.text)  # where this token's text will begin
                text = choice.assembler.add(event.token_id)
                if event.logprob is not None:
                    choice.pending.append((begins, self._logprob_entry(choice, event, logprob_format, begins)))
            finish = event.finish_reason
            if choice.assembler.stopped:
                if finish is None:
                    await self._close([choice])
                # a stop string ends the answer even on its last allowed token, where the engine says "length"
                finish = "stop"
            text, waiting = waiting + text, ""
            if finish is not None:
                choice.finished = True
                text += choice.assembler.finish()
                choice.finish_reason = finish
                yield text, self._ready_entries(choice, final=True), finish
                return
            ready = getattr(choice.events, "ready", None)
            if ready is not None and ready():
                waiting = text
            else:
                yield text, self._ready_entries(choice, final=False), None
            try:
                event = await choice.events.__anext__()
            except StopAsyncIteration:
                event = None

    @staticmethod
    def _ready_entries(choice: _Choice, final: bool) -> list[dict[str, Any]]:
        """The pending logprob entries whose tokens begin in the text handed out so far; at the end,
        all of them, except after a stop string: those beginning at or after the cut are dropped."""
        assembler = choice.assembler
        if final and not assembler.stopped:
            ready, choice.pending = choice.pending, []
        else:
            count = 0
            while count < len(choice.pending) and choice.pending[count][0] < assembler.sent:
                count += 1
            ready, choice.pending = choice.pending[:count], choice.pending[count:]
            if final:
                choice.pending = []
        return [entry for _, entry in ready]

    @staticmethod
    def _logprob_entry(choice: _Choice, event: TokenEvent, logprob_format: str, offset: int = 0) -> dict[str, Any]:
        assembler = choice.assembler
        token = assembler.token_text(event.token_id)
        top = [(i, assembler.token_text(i), _finite(lp)) for i, lp in (event.top_logprobs or [])]
        if logprob_format == "chat":
            return {"token": token, "logprob": _finite(event.logprob),
                    "bytes": list(assembler.token_bytes(event.token_id)),
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(assembler.token_bytes(i))}
                                     for i, t, lp in top]}
        # offset: where the token's text begins in the choice's generated text
        return {"token": token, "logprob": _finite(event.logprob),
                "top": _with_chosen({t: lp for _, t, lp in top}, token, _finite(event.logprob)), "offset": offset}

    async def _with_disconnect(self, request: Request, work) -> Any:
        """Run `work` (a coroutine); if the client disconnects first, cancel it (its choices are aborted)."""
        task = asyncio.ensure_future(work)

        async def disconnected():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return None
        return task.result()

    async def _merged(self, choices: list[_Choice], started: float, logprob_format: str) -> AsyncIterator:
        """(choice, text, entries, finish) from all choices as they come."""
        if len(choices) == 1:
            async for text, entries, finish in self._pieces(choices[0], started, logprob_format):
                yield choices[0], text, entries, finish
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: _Choice):
            try:
                async for piece in self._pieces(choice, started, logprob_format):
                    await queue.put((choice, *piece))
            except Exception as error:  # noqa: BLE001 - surfaced to the consumer
                await queue.put(error)

        tasks = [asyncio.ensure_future(pump(choice)) for choice in choices]
        try:
            remaining = len(choices)
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item[3] is not None:
                    remaining -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await self._close(choices)

    # -- chat --

    async def _chat(self, request: Request):
        started = time.perf_counter()
        body = await self._body(request)
        chat = parse_chat_request(body)
        self._check_model(chat.model)
        calls_wanted = chat.tools is not None and chat.tool_choice != "none"
        prompt_ids, model_inputs = await self.prompts.chat(chat.messages, chat.tools if chat.tools else None)
        self.metrics.prompt_tokens.inc(len(prompt_ids))

        def constraint():
            if chat.tool_choice == "required" or isinstance(chat.tool_choice, dict):
                name = chat.tool_choice["function"]["name"] if isinstance(chat.tool_choice, dict) else None
                return self.grammar.for_tool_call(chat.tools, name)
            return None if chat.response_format is None else self.grammar.for_response_format(chat.response_format)

        choices = [self._choice(i, prompt_ids, chat.sampling, param="messages", model_inputs=model_inputs,
                                constraint=constraint(), keep_special_tokens=calls_wanted)
                   for i in range(chat.sampling.n)]
        return await self._respond(request, choices, chat.stream,
                                   lambda: self._chat_stream(choices, chat, started, calls_wanted),
                                   lambda: self._chat_collect(choices, chat, started, calls_wanted))

    async def _respond(self, request: Request, choices: list[_Choice], stream: bool, streamed, collected):
        """Start the choices, then answer with the streamed body (`streamed()`, whose own finally
        ends the request) or the collected JSON (`collected()`); 499 when the client left first."""
        self.in_flight += 1
        streaming = False
        try:
            if not await self._with_disconnect(request, self._start(choices)):
                return Response(status_code=499)  # the client left while its prompt was prefilled
            if stream:
                streaming = True  # the stream's own finally ends the request from here on
                return StreamingResponse(streamed(), media_type="text/event-stream")
            result = await self._with_disconnect(request, collected())
            return JSONResponse(result) if result is not None else Response(status_code=499)
        finally:
            if not streaming:
                self.in_flight -= 1
                await self._close(choices)

    def _tool_answer(self, text: str, chat) -> tuple[str | None, list[dict] | None]:
        parsed = parse_tool_calls(text)
        if not parsed.tool_calls:
            return parsed.content, None
        calls = parsed.tool_calls if chat.parallel_tool_calls else parsed.tool_calls[:1]
        return parsed.content, [call.to_openai() for call in calls]

    async def _chat_collect(self, choices, chat, started, calls_wanted) -> dict[str, Any]:
        texts = {choice.index: [] for choice in choices}
        async for choice, text, entries, finish in self._merged(choices, started, "chat"):
            texts[choice.index].append(text)
            choice.logprobs += entries
        self.metrics.latency.observe(time.perf_counter() - started)
        out = []
        for choice in choices:
            text = "".join(texts[choice.index])
            message: dict[str, Any] = {"role": "assistant", "content": text}
            finish = choice.finish_reason
            if calls_wanted:
                content, calls = self._tool_answer(text, chat)
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
                    finish = "tool_calls"
            out.append({"index": choice.index, "message": message, "finish_reason": self._finish(finish),
                        "logprobs": {"content": choice.logprobs} if chat.sampling.logprobs is not None else None})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": _now(),
                "model": self.model_name, "choices": out, "usage": self._usage(choices)}

    @staticmethod
    def _stream_error(error: Exception) -> bytes:
        logger.exception("a streamed request failed")
        return _sse(APIError(500, f"the answer failed: {type(error).__name__}: {error}", type="server_error").body()) \
            + b"data: [DONE]\n\n"

    @staticmethod
    def _finish(reason: str | None) -> str | None:
        return "stop" if reason == "abort" else reason

    def _usage(self, choices: list[_Choice], per_prompt: int | None = None) -> dict[str, Any]:
        """Usage of the choices, `per_prompt` of them sampled from each prompt (default: all from one). A
        prompt counts once however many choices it has; a list of prompts (/v1/completions) counts each."""
        per_prompt = per_prompt or len(choices)
        groups = [choices[i:i + per_prompt] for i in range(0, len(choices), per_prompt)]
        prompt = sum(max(c.prompt_tokens for c in group) or len(group[0].request.prompt_ids) for group in groups)
        cached = sum(max(c.cached_tokens for c in group) for group in groups)
        completion = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _chunk_usage(self, request, choices: list[_Choice], per_prompt: int | None = None) -> dict[str, Any]:
        """The usage field of a streamed chunk: none without include_usage; null until the last
        chunk; with continuous_usage_stats (vLLM's), the usage so far."""
        if not request.include_usage:
            return {}
        return {"usage": self._usage(choices, per_prompt) if request.continuous_usage else None}

    async def _chat_stream(self, choices, chat, started, calls_wanted) -> AsyncIterator[bytes]:
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", _now()

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None) -> bytes:
            return _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                         "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                         **self._chunk_usage(chat, choices)})

        answers = {choice.index: _ToolStream() for choice in choices}
        try:
            for choice in choices:
                yield chunk(choice.index, {"role": "assistant", "content": ""})
            async for choice, text, entries, finish in self._merged(choices, started, "chat"):
                logprobs = {"content": entries} if chat.sampling.logprobs is not None and entries else None
                if calls_wanted:
                    # content streams up to where a call may start; from there the whole answer
                    # decides (sent with the finish)
                    answer = answers[choice.index]
                    text = answer.add(text)
                    if answer.holding:
                        choice.logprobs += entries
                        logprobs = None
                if text or logprobs:
                    yield chunk(choice.index, {"content": text}, None, logprobs)
                if finish is None:
                    continue
                if calls_wanted:
                    content, calls = self._tool_answer(answers[choice.index].whole, chat)
                    delta: dict[str, Any] = {}
                    rest = answers[choice.index].rest_of(content)
                    if rest:
                        delta["content"] = rest
                    if calls:
                        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
                        finish = "tool_calls"
                    saved = {"content": choice.logprobs} if chat.sampling.logprobs is not None and choice.logprobs \
                        else None
                    if delta or saved:
                        yield chunk(choice.index, delta, None, saved)
                yield chunk(choice.index, {}, self._finish(finish))
            self.metrics.latency.observe(time.perf_counter() - started)
            if chat.include_usage:
                yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created,
                            "model": self.model_name, "choices": [], "usage": self._usage(choices)})
            yield b"data: [DONE]\n\n"
        except Exception as error:  # noqa: BLE001 - the headers are sent: the error goes in the stream
            yield self._stream_error(error)
        finally:
            self.in_flight -= 1
            await self._close(choices)

    # -- completions --

    async def _completion(self, request: Request):
        started = time.perf_counter()
        body = await self._body(request)
        completion = parse_completion_request(body)
        self._check_model(completion.model)
        choices = []
        echoes = {}  # choice index -> _Echo, with echo
        wants_logprobs = completion.sampling.logprobs is not None
        for p, prompt in enumerate(completion.prompts):
            ids = self.prompts.completion(prompt)
            vocab = self.model.vocab_size
            if vocab and any(i >= vocab for i in ids):
                raise bad("prompt", f"holds token ids outside the vocabulary of {vocab} tokens")
            self.metrics.prompt_tokens.inc(len(ids))
            for j in range(completion.sampling.n):
                constraint = None if completion.response_format is None else \
                    self.grammar.for_response_format(completion.response_format)
                choice = self._choice(p * completion.sampling.n + j, ids, completion.sampling, param="prompt",
                                      constraint=constraint)
                choice.request.sampling.seed = None if completion.sampling.seed is None else \
                    completion.sampling.seed + j * SEED_STRIDE
                choices.append(choice)
                if completion.echo:
                    if j == 0:  # the prompt's logprobs are computed once, by its first choice's request
                        if wants_logprobs:
                            choice.request.sampling.prompt_logprobs = completion.sampling.logprobs
                        text = prompt if isinstance(prompt, str) else self.model.tokenizer.decode(prompt)
                        echo = _Echo(text, ids, choice)
                    echoes[choice.index] = echo
        return await self._respond(request, choices, completion.stream,
                                   lambda: self._completion_stream(choices, completion, started, echoes),
                                   lambda: self._completion_collect(choices, completion, started, echoes))

    @staticmethod
    def _completion_logprobs(entries: list[dict], base: int = 0) -> dict[str, Any]:
        """The legacy logprobs lists of `entries`, whose offsets count from `base` in the choice's text."""
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": [base + e["offset"] for e in entries]}

    def _prompt_entries(self, echo: _Echo) -> list[dict[str, Any]]:
        """The prompt's tokens as legacy logprob entries: the first (and any the engine gave no
        logprobs for, an aborted request) with null logprob and top_logprobs; offsets where each
        token's text begins in the decoded prompt. Made once per prompt, whatever n."""
        if echo.entries is not None:
            return echo.entries
        scored = echo.source.first.prompt_logprobs if echo.source.first is not None else None
        scored = scored or [None] * len(echo.ids)
        positions = TextAssembler(self.model.tokenizer)
        entries = []
        for token, score in zip(echo.ids, scored):
            begins = len(positions.text)
            positions.add(token)
            entry = {"token": positions.token_text(token), "logprob": None, "top": None, "offset": begins}
            if score is not None:
                logprob, top = score
                entry["logprob"] = _finite(logprob)
                entry["top"] = _with_chosen({positions.token_text(i): _finite(value) for i, value in top},
                                            entry["token"], entry["logprob"])
            entries.append(entry)
        echo.entries = entries
        return entries

    @staticmethod
    def _prompt_only(choice: _Choice) -> None:
        """echo with max_tokens 0: the one token generated is not part of the answer."""
        choice.finish_reason, choice.completion_tokens = "length", 0

    async def _completion_collect(self, choices, completion, started, echoes) -> dict[str, Any]:
        texts = {choice.index: [] for choice in choices}
        async for choice, text, entries, finish in self._merged(choices, started, "completion"):
            texts[choice.index].append(text)
            choice.logprobs += entries
        self.metrics.latency.observe(time.perf_counter() - started)
        wants_logprobs = completion.sampling.logprobs is not None
        out = []
        for c in choices:
            echo = echoes.get(c.index)
            text, logprobs = "".join(texts[c.index]), None
            if completion.prompt_only:
                self._prompt_only(c)
                text, c.logprobs = "", []
            if wants_logprobs:
                logprobs = self._completion_logprobs(c.logprobs, len(echo.text) if echo else 0)
            if echo is not None:
                text = echo.text + text
                if wants_logprobs:
                    prompt = self._completion_logprobs(self._prompt_entries(echo))
                    logprobs = {key: prompt[key] + logprobs[key] for key in logprobs}
            out.append({"index": c.index, "text": text, "finish_reason": self._finish(c.finish_reason),
                        "logprobs": logprobs})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": _now(),
                "model": self.model_name, "choices": out, "usage": self._usage(choices, completion.sampling.n)}

    async def _completion_stream(self, choices, completion, started, echoes) -> AsyncIterator[bytes]:
        ident, created = f"cmpl-{uuid.uuid4().hex}", _now()
        wants_logprobs = completion.sampling.logprobs is not None

        def usage() -> dict[str, Any]:
            return self._chunk_usage(completion, choices, completion.sampling.n)

        try:
            for index, echo in echoes.items():  # echo: each choice's stream starts with its prompt
                logprobs = self._completion_logprobs(self._prompt_entries(echo)) if wants_logprobs else None
                yield _sse({"id": ident, "object": "text_completion", "created": created, "model": self.model_name,
                            "choices": [{"index": index, "text": echo.text, "logprobs": logprobs,
                                         "finish_reason": None}], **usage()})
            async for choice, text, entries, finish in self._merged(choices, started, "completion"):
                if completion.prompt_only:
                    text, entries = "", []
                    if finish is not None:
                        self._prompt_only(choice)
                        finish = choice.finish_reason
                if not text and not entries and finish is None:
                    continue
                logprobs = None
                if wants_logprobs:
                    echo = echoes.get(choice.index)
                    logprobs = self._completion_logprobs(entries, len(echo.text) if echo else 0)
                yield _sse({"id": ident, "object": "text_completion", "created": created, "model": self.model_name,
                            "choices": [{"index": choice.index, "text": text, "logprobs": logprobs,
                                         "finish_reason": self._finish(finish)}], **usage()})
            self.metrics.latency.observe(time.perf_counter() - started)
            if completion.include_usage:
                yield _sse({"id": ident, "object": "text_completion", "created": created, "model": self.model_name,
                            "choices": [], "usage": self._usage(choices, completion.sampling.n)})
            yield b"data: [DONE]\n\n"
        except Exception as error:  # noqa: BLE001 - the headers are sent: the error goes in the stream
            yield self._stream_error(error)
        finally:
            self.in_flight -= 1
            await self._close(choices)


def create_app(engine: Any, model: ModelInfo, *, model_name: str, api_key: str | None = None,
               media: MediaPolicy | None = None) -> FastAPI:
    """An app that starts `engine` (an AsyncEngine) when it starts up, and stops it on shutdown."""
    return Server(model_name=model_name, api_key=api_key, media=media, engine=engine, model=model).app
