"""Data parallelism under `torchrun`: DDP (every rank holds the whole model) or FSDP2 (`fully_shard`:
every rank holds 1/N of the weights, gradients and optimizer moments, for models that do not fit one
device). One process needs neither, and gets the model as it is.

Checkpoints do not depend on the mode: weights and optimizer state are gathered into the plain
single-process form on save and sharded again on load, so a run started on 8 GPUs with FSDP can be
resumed, evaluated or fine-tuned on one laptop, and the other way round.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

MODES = ("ddp", "fsdp")


def is_sharded(rt, tc) -> bool:
    return rt.distributed and tc.parallel == "fsdp"


def shard(model: torch.nn.Module, rt) -> None:
    """FSDP2 in place: one unit per transformer block (gathered just before it runs, freed after), and
    the root (embeddings, final norm, head) as the last unit. Must run before the optimizer is built."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world,))
    # on GPUs the all-gathers move bf16 weights; the gradients are reduced in fp32 either way
    mixed = MixedPrecisionPolicy(param_dtype=rt.dtype if rt.device.type == "cuda" and rt.dtype != torch.float32 else None,
                                 reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mixed)
    fully_shard(model, mesh=mesh, mp_policy=mixed)


def wrap(model: torch.nn.Module, rt, tc, compiled: bool) -> torch.nn.Module:
    """The module the training step calls: compiled if `compiled`, inside DDP when there are ranks to sync."""
    # a step that changes shape (train.short_seq_len) compiles once per shape, each specialised
    compiled = torch.compile(model, dynamic=False if tc.short_seq_len else None) if compiled else model
    if rt.distributed and not is_sharded(rt, tc):
        return DDP(compiled, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    return compiled


def sync_gradients(wrapped: torch.nn.Module, model: torch.nn.Module, rt, tc, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only when `sync`."""
    if not rt.distributed:
        return contextlib.nullcontext()
    if is_sharded(rt, tc):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else wrapped.no_sync()


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's gradient norm) as a plain tensor; a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order a plain `optimizer.state_dict()` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rt, tc) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) in single-process form, on the CPU of rank 0 (other
    ranks get empty dicts but must call this too: gathering is collective)."""
    if not is_sharded(rt, tc):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not rt.is_main:
        return {}, {}
    number = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    groups = [{**g, "params": [number[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return weights, {"state": {number[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict,
                    rt, tc) -> None:
    """The inverse of `full_state`: every rank passes the whole single-process state and keeps its shard."""
    if not is_sharded(rt, tc):
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    name = parameter_names(model, optimizer)
    groups = [{**g, "params": [name[i] for i in g["params"]]} for g in optim_state["param_groups"]]
    by_name = {"state": {name[i]: s for i, s in optim_state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
