"""The Python API: load a checkpoint and generate or stream text.

    import tinylm
    lm = tinylm.load("runs/default")                      # a run, stage or checkpoint directory
    print(lm.generate("Once upon a time", max_new_tokens=100, temperature=0.7, top_k=50))
    for piece in lm.stream("Hello"): print(piece, end="", flush=True)
    print(lm.chat([{"role": "user", "content": "How are you?"}]))

Text is turned into ids here and back; `generate.generate_ids` does the decoding. Streaming never
splits a UTF-8 character and holds back text that could be the start of a stop string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .config import SampleConfig
from .generate import generate_ids
from .layout import checkpoint_name
from .model import Transformer
from .tokenizer import Tokenizer
from .device import pick_device


@dataclasses.dataclass
class TokenScore:
    """One token as the model saw it: its id, its text (the token decoded alone, so a piece of a UTF-8
    character reads as U+FFFD), its natural-log probability under the model's own distribution (before
    temperature, penalty and top-k/p, as vLLM reports it) and the `top` most likely (text, logprob) there."""
    token: int
    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclasses.dataclass
class Usage:
    """Filled in by a stream as it runs: token counts and why it ended ("stop" or "length"); with
    `logprobs=k` given to the stream, `scores` gets a TokenScore per generated token (k alternatives)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    scores: list[TokenScore] = dataclasses.field(default_factory=list)


MIN_REPLY_ROOM = 16  # tokens of context a prompt must leave for the reply before it is shortened


def check_text(text: str, where: str) -> str:
    """`text` if it is valid Unicode; ValueError naming `where` for a lone surrogate (e.g. JSON "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: not valid Unicode (a lone surrogate at character {e.start})") from None
    return text


class LanguageModel:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, meta: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.meta = meta or {}
        defaults = self.meta.get("config", {}).get("sample", {})
        self.defaults = SampleConfig(**{k: v for k, v in defaults.items() if k in SampleConfig.__dataclass_fields__})

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "LanguageModel":
        model, tokenizer, meta = load_checkpoint(path, pick_device(device))
        return cls(model, tokenizer, meta)

    @property
    def name(self) -> str:
        return checkpoint_name(Path(self.meta.get("path", "model")))

    @property
    def num_params(self) -> int:
        return self.model.num_params()

    @property
    def context_length(self) -> int:
        return self.model.cfg.max_seq_len

    def sampling(self, **overrides) -> SampleConfig:
        """The checkpoint's sampling defaults with the given (non-None) fields replaced, checked by
        `SampleConfig.check` (SamplingError naming the field); TypeError for an unknown field."""
        unknown = set(overrides) - set(SampleConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown sampling options: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None}).check()

    # --- plain text continuation ---------------------------------------------------------------
    def generate(self, prompt: str, **sampling) -> str:
        return "".join(self.stream(prompt, **sampling))

    def stream(self, prompt: str | list[int], usage: Usage | None = None, logprobs: int | None = None,
               **sampling) -> Iterator[str]:
        """Text pieces continuing `prompt` (text or token ids), read after a <|bos|> (as `tinylm eval` does)."""
        return self.stream_ids(self.prompt_ids(prompt), self.sampling(**sampling), usage, logprobs)

    def echo(self, prompt: str | list[int], max_new_tokens: int | None, top: int | None = None) -> tuple[str, list[TokenScore]]:
        """The prompt as `stream` reads it for a reply of `max_new_tokens` (shortened the same way if it
        is too long): its text and, with `top` (0-20 alternatives), a TokenScore for every token after the
        <|bos|>, each given all before it: what `tinylm eval` sums for a continuation."""
        full = self.prompt_ids(prompt)
        ids, _ = self.fit_prompt(full, max_new_tokens)
        text = prompt if isinstance(prompt, str) and len(ids) == len(full) else self.tokenizer.decode(ids[1:])
        return text, (self.score(ids, top) if top is not None and len(ids) > 1 else [])

    # --- chat ----------------------------------------------------------------------------------
    def chat(self, messages: list[dict], **sampling) -> str:
        return "".join(self.stream_chat(messages, **sampling))

    def stream_chat(self, messages: list[dict], usage: Usage | None = None, logprobs: int | None = None,
                    **sampling) -> Iterator[str]:
        for n, m in enumerate(messages):
            if isinstance(m.get("content"), str):
                check_text(m["content"], f"messages.{n}.content")
        ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        return self.stream_ids(ids, self.sampling(**sampling), usage, logprobs)

    def reply_room(self, max_new_tokens: int | None) -> int:
        """Tokens of context a prompt must leave free before it is shortened: MIN_REPLY_ROOM, or a quarter
        of the context if that is less, or `max_new_tokens` if that is less still."""
        room = min(MIN_REPLY_ROOM, self.context_length // 4)
        return room if max_new_tokens is None else min(room, max_new_tokens)

    def fit_messages(self, messages: list[dict], max_new_tokens: int | None = None) -> tuple[list[dict], int]:
        """Drop the oldest messages (keeping a leading system message and the newest message) until the
        rendered chat leaves `reply_room(max_new_tokens)` tokens of context; the reply budget is then
        whatever is left (`fit_prompt`). Returns the kept messages and how many were dropped.

        Each message is rendered once (the chat template is a concatenation of per-message segments),
        so this is linear in the number of messages. If the newest message alone is too long, it is
        kept and `fit_prompt` keeps its most recent tokens.
        """
        budget = self.context_length - self.reply_room(max_new_tokens)
        start = 1 if messages and messages[0].get("role") == "system" else 0
        # <|bos|> + <|assistant|> around the segments; each segment is its render minus the <|bos|>
        sizes = [len(self.tokenizer.render_chat([m])[0]) - 1 for m in messages]
        total = 2 + sum(sizes)
        first = start
        while total > budget and len(messages) - first > 1:
            total -= sizes[first]
            first += 1
        return messages[:start] + messages[first:], first - start

    # --- shared by both ------------------------------------------------------------------------
    def fit_prompt(self, ids: list[int], max_new_tokens: int | None) -> tuple[list[int], int]:
        """(prompt, reply budget). The prompt comes first: it is shortened (keeping <|bos|> and its most
        recent tokens) only when it leaves less than `reply_room` tokens; the budget is what is then left
        of the context, or `max_new_tokens` if that is smaller."""
        keep = self.context_length - self.reply_room(max_new_tokens)
        if len(ids) > keep:
            ids = [ids[0], *ids[-(keep - 1):]]
        left = self.context_length - len(ids)
        return ids, left if max_new_tokens is None else min(left, max_new_tokens)

    @torch.inference_mode()
    def score(self, ids: list[int], top: int = 0) -> list[TokenScore]:
        """A TokenScore for each of ids[1:] given the tokens before it: one forward pass, the same
        log-softmax as `tinylm eval` (evaluate.masked_logprobs). len(ids) <= context_length."""
        device = self.model.tok_embeddings.weight.device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        logp = F.log_softmax(self.model(x[:, :-1])[0].float(), dim=-1)[0]  # (T - 1, V)
        return [self._token_score(row, t, top) for row, t in zip(logp, ids[1:])]

    def _token_score(self, logp: torch.Tensor, token: int, top: int = 0) -> TokenScore:
        """logp: (V,) log-probabilities at one position."""
        alternatives = []
        if top:
            values, indices = torch.topk(logp, min(top, logp.numel()))
            alternatives = [(self.token_text(int(i)), float(v)) for v, i in zip(values, indices)]
        return TokenScore(token, self.token_text(token), float(logp[token]), alternatives)

    def token_text(self, token: int) -> str:
        """One token decoded alone, special tokens included (`<|end|>`)."""
        return self.tokenizer.decode([token], skip_special=False)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """<|bos|> and the prompt's ids: text is encoded, a list of token ids is taken as it is (with
        the <|bos|> added unless it is there). ValueError for an id outside the vocabulary."""
        if isinstance(prompt, str):
            return [self.tokenizer.bos_id, *self.tokenizer.encode(check_text(prompt, "prompt"))]
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        return list(prompt) if prompt[:1] == [self.tokenizer.bos_id] else [self.tokenizer.bos_id, *prompt]

    def stream_ids(self, ids: list[int], sc: SampleConfig, usage: Usage | None = None,
                   logprobs: int | None = None) -> Iterator[str]:
        """Decode a continuation of `ids`, yielding text as soon as it is safe to show. With `logprobs`
        (0-20 alternatives) each generated token's TokenScore goes to `usage.scores`."""
        usage = usage if usage is not None else Usage()
        ids, budget = self.fit_prompt(ids, sc.max_new_tokens)
        usage.prompt_tokens = len(ids)
        return self._decode(ids, sc, budget, usage, logprobs)

    def _recorder(self, usage: Usage, top: int):
        """An `observe` for generate_ids that puts each sampled token's TokenScore in `usage.scores`."""
        def observe(logits: torch.Tensor, nxt: torch.Tensor) -> None:  # (1, V), (1,)
            usage.scores.append(self._token_score(F.log_softmax(logits[0].float(), dim=-1), int(nxt[0]), top))
        return observe

    def _decode(self, ids: list[int], sc: SampleConfig, budget: int, usage: Usage, logprobs: int | None) -> Iterator[str]:
        tok = self.tokenizer
        stop_ids = [tok.end_id, tok.eos_id]
        hold = max((len(s) for s in sc.stop), default=1) - 1
        generated: list[int] = []
        emitted = 0
        observe = None if logprobs is None else self._recorder(usage, logprobs)
        steps = generate_ids(self.model, [ids], sc, stop_ids=stop_ids, max_new_tokens=budget, observe=observe) if budget else ()
        for nxt in steps:
            token = int(nxt[0])
            usage.completion_tokens += 1
            if token in stop_ids:
                usage.finish_reason = "stop"
                if logprobs is not None:
                    usage.scores.pop()  # the end-of-turn token is not part of the text
                break
            generated.append(token)
            text = tok.decode(generated)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                continue
            cut = min((text.find(s) for s in sc.stop if s in text), default=-1)  # the first stop ends it
            if cut >= 0:
                usage.finish_reason = "stop"
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = len(text) - hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = tok.decode(generated)
        if len(text) > emitted:
            yield text[emitted:]


def load(path: str | Path, device: str = "auto") -> LanguageModel:
    """Load a checkpoint (or the newest one of a run or stage directory) for generation."""
    return LanguageModel.load(path, device)
