"""Low-rank adapters (LoRA, Hu et al. 2021) for fine-tuning: W x + (alpha / r) B A x, only A and B train.

Applied from outside the model, after the base weights are loaded: each targeted `nn.Linear` of the
blocks becomes a `LoRALinear` holding the same frozen weight plus A (r, in) and B (out, r). B starts
at zero, so the adapted model starts as the base model exactly. A checkpoint of an adapted model
holds the base weights and the adapters under their own names (`layers.0.attn.wq.lora_a`) and says
so in its meta.json (`lora`): resuming loads both, exactly. Every reader that only runs the model
(generate, chat, serve, eval, export, `tinylm merge`) gets the merged weights, W + (alpha / r) B A,
in a plain model, so nothing downstream knows adapters exist.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LoRAConfig

TARGETS = {"wq": "attn.wq", "wk": "attn.wk", "wv": "attn.wv", "wo": "attn.wo",
           "w1": "ffn.w1", "w2": "ffn.w2", "w3": "ffn.w3"}  # lora.targets name -> module in each block


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear inits its weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)  # (..., r) -> (..., out)
        return F.linear(x, self.weight) + self.scale * update

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_b @ self.lora_a)


def add_adapters(model: nn.Module, lc: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model` and put adapters on the targeted projections of each block."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for target in lc.targets:
            parent_name, _, child = TARGETS[target].rpartition(".")
            parent = layer.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), lc.rank, lc.alpha, lc.dropout))
    return model


def adapter_spec(model: nn.Module) -> dict | None:
    """What a checkpoint records about its adapters (None for a plain model)."""
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not adapted:
        return None
    targets = [t for t, path in TARGETS.items() if isinstance(model.layers[0].get_submodule(path), LoRALinear)]
    return {"rank": adapted[0].rank, "alpha": adapted[0].alpha, "targets": targets}


def spec_config(spec: dict) -> LoRAConfig:
    return LoRAConfig(rank=spec["rank"], alpha=spec["alpha"], targets=list(spec["targets"]))


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain trainable nn.Linear holding W + (alpha / r) B A."""
    for layer in model.layers:
        for path in TARGETS.values():
            parent_name, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            module = getattr(parent, child)
            if isinstance(module, LoRALinear):
                plain = nn.Linear(module.in_features, module.out_features, bias=False,
                                  device=module.weight.device, dtype=module.weight.dtype)
                plain.weight.copy_(module.merged_weight())
                setattr(parent, child, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
