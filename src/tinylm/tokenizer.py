"""Tokenizer: training, special tokens, the chat format, and files `transformers` can load.

Two trainers, one runtime: byte-level BPE is trained with Hugging Face `tokenizers`; SentencePiece
BPE is trained with `sentencepiece` and converted. Either way the result is a `tokenizer.json`
plus a `tokenizer_config.json` holding the chat template, so `AutoTokenizer.from_pretrained(dir)`
works and `apply_chat_template` gives exactly the ids of `Tokenizer.render_chat` (with
`sanitize_control_tokens=True` when content may hold special-token strings: docs/export.md).

Chat format (one line, no hidden whitespace):
    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from .config import TokenizerConfig
from .files import atomic_dir, write_json

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|bos|>", "<|eos|>"
END = "<|end|>"  # end of a chat turn
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, *ROLE_TOKENS.values(), END]  # ids 0..7 in this order

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class Tokenizer:
    """Text <-> ids, special tokens and the chat format. Wraps a `tokenizers.Tokenizer`."""

    def __init__(self, backend: HFTokenizer, kind: str = "bpe", sp_model: bytes | None = None):
        self.backend = backend
        # text is text: "<|assistant|>" typed by a user is encoded as characters, never as the role
        # token (a runtime flag, not saved: transformers still reads special tokens in its templates)
        self.backend.encode_special_tokens = True
        self.kind = kind
        self.sp_model = sp_model  # the original SentencePiece model, kept beside tokenizer.json
        ids = {tok: backend.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids[PAD], ids[UNK], ids[BOS], ids[EOS]
        self.end_id = ids[END]
        self.role_ids = {role: ids[tok] for role, tok in ROLE_TOKENS.items()}
        self.special_ids = set(ids.values())

    # --- text ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_document(self, text: str) -> list[int]:
        """A pretraining document: <|bos|> text <|eos|>."""
        return [self.bos_id, *self.encode(text), self.eos_id]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token(self, i: int) -> str:
        return self.backend.id_to_token(i)

    # --- chat -----------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a mask marking the tokens to train on.

        mask[i] == 1 for every token of an assistant message and the <|end|> closing it: the
        tokens the model must learn to produce. Everything else (prompt, roles) is 0.
        """
        ids, mask = [self.bos_id], [0]
        for n, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in self.role_ids:
                raise ValueError(f"message {n}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(content, str):
                raise ValueError(f"message {n}: 'content' must be a string, got {type(content).__name__}")
            body = [*self.encode(content), self.end_id]
            ids += [self.role_ids[role], *body]
            mask += [0, *([1 if role == "assistant" else 0] * len(body))]
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask

    # --- files ----------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, model_max_length: int = 2048, extra_meta: dict | None = None) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and meta.json atomically."""
        with atomic_dir(out_dir, "tokenizer", legacy=("tokenizer.json",)) as tmp:
            self.backend.save(str(tmp / "tokenizer.json"))
            if self.sp_model:
                (tmp / "sentencepiece.model").write_bytes(self.sp_model)
            self._write_transformers_config(tmp, model_max_length, add_bos=False)
            meta = {"kind": self.kind, "vocab_size": self.vocab_size, "special_tokens": SPECIAL_TOKENS,
                    "fingerprint": fingerprint_file(tmp / "tokenizer.json"), **(extra_meta or {})}
            write_json(tmp / "meta.json", meta)

    def save_for_transformers(self, out_dir: str | Path, model_max_length: int = 2048) -> None:
        """The tokenizer files of a Hugging Face export, into an existing folder.

        Unlike `save`, plain text gets <|bos|> in front, as tinylm trains and scores it:
        `AutoTokenizer.from_pretrained(out_dir)(text).input_ids == [bos_id, *encode(text)]`
        (a TemplateProcessing post-processor, and `add_bos_token: true` for transformers).
        Special tokens typed in text are still matched by a plain `tokenizer(text)` call, as
        transformers does for every model: pass `split_special_tokens=True` to read them as text,
        and `apply_chat_template(..., sanitize_control_tokens=True)` for chats (docs/export.md).
        """
        backend = HFTokenizer.from_str(self.backend.to_str())
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, self.bos_id)])
        backend.save(str(Path(out_dir) / "tokenizer.json"))
        self._write_transformers_config(Path(out_dir), model_max_length, add_bos=True)

    def _write_transformers_config(self, out_dir: Path, model_max_length: int, add_bos: bool) -> None:
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
        write_json(out_dir / "special_tokens_map.json", special)
        write_json(out_dir / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "additional_special_tokens": [*ROLE_TOKENS.values(), END],
            # the template builds role tokens from pieces ('<|' + role + '|>'), so transformers'
            # sanitize_control_tokens needs them listed (it would infer them from literals otherwise)
            "chat_control_tokens": SPECIAL_TOKENS,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": add_bos,
            "add_eos_token": False,
        })

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        backend = HFTokenizer.from_file(str(file))
        if any(backend.token_to_id(t) is None for t in SPECIAL_TOKENS):  # an imported model's own tokenizer
            from .chat_template import TemplateTokenizer

            return TemplateTokenizer.from_dir(file.parent)
        meta = file.parent / "meta.json"  # a checkpoint's meta.json has no "kind": the model tells it
        kind = json.loads(meta.read_text()).get("kind") if meta.is_file() else None
        return cls(backend, kind or infer_kind(backend))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]


def infer_kind(backend: HFTokenizer) -> str:
    """"sentencepiece" for a converted SentencePiece model (BPE with byte fallback), else "bpe"."""
    return "sentencepiece" if json.loads(backend.to_str())["model"].get("byte_fallback") else "bpe"


def fingerprint_file(path: Path) -> str:
    """The fingerprint checkpoints record: a hash of the tokenizer's canonical JSON."""
    return hashlib.sha256(HFTokenizer.from_file(str(path)).to_str().encode()).hexdigest()[:16]


# --- training ------------------------------------------------------------------------------------
def _limited(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        text = text[: max_chars - total]
        total += len(text)
        yield text


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig, show_progress: bool = False) -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(_limited(texts, cfg.max_train_chars), trainer)
    return Tokenizer(backend, "bpe")


def train_sentencepiece(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train SentencePiece BPE (byte fallback, no normalisation) and convert it to tokenizers' format."""
    import sentencepiece as spm

    model = io.BytesIO()
    lines = (line for text in _limited(texts, cfg.max_train_chars) for line in text.splitlines() if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model,
        model_type="bpe",
        vocab_size=cfg.vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        user_defined_symbols=[*ROLE_TOKENS.values(), END],
        max_sentence_length=1 << 16,
        train_extremely_large_corpus=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return Tokenizer(sentencepiece_to_tokenizers(sp), "sentencepiece", model.getvalue())


def sentencepiece_to_tokenizers(sp) -> HFTokenizer:
    """Rebuild a SentencePiece BPE model as a `tokenizers` BPE with byte fallback.

    SentencePiece stores pieces ranked by score, not merges; a merge (left, right) exists for
    every split of a piece into two known pieces, ranked by the piece it makes.
    """
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, rank in vocab.items():
        if sp.is_control(rank) or sp.is_unknown(rank) or sp.is_byte(rank) or piece in SPECIAL_TOKENS:
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(rank, vocab[a], vocab[b], a, b) for a, b in splits]
    merges.sort()
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges],
                                     unk_token=UNK, byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    backend.add_special_tokens(SPECIAL_TOKENS)
    return backend


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, show_progress: bool = False) -> Tokenizer:
    if cfg.vocab_size < 300 and cfg.kind == "bpe":
        raise ValueError(f"tokenizer.vocab_size={cfg.vocab_size} is too small: byte-level BPE needs 256 bytes + specials")
    if cfg.kind == "sentencepiece":
        return train_sentencepiece(texts, cfg)
    return train_bpe(texts, cfg, show_progress)


def bytes_per_token(tok: Tokenizer, texts: Iterable[str]) -> dict:
    """Compression on held-out text: UTF-8 bytes per token (higher is better)."""
    n_bytes = n_tokens = n_docs = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tok.encode(text))
        n_docs += 1
    return {"docs": n_docs, "bytes": n_bytes, "tokens": n_tokens,
            "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else None}
