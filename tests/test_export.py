"""Export to transformers: same logits, same greedy tokens, same chat-template ids, no custom code."""

import json

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
