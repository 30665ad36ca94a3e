"""One configuration schema for every stage.

Each section is a dataclass; the docstring-like comment after each field is its help text.
Presets are TOML files in `configs/` (shipped inside the package); any field can be overridden
on the command line as `--section.field=value`. The resolved config is written next to every
output as `config.toml`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


OPTIMIZERS = ("adamw", "muon")  # train.optimizer: each has its scaling law in scaling.json (sizing.py)


@dataclass
class ModelConfig:
    size: str = ""  # "auto": width, depth and pretraining batch (train.batch_size or its half or quarter) chosen for the time budget on this machine (sizing.py); a ladder name ("xs", "s", "m", "l", "xl", "xxl"); "" = the shape fields below
    dim: int = 256  # width of the residual stream
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 0  # key/value heads for grouped-query attention (0 = same as n_heads)
    ffn_hidden: int = 0  # SwiGLU hidden width (0 = 8/3 * dim rounded up to multiple_of)
    multiple_of: int = 64  # rounding for the derived SwiGLU width
    max_seq_len: int = 256  # context length in tokens
    vocab_size: int = 0  # 0 = take it from the tokenizer (the usual case)
    rope_base: float = 10000.0  # rotary embedding base (theta)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    dropout: float = 0.0  # dropout on the attention and MLP outputs (residual branches)
    attention_dropout: float = 0.0  # dropout on the attention probabilities (slower on a CPU: no chunked kernel)
    tie_embeddings: bool = True  # share the input embedding with the output head
    init_std: float = 0.02  # std of the normal init of every matrix

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head dimension {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.kv_heads}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} is a probability in [0, 1), not {getattr(self, name)}")
        from .sizing import check_size

        check_size(self)


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bpe" (byte-level BPE, Hugging Face tokenizers) or "sentencepiece"
    vocab_size: int = 4096  # vocabulary size including special tokens
    min_frequency: int = 2  # a merge must occur this often to be learnt
    max_train_chars: int = 50_000_000  # train on at most this many characters of the corpus
    held_out_docs: int = 200  # validation documents used to report compression (bytes per token)


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=lambda: ["builtin"])  # files, folders or "builtin"
    text_fields: list[str] = field(default_factory=lambda: ["text", "content"])  # JSON fields holding text, first found wins
    doc_separator: str = "<|endoftext|>"  # a line holding only this splits a .txt file into documents
    txt_chunk_chars: int = 8192  # .txt files without separators are cut at blank lines into documents of about this size
    max_doc_chars: int = 1_000_000  # longer documents (a 100 MB line) are cut at whitespace into pieces of at most this size, sources marked #part-N
    val_fraction: float = 0.05  # share of documents held out for validation
    val_split: str = "hash"  # "hash": a stable hash of each document's text decides; "tail": the last val_fraction of the corpus text
    shard_tokens: int = 50_000_000  # tokens per shard file
    workers: int = 0  # tokenizer processes for sharding (0 = one per core)


@dataclass
class CollectConfig:
    files: list[str] = field(default_factory=list)  # local files or folders (txt, md, jsonl, json; optionally .gz)
    hf_datasets: list[str] = field(default_factory=list)  # Hugging Face datasets, streamed: "owner/name[/config]?split=train&text_field=text"
    hf_max_rows: int = 10_000  # rows taken from each dataset
    wikipedia_topics: list[str] = field(default_factory=list)  # search terms; each gives up to wikipedia_articles articles
    wikipedia_articles: int = 20  # articles per topic
    wikipedia_lang: str = "en"  # Wikipedia language edition
    wikipedia_api: str = ""  # MediaWiki API address (default https://{lang}.wikipedia.org/w/api.php)
    urls: list[str] = field(default_factory=list)  # web pages to fetch and extract
    builtin: bool = False  # include the built-in corpus
    timeout: float = 10.0  # seconds per HTTP request
    retries: int = 3  # extra attempts after a timeout, connection error or 5xx
    backoff: float = 1.0  # first retry delay in seconds, doubled each time
    per_host_delay: float = 1.0  # minimum seconds between two requests to one host


@dataclass
class CleanConfig:
    nfkc: bool = False  # apply Unicode NFKC normalisation (folds ligatures, full-width forms)
    rejoin_wrapped: bool = False  # join hard-wrapped lines inside paragraphs into one line
    min_chars: int = 100  # drop documents shorter than this many characters
    max_chars: int = 50_000  # drop documents longer than this many characters
    min_words: int = 20  # drop documents with fewer words
    min_sentence_words: float = 3.0  # drop documents whose mean sentence is shorter (lists, menus)
    max_sentence_words: float = 80.0  # drop documents whose mean sentence is longer (run-ons, code, tables)
    min_unique_chars: int = 10  # drop documents using fewer distinct characters
    max_symbol_ratio: float = 0.1  # drop documents with more symbols (not letters, digits, spaces, punctuation)
    max_digit_ratio: float = 0.2  # drop documents with more digits than this share of characters
    max_dup_line_ratio: float = 0.3  # drop documents where this share of lines repeats another line
    max_top_ngram_ratio: float = 0.2  # drop documents where the most frequent word 3-gram covers this share of words
    languages: list[str] = field(default_factory=list)  # keep only these ISO 639-1 languages, e.g. ["en"] (empty = no check; py3langid)
    min_language_score: float = 0.5  # with languages set: drop documents identified with a lower probability
    exact_dedup: bool = True  # drop documents whose normalised text was seen before
    near_dup_threshold: float = 0.8  # drop documents whose estimated Jaccard similarity to a kept one is above this (0 = off)
    shingle_words: int = 5  # word n-grams compared by the near-duplicate check
    minhash_perm: int = 128  # MinHash permutations (more = finer Jaccard estimates, slower)
    examples_per_rule: int = 3  # dropped examples shown in the report for each rule
    contamination: list[str] = field(default_factory=list)  # benchmark files (JSONL) checked for overlap with the training text
    contamination_ngram: int = 13  # words in the n-grams compared by the contamination check


@dataclass
class TrainConfig:
    seed: int = 1337  # seeds weights, data order and dropout
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto" (bf16 where supported, fp16+scaler on old GPUs), "bf16", "fp16", "fp32"
    compile: str = "auto"  # torch.compile the training step: "true", "false", or "auto" (only when the compile time pays back within the run's budget: compiling.py)
    attention: str = "auto"  # training's attention kernel: "sdpa" (PyTorch's fused kernels), "chunked" (attention.py, CPU; for sequences of 256+ tokens in multiples of 128, else SDPA), "auto" (chunked where a compiled step runs on a CPU)
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-repeatable GPU runs and resumes, a little slower (CPU runs are repeatable anyway)
    parallel: str = "ddp"  # under torchrun: "ddp" (whole model per rank) or "fsdp" (FSDP2: weights, gradients and optimizer sharded)
    batch_size: int = 16  # sequences per micro-batch (per rank); with model.size = "auto", the largest pretraining tries
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # "adamw", or "muon" (Muon for the hidden weight matrices, AdamW for embeddings, head and norms)
    lr: float = 1e-3  # peak learning rate (Muon's is scaled to match AdamW's update size: the same value serves both)
    embedding_lr: float = 0.0  # peak learning rate of the token embedding (and of the output head when tied), on the same schedule; 0 = train.lr
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    schedule: str = "cosine"  # after warm-up: "cosine" decay to min_lr_ratio, or "wsd" (warmup-stable-decay: the peak held, then a linear decay over the last decay_fraction)
    decay_fraction: float = 0.3  # "wsd": the share of the run spent decaying
    warmup_steps: int = 100  # linear warm-up, in optimizer steps; with warmup_fraction, the fewest it takes (up to a quarter of the run)
    warmup_fraction: float = 0.0  # linear warm-up as a share of the run (of max_time when time ends it): every machine reaches the peak
    dropout_from_epoch: float = 0.0  # model.dropout and attention_dropout apply from this pass over the training tokens on: 0 = from the start, 1 = once the data repeat (the first pass cannot overfit; dropout there only slows learning)
    short_seq_len: int = 0  # pretraining on windows of this many tokens first (at max_seq_len / short_seq_len times the batch: the same tokens a step), then on model.max_seq_len; 0 = the full context throughout. A sequence-length warm-up in two phases (Li et al. 2022): short steps are cheaper and the model learns the near context first (data.GrowingBatches)
    short_seq_fraction: float = 0.0  # with short_seq_len: the share of the run at the short context, in the schedule's measure (of max_time when time ends the run, like warmup_fraction)
    weight_decay: float = 0.1  # weight decay (decoupled), applied to matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    guided_heads: list[str] = field(default_factory=list)  # heads guided to an attention pattern while training, "PATTERN:LAYER.HEAD": "previous:0.0" (attend to the previous token), "induction:1.0" (to what followed earlier occurrences of the current token), "induction2:2.0" (of the last two tokens); the logged training loss includes the guidance term, validation does not (model.set_guidance)
    guided_weight: float = 0.1  # weight of the guidance term against the language-model loss
    guided_mass: float = 0.7  # the share of a guided head's attention asked for on its pattern's keys (a hinge: no pull beyond it)
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit)
    max_epochs: float = 0.0  # stop after this many passes over the training tokens (0 = no limit)
    max_tokens: int = 0  # stop after this many training tokens (0 = no limit)
    max_time: float = 0.0  # stop after this many seconds of the stage's wall time: steps, validations and checkpoint saves (0 = no limit); with run.max_time set, `tinylm run` gives the stage its share of the run instead and this value is the weight of that share
    eval_every: int = 100  # validation every N steps (0 = only at the end)
    eval_batches: int = 20  # micro-batches per validation
    log_every: int = 10  # one log line every N steps
    save_every: int = 500  # checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept on disk
    resume: bool = True  # continue from the newest checkpoint in the output directory
    init_from: str = ""  # checkpoint to start the weights from (fine-tuning)
    wandb_project: str = ""  # log to this Weights & Biases project (needs `pip install wandb`)
    tensorboard: bool = False  # write TensorBoard event files (needs `pip install tensorboard`)


# The [train] settings that fine-tuning changes, and to what, unless a preset's [sft.train] table or an
# override says otherwise. `compile` is off: SFT batches vary in width, so it would compile several times.
SFT_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 5e-4, "embedding_lr": 0.0, "guided_heads": [], "warmup_steps": 20, "batch_size": 16, "max_steps": 0,
                                      "max_epochs": 1.0, "max_tokens": 0, "max_time": 0.0, "eval_every": 100,
                                      "compile": "false", "short_seq_len": 0, "short_seq_fraction": 0.0}


@dataclass
class SFTConfig:
    corpus: list[str] = field(default_factory=lambda: ["builtin"])  # conversation JSONL files ("conversations" or "messages") or "builtin"; empty = no SFT in `tinylm run`
    val_fraction: float = 0.05  # share of conversations held out for validation
    train: dict[str, Any] = field(default_factory=lambda: dict(SFT_TRAIN_DEFAULTS))  # [sft.train]: [train] settings that differ for fine-tuning (--sft.train.lr=...); the rest come from [train]
    demo: list[str] = field(default_factory=lambda: ["Hi! How are you today?", "What do you like to do on weekends?"])  # user messages of the demo exchange after `tinylm run`


# The [train] settings that preference alignment changes, as SFT_TRAIN_DEFAULTS does for fine-tuning.
DPO_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "embedding_lr": 0.0, "guided_heads": [], "warmup_steps": 10, "batch_size": 8, "max_steps": 200,
                                      "max_epochs": 0.0, "max_tokens": 0, "max_time": 0.0, "eval_every": 50,
                                      "compile": "false", "short_seq_len": 0, "short_seq_fraction": 0.0}


@dataclass
class DPOConfig:
    corpus: list[str] = field(default_factory=lambda: ["builtin"])  # preference pairs JSONL ({"prompt", "chosen", "rejected"}: strings or chat messages) or "builtin" (pairs made from the built-in conversations)
    beta: float = 0.1  # beta of the DPO loss: how far the policy may move from the frozen reference model
    val_fraction: float = 0.05  # share of pairs held out for the validation loss and preference accuracy
    train: dict[str, Any] = field(default_factory=lambda: dict(DPO_TRAIN_DEFAULTS))  # [dpo.train]: [train] settings that differ for preference alignment (--dpo.train.lr=...); the rest come from [train]


@dataclass
class LoRAConfig:
    rank: int = 0  # fine-tuning (sft, dpo) trains low-rank adapters of this rank on a frozen model (0 = off: every weight trains)
    alpha: float = 16.0  # the adapters' update B A is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input (training only)
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])  # projections of each block that get adapters: wq wk wv wo (attention), w1 w3 w2 (SwiGLU gate, up, down)


@dataclass
class SampleConfig:
    max_new_tokens: int = 120  # tokens to generate
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # keep the k most likely tokens (0 = off)
    top_p: float = 0.95  # nucleus sampling threshold (1 = off)
    repetition_penalty: float = 1.1  # >1 discourages tokens already present (1 = off)
    stop: list[str] = field(default_factory=list)  # extra stop strings
    seed: int = -1  # sampling seed, 0 to 2**64-1 (-1 = a fresh random seed every time)
    prompts: list[str] = field(default_factory=lambda: ["Hello, how are you", "What do you like to do", "I think that"])  # prompts for the samples printed after training

    def check(self) -> "SampleConfig":
        """Refuse settings the sampler cannot honour; the one check behind the CLI, the terminal chat, the
        Python API, the web page and the server. Raises SamplingError naming the field. Ranges follow the
        OpenAI API reference (temperature 0-2, top_p 0-1); top_p 0 keeps only the most likely token."""
        def bad(name: str, why: str) -> SamplingError:
            return SamplingError(name, f"{name}={getattr(self, name)!r}: {why}")

        number = (int, float)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be a whole number >= 0")
        if not isinstance(self.temperature, number) or not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "must be between 0 and 2 (0 = greedy)")
        if not isinstance(self.top_p, number) or not 0.0 <= self.top_p <= 1.0:
            raise bad("top_p", "must be between 0 and 1 (1 = off)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be a whole number >= 0 (0 = off)")
        if not isinstance(self.repetition_penalty, number) or not 0.0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -1 <= self.seed < 2**64:
            raise bad("seed", "must be between 0 and 2**64-1 (-1 = random)")
        return self


class SamplingError(ConfigError):
    """A sampling setting out of its range; `field` names it (the server reports it as `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class EvalConfig:
    enabled: bool = True  # `tinylm run` evaluates each trained stage (-> CKPT/eval.json) and writes RUN/report.html
    max_items: int = 200  # per task: validation windows, held-out conversations or task items, spread evenly over it (0 = all)
    blimp: list[str] = field(default_factory=list)  # BLiMP-format JSONL files (sentence_good, sentence_bad)
    choice: list[str] = field(default_factory=list)  # HellaSwag/ARC JSONL files or Hugging Face dataset names


@dataclass
class RunConfig:
    max_time: float = 0.0  # seconds of wall time for the whole `tinylm run`, every stage included; the training stages share what the others leave, in the ratio of their train.max_time (0 = no whole-run limit: each training stage keeps its own train.max_time)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage_train(self, stage: str) -> TrainConfig:
        """The training settings of a stage: [train] for pretraining; [train] under [sft.train] for SFT
        ([dpo.train] for DPO)."""
        return dataclasses.replace(self.train, **getattr(self, stage).train) if stage in ("sft", "dpo") else self.train

    def _validate_short_context(self) -> None:
        for stage in ("sft", "dpo"):
            if getattr(self, stage).train.get("short_seq_len"):
                raise ConfigError(f"{stage}.train.short_seq_len: a short context first is for pretraining's packed "
                                  f"windows; {stage} trains on whole examples")
        short, share, full = self.train.short_seq_len, self.train.short_seq_fraction, self.model.max_seq_len
        if not short:
            if share:
                raise ConfigError(f"train.short_seq_fraction={share} does nothing without train.short_seq_len: set both (or both to 0)")
            return
        if short < 0 or short >= full or full % short:
            raise ConfigError(f"train.short_seq_len={short} must be shorter than model.max_seq_len={full} and divide it")
        if not 0.0 < share < 1.0:
            raise ConfigError(f"train.short_seq_fraction is the share of the run at train.short_seq_len, between 0 "
                              f"and 1 (exclusive), not {share}")

    def validate(self) -> "Config":
        self.model.validate()
        if self.tokenizer.kind not in ("bpe", "sentencepiece"):
            raise ConfigError(f"tokenizer.kind must be 'bpe' or 'sentencepiece', not {self.tokenizer.kind!r}")
        if self.train.attention not in ("auto", "sdpa", "chunked"):
            raise ConfigError(f"train.attention must be 'auto', 'sdpa' or 'chunked', not {self.train.attention!r}")
        if self.train.compile not in ("auto", "true", "false"):
            raise ConfigError(f"train.compile must be 'auto', 'true' or 'false', not {self.train.compile!r}")
        if self.train.optimizer not in OPTIMIZERS:
            choices = " or ".join(repr(name) for name in OPTIMIZERS)
            raise ConfigError(f"train.optimizer must be {choices}, not {self.train.optimizer!r}")
        if self.train.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"train.schedule must be 'cosine' or 'wsd', not {self.train.schedule!r}")
        for name in ("warmup_fraction", "decay_fraction"):
            if not 0.0 <= getattr(self.train, name) <= 1.0:
                raise ConfigError(f"train.{name} is a share of the run, between 0 and 1, not {getattr(self.train, name)}")
        if not 0.0 <= self.train.embedding_lr < math.inf:
            raise ConfigError(f"train.embedding_lr is a learning rate, >= 0 (0 = train.lr), not {self.train.embedding_lr}")
        if not 0.0 <= self.train.dropout_from_epoch < math.inf:
            raise ConfigError(f"train.dropout_from_epoch is a pass over the training tokens, >= 0, not {self.train.dropout_from_epoch}")
        self._validate_short_context()
        if self.train.guided_weight < 0 or not 0.0 < self.train.guided_mass < 1.0:
            raise ConfigError(f"train.guided_weight must be >= 0 and train.guided_mass in (0, 1), "
                              f"not {self.train.guided_weight} and {self.train.guided_mass}")
        if self.dpo.train.get("guided_heads"):
            raise ConfigError("dpo.train.guided_heads: guidance adds to the next-token loss of pretraining and SFT; "
                              "the DPO loss has none")
        if self.train.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be 'ddp' or 'fsdp', not {self.train.parallel!r}")
        self._validate_lora()
        if not 0.0 <= self.run.max_time < math.inf:
            raise ConfigError(f"run.max_time is seconds of the whole run, >= 0 (0 = no limit), not {self.run.max_time}")
        if self.dpo.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, not {self.dpo.beta}")
        for name, value in (("data.val_fraction", self.data.val_fraction), ("sft.val_fraction", self.sft.val_fraction),
                            ("dpo.val_fraction", self.dpo.val_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1)")
        try:
            self.sample.check()
        except SamplingError as e:
            raise ConfigError(f"sample.{e}") from None
        return self


    def _validate_lora(self) -> None:
        lc = self.lora
        if lc.rank < 0 or lc.alpha <= 0 or not 0.0 <= lc.dropout < 1.0:
            raise ConfigError(f"lora.rank must be >= 0, lora.alpha > 0 and lora.dropout in [0, 1) "
                              f"(got {lc.rank}, {lc.alpha}, {lc.dropout})")
        known = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
        unknown = [t for t in lc.targets if t not in known]
        if unknown or (lc.rank and not lc.targets):
            raise ConfigError(f"lora.targets: {unknown or 'empty'}; choose from {', '.join(known)}")
        if lc.rank and "fsdp" in (self.train.parallel, self.sft.train.get("parallel")):
            raise ConfigError("lora.rank with train.parallel=fsdp: adapters train under DDP or one process only")


_SECTION_TYPES = typing.get_type_hints(Config)


def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(_SECTION_TYPES[section])


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(options))})"


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Turn a TOML value or a command-line string into the field's type."""
    origin = typing.get_origin(typ)
    if origin in (list, typing.List):
        (item,) = typing.get_args(typ)
        if isinstance(value, str) and value.startswith("[") and value.endswith("]"):  # `[]`, `[a,b]`, `["a", "b"]`
            value = value[1:-1]
            value = [v.strip().strip("'\"") for v in value.split(",") if v.strip()]
        elif isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    try:
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and ("e" in value.lower()) else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return ("true" if value else "false") if isinstance(value, bool) else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported type {typ}")  # pragma: no cover


def set_value(cfg: Config, dotted: str, value: Any, origin: str = "override") -> None:
    section, _, name = dotted.partition(".")
    if section not in _SECTION_TYPES or not name:
        raise ConfigError(f"{origin}: unknown section {section!r}{_suggest(section, list(_SECTION_TYPES))}")
    train_fields = _field_types("train")
    if section in ("sft", "dpo") and name.startswith("train."):  # a [train] setting for the fine-tuning stage
        key = name.removeprefix("train.")
        if key not in train_fields:
            raise ConfigError(f"{origin}: unknown key {dotted!r}{_suggest(key, list(train_fields))}")
        getattr(cfg, section).train[key] = _coerce(value, train_fields[key], f"{origin}: {dotted}")
        return
    types_ = _field_types(section)
    if section in ("sft", "dpo") and name.startswith("lora_"):  # litgpt's and PEFT's spelling
        raise ConfigError(f"{origin}: {dotted!r} is 'lora.{name.removeprefix('lora_')}': adapters are set in [lora] "
                          "for every fine-tuning stage")
    if section == "sft" and name in train_fields:
        raise ConfigError(f"{origin}: {dotted!r} is now 'sft.train.{name}': fine-tuning takes any [train] setting "
                          f"under [sft.train]")
    if name not in types_:
        raise ConfigError(f"{origin}: unknown key {dotted!r}{_suggest(name, list(types_))}")
    if typing.get_origin(types_[name]) is dict:
        raise ConfigError(f"{origin}: {dotted!r} is a table: set its fields, e.g. --{dotted}.lr=1e-4")
    setattr(getattr(cfg, section), name, _coerce(value, types_[name], f"{origin}: {dotted}"))


def merge_dict(cfg: Config, data: dict[str, Any], origin: str, prefix: str = "") -> None:
    """Set every value of a parsed TOML document (or a saved config); sub-tables such as [sft.train] nest."""
    for key, value in data.items():
        if not prefix and not isinstance(value, dict):
            raise ConfigError(f"{origin}: top-level key {key!r} must be a [section]{_suggest(key, list(_SECTION_TYPES))}")
        if isinstance(value, dict):
            merge_dict(cfg, value, origin, f"{prefix}{key}.")
        else:
            set_value(cfg, f"{prefix}{key}", value, origin)


PRESET_DIRS = [
    Path(__file__).resolve().parent / "configs",  # installed wheel
    Path(__file__).resolve().parents[2] / "configs",  # source checkout / editable install
]


PRESET_ALIASES = {"seed-26m": "gpu-26m", "seed2-llama": "gpu-46m"}  # the names they had, after the seed projects


def preset_names() -> list[str]:
    return sorted({p.stem for d in PRESET_DIRS if d.is_dir() for p in d.glob("*.toml")})


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        return path
    name_or_path = PRESET_ALIASES.get(name_or_path, name_or_path)
    for d in PRESET_DIRS:
        candidate = d / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no config file or preset named {name_or_path!r}{_suggest(name_or_path, preset_names())}")


def load_config(name_or_path: str | None = None, overrides: list[str] | dict[str, Any] | None = None,
                base: Config | None = None) -> Config:
    """Defaults (or `base`), then a preset or TOML file, then overrides (`section.field=value`)."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if name_or_path:
        path = resolve_preset(name_or_path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
        merge_dict(cfg, data, str(path))
    if isinstance(overrides, dict):
        for k, v in overrides.items():
            set_value(cfg, k, v)
    else:
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like section.field=value")
            set_value(cfg, key.strip().lstrip("-"), value.strip())
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    merge_dict(cfg, data, "saved config")
    return cfg.validate()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def to_toml(cfg: Config) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
        lines.append("")
        for table, items in ((k, v) for k, v in values.items() if isinstance(v, dict)):
            lines.append(f"[{section}.{table}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in items.items()]
            lines.append("")
    return "\n".join(lines)


def help_text(sections=None) -> str:
    """Every field of `sections` (default: all) with its meaning (the comment beside it in this file)."""
    out = []
    for section, cls in _SECTION_TYPES.items():
        if sections is not None and section not in sections:
            continue
        comments = {}
        for line in inspect.getsource(cls).splitlines():
            match = re.match(r"\s+(\w+): [^=]+=.*?\s#\s(.+)$", line)  # the first " # " starts the help
            if match:
                comments[match[1]] = match[2]
        default = cls()
        for f in dataclasses.fields(cls):
            flag = f"{section}.{f.name}" + (".FIELD" if isinstance(getattr(default, f.name), dict) else "")
            out.append(f"  --{flag:<28} {comments.get(f.name, '')} [{getattr(default, f.name)!r}]")
    return "\n".join(out)


__all__ = [
    "CleanConfig", "CollectConfig", "Config", "ConfigError", "DataConfig", "DPOConfig", "LoRAConfig", "ModelConfig", "RunConfig", "SFTConfig", "SampleConfig", "TokenizerConfig", "TrainConfig",
    "config_from_dict", "load_config", "preset_names", "to_toml",
]
