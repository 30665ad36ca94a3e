"""Export to Hugging Face `transformers` (a LlamaForCausalLM directory that loads with no custom code)
and to GGUF (llama.cpp, Ollama).

The model's layout and rotary convention are Llama's, so export is a renaming of weights plus a
config.json; the tokenizer files hold the chat template and add <|bos|> to plain text, as tinylm
does. GGUF follows llama.cpp's convert_hf_to_gguf.py: rotary rows reordered to adjacent pairs,
the tokenizer described the way src/llama-vocab.cpp reads it (docs/export.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import find_checkpoint, load_checkpoint
from .files import atomic_dir, write_json, write_text
from .layout import checkpoint_name
from .model import Transformer
from .tokenizer import Tokenizer

OUR_TO_HF = {  # per-layer names; the rest are mapped in llama_state_dict
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj", "ffn.w2": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def llama_config(model: Transformer, tok: Tokenizer | None = None) -> dict:
    c = model.cfg
    special = ({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
               if tok else {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0})
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base, "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": c.attention_dropout, "initializer_range": c.init_std,
        "torch_dtype": "float32", **special,
    }


def llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        for ours, theirs in OUR_TO_HF.items():
            out[f"model.layers.{i}.{theirs}.weight"] = layer.get_submodule(ours).weight
    return {k: v.detach().contiguous() for k, v in out.items()}


def to_transformers(model: Transformer, tok: Tokenizer | None = None):
    """The same weights as an in-memory `transformers.LlamaForCausalLM` (eval mode, same device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**llama_config(model, tok))
    hf = LlamaForCausalLM(cfg).to(model.tok_embeddings.weight.device)
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weight names do not line up: missing {missing}, unexpected {unexpected}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face model directory from a checkpoint; returns it."""
    ckpt = find_checkpoint(checkpoint)
    model, tok, meta = load_checkpoint(ckpt)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, "hf-export", inputs=(ckpt,), legacy=("config.json", "model.safetensors")) as tmp:
        write_json(tmp / "config.json", llama_config(model, tok))
        save_file(llama_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "generation_config.json", {
            "bos_token_id": tok.bos_id, "eos_token_id": [tok.eos_id, tok.end_id], "pad_token_id": tok.pad_id,
            "do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1})
        tok.save_for_transformers(tmp, model_max_length=model.cfg.max_seq_len)
        write_text(tmp / "README.md", model_card(model, meta, ckpt))
    return out_dir


def model_card(model: Transformer, meta: dict, ckpt: Path) -> str:
    c, trainer = model.cfg, meta.get("trainer", {})
    corpus = meta.get("config", {}).get("data", {}).get("corpus", [])
    return f"""---
library_name: transformers
pipeline_tag: text-generation
license: other
---
# {checkpoint_name(ckpt)}

A small LLaMA-style language model trained from scratch with [tinylm](https://pypi.org/project/tinylm/).

| | |
|---|---|
| parameters | {model.num_params():,} |
| layers / width / heads (kv) | {c.n_layers} / {c.dim} / {c.n_heads} ({c.kv_heads}) |
| context | {c.max_seq_len} tokens |
| vocabulary | {c.vocab_size} |
| training stage | {trainer.get("stage", "?")}, {trainer.get("step", "?")} steps, {trainer.get("tokens", 0):,} tokens |
| training data | {", ".join(map(str, corpus)) or "?"} |

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{ckpt.name}")
model = AutoModelForCausalLM.from_pretrained("{ckpt.name}")
# sanitize_control_tokens: special-token strings typed in content stay text, as in training
ids = tok.apply_chat_template([{{"role": "user", "content": "Hi!"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True, sanitize_control_tokens=True)
print(tok.decode(model.generate(**ids, max_new_tokens=40)[0]))
```

The licence is that of the training data; check it before sharing the weights.
"""


# --- GGUF (llama.cpp, Ollama) ----------------------------------------------------------------------
GGUF_LAYER_NAMES = {  # our per-layer module -> llama.cpp tensor name
    "attn_norm": "attn_norm", "attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v", "attn.wo": "attn_output",
    "ffn_norm": "ffn_norm", "ffn.w1": "ffn_gate", "ffn.w3": "ffn_up", "ffn.w2": "ffn_down",
}

MODELFILE = '''FROM ./model.gguf
TEMPLATE """{{ if .System }}<|system|>{{ .System }}<|end|>{{ end }}{{ if .Prompt }}<|user|>{{ .Prompt }}<|end|>{{ end }}<|assistant|>{{ .Response }}<|end|>"""
PARAMETER stop "<|end|>"
PARAMETER temperature 0.8
PARAMETER top_k 50
PARAMETER top_p 0.95
PARAMETER repeat_penalty 1.1
'''


def rope_halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from rotate-half order (HF, ours) to adjacent pairs (llama.cpp's llama).

    Row i of the first half and row i of the second half of a head become rows 2i and 2i+1.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


GGUF_TYPES = ("f32", "f16", "q8_0")  # --gguf-type: llama.cpp's convert_hf_to_gguf.py --outtype names


def gguf_pre_tokenizer(tok: Tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer: the one whose split matches ours.

    tinylm trains with tokenizers' `ByteLevel(add_prefix_space=False, use_regex=True)`, whose regex
    is GPT-2's (`'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`);
    llama.cpp's name for that split is "gpt-2" (LLAMA_VOCAB_PRE_TYPE_GPT2 in src/llama-vocab.cpp).
    "default" would split differently (digits in threes, punctuation apart). Raises ValueError for
    any other pre-tokenizer rather than guess.
    """
    pre = json.loads(tok.backend.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    raise ValueError(f"no llama.cpp pre-tokenizer is known to match {pre} (tinylm's byte-level BPE uses GPT-2's)")


def add_gguf_tokenizer(w, tok: Tokenizer, chat_template: str) -> None:
    """Vocabulary, merges or scores, token types, special ids and chat template, as llama.cpp reads them.

    Byte-level BPE -> `tokenizer.ggml.model = "gpt2"` with the "gpt-2" pre-tokenizer; SentencePiece
    BPE -> "llama" (llama.cpp's SPM: pieces merged by score, a space prefix, byte fallback), with
    score = -id for ordinary pieces, the merge priority tinylm's converted BPE uses. Every special
    token is CONTROL, so llama.cpp reads typed "<|end|>" as text unless asked to parse specials.
    `<|eos|>` is the end-of-sequence token and `<|end|>` the end-of-turn one: llama.cpp stops on both
    (its end-of-generation set is eos + eot + eom).
    """
    import gguf

    vocab = sorted(tok.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    if [i for _, i in vocab] != list(range(len(vocab))):
        raise ValueError("GGUF needs token ids 0..n-1 without gaps")
    types = []
    for token, i in vocab:
        if i in tok.special_ids:
            types.append(gguf.TokenType.CONTROL)
        elif tok.kind == "sentencepiece" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    if tok.kind == "sentencepiece":
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")  # llama.cpp reads a pre-tokenizer for BPE vocabularies only
        w.add_token_scores([0.0 if t != gguf.TokenType.NORMAL else -float(i) for (_, i), t in zip(vocab, types)])
        w.add_add_space_prefix(True)  # trained with add_dummy_prefix: Prepend("▁") in tokenizer.json
        w.add_remove_extra_whitespaces(False)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(gguf_pre_tokenizer(tok))
        merges = json.loads(tok.backend.to_str())["model"]["merges"]
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_token_list([token for token, _ in vocab])
    w.add_token_types(types)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)  # ends a document, as in pretraining
    w.add_eot_token_id(tok.end_id)  # ends a chat turn
    w.add_pad_token_id(tok.pad_id)
    w.add_unk_token_id(tok.unk_id)
    w.add_add_bos_token(True)  # tinylm trains and scores every text after <|bos|>
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template)


def gguf_tensor(t: torch.Tensor, gguf_type: str):
    """A weight as GGUF data and its GGML type, the way llama.cpp's convert_hf_to_gguf.py chooses.

    1-D tensors (norms) stay F32; matrices become F16 or Q8_0 (blocks of 32 values sharing one
    fp16 scale); a matrix whose rows do not split into whole blocks falls back to F16, as there.
    """
    import gguf
    import numpy as np

    data = t.detach().float().contiguous().numpy().astype(np.float32)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    if data.ndim <= 1 or qtype == gguf.GGMLQuantizationType.F32:
        return data, gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def export_gguf(checkpoint: str | Path, out_dir: str | Path, gguf_type: str = "f32") -> Path:
    """out_dir/model.gguf and an example Ollama Modelfile; returns out_dir.

    gguf_type: "f32" (exact), "f16" or "q8_0" (about 1/4 of the f32 size; see gguf_tensor).
    Raises ValueError for another type or a tokenizer llama.cpp cannot reproduce.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    ckpt = find_checkpoint(checkpoint)
    model, tok, _ = load_checkpoint(ckpt)
    c = model.cfg
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, "gguf-export", inputs=(ckpt,), legacy=("model.gguf",)) as tmp:
        w = gguf.GGUFWriter(tmp / "model.gguf", arch="llama")
        w.add_name(checkpoint_name(ckpt).replace("/", "-"))
        w.add_context_length(c.max_seq_len)
        w.add_embedding_length(c.dim)
        w.add_block_count(c.n_layers)
        w.add_feed_forward_length(c.hidden_dim)
        w.add_head_count(c.n_heads)
        w.add_head_count_kv(c.kv_heads)
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_freq_base(c.rope_base)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        add_gguf_tokenizer(w, tok, json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"])

        def add(name: str, t: torch.Tensor) -> None:
            data, qtype = gguf_tensor(t, gguf_type)
            w.add_tensor(name, data, raw_dtype=qtype)

        add("token_embd.weight", model.tok_embeddings.weight)
        add("output_norm.weight", model.norm.weight)
        if not c.tie_embeddings:
            add("output.weight", model.output.weight)
        for i, layer in enumerate(model.layers):
            for ours, theirs in GGUF_LAYER_NAMES.items():
                weight = layer.get_submodule(ours).weight
                if ours == "attn.wq":
                    weight = rope_halves_to_pairs(weight, c.n_heads)
                elif ours == "attn.wk":
                    weight = rope_halves_to_pairs(weight, c.kv_heads)
                add(f"blk.{i}.{theirs}.weight", weight)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        write_text(tmp / "Modelfile", MODELFILE)
    return out_dir
