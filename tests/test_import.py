"""`tinylm import`: a transformers LlamaForCausalLM becomes a checkpoint with the same logits, its own
tokenizer and chat template, fine-tunes, chats, and exports back to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinylm.checkpoint import load_checkpoint
from tinylm.importer import ImportRefused, import_hf

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "Fine."},
        {"role": "assistant", "content": "Good to hear."}]


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory, corpus_file) -> Path:
    """A byte-level BPE with ChatML special tokens and template: not tinylm's own format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    folder = tmp_path_factory.mktemp("chatml-tok")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "chat_template": CHATML}))
    return folder


def hf_model(folder: Path, tokenizer_dir: Path, **config) -> Path:
    """A LlamaForCausalLM with random weights saved to folder with the tokenizer's files."""
    import shutil

    settings = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    settings.update(config)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy2(f, folder / f.name)
    return folder


CASES = {
    "gqa-tied": dict(tie_word_embeddings=True),
    "untied-mha-theta": dict(tie_word_embeddings=False, num_key_value_heads=4, rope_theta=500000.0),
    "gqa-untied-1kv": dict(tie_word_embeddings=False, num_key_value_heads=1, rope_theta=1e6, rms_norm_eps=1e-5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_as_transformers(case, chatml_tokenizer, tmp_path):
    hf_dir = hf_model(tmp_path / "hf", chatml_tokenizer, **CASES[case])
    ckpt = import_hf(hf_dir, tmp_path / "imported")
    model, tok, meta = load_checkpoint(ckpt)
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    idx = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model.eval()(idx)
        theirs = reference(idx).logits
    assert model.cfg.tie_embeddings == CASES[case]["tie_word_embeddings"]
    assert model.cfg.rope_base == CASES[case].get("rope_theta", 10000.0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert meta["trainer"]["stage"] == "import" and tok.kind == "hf"


def test_chat_template_mask_and_ids_match_transformers(chatml_tokenizer, tmp_path):
    ckpt = import_hf(hf_model(tmp_path / "hf", chatml_tokenizer), tmp_path / "imported")
    _, tok, _ = load_checkpoint(ckpt)
    ids, mask = tok.render_chat(CHAT)
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    rendered = hf_tok.apply_chat_template(CHAT, tokenize=True)
    assert ids == list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    trained = tok.backend.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "Hello! How are you?<|im_end|>\nGood to hear.<|im_end|>\n"  # replies and their turn ends only
    assert tok.end_id == tok.backend.token_to_id("<|im_end|>")
    prompt, _ = tok.render_chat(CHAT[:2], add_generation_prompt=True)
    assert tok.decode(prompt, skip_special=False).endswith("<|im_start|>assistant\n")


def test_imported_model_fine_tunes_chats_and_exports_back(chatml_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from tinylm.api import load
    from tinylm.checkpoint import latest_checkpoint
    from tinylm.cli import main
    from tinylm.export import export_hf

    hf_dir = hf_model(tmp_path / "hf", chatml_tokenizer, tie_word_embeddings=False)
    assert main(["import", str(hf_dir), "--out", str(tmp_path / "imported")]) == 0
    ckpt = latest_checkpoint(tmp_path / "imported")
    back = export_hf(ckpt, tmp_path / "exported")
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert original.keys() == exported.keys()
    for name in original:
        assert torch.equal(original[name], exported[name]), name
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the model's own tokenizer and chat template go back out
        assert json.loads((back / name).read_text()) == json.loads((chatml_tokenizer / name).read_text()), name
    before, after = json.loads((hf_dir / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "vocab_size"):
        assert before[key] == after[key], key

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(12)))
    assert main(["sft", str(tmp_path / "imported"), "--out", str(tmp_path / "sft"), f"--sft.corpus={chats}",
                 "--sft.val_fraction=0", "--train.max_steps=3", "--train.max_epochs=0", "--train.batch_size=2",
                 "--train.warmup_steps=1"]) == 0
    tuned = latest_checkpoint(tmp_path / "sft")
    assert tuned.name == "step-0000003" and json.loads((tuned / "meta.json").read_text())["trainer"]["stage"] == "sft"
    reply = load(tuned, device="cpu").chat([{"role": "user", "content": "Hi"}], max_new_tokens=4)
    assert isinstance(reply, str)


@pytest.mark.parametrize("field, value, named", [
    ("attention_bias", True, "attention_bias"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling.rope_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("head_dim", 32, "head_dim"),
])
def test_refuses_what_the_model_cannot_represent(field, value, named, chatml_tokenizer, tmp_path):
    hf_dir = hf_model(tmp_path / "hf", chatml_tokenizer)
    config = json.loads((hf_dir / "config.json").read_text())
    config[field] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportRefused, match=named):
        import_hf(hf_dir, tmp_path / "imported")


def test_tinylm_export_imports_back_to_the_same_weights(lm, tmp_path):
    from tinylm.export import export_hf

    back = export_hf(lm.meta["path"], tmp_path / "hf")
    ckpt = import_hf(back, tmp_path / "imported")
    model, tok, _ = load_checkpoint(ckpt)
    assert tok.fingerprint == lm.tokenizer.fingerprint and tok.kind == "bpe"  # tinylm's own tokenizer stays itself
    for (name, a), (_, b) in zip(lm.model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
