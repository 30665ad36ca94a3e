"""tinylm: train a small LLaMA-style language model from scratch, end to end, and talk to it.

    import tinylm
    lm = tinylm.load("runs/default")                 # newest checkpoint of a run
    lm.generate("Hello", max_new_tokens=50)          # text in, text out
    tinylm.train_on_documents([{"content": "..."}], "runs/mine", config="tiny")

Names are imported on first use, so `import tinylm.shards` (or the CLI) does not pay for torch.
"""

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "LanguageModel": "api", "load": "api",
    "Config": "config", "load_config": "config",
    "pretrain": "pipeline", "run": "pipeline", "train_on_documents": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'tinylm' has no attribute {name!r}")
