"""Issue 18: the request shapes real clients send and the values at the edges, through the official
`openai` client against a live server on 127.0.0.1. Each answer is a 200 with the right content or a
4xx naming the field (`param`); never a 5xx; every stream ends with `data: [DONE]`."""

import json
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tinylm.api import Usage  # noqa: E402
from tinylm.evaluate import continuation_logprobs  # noqa: E402
from tinylm.server import create_app  # noqa: E402

from test_server import LiveServer, base_url, client  # noqa: E402,F401 - the live server and its client, as fixtures

HELLO = [{"role": "user", "content": "Tell me about the cat."}]
GREEDY = dict(temperature=0.0)


def _refused(client, param, create=None, **kwargs):
    """The request gets a 400 whose error names `param`."""
    create = create or client.chat.completions.create
    with pytest.raises(openai.BadRequestError) as info:
        create(model="tiny", **kwargs)
    assert info.value.status_code == 400 and info.value.param == param, info.value
    return str(info.value)


def _raw_stream(base_url, path, body) -> list[str]:
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return [line for line in r.iter_lines() if line]


# --- part 1: the prompt comes first -------------------------------------------------------------
def test_no_max_tokens_keeps_the_whole_prompt_and_the_reply_depends_on_it(client, lm):
    prompts = [[{"role": "user", "content": "Once upon a time there was a little girl named Lily."}],
               [{"role": "user", "content": "the the the the the"}]]  # a 20-step model still tells these apart
    replies = []
    for messages in prompts:
        r = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
        assert r.usage.prompt_tokens == len(lm.tokenizer.render_chat(messages, add_generation_prompt=True)[0])
        assert r.usage.prompt_tokens + r.usage.completion_tokens <= lm.context_length
        replies.append(r.choices[0].message.content)
        assert replies[-1] == lm.chat(messages, max_new_tokens=lm.context_length, **GREEDY)
    assert replies[0] != replies[1]
    text = "Once upon a time there was a cat"
    r = client.completions.create(model="tiny", prompt=text, **GREEDY)
    assert r.usage.prompt_tokens == 1 + len(lm.tokenizer.encode(text))


def test_a_budget_over_what_is_left_is_cut_not_the_prompt(client, lm):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=lm.context_length, **GREEDY)
    assert r.usage.prompt_tokens == len(lm.tokenizer.render_chat(HELLO, add_generation_prompt=True)[0])
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= lm.context_length
    usage = Usage()  # the terminal chat's `/set max_new_tokens 250` goes through the same fitting
    "".join(lm.stream_chat(HELLO, usage=usage, max_new_tokens=250, **GREEDY))
    assert usage.prompt_tokens == r.usage.prompt_tokens


def test_message_fitting_is_linear(lm):
    history = [{"role": ("user", "assistant")[i % 2], "content": f"message number {i}"} for i in range(4000)]
    t0 = time.perf_counter()
    kept, dropped = lm.fit_messages([{"role": "system", "content": "be kind"}, *history], 8)
    assert time.perf_counter() - t0 < 5  # was quadratic: 51 s for 4,000 messages
    assert kept[0]["role"] == "system" and kept[-1] == history[-1] and dropped == 4001 - len(kept)
    assert len(lm.tokenizer.render_chat(kept, True)[0]) <= lm.context_length - 8


# --- part 2: request shapes ---------------------------------------------------------------------
def test_content_parts_and_the_developer_role(client, lm):
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "about the cat."}]}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me\nabout the cat."}]
    r = client.chat.completions.create(model="tiny", messages=parts, max_tokens=10, **GREEDY)
    assert r.usage.prompt_tokens == len(lm.tokenizer.render_chat(plain, add_generation_prompt=True)[0])
    assert r.choices[0].message.content == lm.chat(plain, max_new_tokens=10, **GREEDY)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    assert "only" in _refused(client, "messages.0.content", messages=image)


def test_a_list_of_prompts_gets_one_choice_each(client, lm):
    prompts = ["Once upon a time", "The little dog"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [lm.generate(p, max_new_tokens=8, **GREEDY) for p in prompts]
    ids = lm.tokenizer.encode(prompts[0])
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, **GREEDY)
    assert by_ids.choices[0].text == r.choices[0].text


def test_echo_with_logprobs_scores_what_tinylm_eval_scores(client, lm):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs=1, max_tokens 0 or 1."""
    context, ending = "The cat sat on the", " mat."
    ctx, cont = [lm.tokenizer.bos_id, *lm.tokenizer.encode(context)], lm.tokenizer.encode(ending)
    expected = continuation_logprobs(lm.model, [(ctx, cont)])[0]
    for max_tokens in (0, 1):
        r = client.completions.create(model="tiny", prompt=context + ending, max_tokens=max_tokens, echo=True,
                                      logprobs=1, **GREEDY)
        lp = r.choices[0].logprobs
        assert r.choices[0].text.startswith(context + ending)
        assert len(lp.tokens) == len(ctx) - 1 + len(cont) + max_tokens
        assert "".join(lp.tokens[:len(ctx) - 1 + len(cont)]) == context + ending
        got = sum(lp.token_logprobs[len(ctx) - 1:len(ctx) - 1 + len(cont)])
        assert got == pytest.approx(expected, abs=1e-4)
        assert all(max(top.values()) >= t for top, t in zip(lp.top_logprobs, lp.token_logprobs))
        assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    plain = client.completions.create(model="tiny", prompt=context, max_tokens=3, echo=True, **GREEDY).choices[0]
    assert plain.text.startswith(context) and plain.logprobs is None


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4).choices[0].logprobs is None
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, logprobs=True, stream=True, **GREEDY))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    _refused(client, "top_logprobs", messages=HELLO, top_logprobs=2)


def test_usage_in_a_last_chunk_only_when_asked(client, lm):
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=6, stream=True, **GREEDY)
    chunks = list(client.chat.completions.create(stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in client.chat.completions.create(**kwargs))
    chunks = list(client.completions.create(model="tiny", prompt="Hi", max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 1 + len(lm.tokenizer.encode("Hi"))


def test_retrieve_a_model(client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("extra, param", [
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(n=2), "n"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(logit_bias={"5": 10}), "logit_bias"),
    (dict(stream_options={"include_usage": True}), "stream_options"),  # without stream
])
def test_what_is_not_supported_is_refused(client, extra, param):
    _refused(client, param, messages=HELLO, max_tokens=4, **extra)


# --- part 3: values at the edges ----------------------------------------------------------------
def test_a_tiny_temperature_is_greedy(client):
    greedy = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0.0)
    tiny = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=1e-40)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_top_p_zero_keeps_the_most_likely_token(client):
    greedy = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0.0)
    top = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=1.0, top_p=0.0)
    assert top.choices[0].message.content == greedy.choices[0].message.content


def test_seeds(client, base_url):
    def reply(seed, **kw):
        return client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=1.0,
                                              seed=seed, **kw).choices[0].message.content
    assert reply(0) == reply(0)  # 0 is a seed like any other
    assert reply(2**64 - 1) == reply(2**64 - 1)
    for stream in (False, True):
        assert "seed" in _refused(client, "seed", messages=HELLO, seed=2**64, stream=stream)
        _refused(client, "seed", messages=HELLO, seed=-2, stream=stream)


def test_a_lone_surrogate_is_refused(base_url):
    """The openai client cannot encode one; a JSON body with the escape "\\ud800" can carry it."""
    for path, body, param in [
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "x \\ud800"}]}', "messages.0.content"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x \\ud800"}', "prompt"),
    ]:
        r = httpx.post(f"{base_url}{path}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


class FailingModel:
    """Stands in for LanguageModel: two words, then the generator fails."""
    name, num_params, context_length = "failing", 1, 64

    def fit_messages(self, messages, max_new_tokens):
        return messages, 0

    def stream_chat(self, messages, usage=None, **options):
        def pieces():
            yield "one"
            yield " two"
            raise RuntimeError("the accelerator fell over")
        return pieces()


def test_a_stream_that_fails_ends_with_an_error_event_and_done():
    with LiveServer(create_app(FailingModel(), "tiny")) as url:
        lines = _raw_stream(url, "/v1/chat/completions", {"model": "tiny", "messages": HELLO, "stream": True})
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert "fell over" in error["message"] and error["type"] == "server_error"


@pytest.mark.parametrize("body", [
    {"temperature": 1e-40}, {"seed": 2**64}, {"top_p": 0}, {"seed": 0}, {"max_tokens": 64},
    {"messages": [{"role": "developer", "content": [{"type": "text", "text": "x"}]}, *HELLO]},
])
def test_every_stream_ends_with_done(base_url, body):
    request = {"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True, **body}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=request, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code < 500
    if r.status_code == 200:
        assert lines[-1] == "data: [DONE]" and '"finish_reason": "' in lines[-2]


def test_langchain_clients(base_url, lm):
    """LangChain's ChatOpenAI with content blocks and its completions `OpenAI` with a list of prompts."""
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage

    common = dict(base_url=f"{base_url}/v1", api_key="unused", model="tiny", temperature=0, max_tokens=8, max_retries=0)
    reply = lc.ChatOpenAI(**common).invoke([SystemMessage(content=[{"type": "text", "text": "Be brief."}]),
                                            HumanMessage(content=[{"type": "text", "text": "Tell me about the cat."}])])
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the cat."}]
    assert reply.content == lm.chat(plain, max_new_tokens=8, **GREEDY)
    prompts = ["Once upon a time", "The little dog"]
    out = lc.OpenAI(**common).generate(prompts)
    assert [g[0].text for g in out.generations] == [lm.generate(p, max_new_tokens=8, **GREEDY) for p in prompts]
