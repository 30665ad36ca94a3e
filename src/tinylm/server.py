"""An OpenAI-compatible HTTP API over a tinylm checkpoint (FastAPI + uvicorn).

    tinylm serve runs/default                      # http://127.0.0.1:8000/v1
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="tinylm", messages=[...], stream=True)

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /v1/models,
GET /v1/models/{id}, GET /health. Request and response shapes follow the OpenAI API reference;
docs/serving.md lists the fields taken and those refused. This module only adapts HTTP to `LanguageModel`: the chat template, the sampler and
the streaming text logic are the ones the terminal chat and the web app use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_shapes as shapes
from .api import LanguageModel, TokenScore, Usage
from .config import SampleConfig, SamplingError

MAX_PROMPTS = 64  # prompts in one completions request: they are answered one after another
MAX_BODY_BYTES = 1 << 20  # a request body over 1 MiB is refused with 413 before it is read whole
DEFAULT_TIMEOUT = 120.0  # seconds of generation per request; then it ends as if max_tokens were reached


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _valid_text(text: str) -> str:
    text.encode("utf-8")  # a lone surrogate ("\\ud800" in the JSON) raises UnicodeEncodeError, a ValueError
    return text


class ChatMessage(BaseModel):
    """A message; `content` is a string or a list of {"type": "text", "text": ...} parts (joined with
    newlines, as vLLM does); the `developer` role is the newer name of `system` (OpenAI API reference)."""
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, str):
            return _valid_text(v)
        texts = []
        for n, part in enumerate(v):
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ValueError(f"part {n}: only {{'type': 'text', 'text': str}} parts are supported, not {str(part)[:80]}")
            texts.append(_valid_text(part["text"]))
        return "\n".join(texts)

    def as_dict(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields both endpoints take. Ranges are checked by SampleConfig.check (a 400 naming the field);
    a field this server cannot honour is refused, never ignored: unknown fields (tools, response_format,
    ...) by extra="forbid", penalties other than 0 and a non-empty logit_bias by their validators."""
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None  # an end-user id for abuse monitoring (OpenAI); nothing to do with sampling

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return [_valid_text(s) for s in stops]

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v:
            raise ValueError("not supported (only 0); use repetition_penalty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("not supported")
        return v


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    """`prompt`: a string, a list of strings (one choice each), a list of token ids or a list of those."""
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, str):
            return [_valid_text(v)]
        if not v or any(isinstance(p, list) and not p for p in v):
            raise ValueError("must not be empty")
        if not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        if isinstance(v[0], int):
            return [v]
        return [_valid_text(p) if isinstance(p, str) else p for p in v]


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": None}})


class Deadline:
    """Ends a stream of text pieces once `seconds` have passed since its request arrived (the time
    spent fitting and scoring the prompt counts too), when its client has gone away (`cancelled`), or
    when the server shuts down (`stop`); finish_reason is then "length". Counts the generations in
    flight: the count drops when a stream ends, fails, or is closed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.active = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Shutdown: every generation ends at its next token, so that draining takes moments."""
        self.stopping.set()

    def __call__(self, pieces: Iterator[str], usage: Usage, started: float | None = None,
                 cancelled: threading.Event | None = None) -> Iterator[str]:
        end = (started or time.monotonic()) + self.seconds
        with self._lock:
            self.active += 1
        try:
            if time.monotonic() > end or self.stopping.is_set():  # the prompt alone took the time
                usage.finish_reason = "length"
                return
            for piece in pieces:
                yield piece
                if time.monotonic() > end or self.stopping.is_set() or (cancelled is not None and cancelled.is_set()):
                    usage.finish_reason = "length"
                    return
        finally:
            pieces.close()  # stops the sampler: no token is computed for nobody
            with self._lock:
                self.active -= 1


SERVER_PARAMS = {"max_new_tokens": "max_tokens"}  # SampleConfig's name -> the request's


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "extra_forbidden":
            return _error(400, f"{where}: not supported by this server", where)
        message = str(first.get("msg")).removeprefix("Value error, ")
        return _error(400, f"{where}: {message}" if where else message, where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), kind="request_too_large" if exc.status_code == 413 else "invalid_request_error")


def has_key(headers, api_key: str | None) -> bool:
    """True without a key, or when `Authorization: Bearer KEY` holds it (compared in constant time)."""
    given = headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    return not api_key or hmac.compare_digest(token.encode(), api_key.encode())


class KeyCheck:
    """With a key, every path needs it (the API and its documentation pages) except the bare health
    check. Plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health" and not has_key(Headers(scope=scope), self.api_key):
            response = _error(401, "invalid or missing API key (Authorization: Bearer ...)", kind="authentication_error")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _sampling(req: SamplingFields, max_tokens: int | None, model_name: str, limit: int) -> dict:
    """The request's sampling settings for LanguageModel, checked by SampleConfig.check (APIError 400
    naming the field). Without max_tokens the reply may take the rest of the context (up to `limit`)
    after the prompt; without a seed it is random, whatever the checkpoint's default (OpenAI's convention)."""
    if req.model != model_name:
        raise APIError(404, f"model {req.model!r} not found; this server serves {model_name!r}", "model", "not_found_error")
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens={max_tokens} is over this model's limit of {limit}", "max_tokens")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    fields = {"max_new_tokens": limit if max_tokens is None else max_tokens, "temperature": req.temperature,
              "top_p": req.top_p, "top_k": req.top_k, "repetition_penalty": req.repetition_penalty,
              "stop": req.stop, "seed": -1 if req.seed is None else req.seed}
    options = {k: v for k, v in fields.items() if v is not None}
    try:
        dataclasses.replace(SampleConfig(), **options).check()
    except SamplingError as e:
        param = SERVER_PARAMS.get(e.field, e.field)
        raise APIError(400, str(e).replace(e.field, param, 1), param) from None
    return options


def create_app(lm: LanguageModel, model_name: str = "tinylm", api_key: str | None = None,
               max_tokens_limit: int | None = None, timeout: float = DEFAULT_TIMEOUT,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    limit = max_tokens_limit or lm.context_length
    # bodies over the limit get 413 as soon as Content-Length, or the bytes read so far, pass it
    security = [Depends(HTTPBearer(auto_error=False, description="the --api-key, as `Authorization: Bearer KEY`"))]
    app = FastAPI(title="tinylm", description="OpenAI-compatible API for a tinylm model", version="1",
                  max_body_size=max_body_bytes, dependencies=security if api_key else None)
    created = int(time.time())
    deadline = app.state.deadline = Deadline(timeout)
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "tinylm"}
    _install_error_handlers(app)

    if api_key:
        app.add_middleware(KeyCheck, api_key=api_key)

    @app.get("/health")
    def health(request: Request):
        """Liveness; the model and the load only for a caller holding the key (when there is one)."""
        if not has_key(request.headers, api_key):
            return {"status": "ok"}
        return {"status": "ok", "model": model_name, "parameters": lm.num_params, "active_generations": deadline.active}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} not found; this server serves {model_name!r}", "model", "not_found_error")
        return card

    def chat_choices(req: ChatRequest, started: float, cancelled: threading.Event) -> list[Choice]:
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        options = _sampling(req, req.max_completion_tokens or req.max_tokens, model_name, limit)
        if options["max_new_tokens"] == 0:
            raise APIError(400, "max_tokens must be at least 1 for a chat completion", "max_tokens")
        messages, _ = lm.fit_messages([m.as_dict() for m in req.messages], options["max_new_tokens"])
        usage = Usage()
        top = (req.top_logprobs or 0) if req.logprobs else None
        pieces = deadline(lm.stream_chat(messages, usage=usage, logprobs=top, **options), usage, started, cancelled)
        return [Choice(pieces, usage)]

    def completion_choices(req: CompletionRequest, started: float, cancelled: threading.Event) -> list[Choice]:
        options = _sampling(req, req.max_tokens, model_name, limit)
        choices = []
        for prompt in req.prompt:
            if time.monotonic() > started + timeout or cancelled.is_set():  # out of time: an empty answer
                choices.append(Choice((text for text in ()), Usage(finish_reason="length")))
                continue
            try:
                text, echoed = lm.echo(prompt, options["max_new_tokens"], req.logprobs if req.echo else None)
            except ValueError as e:
                raise APIError(400, str(e), "prompt") from None
            usage = Usage()
            pieces = deadline(lm.stream(prompt, usage=usage, logprobs=req.logprobs, **options), usage, started, cancelled)
            choices.append(Choice(pieces, usage, text if req.echo else "", echoed, len(text)))
        return choices

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await answer(request, req, chat_choices, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await answer(request, req, completion_choices, chat=False)

    async def answer(request: Request, req, make_choices, chat: bool):
        """Prepare the choices off the event loop, then stream them, or build the whole body while
        watching the connection: a client that leaves stops its generation either way."""
        started, cancelled = time.monotonic(), threading.Event()
        choices = await run_in_threadpool(make_choices, req, started, cancelled)
        reply = Reply(req, model_name, chat=chat)
        if req.stream:
            return respond(reply, choices)
        work = asyncio.ensure_future(run_in_threadpool(respond, reply, choices))
        while not work.done():
            await asyncio.wait({work}, timeout=0.25)
            if not work.done() and await request.is_disconnected():
                cancelled.set()
        return work.result()

    return app


@dataclasses.dataclass
class Reply:
    req: SamplingFields
    model_name: str
    chat: bool
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


@dataclasses.dataclass
class Choice:
    """One reply being generated: its text pieces, its usage, and for completions the echoed prompt text,
    that prompt's TokenScores (echo with logprobs) and its length in characters (where text_offset starts)."""
    pieces: Iterator[str]
    usage: Usage
    echo: str = ""
    echoed: list[TokenScore] = dataclasses.field(default_factory=list)
    prompt_chars: int = 0


def respond(reply: Reply, choices: list[Choice]):
    """A whole response, or with `stream` server-sent events that always end with `data: [DONE]`."""
    if reply.req.stream:
        return StreamingResponse(stream_events(reply, choices), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    body = []
    for index, c in enumerate(choices):
        text = c.echo + "".join(c.pieces)
        start = c.prompt_chars - len(c.echo) if c.echo else c.prompt_chars
        logprobs = shapes.logprobs(reply.chat, reply.req.logprobs, c.echoed + c.usage.scores, start)
        body.append(shapes.choice(reply.chat, index, text, c.usage.finish_reason, logprobs))
    return shapes.body(reply, body, shapes.usage([c.usage for c in choices]))


def stream_events(reply: Reply, choices: list[Choice]) -> Iterator[str]:
    """Chunks in OpenAI's shapes; usage in a last chunk with `choices: []` when stream_options asks for it.
    A failure mid-way sends an error event; `[DONE]` always ends the stream."""
    try:
        for index, c in enumerate(choices):
            yield from _choice_events(reply, index, c)
        options = reply.req.stream_options
        if options is not None and options.include_usage:
            yield shapes.event(shapes.body(reply, [], shapes.usage([c.usage for c in choices]), chunk=True))
    except Exception as e:  # noqa: BLE001 - the client must learn that the stream failed, and how
        yield shapes.event({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                      "type": "server_error", "param": None, "code": None}})
    finally:
        for c in choices:
            c.pieces.close()  # a client that went away stops the generation here
    yield "data: [DONE]\n\n"


def _choice_events(reply: Reply, index: int, c: Choice) -> Iterator[str]:
    want = reply.req.logprobs

    def chunk(delta, finish=None, logprobs=None) -> str:
        return shapes.event(shapes.body(reply, [shapes.choice(reply.chat, index, delta, finish, logprobs, delta=True)], chunk=True))

    if reply.chat:
        yield chunk({"role": "assistant", "content": ""})
    if c.echo:
        yield chunk(c.echo, logprobs=shapes.logprobs(False, want, c.echoed, c.prompt_chars - len(c.echo)))
    offset, sent = c.prompt_chars, 0
    for piece in c.pieces:
        new = c.usage.scores[sent:]
        sent += len(new)
        logprobs = shapes.logprobs(reply.chat, want, new, offset)
        offset += sum(len(t.text) for t in new)
        yield chunk({"content": piece} if reply.chat else piece, logprobs=logprobs)
    yield chunk({} if reply.chat else "", c.usage.finish_reason)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, api_key: str | None) -> str | None:
    if is_loopback(host) or api_key:
        return None
    return (f"WARNING: serving on {host} without an API key: anyone who can reach this port can use the model. "
            "Pass --api-key (or TINYLM_API_KEY) to require one.")


HEADER_TIMEOUT = 10.0  # seconds for a connection's request line and headers to arrive in full
SHUTDOWN_GRACE = 5.0  # seconds a shutdown waits for requests in flight (generations end at once)


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """A uvicorn server for `app` that times out slow header senders and, on SIGTERM/SIGINT, ends every
    generation at its next token and drains within SHUTDOWN_GRACE seconds."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        """uvicorn's HTTP/1.1 protocol, closing a connection that has no request in progress after
        HEADER_TIMEOUT seconds: a client sending its headers a byte at a time (slowloris) cannot hold a
        connection open (uvicorn's keep-alive timer restarts on every byte)."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._no_request_yet)

        def _no_request_yet(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.deadline.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE, http=HeaderTimeout)
    return Draining(config)


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> None:
    from .api import load

    lm = load(checkpoint, device)
    name = model_name or "tinylm"
    warning = bind_warning(host, api_key)
    if warning:
        print(warning)
    print(f"serving {lm.name} ({lm.num_params:,} parameters) as model {name!r} on http://{host}:{port}/v1")
    make_server(create_app(lm, name, api_key, timeout=timeout), host, port).run()
