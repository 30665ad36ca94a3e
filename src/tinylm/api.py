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


from .checkpoint import load_checkpoint
from .config import SampleConfig
from .generate import generate_ids
from .layout import checkpoint_name
from .model import Transformer
from .tokenizer import Tokenizer
from .device import pick_device


@dataclasses.dataclass
class Usage:
    """Filled in by a stream as it runs: token counts and why it ended ("stop" or "length")."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"


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
        """The checkpoint's sampling defaults with the given (non-None) fields replaced."""
        unknown = set(overrides) - set(SampleConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown sampling options: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})

    # --- plain text continuation ---------------------------------------------------------------
    def generate(self, prompt: str, **sampling) -> str:
        return "".join(self.stream(prompt, **sampling))

    def stream(self, prompt: str, usage: Usage | None = None, **sampling) -> Iterator[str]:
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]
        return self.stream_ids(ids, self.sampling(**sampling), usage)

    # --- chat ----------------------------------------------------------------------------------
    def chat(self, messages: list[dict], **sampling) -> str:
        return "".join(self.stream_chat(messages, **sampling))

    def stream_chat(self, messages: list[dict], usage: Usage | None = None, **sampling) -> Iterator[str]:
        ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        return self.stream_ids(ids, self.sampling(**sampling), usage)

    def fit_messages(self, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], int]:
        """Drop the oldest messages (keeping a system message) until prompt and reply fit the context.

        Returns the kept messages and how many were dropped. If the newest message alone is too
        long, it is kept and `fit_prompt` keeps its most recent tokens.
        """
        dropped = 0
        while True:
            ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
            if len(ids) + max_new_tokens <= self.context_length:
                return messages, dropped
            start = 1 if messages and messages[0]["role"] == "system" else 0
            if len(messages) - start <= 1:
                return messages, dropped
            messages = messages[:start] + messages[start + 1:]
            dropped += 1

    # --- shared by both ------------------------------------------------------------------------
    def fit_prompt(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Keep <|bos|> and the most recent tokens so that the reply fits in the context."""
        room = max(2, self.context_length - max_new_tokens)
        return ids if len(ids) <= room else [ids[0], *ids[-(room - 1):]]

    def stream_ids(self, ids: list[int], sc: SampleConfig, usage: Usage | None = None) -> Iterator[str]:
        """Decode a continuation of `ids`, yielding text as soon as it is safe to show."""
        tok = self.tokenizer
        usage = usage if usage is not None else Usage()
        ids = self.fit_prompt(ids, sc.max_new_tokens)
        usage.prompt_tokens = len(ids)
        stop_ids = [tok.end_id, tok.eos_id]
        hold = max((len(s) for s in sc.stop), default=1) - 1
        generated: list[int] = []
        emitted = 0
        for nxt in generate_ids(self.model, [ids], sc, stop_ids=stop_ids):
            token = int(nxt[0])
            usage.completion_tokens += 1
            if token in stop_ids:
                usage.finish_reason = "stop"
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
