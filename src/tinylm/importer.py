"""Import a Hugging Face `LlamaForCausalLM` folder as a tinylm checkpoint: the reverse of export.py.

    tinylm import path/to/hf-model --out runs/imported

The weights are renamed with export.py's table read backwards and stored in fp32; the model's own
tokenizer and chat template are kept (chat_template.py). What tinylm's model cannot represent
(biases, another activation, rotary scaling, a head size other than width / heads) is refused
with the config field named, never approximated. The result is a checkpoint like any other: `sft`,
`generate`, `chat`, `serve`, `eval` and `export` take it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from .checkpoint import TOKENIZER_FILES, save_checkpoint
from .config import Config, ModelConfig
from .export import OUR_TO_HF
from .files import claimed_folder, output_lock, write_json
from .model import Transformer
from .tokenizer import SPECIAL_TOKENS, Tokenizer, infer_kind

LLAMA_TYPES = ("llama",)


class ImportRefused(ValueError):
    """A model whose config names something tinylm's model does not have."""


def _refuse(field: str, value, why: str):
    raise ImportRefused(f"config.json: {field} = {value!r}: {why}; tinylm cannot represent this model")


def rope_theta(hf: dict) -> float:
    """The rotary base, refusing every scaling but none (transformers 4 `rope_scaling`, 5 `rope_parameters`)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for field, spec in (("rope_scaling", scaling), ("rope_parameters", params)):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            _refuse(f"{field}.rope_type", kind, "tinylm's rotary embeddings have one base (model.rope_base) and no "
                    "scaling (linear, dynamic, yarn, llama3 and longrope are not implemented)")
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def model_config(hf: dict, context: int | None = None) -> ModelConfig:
    """tinylm's ModelConfig for a Hugging Face Llama config.json, or ImportRefused naming the field."""
    kind = hf.get("model_type")
    if kind not in LLAMA_TYPES:
        _refuse("model_type", kind, "only the Llama architecture (LlamaForCausalLM) is imported")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "tinylm's feed-forward is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            _refuse(field, hf[field], "tinylm's projections have no bias")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // heads):
        _refuse("head_dim", hf["head_dim"], f"tinylm's head size is model.dim / model.n_heads = {dim // heads}")
    cfg = ModelConfig(
        dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
        max_seq_len=context or hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
        rope_base=rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)), dropout=0.0, attention_dropout=float(hf.get("attention_dropout", 0.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=float(hf.get("initializer_range", 0.02)))
    cfg.validate()
    return cfg


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors (or index); only safetensors weights are imported "
                                "(re-save a .bin model with save_pretrained(..., safe_serialization=True))")
    weights = {}
    for name in files:
        weights.update(load_file(hf_dir / name))
    return weights


def tinylm_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face names to ours (export.llama_state_dict backwards); fp32. Leftover tensors are an error."""
    weights = dict(weights)
    take = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        take["output.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        for ours, theirs in OUR_TO_HF.items():
            take[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    missing = [theirs for theirs in take.values() if theirs not in weights]
    if missing:
        raise ImportRefused(f"weights missing: {', '.join(missing[:5])}" + (" (config.json says "
                            "tie_word_embeddings = false)" if "lm_head.weight" in missing else ""))
    state = {ours: weights.pop(theirs).float() for ours, theirs in take.items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)  # a tied head saved anyway is the embedding again
        state["output.weight"] = state["tok_embeddings.weight"]
    leftover = [k for k in weights if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ImportRefused(f"weights tinylm's model has no place for: {', '.join(leftover[:5])}")
    return state


def stage_tokenizer(hf_dir: Path, into: Path) -> Path:
    """The tokenizer files a checkpoint holds, with the chat template inside tokenizer_config.json,
    written under `into`; returns their folder."""
    if not (hf_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no tokenizer.json (a fast tokenizer is needed; "
                                "AutoTokenizer.from_pretrained(...).save_pretrained(...) writes one)")
    backend = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    if all(backend.token_to_id(t) is not None for t in SPECIAL_TOKENS):  # tinylm's own, as `tinylm export` wrote it
        plain = json.loads(backend.to_str())
        plain["post_processor"] = None  # the <|bos|> the export adds for transformers' plain calls; tinylm adds its own
        Tokenizer(HFTokenizer.from_str(json.dumps(plain)), infer_kind(backend)).save(into / "tinylm")
        return into / "tinylm"
    config_file = hf_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    template_file = hf_dir / "chat_template.jinja"  # where transformers 5 keeps it
    if "chat_template" not in config and template_file.is_file():
        config["chat_template"] = template_file.read_text(encoding="utf-8")
    special_file = hf_dir / "special_tokens_map.json"
    special = json.loads(special_file.read_text(encoding="utf-8")) if special_file.is_file() else {
        k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
    shutil.copy2(hf_dir / "tokenizer.json", into / "tokenizer.json")
    write_json(into / "tokenizer_config.json", config)
    write_json(into / "special_tokens_map.json", special)
    assert set(TOKENIZER_FILES) <= {p.name for p in into.iterdir()}
    return into


def import_hf(hf_dir: str | Path, out_dir: str | Path, context: int | None = None) -> Path:
    """Write out_dir/checkpoints/step-0000000 from a Hugging Face Llama folder; returns the checkpoint."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    cfg = Config(model=model_config(hf, context))
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        staging = stage_tokenizer(hf_dir, staging)
        tok = Tokenizer.load(staging)  # a foreign one is checked here: eos, chat template
        if tok.vocab_size > cfg.model.vocab_size:
            _refuse("vocab_size", cfg.model.vocab_size, f"the tokenizer has {tok.vocab_size} tokens")
        model = Transformer(cfg.model)
        model.load_state_dict(tinylm_state_dict(read_weights(hf_dir), cfg.model), strict=True)
        with output_lock(out_dir), claimed_folder(out_dir, "import", inputs=(hf_dir,), legacy=("checkpoints",)):
            trainer = {"step": 0, "tokens": 0, "stage": "import", "source": str(hf_dir.resolve())}
            return save_checkpoint(out_dir, model, cfg, staging, trainer, keep_last=1)
