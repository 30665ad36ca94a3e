"""The API under load and abuse: many streams, clients that leave, huge or malformed bodies, absurd
parameters, slow generations. Every answer is a 2xx or a 4xx with a message; the server never falls over."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tinylm.server import bind_warning, create_app  # noqa: E402

from test_server import LiveServer  # noqa: E402


class SlowModel:
    """Stands in for LanguageModel: one word per `delay` seconds, and a record of what it was asked."""

    name, num_params, context_length = "slow", 1, 64

    def __init__(self, delay: float = 0.0, words: int = 1000):
        self.delay, self.words = delay, words
        self.produced, self.closed = [], 0
        self.lock = threading.Lock()

    def fit_messages(self, messages, max_new_tokens):
        return messages, 0

    def _pieces(self, usage, max_new_tokens=16, **_):
        usage.prompt_tokens = 3
        count = 0
        try:
            for i in range(min(self.words, max_new_tokens)):
                time.sleep(self.delay)
                count += 1
                usage.completion_tokens += 1
                yield f" w{i}"
            usage.finish_reason = "length"
        finally:
            with self.lock:
                self.produced.append(count)
                self.closed += 1

    def stream_chat(self, messages, usage=None, **options):
        return self._pieces(usage, **options)

    def stream(self, prompt, usage=None, **options):
        return self._pieces(usage, **options)

    def echo(self, prompt, max_new_tokens, top=None):
        return (prompt if isinstance(prompt, str) else "ids"), []


def _chat(max_tokens=8, stream=False, **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "stream": stream, **extra}


def _wait_idle(url: str, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while httpx.get(f"{url}/health").json()["active_generations"]:
        assert time.time() < deadline, "generations still running"
        time.sleep(0.05)


def test_fifty_concurrent_streams(lm):
    """The real model, 50 clients streaming at once: every stream completes with its [DONE]."""
    with LiveServer(create_app(lm, "tiny")) as url:
        def one(i):
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=_chat(12, True, seed=i), timeout=120) as r:
                lines = [ln for ln in r.iter_lines() if ln]
            return r.status_code, lines[-1]

        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, range(50)))
        assert results == [(200, "data: [DONE]")] * 50
        _wait_idle(url)


def test_a_client_leaving_mid_stream_stops_its_generation():
    model = SlowModel(delay=0.05)
    with LiveServer(create_app(model, "tiny")) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=_chat(60, True), timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        # the connection is closed here, after a few pieces of a 60-piece answer
        _wait_idle(url)
        assert model.closed == 1 and model.produced[0] < 30, model.produced


def test_a_slow_generation_ends_at_the_timeout():
    model = SlowModel(delay=0.1)
    with LiveServer(create_app(model, "tiny", timeout=0.5)) as url:
        t0 = time.time()
        reply = httpx.post(f"{url}/v1/chat/completions", json=_chat(60), timeout=30).json()
        assert time.time() - t0 < 3 and reply["choices"][0]["finish_reason"] == "length"
        assert model.produced == [reply["usage"]["completion_tokens"]] and model.produced[0] < 15


@pytest.mark.parametrize("body, status, words", [
    (b'{"model": "tiny", "messages": [', 400, "JSON"),
    (b"not json at all", 400, "JSON"),
    (json.dumps({"model": "tiny", "messages": "hello"}).encode(), 400, "messages"),
    (json.dumps(_chat(max_tokens="lots")).encode(), 400, "max_tokens"),
    (json.dumps(_chat(temperature="hot")).encode(), 400, "temperature"),
    (json.dumps(_chat(max_tokens=10**12)).encode(), 400, "limit"),
    (json.dumps(_chat(top_p=5)).encode(), 400, "top_p"),
    (json.dumps(_chat(n=3)).encode(), 400, "n"),
    (json.dumps(_chat(stop=["a"] * 10)).encode(), 400, "stop"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user"}]}).encode(), 400, "content"),
    (json.dumps([1, 2, 3]).encode(), 400, ""),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}', 413, "Too Large"),
], ids=["cut", "not-json", "messages-type", "max_tokens-type", "temperature-type", "max_tokens-huge", "top_p-range",
        "n", "stop-count", "content-missing", "array", "2MB"])
def test_malformed_requests_get_a_4xx_with_a_message(body, status, words):
    with LiveServer(create_app(SlowModel(), "tiny")) as url:
        r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, r.text[:500]
        # a body refused for its declared size gets Starlette's plain-text 413; everything else OpenAI's JSON error
        assert words in (r.text if status == 413 else r.json()["error"]["message"])
        assert httpx.get(f"{url}/health").status_code == 200  # and the server is still there


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives():
    with LiveServer(create_app(SlowModel(), "tiny", max_body_bytes=10_000)) as url:
        def chunks():
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            for _ in range(100):
                yield b"y" * 1000
            yield b'"}]}'
        r = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=30)
        assert r.status_code == 413 and "Too Large" in r.json()["error"]["message"]


def test_an_oversized_prompt_is_cut_to_the_context(lm):
    with LiveServer(create_app(lm, "tiny")) as url:
        long = "the cat sat on the mat " * 20_000  # 460 KB: under the body limit, far over the context
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": long, "max_tokens": 5}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] <= lm.context_length - 5


def test_binding_beyond_this_machine_without_a_key_warns():
    assert bind_warning("127.0.0.1", None) is None and bind_warning("0.0.0.0", "k3y") is None
    assert "without an API key" in bind_warning("0.0.0.0", None)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
FIELDS = {"model": st.sampled_from(["tiny", "other"]) | JSON,
          "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "x"]),
                                                      "content": st.text(max_size=40) | st.lists(st.fixed_dictionaries(
                                                          {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10) | JSON}),
                                                          max_size=2)}), max_size=3) | JSON,
          "prompt": st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3)
          | st.lists(st.integers(-5, 500), max_size=5) | JSON, "max_tokens": st.integers(-5, 100) | JSON,
          "temperature": st.floats(-1, 3) | JSON, "top_p": st.floats(-1, 2) | JSON, "top_k": st.integers(-3, 100) | JSON,
          "stop": st.lists(st.text(max_size=3), max_size=5) | JSON, "stream": st.booleans() | JSON,
          "seed": st.integers() | JSON, "n": st.integers(-1, 3) | JSON,
          "logprobs": st.booleans() | st.integers(-1, 30) | JSON, "top_logprobs": st.integers(-1, 30) | JSON,
          "echo": st.booleans() | JSON, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
          "tools": JSON, "response_format": JSON, "logit_bias": JSON, "frequency_penalty": st.floats(-1, 1) | JSON}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       body=st.fixed_dictionaries({}, optional=FIELDS) | JSON)
def test_fuzzed_bodies_never_get_a_5xx(path, body):
    """Request bodies drawn from the schema's fields, with values both valid and wild."""
    client = _fuzz_client()
    r = client.post(path, json=body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


_CLIENT = {}


def _fuzz_client():
    from fastapi.testclient import TestClient

    if "c" not in _CLIENT:
        _CLIENT["c"] = TestClient(create_app(SlowModel(words=4), "tiny"))
    return _CLIENT["c"]


def test_openapi_document_lists_the_endpoints():
    from fastapi.testclient import TestClient

    spec = TestClient(create_app(SlowModel(), "tiny")).get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])


def test_many_tiny_messages_end_within_the_timeout_and_free_the_worker(lm):
    """10,000 one-word messages (well under the body limit): fitting them is linear and counts
    against the request's timeout, so the answer comes within it and nothing keeps running."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(10_001)]
    with LiveServer(create_app(lm, "tiny", timeout=3)) as url:
        t0 = time.time()
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 50},
                       timeout=60)
        took = time.time() - t0
        assert r.status_code == 200 and took < 3 + 2, (r.status_code, took)
        _wait_idle(url, seconds=2)


def test_a_client_leaving_a_whole_response_stops_its_generation():
    """Not streamed: the server watches the connection while it builds the body."""
    model = SlowModel(delay=0.05)
    with LiveServer(create_app(model, "tiny")) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=_chat(60), timeout=0.5)  # 3 s of words
        _wait_idle(url)
        assert model.closed == 1 and model.produced[0] < 30, model.produced


def test_a_slow_header_sender_is_cut_off(monkeypatch):
    import socket

    from tinylm import server

    monkeypatch.setattr(server, "HEADER_TIMEOUT", 1.0)
    with LiveServer(create_app(SlowModel(), "tiny")) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(10)
            t0 = time.time()
            closed = False
            for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 20:
                try:
                    s.sendall(bytes([byte]))
                    if s.recv(1, socket.MSG_DONTWAIT) == b"":
                        closed = True
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    closed = True
                    break
                time.sleep(0.2)
            assert closed and time.time() - t0 < 3, "the connection stayed open"


def test_shutdown_ends_generations_and_drains_within_seconds():
    import signal

    model = SlowModel(delay=0.2)
    server = LiveServer(create_app(model, "tiny", timeout=600))
    with server as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=_chat(60, True), timeout=30) as r:  # 12 s
            lines = r.iter_lines()
            next(lines)
            t0 = time.time()
            server.server.handle_exit(signal.SIGTERM, None)  # as uvicorn's signal handler does
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        server.thread.join(timeout=10)
        assert not server.thread.is_alive() and time.time() - t0 < 6
        assert sum(model.produced) < 30  # it stopped (or never started), not ran to its 60 words


def test_with_a_key_only_a_bare_health_check_answers_without_it(lm):
    key = "s3cret"
    with LiveServer(create_app(lm, "tiny", api_key=key)) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # no model name, no load
        for path in ("/docs", "/openapi.json", "/redoc", "/v1/models"):
            assert httpx.get(f"{url}{path}").status_code == 401, path
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/health", headers=auth).json()["model"] == "tiny"
        spec = httpx.get(f"{url}/openapi.json", headers=auth).json()
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
