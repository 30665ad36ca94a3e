"""Export to Hugging Face `transformers`: a LlamaForCausalLM directory that loads with no custom code.

The model's layout and rotary convention are Llama's, so export is a renaming of weights plus a
config.json. The tokenizer files (with the chat template) are copied from the checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import TOKENIZER_FILES, find_checkpoint, load_checkpoint
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
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": c.init_std,
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
        for name in TOKENIZER_FILES:
            shutil.copy2(ckpt / name, tmp / name)
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
ids = tok.apply_chat_template([{{"role": "user", "content": "Hi!"}}], add_generation_prompt=True, return_tensors="pt")
print(tok.decode(model.generate(ids, max_new_tokens=40)[0]))
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


def export_gguf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """out_dir/model.gguf (fp32) and an example Ollama Modelfile; byte-level BPE tokenizers only."""
    import gguf
    import numpy as np

    ckpt = find_checkpoint(checkpoint)
    model, tok, _ = load_checkpoint(ckpt)
    if tok.kind != "bpe":
        raise ValueError(f"{ckpt}: GGUF export supports byte-level BPE tokenizers; this one is {tok.kind} "
                         "(export --format hf works for every tokenizer)")
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
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        vocab = sorted(tok.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list([token for token, _ in vocab])
        w.add_token_types([gguf.TokenType.CONTROL if i in tok.special_ids else gguf.TokenType.NORMAL for _, i in vocab])
        merges = json.loads(tok.backend.to_str())["model"]["merges"]
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.end_id)  # a chat turn ends with <|end|>
        w.add_pad_token_id(tok.pad_id)
        w.add_unk_token_id(tok.unk_id)
        w.add_add_bos_token(True)
        w.add_chat_template(json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"])

        def add(name: str, t: torch.Tensor) -> None:
            w.add_tensor(name, t.detach().float().contiguous().numpy().astype(np.float32))

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
