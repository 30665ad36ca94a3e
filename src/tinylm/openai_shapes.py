"""Response bodies and stream events in the shapes of the OpenAI API reference (chat completions and
the legacy completions), built from what the generator reports. JSON in, nothing else: no model here.

Logprobs are natural logs under the model's own distribution. Chat: `choices[i].logprobs.content` is
a list of {token, logprob, bytes, top_logprobs}. Completions: `choices[i].logprobs` holds parallel
lists `tokens`, `token_logprobs`, `top_logprobs` ({token text: logprob}) and `text_offset` (character
offsets from the start of the prompt), the shape lm-evaluation-harness reads for echo scoring.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .api import TokenScore, Usage


def body(reply, choices: list[dict], usage: dict | None = None, chunk: bool = False) -> dict:
    """reply: server.Reply (id, created, model_name, chat)."""
    kind = "chat.completion" if reply.chat else "text_completion"
    out = {"id": f"{'chatcmpl' if reply.chat else 'cmpl'}-{reply.id}", "object": f"{kind}.chunk" if chunk and reply.chat else kind,
           "created": reply.created, "model": reply.model_name, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def choice(chat: bool, index: int, content, finish: str | None, logprobs: dict | None, delta: bool = False) -> dict:
    """content: the text, or for a chat chunk (`delta`) the delta dict."""
    if not chat:
        return {"index": index, "text": content, "finish_reason": finish, "logprobs": logprobs}
    if delta:
        return {"index": index, "delta": content, "finish_reason": finish, "logprobs": logprobs}
    return {"index": index, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
            "logprobs": logprobs}


def usage(usages: Sequence[Usage]) -> dict:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs(chat: bool, wanted, scores: list[TokenScore], offset: int = 0) -> dict | None:
    """None unless the request asked for logprobs (chat: true; completions: an int, 0 included)."""
    if wanted is None or wanted is False:
        return None
    if chat:
        def entry(text: str, lp: float) -> dict:
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**entry(s.text, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                            for s in scores], "refusal": None}
    offsets = []
    for s in scores:
        offsets.append(offset)
        offset += len(s.text)
    return {"tokens": [s.text for s in scores], "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": [dict(s.top) for s in scores], "text_offset": offsets}


def event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
