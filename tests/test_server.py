"""The OpenAI-compatible API, exercised with the official `openai` client against a live server."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from tinylm.server import create_app, is_loopback, make_server  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        self.port = _free_port()
        self.server = make_server(app, "127.0.0.1", self.port, log_level="warning")  # as `tinylm serve` runs it
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def base_url(lm):
    with LiveServer(create_app(lm, "tiny")) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


HELLO = [{"role": "user", "content": "Tell me about the cat."}]


def test_chat_completion(client, lm):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, seed=5, temperature=0.8)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and isinstance(text, str)
    assert r.usage.prompt_tokens == len(lm.tokenizer.render_chat(HELLO, add_generation_prompt=True)[0])
    assert 1 <= r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    assert text == lm.chat(HELLO, max_new_tokens=12, seed=5, temperature=0.8)  # the same generator underneath


def test_streamed_chat_equals_the_whole_reply(client):
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=16, seed=11, temperature=1.0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and all(c.usage is None for c in chunks)


def test_text_completion_stream_and_stop(client, lm):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, seed=3, temperature=0.0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=20, seed=3, temperature=0.0, stream=True))
    assert r.choices[0].text == streamed == lm.generate("Once upon a time", max_new_tokens=20, temperature=0.0)
    words = r.choices[0].text.split()
    if len(words) > 2:  # stop on a word the unconstrained reply contains: the text ends before it
        stop = " " + words[2]
        cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0.0, stop=[stop])
        assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(model="tiny", messages=HELLO, temperature=-1), "BadRequestError", "temperature"),
    (dict(model="tiny", messages=[]), "BadRequestError", "messages"),
    (dict(model="tiny", messages=HELLO, max_tokens=100_000), "BadRequestError", "over this model's limit"),
    (dict(model="gpt-9", messages=HELLO), "NotFoundError", "model 'gpt-9' not found"),
    (dict(model="tiny", messages=[{"role": "wizard", "content": "hi"}]), "BadRequestError", "role"),
])
def test_bad_requests_get_a_4xx_with_a_message(client, kwargs, error, text):
    with pytest.raises(getattr(openai, error)) as info:
        client.chat.completions.create(**kwargs)
    assert 400 <= info.value.status_code < 500 and text in str(info.value)


def test_concurrent_streams_do_not_mix(client):
    requests = [dict(messages=[{"role": "user", "content": "The dog"}], seed=1),
                dict(messages=[{"role": "user", "content": "A little girl"}], seed=2)]

    def stream(req):
        out = client.chat.completions.create(model="tiny", max_tokens=40, temperature=1.0, stream=True, **req)
        return "".join(c.choices[0].delta.content or "" for c in out)

    alone = [stream(r) for r in requests]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(stream, requests * 2))
    assert together == alone * 2
    assert alone[0] != alone[1]


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list()] == ["tiny"]
    import httpx
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"


def test_api_key(lm):
    with LiveServer(create_app(lm, "tiny", api_key="s3cret")) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in right.models.list()] == ["tiny"]


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_readme_client_example_runs(lm):
    from test_readme import DOCS, _section_python

    code = _section_python("## OpenAI-compatible API", DOCS / "serving.md")
    with LiveServer(create_app(lm, "tinylm")) as url:
        scope: dict = {}
        exec(compile(code.replace("http://127.0.0.1:8000", url), "README.md", "exec"), scope)
    assert scope["reply"].choices[0].message.role == "assistant"
