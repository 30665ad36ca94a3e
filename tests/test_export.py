"""Export to transformers: same logits, same greedy tokens, same chat-template ids, no custom code."""

import json

import numpy as np
import pytest
import torch

from tinylm.checkpoint import load_checkpoint
from tinylm.config import SampleConfig
from tinylm.export import to_transformers
from tinylm.generate import generate_ids
from tinylm.pipeline import pretrain

from conftest import tiny_config


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    # untied head and GQA: both mappings are exercised
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 15, "model.tie_embeddings": False,
                                                         "model.n_heads": 4, "model.n_kv_heads": 2})
    return pretrain(cfg, prepared["shards"], tmp_path_factory.mktemp("export"))["checkpoint"]


def test_transformers_model_gives_our_logits_and_greedy_tokens(checkpoint):
    model, tok, _ = load_checkpoint(checkpoint)
    model.eval()
    hf = to_transformers(model, tok)
    ids = torch.tensor([tok.encode("Once upon a time, a little cat") + [tok.eos_id]])
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    prompt = ids[0, :6].tolist()
    greedy = SampleConfig(temperature=0.0, repetition_penalty=1.0, max_new_tokens=20)
    our_tokens = torch.stack(list(generate_ids(model, [prompt], greedy)), dim=1)[0].tolist()
    their_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                               pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert our_tokens == their_tokens


def test_exported_directory_loads_with_auto_classes(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinylm.cli import main

    assert main(["export", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
    hf_tok = AutoTokenizer.from_pretrained(out)
    model, tok, _ = load_checkpoint(checkpoint)
    messages = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Tell me a story."}]
    ours, _ = tok.render_chat(messages, add_generation_prompt=True)
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert (theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ours  # newer transformers return a dict
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ours])).logits, model.eval()(torch.tensor([ours]))[0],
                                   atol=1e-4, rtol=1e-4)
    assert "parameters" in (out / "README.md").read_text()


def test_gguf_reads_back_with_the_right_tensors_and_metadata(checkpoint, tmp_path):
    gguf = pytest.importorskip("gguf")
    from tinylm.cli import main
    from tinylm.export import rope_halves_to_pairs

    assert main(["export", str(checkpoint), "--format", "gguf", "--out", str(tmp_path / "g")]) == 0
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    model, tok, _ = load_checkpoint(checkpoint)
    c = model.cfg

    def field(name):
        f = reader.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == c.n_layers and field("llama.context_length") == c.max_seq_len
    assert field("llama.attention.head_count_kv") == c.kv_heads and field("llama.embedding_length") == c.dim
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size and tokens[tok.end_id] == "<|end|>"
    assert field("tokenizer.ggml.eos_token_id") == tok.end_id
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + (0 if c.tie_embeddings else 1) + 9 * c.n_layers
    embd = tensors["token_embd.weight"]
    assert list(reversed(embd.shape.tolist())) == [c.vocab_size, c.dim]  # GGUF lists dimensions innermost first
    assert np.array_equal(np.asarray(embd.data).reshape(c.vocab_size, c.dim), model.tok_embeddings.weight.detach().numpy())
    q = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(c.n_heads * c.head_dim, c.dim)
    expected = rope_halves_to_pairs(model.layers[0].attn.wq.weight.detach(), c.n_heads).numpy()
    assert np.array_equal(q, expected) and not np.array_equal(q, model.layers[0].attn.wq.weight.detach().numpy())
    assert "<|end|>" in (tmp_path / "g" / "Modelfile").read_text()


def test_rope_reordering_matches_the_rotation():
    """Rotating adjacent pairs of the reordered rows equals rotating halves of the original ones."""
    from tinylm.export import rope_halves_to_pairs
    from tinylm.model import apply_rope, rope_tables

    torch.manual_seed(0)
    heads, head_dim, dim = 2, 8, 16
    w, x = torch.randn(heads * head_dim, dim), torch.randn(5, dim)
    cos, sin = rope_tables(head_dim, 5, 10000.0)
    ours = apply_rope((x @ w.T).view(5, heads, head_dim).transpose(0, 1), cos, sin)  # (H, T, D), halves
    pairs = (x @ rope_halves_to_pairs(w, heads).T).view(5, heads, head_dim // 2, 2).transpose(0, 1)
    c, s = cos[:, : head_dim // 2], sin[:, : head_dim // 2]
    rotated = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], dim=-1)
    reordered = torch.cat([rotated[..., 0], rotated[..., 1]], dim=-1)  # back to halves order to compare
    torch.testing.assert_close(reordered, ours)
