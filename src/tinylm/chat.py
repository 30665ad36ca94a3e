"""Terminal chat: multi-turn history through the chat template, streamed replies, slash commands."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .api import load
from .config import Config, ConfigError, set_value
from .files import write_json

HELP = """commands:
  /reset              forget the conversation
  /set FIELD VALUE    change a sampling setting, e.g. /set temperature 0.5 (fields: {fields})
  /settings           show the sampling settings
  /help               this text
  /quit               leave (Ctrl-D works too)"""


def chat_loop(checkpoint: str, cfg: Config, device: str = "auto", system: str = "", out_dir: str | None = None,
              input_fn=input, print_fn=print) -> int:
    lm = load(checkpoint, device)
    sample = dataclasses.replace(cfg.sample)
    fields = [f for f in sample.__dataclass_fields__ if f not in ("prompts",)]
    print_fn(f"{lm.name}: {lm.num_params:,} parameters, context {lm.context_length} tokens. /help for commands.")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    transcript: list[dict] = []
    while True:
        try:
            line = input_fn("you> ").strip()
        except EOFError:
            print_fn("")
            break
        if not line:
            continue
        if line.startswith("/"):
            cmd, *rest = line.split(maxsplit=2)
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                history = history[:1] if system else []
                print_fn("(history cleared)")
            elif cmd == "/settings":
                print_fn(", ".join(f"{f}={getattr(sample, f)}" for f in fields))
            elif cmd == "/set" and len(rest) == 2:
                holder = Config(sample=sample)
                try:
                    set_value(holder, f"sample.{rest[0]}", rest[1], "/set")
                    print_fn(f"({rest[0]} = {getattr(sample, rest[0])})")
                except ConfigError as e:
                    print_fn(f"({e})")
            else:
                print_fn(HELP.format(fields=", ".join(fields)))
            continue
        history.append({"role": "user", "content": line})
        history, dropped = lm.fit_messages(history, sample.max_new_tokens)
        if dropped:
            print_fn(f"(the conversation outgrew the {lm.context_length}-token context: dropped the {dropped} oldest message(s))")
        print_fn("bot> ", end="", flush=True)
        pieces = []
        settings = {f: getattr(sample, f) for f in fields}
        for piece in lm.stream_chat(history, **settings):
            pieces.append(piece)
            print_fn(piece, end="", flush=True)
        print_fn("")
        reply = "".join(pieces).strip()
        history.append({"role": "assistant", "content": reply})
        transcript += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
    if out_dir:
        write_json(Path(out_dir) / "transcript.json", {"checkpoint": lm.meta.get("path"), "messages": transcript})
    return 0
