"""Checkpoints: one directory per save, complete or absent.

    <run>/checkpoints/step-0000200/
        model.safetensors      weights (a tied head is stored once)
        trainer_state.pt       optimizer, grad scaler, RNG: tensors and numbers only (weights_only load)
        tokenizer.json, tokenizer_config.json, special_tokens_map.json
        meta.json              model config, full config, step, data position, tokenizer fingerprint,
                               SHA-256 of every file

Written to `step-N.tmp/` and renamed; `latest` names the newest complete one; the oldest beyond
`keep_last` are removed. Loading is strict: shapes, names and hashes must match.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .config import Config, ConfigError, ModelConfig, config_from_dict
from .layout import TRAINING_STAGES, RunLayout
from .files import MARKER, atomic_dir, output_complete, read_json, sha256_file, write_json, write_text
from .lora import adapter_spec, add_adapters, merge_adapters, spec_config
from .model import Transformer
from .tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    pass


def save_checkpoint(run_dir: str | Path, model: Transformer, cfg: Config, tokenizer_dir: str | Path,
                    trainer: dict, optimizer_state: dict | None = None, extra_state: dict | None = None,
                    keep_last: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    target = ckpt_root / f"step-{trainer['step']:07d}"
    with atomic_dir(target, "checkpoint", legacy=("meta.json",)) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        if optimizer_state is not None:
            torch.save({"optimizer": optimizer_state, **(extra_state or {})}, tmp / "trainer_state.pt")
        for name in TOKENIZER_FILES:
            shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        tok_cfg = read_json(tmp / "tokenizer_config.json")
        if tok_cfg.get("model_max_length", model.cfg.max_seq_len) != model.cfg.max_seq_len:  # the model's context
            write_json(tmp / "tokenizer_config.json", {**tok_cfg, "model_max_length": model.cfg.max_seq_len})
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        write_json(tmp / "meta.json", {
            "format": "tinylm-checkpoint/1",
            "model": dataclasses.asdict(model.cfg),
            "params": model.num_params(),
            "tokenizer_fingerprint": Tokenizer.load(tmp).fingerprint,
            "trainer": trainer,
            "config": cfg.to_dict(),
            "files": files,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"torch": torch.__version__},
            **({"lora": adapter_spec(model)} if adapter_spec(model) else {}),  # adapters beside the base weights
        })
    write_text(ckpt_root / "latest", target.name + "\n")
    _prune(ckpt_root, keep_last)
    return target


def _prune(ckpt_root: Path, keep_last: int) -> None:
    steps = sorted((p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: p.name)
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def is_complete(ckpt: Path) -> bool:
    """A checkpoint directory with its meta.json and every file at the size it was written with
    (hashes are checked when it is loaded)."""
    if not (ckpt / "meta.json").is_file():
        return False
    return output_complete(ckpt) if (ckpt / MARKER).is_file() else True  # written before markers: meta.json only


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None. `latest` is followed only to a
    complete checkpoint; otherwise the newest complete step-N is taken."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if STEP_DIR.match(named.name) and is_complete(named):
            return named
    complete = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and is_complete(p))
    return complete[-1] if complete else None


def remove_partial(run_dir: str | Path) -> list[str]:
    """Delete what a killed save left behind (`step-N.tmp/`, temp files). Only the trainer calls this,
    before it resumes: a reader (chat, eval) must not touch a save that may still be in progress."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    for tmp in root.glob("*.tmp") if root.is_dir() else []:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed


def find_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, a stage dir (with checkpoints/) or a run dir (sft/ or pretrain/)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    run = RunLayout(path)
    for stage in (path, *(getattr(run, s) for s in reversed(TRAINING_STAGES))):  # the last stage first
        found = latest_checkpoint(stage)
        if found:
            return found
    raise CheckpointError(f"{path}: no checkpoint here (looked for model.safetensors, checkpoints/, sft/, pretrain/)")


def verify_files(ckpt: Path, meta: dict) -> None:
    for name, digest in meta.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{ckpt}: {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{ckpt}: {name} does not match its SHA-256 in meta.json (corrupted or edited)")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", verify: bool = True, adapters: bool = False
                    ) -> tuple[Transformer, Tokenizer, dict]:
    """Rebuild model and tokenizer from a checkpoint directory; strict about every mismatch.

    A checkpoint with LoRA adapters (meta.json `lora`) comes back merged into plain weights, or with
    its adapters apart and only them trainable if `adapters` (the trainer, to resume)."""
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    if verify:
        verify_files(ckpt, meta)
    tokenizer = Tokenizer.load(ckpt)
    if tokenizer.fingerprint != meta["tokenizer_fingerprint"]:
        raise CheckpointError(f"{ckpt}: tokenizer does not match the one the model was trained with")
    model = Transformer(checkpoint_model_config(ckpt, meta))
    if meta.get("lora"):
        add_adapters(model, spec_config(meta["lora"]))
    missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
    if missing or unexpected:  # pragma: no cover - strict=True raises first
        raise CheckpointError(f"{ckpt}: missing {missing}, unexpected {unexpected}")
    if meta.get("lora") and not adapters:
        merge_adapters(model)
    model.to(device)
    meta["path"] = str(ckpt)
    return model, tokenizer, meta


def load_trainer_state(ckpt: Path) -> dict:
    """Optimizer, scaler and RNG state, loaded with `weights_only=True` (tensors, numbers, strings only).

    Raises CheckpointError for a missing file, or one holding anything else (a pickle that would
    import or call code): such a file was not written by tinylm and must not be trusted.
    """
    path = ckpt / "trainer_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no trainer_state.pt, cannot resume training from it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a tinylm trainer state ({str(e).splitlines()[0][:120]}); it was not "
                              "written by tinylm or was damaged: do not load it with weights_only=False (a pickle "
                              "can run code). Remove the checkpoint or resume from another one") from None


META_FIELDS = {"model": dict, "tokenizer_fingerprint": str, "trainer": dict, "config": dict, "files": dict}


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's meta.json, its fields checked: CheckpointError names the file and the field."""
    path = Path(ckpt) / "meta.json"
    meta = read_json(path)
    problem = None
    if not isinstance(meta, dict):
        problem = "not a JSON object"
    else:
        for field, typ in META_FIELDS.items():
            if field not in meta:
                problem = f"the field {field!r} is missing"
            elif not isinstance(meta[field], typ):
                problem = f"the field {field!r} should be a {typ.__name__}, not {type(meta[field]).__name__}"
            if problem:
                break
        if problem is None and not isinstance(meta["trainer"].get("step"), int):
            problem = "the field 'trainer.step' should be a whole number"
    if problem:
        raise CheckpointError(f"{path}: {problem} (tinylm writes this file; was it edited or damaged?)")
    return meta


def checkpoint_model_config(ckpt: Path, meta: dict | None = None) -> ModelConfig:
    """The model settings a checkpoint was saved with, checked as a config file's would be."""
    meta = meta if meta is not None else read_meta(ckpt)
    try:
        return config_from_dict({"model": meta["model"]}).model
    except ConfigError as e:
        raise CheckpointError(f"{Path(ckpt) / 'meta.json'}: {e}") from None


def checkpoint_config(ckpt: Path) -> Config:
    try:
        return config_from_dict(read_meta(ckpt)["config"])
    except ConfigError as e:
        raise CheckpointError(f"{Path(ckpt) / 'meta.json'}: {e}") from None
