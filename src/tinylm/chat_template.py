"""A tokenizer that is not tinylm's own: an imported model's, with its special tokens and chat template.

tinylm's tokenizer (tokenizer.py) has `<|user|>`-style role tokens and renders chats itself. A
Hugging Face model brings a `tokenizer.json` and a `tokenizer_config.json` whose Jinja `chat_template`
is the chat format the model was trained with. `TemplateTokenizer` keeps both and offers the same
interface: `render_chat(messages) -> (ids, mask)`, with mask 1 on the tokens of every assistant
message, so SFT, chat and serving work unchanged.

How the mask is found (any template, no `{% generation %}` markers needed): the conversation is
rendered once as text; for each assistant message i, the text of `messages[:i]` with the generation
prompt and the text of `messages[:i + 1]` are rendered too, and must both be prefixes of the whole
text. The characters between those two ends are that reply (its content and whatever the template
closes it with, e.g. `<|im_end|>` or `<|eot_id|>`, which the model must learn to produce); the text is
tokenized once and a token is masked 1 when it starts inside a reply. A template that rewrites
earlier turns when later ones follow has no such prefixes and is refused with a message.

As in `transformers`, the rendered text is tokenized with special tokens parsed, so a message that
contains the text of one (`<|im_end|>`) becomes that token; `encode` (prompts, documents) never parses them.
"""

from __future__ import annotations

import bisect
import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .files import write_json
from .tokenizer import Tokenizer


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _compile(template: str):
    """The template in a sandboxed Jinja environment set up as `transformers` sets it up."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class TemplateTokenizer(Tokenizer):
    """An imported tokenizer: its own bos/eos/pad tokens and chat template (see the module docstring).

    `end_id` (the end of a turn, where a reply stops) is the first special token the template puts
    after an assistant message's content, or eos when it puts none.
    """

    def __init__(self, backend: HFTokenizer, config: dict):
        self.backend = backend
        self.backend.encode_special_tokens = True  # text is text, as in tinylm's own tokenizer
        self.kind, self.sp_model, self.config = "hf", None, config
        self.template = config.get("chat_template")
        if isinstance(self.template, list):  # several named templates: take the default one
            self.template = next((t["template"] for t in self.template if t.get("name") == "default"), None)
        if not isinstance(self.template, str):
            raise ValueError("the tokenizer has no chat template (tokenizer_config.json: chat_template), "
                             "so conversations cannot be rendered for SFT or chat")
        self.tokens = {k: _token_text(config.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}
        ids = {k: (backend.token_to_id(t) if t else None) for k, t in self.tokens.items()}
        if ids["eos"] is None:
            raise ValueError(f"the tokenizer's eos_token {self.tokens['eos']!r} is not in its vocabulary")
        self.eos_id = ids["eos"]
        self.bos_id = ids["bos"] if ids["bos"] is not None else self.eos_id  # a document separator, as eos
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id  # padding carries no loss anyway
        self.unk_id = ids["unk"]
        self.role_ids = {}
        self.special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._compiled = _compile(self.template)
        self.end_id = self._turn_end()

    @classmethod
    def from_dir(cls, path: Path) -> "TemplateTokenizer":
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        special_map = path / "special_tokens_map.json"
        if special_map.is_file():  # some models name their special tokens only here
            for key, value in json.loads(special_map.read_text(encoding="utf-8")).items():
                config.setdefault(key, value)
        return cls(HFTokenizer.from_file(str(path / "tokenizer.json")), config)

    def save_for_transformers(self, out_dir: str | Path, model_max_length: int = 2048) -> None:
        """The model's own tokenizer files, as they were imported (export.py writes them into an export)."""
        self.backend.save(str(Path(out_dir) / "tokenizer.json"))
        write_json(Path(out_dir) / "tokenizer_config.json", self.config)
        write_json(Path(out_dir) / "special_tokens_map.json", {f"{k}_token": v for k, v in self.tokens.items() if v})

    # --- chat -----------------------------------------------------------------------------------
    def render_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.tokens["bos"] or "", eos_token=self.tokens["eos"] or "",
                                     pad_token=self.tokens["pad"] or "", unk_token=self.tokens["unk"] or "")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        for n, m in enumerate(messages):
            if not isinstance(m.get("content"), str):
                raise ValueError(f"message {n}: 'content' must be a string, got {type(m.get('content')).__name__}")
        text = self.render_text(messages, add_generation_prompt)
        spans = [self._reply_span(messages, i, text) for i, m in enumerate(messages) if m["role"] == "assistant"]
        self.backend.encode_special_tokens = False  # the template's own special tokens are tokens
        try:
            encoding = self.backend.encode(text, add_special_tokens=False)  # the template adds bos if it wants it
        finally:
            self.backend.encode_special_tokens = True
        starts = [a for a, _ in spans]
        mask = []
        for start, _ in encoding.offsets:
            k = bisect.bisect_right(starts, start) - 1
            mask.append(int(k >= 0 and start < spans[k][1]))
        return list(encoding.ids), mask

    def _reply_span(self, messages: list[dict], i: int, text: str) -> tuple[int, int]:
        """Character span of assistant message i in `text`, the rendering of the whole conversation."""
        before = self.render_text(messages[:i], add_generation_prompt=True)
        through = self.render_text(messages[:i + 1])
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation, "
                             "so the assistant tokens cannot be located for the loss mask")
        return len(before), len(through)

    def _turn_end(self) -> int:
        """The token the template closes an assistant message with (eos if none is special)."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        try:
            ids, mask = self.render_chat(probe)
        except Exception:  # noqa: BLE001 - a template that needs more (tools, dates) still chats with eos
            return self.eos_id
        reply = [t for t, m in zip(ids, mask) if m]
        return next((t for t in reply if t in self.special_ids), self.eos_id)
