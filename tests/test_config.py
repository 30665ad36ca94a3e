import pytest

from tinylm.config import ConfigError, config_from_dict, load_config, preset_names, to_toml
from tinylm.model import Transformer


def test_presets_exist_and_load():
    names = preset_names()
    for required in ("tiny", "cpu-demo", "gpu-26m", "gpu-46m"):
        assert required in names
        load_config(required)
    assert load_config("seed-26m") == load_config("gpu-26m")  # the old names still work
    assert load_config("seed2-llama") == load_config("gpu-46m")


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.lr=1e-4", "model.n_layers=3", "train.compile=true",
                               "data.corpus=a.txt,b.jsonl", "train.max_tokens=2e6"])
    assert cfg.train.lr == 1e-4 and cfg.model.n_layers == 3 and cfg.train.compile == "true"
    assert cfg.data.corpus == ["a.txt", "b.jsonl"] and cfg.train.max_tokens == 2_000_000


@pytest.mark.parametrize("override, hint", [
    ("train.lrr=1", "did you mean 'lr'"),
    ("trian.lr=1", "did you mean 'train'"),
    ("model.dim=abc", "expected int"),
    ("train.compile=maybe", "train.compile must be 'auto', 'true' or 'false'"),
])
def test_bad_overrides_are_explained(override, hint):
    with pytest.raises(ConfigError, match=hint):
        load_config("tiny", [override])


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tinny")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("gpu-46m", ["sample.stop=a,b"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(str(path)) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_invalid_model_shape_is_rejected():
    with pytest.raises(ConfigError, match="not divisible"):
        load_config("tiny", ["model.dim=66"])


@pytest.mark.parametrize("preset, low, high", [("gpu-26m", 25e6, 27e6), ("gpu-46m", 35e6, 47e6)])
def test_seed_preset_sizes(preset, low, high):
    cfg = load_config(preset)
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    n = Transformer(cfg.model).num_params()
    assert low < n < high, n


def test_config_help_lists_every_field_under_its_real_flag():
    from tinylm.config import Config, help_text

    flags = [line.split()[0][2:] for line in help_text().splitlines()]
    expected = [f"{section}.{name}" + (".FIELD" if isinstance(value, dict) else "")
                for section, values in Config().to_dict().items() for name, value in values.items()]
    assert sorted(flags) == sorted(expected)
    for flag in flags:  # each one is accepted by the override parser
        if flag in ("sft.train.FIELD", "dpo.train.FIELD"):  # a table of [train] settings: every [train] field goes in
            stage = flag.split(".")[0]
            for name, value in Config().train.__dict__.items():
                assert getattr(load_config("tiny", [f"{stage}.train.{name}={value}"]), stage).train[name] == value
            continue
        section, name = flag.split(".")
        load_config("tiny", [f"{flag}={getattr(getattr(Config(), section), name) if not isinstance(getattr(getattr(Config(), section), name), list) else ''}"])


def test_fine_tuning_takes_train_lr_for_the_embedding_unless_its_table_sets_one():
    cfg = load_config("tiny", ["train.embedding_lr=6e-3"])
    assert cfg.stage_train("pretrain").embedding_lr == 6e-3
    assert cfg.stage_train("sft").embedding_lr == 0.0 and cfg.stage_train("dpo").embedding_lr == 0.0
    assert load_config("tiny", ["sft.train.embedding_lr=1e-4"]).stage_train("sft").embedding_lr == 1e-4
    with pytest.raises(ConfigError, match="train.embedding_lr is a learning rate"):
        load_config("tiny", ["train.embedding_lr=-1"])


def test_a_short_context_first_is_refused_where_it_cannot_do_what_it_says():
    """train.short_seq_len must divide the model's context and come with a share of the run; a share
    alone, or a short context for fine-tuning's whole examples, would do nothing: refused by name."""
    full = load_config("tiny").model.max_seq_len
    cfg = load_config("tiny", [f"train.short_seq_len={full // 2}", "train.short_seq_fraction=0.6"])
    assert (cfg.train.short_seq_len, cfg.stage_train("sft").short_seq_len) == (full // 2, 0)  # pretraining only
    for flags, refusal in (([f"train.short_seq_len={full // 2}"], "short_seq_fraction is the share"),
                           ([f"train.short_seq_len={full // 2}", "train.short_seq_fraction=1"], "short_seq_fraction is the share"),
                           (["train.short_seq_fraction=0.5"], "does nothing without train.short_seq_len"),
                           ([f"train.short_seq_len={full // 2 + 1}", "train.short_seq_fraction=0.5"], "divide it"),
                           ([f"train.short_seq_len={full}", "train.short_seq_fraction=0.5"], "must be shorter"),
                           ([f"sft.train.short_seq_len={full // 2}"], "sft.train.short_seq_len: a short context first is for pretraining")):
        with pytest.raises(ConfigError, match=refusal):
            load_config("tiny", flags)


def test_sft_trains_with_train_settings_under_its_own_table(tmp_path):
    cfg = load_config("tiny", ["train.lr=2e-3", "train.grad_clip=0.5", "sft.train.lr=1e-5"])
    pre, sft = cfg.stage_train("pretrain"), cfg.stage_train("sft")
    assert (pre.lr, sft.lr) == (2e-3, 1e-5)
    assert sft.grad_clip == 0.5 and sft.batch_size == 4 and pre.batch_size == 8  # [train], then tiny's [sft.train]
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert "[sft.train]" in path.read_text() and load_config(str(path)) == cfg
    with pytest.raises(ConfigError, match="is now 'sft.train.lr'"):  # the old place is refused, not ignored
        load_config("tiny", ["sft.lr=1e-4"])
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config("tiny", ["sft.train.lrr=1e-4"])
    with pytest.raises(ConfigError, match="is a table"):
        load_config("tiny", ["sft.train=1"])
