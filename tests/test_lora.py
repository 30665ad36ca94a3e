"""LoRA: adapters start as the base model, merge to W + (alpha / r) B A, train alone through the one
training loop, resume exactly, and every reader (generate, merge, export) sees merged weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tinylm.checkpoint import load_checkpoint
from tinylm.config import ConfigError, LoRAConfig, ModelConfig, load_config
from tinylm.lora import LoRALinear, add_adapters, merge_adapters, trainable_parameters
from tinylm.model import Transformer
from tinylm.pipeline import pretrain, sft

from conftest import tiny_config
from test_sft import arithmetic_chats


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=32)).eval()


def test_zero_adapters_are_the_base_model_and_merge_is_base_plus_scaled_ba():
    base = tiny_model()
    idx = torch.randint(0, 300, (2, 16))
    expected, _ = base(idx)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = add_adapters(tiny_model(), LoRAConfig(rank=4, alpha=8.0, targets=["wq", "wv", "w2"]))
    with torch.no_grad():
        same, _ = adapted(idx)
    torch.testing.assert_close(same, expected, atol=0, rtol=0)  # B = 0: exactly the base model
    assert trainable_parameters(adapted) == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4) + (4 * 192 + 64 * 4))  # A (r, in) + B (out, r)
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if "lora" not in n)

    wq = adapted.layers[1].attn.wq
    assert isinstance(wq, LoRALinear) and wq.scale == 2.0
    with torch.no_grad():
        for m in adapted.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.1)
        before_merge, _ = adapted(idx)
    b, a = wq.lora_b.detach().clone(), wq.lora_a.detach().clone()
    merged = merge_adapters(adapted)
    assert type(merged.layers[1].attn.wq) is torch.nn.Linear
    torch.testing.assert_close(merged.layers[1].attn.wq.weight, weights["layers.1.attn.wq.weight"] + 2.0 * (b @ a))
    torch.testing.assert_close(merged.layers[1].attn.wk.weight, weights["layers.1.attn.wk.weight"], atol=0, rtol=0)
    with torch.no_grad():
        after, _ = merged(idx)
    torch.testing.assert_close(after, before_merge, atol=1e-5, rtol=1e-5)


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match="lora.targets"):
        load_config("tiny", {"lora.rank": 4, "lora.targets": ["wq", "qkv"]})
    with pytest.raises(ConfigError, match="'sft.lora_rank' is 'lora.rank'"):
        load_config("tiny", {"sft.lora_rank": 4})


@pytest.fixture(scope="module")
def base_checkpoint(prepared, tmp_path_factory):
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 20})
    return pretrain(cfg, prepared["shards"], tmp_path_factory.mktemp("base"))["checkpoint"]


def _lora_cfg(prepared, chats, **overrides):
    return tiny_config(prepared["cfg"].data.corpus[0], **{
        "sft.corpus": [str(chats)], "sft.val_fraction": 0.2, "sft.train.batch_size": 8, "sft.train.max_steps": 8,
        "sft.train.lr": 1e-2, "lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, **overrides})


def test_lora_sft_trains_only_adapters_and_readers_see_merged_weights(prepared, base_checkpoint, tmp_path, capsys):
    from tinylm.api import load
    from tinylm.cli import main

    chats = arithmetic_chats(tmp_path / "chats.jsonl", n=120)
    summary = sft(_lora_cfg(prepared, chats), base_checkpoint, tmp_path / "sft")
    assert "LoRA: 9,728 trainable" in capsys.readouterr().out  # 2 x (wq 512 + wk 384 + wv 384 + wo 512 + w1, w3, w2 1,024 each)
    ckpt = summary["checkpoint"]
    meta = json.loads((tmp_path / "sft/checkpoints/step-0000008/meta.json").read_text())
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}
    saved, base = load_file(f"{ckpt}/model.safetensors"), load_file(f"{base_checkpoint}/model.safetensors")
    for name, w in base.items():  # the frozen weights are the base model's, bit for bit
        assert torch.equal(saved[name], w), name
    assert any(k.endswith("lora_b") and saved[k].abs().sum() > 0 for k in saved)

    adapted, _, _ = load_checkpoint(ckpt, adapters=True)
    merged, _, _ = load_checkpoint(ckpt)
    assert trainable_parameters(adapted) == 9_728 and not any("lora" in k for k in merged.state_dict())
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(idx)[0], adapted.eval()(idx)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(idx)[0], load_checkpoint(base_checkpoint)[0].eval()(idx)[0], atol=1e-4)

    assert main(["merge", str(tmp_path / "sft"), "--out", str(tmp_path / "merged")]) == 0
    plain, _, plain_meta = load_checkpoint(tmp_path / "merged")
    assert "lora" not in plain_meta and plain_meta["config"]["lora"]["rank"] == 0
    for name, w in merged.state_dict().items():
        assert torch.equal(plain.state_dict()[name], w), name
    for path in (ckpt, tmp_path / "merged"):  # generation works on either
        assert isinstance(load(path, device="cpu").chat([{"role": "user", "content": "Hi"}], max_new_tokens=3), str)


def test_lora_sft_resumes_exactly(prepared, base_checkpoint, tmp_path):
    chats = arithmetic_chats(tmp_path / "chats.jsonl", n=120)
    cfg = _lora_cfg(prepared, chats, **{"train.save_every": 4, "train.keep_last": 5})  # adapter dropout on: RNG restored
    sft(cfg, base_checkpoint, tmp_path / "straight")
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight/checkpoints/step-0000004", tmp_path / "resumed/checkpoints/step-0000004")
    sft(cfg, base_checkpoint, tmp_path / "resumed")
    a = load_file(str(tmp_path / "straight/checkpoints/step-0000008/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/step-0000008/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="LoRA adapters"):  # another rank cannot resume these adapters
        sft(_lora_cfg(prepared, chats, **{"lora.rank": 2, "sft.train.max_steps": 12}), base_checkpoint, tmp_path / "straight")
