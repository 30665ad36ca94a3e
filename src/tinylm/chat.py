"""Terminal chat: multi-turn history through the chat template, streamed replies, slash commands."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .api import load
from .config import Config, ConfigError, SampleConfig, set_value
from .files import write_json

HELP = """commands:
  /reset              forget the conversation
  /set FIELD VALUE    change a sampling setting, e.g. /set temperature 0.5 (fields: {fields})
  /settings           show the sampling settings
  /help               this text
  /quit               leave (Ctrl-D works too; Ctrl-C stops a reply)"""


def chat_loop(checkpoint: str, cfg: Config, device: str = "auto", system: str = "", out_dir: str | None = None,
              input_fn=input, print_fn=print) -> int:
    lm = load(checkpoint, device)
    sample = dataclasses.replace(cfg.sample)
    fields = [f for f in sample.__dataclass_fields__ if f not in ("prompts",)]
    print_fn(f"{lm.name}: {lm.num_params:,} parameters, context {lm.context_length} tokens. /help for commands.")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    transcript: list[dict] = []
    try:
        while True:
            try:
                line = input_fn("you> ").strip()
            except EOFError:
                print_fn("")
                break
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line being typed, as Ollama does
                print_fn("\n(Ctrl-D or /quit to leave)")
                continue
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
                    sample = _set(sample, rest[0], rest[1], print_fn)
                else:
                    print_fn(HELP.format(fields=", ".join(fields)))
                continue
            history.append({"role": "user", "content": line})
            history, dropped = lm.fit_messages(history, sample.max_new_tokens)
            if dropped:
                print_fn(f"(the conversation outgrew the {lm.context_length}-token context: dropped the {dropped} oldest message(s))")
            reply = _reply(lm, history, {f: getattr(sample, f) for f in fields}, print_fn)
            history.append({"role": "assistant", "content": reply})
            transcript += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
    finally:  # the transcript survives whatever ends the chat
        if out_dir:
            write_json(Path(out_dir) / "transcript.json", {"checkpoint": lm.meta.get("path"), "messages": transcript})
    return 0


def _set(sample: SampleConfig, name: str, value: str, print_fn) -> SampleConfig:
    """`sample` with one field changed, or unchanged (and why) when the value is refused."""
    holder = Config(sample=dataclasses.replace(sample))
    try:
        set_value(holder, f"sample.{name}", value, "/set")
        holder.sample.check()
    except ConfigError as e:
        print_fn(f"({e})")
        return sample
    print_fn(f"({name} = {getattr(holder.sample, name)})")
    return holder.sample


def _reply(lm, history: list[dict], settings: dict, print_fn) -> str:
    """Stream one reply to the terminal. Ctrl-C stops it (as in llama.cpp and Ollama): what was said so
    far is kept as the reply and the chat goes back to the prompt."""
    print_fn("bot> ", end="", flush=True)
    pieces = []
    stream = lm.stream_chat(history, **settings)
    try:
        for piece in stream:
            pieces.append(piece)
            print_fn(piece, end="", flush=True)
    except KeyboardInterrupt:
        print_fn(" [stopped]", end="")
    finally:
        stream.close()
    print_fn("")
    return "".join(pieces).strip()
