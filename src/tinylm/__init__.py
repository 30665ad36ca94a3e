"""tinylm: train a small LLaMA-style language model from scratch, end to end, and talk to it.

    import tinylm
    lm = tinylm.load("runs/default")                 # newest checkpoint of a run
    lm.generate("Hello", max_new_tokens=50)          # text in, text out
    tinylm.train_on_documents([{"content": "..."}], "runs/mine", config="tiny")
"""

from .api import LanguageModel, load
from .config import Config, load_config
from .pipeline import pretrain, run, train_on_documents

__all__ = ["Config", "LanguageModel", "load", "load_config", "pretrain", "run", "train_on_documents"]
__version__ = "0.1.0"
