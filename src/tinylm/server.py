"""An OpenAI-compatible HTTP API over a tinylm checkpoint (FastAPI + uvicorn).

    tinylm serve runs/default                      # http://127.0.0.1:8000/v1
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="tinylm", messages=[...], stream=True)

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /v1/models,
GET /health. This module only adapts HTTP to `LanguageModel`: the chat template, the sampler and
the streaming text logic are the ones the terminal chat and the web app use.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import LanguageModel, Usage

DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 1 << 20  # a request body over 1 MiB is refused with 413 before it is read whole
DEFAULT_TIMEOUT = 120.0  # seconds of generation per request; then it ends as if max_tokens were reached


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (e.g. user)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": None}})


class Deadline:
    """Ends a stream of text pieces once `seconds` have passed (finish_reason "length"), and counts the
    generations in flight: the count drops when a stream ends, fails, or is closed because its client
    went away."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.active = 0
        self._lock = threading.Lock()

    def __call__(self, pieces: Iterator[str], usage: Usage) -> Iterator[str]:
        end = time.monotonic() + self.seconds
        with self._lock:
            self.active += 1
        try:
            for piece in pieces:
                yield piece
                if time.monotonic() > end:
                    usage.finish_reason = "length"
                    return
        finally:
            pieces.close()  # stops the sampler: no token is computed for nobody
            with self._lock:
                self.active -= 1


def create_app(lm: LanguageModel, model_name: str = "tinylm", api_key: str | None = None,
               max_tokens_limit: int | None = None, timeout: float = DEFAULT_TIMEOUT,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    limit = max_tokens_limit or lm.context_length
    # bodies over the limit get 413 as soon as Content-Length, or the bytes read so far, pass it
    app = FastAPI(title="tinylm", description="OpenAI-compatible API for a tinylm model", version="1",
                  max_body_size=max_body_bytes)
    created = int(time.time())
    deadline = app.state.deadline = Deadline(timeout)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")), where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), kind="request_too_large" if exc.status_code == 413 else "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return _error(401, "invalid or missing API key (Authorization: Bearer ...)", kind="authentication_error")
        return await call_next(request)

    def sampling(req: SamplingFields) -> dict:
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} not found; this server serves {model_name!r}", "model", "not_found_error")
        max_tokens = req.max_completion_tokens or req.max_tokens or min(DEFAULT_MAX_TOKENS, limit)
        if max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} is over this model's limit of {limit}", "max_tokens")
        fields = {"max_new_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                  "repetition_penalty": req.repetition_penalty, "stop": req.stop, "seed": req.seed}
        return {k: v for k, v in fields.items() if v is not None}

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name, "parameters": lm.num_params, "active_generations": deadline.active}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "tinylm"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        options = sampling(req)
        messages = [m.model_dump() for m in req.messages]
        messages, _ = lm.fit_messages(messages, options["max_new_tokens"])
        usage = Usage()
        pieces = deadline(lm.stream_chat(messages, usage=usage, **options), usage)
        return _respond(req, pieces, usage, "chat.completion", model_name)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        options = sampling(req)
        usage = Usage()
        pieces = deadline(lm.stream(req.prompt, usage=usage, **options), usage)
        return _respond(req, pieces, usage, "text_completion", model_name)

    return app


def _respond(req: SamplingFields, pieces: Iterator[str], usage: Usage, kind: str, model_name: str):
    rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    chat = kind == "chat.completion"

    def usage_dict() -> dict:
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens}

    if not req.stream:
        text = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": usage.finish_reason}
                  if chat else {"index": 0, "text": text, "finish_reason": usage.finish_reason, "logprobs": None})
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice], "usage": usage_dict()}

    def chunk(delta: dict | str, finish: str | None, with_usage: bool = False) -> str:
        choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat
                  else {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None})
        body = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": model_name,
                "choices": [choice]}
        if with_usage:
            body["usage"] = usage_dict()
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def events() -> Iterator[str]:
        if chat:
            yield chunk({"role": "assistant", "content": ""}, None)
        try:
            for piece in pieces:
                yield chunk({"content": piece} if chat else piece, None)
        finally:
            pieces.close()  # a client that went away stops the generation here
        yield chunk({} if chat else "", usage.finish_reason, with_usage=True)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> None:
    import uvicorn

    from .api import load

    lm = load(checkpoint, device)
    name = model_name or "tinylm"
    warning = bind_warning(host, api_key)
    if warning:
        print(warning)
    print(f"serving {lm.name} ({lm.num_params:,} parameters) as model {name!r} on http://{host}:{port}/v1")
    uvicorn.run(create_app(lm, name, api_key, timeout=timeout), host=host, port=port, log_level="info",
                timeout_keep_alive=5)
