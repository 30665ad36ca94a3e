"""model.size: the ladder, the scaling law and its fit, the choice for a budget, and how a run uses it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from conftest import tiny_config
from tinylm import sizing
from tinylm.checkpoint import checkpoint_config, checkpoint_model_config, latest_checkpoint
from tinylm.config import OPTIMIZERS, ConfigError, ModelConfig, load_config
from tinylm.model import Transformer
from tinylm.pipeline import pretrain
from tinylm.sizing import (LADDER, ScalingLaw, choose_size, effective_tokens, fit_law, fit_positions, shaped,
                           window_excess)


def test_repeated_tokens_count_less_and_less():
    unique = 1e6
    assert effective_tokens(5e5, unique) == 5e5 and effective_tokens(unique, unique) == unique
    seen = [effective_tokens(unique * (1 + r), unique) for r in (0.01, 1, 4, 16, 64, 1000)]
    assert all(b > a for a, b in zip(seen, seen[1:]))  # more data still helps ...
    assert seen[0] == pytest.approx(unique * 1.01, rel=1e-3)  # a first repeat counts almost fully
    assert seen[-2] < seen[-1] <= unique * (1 + sizing.REPEAT_SCALE)  # ... up to a ceiling of R* + 1 passes' worth
    assert effective_tokens(3e6, None) == 3e6  # unknown data size: no discount


def test_the_fit_recovers_a_law_it_was_given():
    truth = ScalingLaw(E=1.7, A=40.0, B=300.0, alpha=0.34, beta=0.28)
    points = [(n, d, 2e6, 4096, truth.loss(n, d, 2e6)) for n in (3e5, 1e6, 4e6, 1.5e7) for d in (1e6, 5e6, 2e7)]
    law, rms = fit_law(points)
    assert rms < 1e-6 and (law.alpha, law.beta) == (truth.alpha, truth.beta)
    assert law.noise_scale == 0  # one batch cannot tell a noise scale from B
    assert law.loss(2e6, 8e6, 2e6) == pytest.approx(truth.loss(2e6, 8e6, 2e6), abs=1e-6)


def test_the_fit_recovers_the_noise_scale_from_points_at_several_batches():
    truth = ScalingLaw(E=1.7, A=40.0, B=120.0, alpha=0.34, beta=0.28, noise_scale=2048.0 * 4 ** 4.762,
                       noise_exponent=4.762)  # 2,048 tokens at a loss of 4 nats, more below
    points = [(n, d, 2e6, b, truth.loss(n, d, 2e6, b)) for n in (3e5, 1e6, 4e6) for d in (3e6, 1e7, 3e7)
              for b in (256, 1024, 2048)]
    assert all(3 < p[-1] < 6 for p in points)
    assert truth.loss(3e5, 1e6, 2e6, 4096) == math.inf  # no fixed point: steps this large at this loss do not learn
    law, rms = fit_law(points)
    assert rms < 1e-6 and (law.alpha, law.beta, law.noise_exponent) == (truth.alpha, truth.beta, truth.noise_exponent)
    assert law.noise_scale == pytest.approx(truth.noise_scale, rel=1e-9)
    assert law.noise(4.0) == pytest.approx(2048.0)
    assert law.noise(3.0) > law.noise(4.0) > law.noise(5.0)  # Kaplan: B_noise grows as the loss falls
    # the prediction is a fixed point: the loss it returns is the one its noise scale was taken at
    predicted = truth.loss(1e6, 3e6, 2e6, 4096)
    seen = effective_tokens(3e6, 2e6) / (1 + 4096 / truth.noise(predicted))
    assert predicted == pytest.approx(truth.E + truth.A / 1e6 ** truth.alpha + truth.B / seen ** truth.beta, abs=1e-9)


def test_a_smaller_batch_learns_more_from_the_same_tokens_by_mccandlish_factor():
    law = ScalingLaw(E=1.5, A=30.0, B=400.0, alpha=0.34, beta=0.28, noise_scale=1024.0)
    # steps of b tokens need 1 + b / B_noise times the tokens of tiny steps: 2x at b = B_noise, 5x at 4 B_noise
    assert law.loss(1e6, 2e6, None, 1024) == pytest.approx(law.loss(1e6, 1e6, None, 1), rel=1e-3)
    assert law.loss(1e6, 5e6, None, 4096) == pytest.approx(law.loss(1e6, 2e6, None, 1024), rel=1e-9)
    assert law.loss(1e6, 1e6, None, 1024) < law.loss(1e6, 1e6, None, 4096)
    assert ScalingLaw(1.5, 30.0, 400.0, 0.34, 0.28).loss(1e6, 1e6, None, 1024) == law.loss(1e6, 1e6)  # no term


SHIPPED = json.loads((Path(sizing.__file__).with_name("scaling.json")).read_text())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizers_shipped_law_prefers_more_parameters_and_more_data_and_fits_its_points(optimizer):
    law = ScalingLaw.load(optimizer)
    assert law.A >= 0 and law.B >= 0 and law.noise_scale >= 0 and math.isfinite(law.E)
    assert law.loss(4e6, 1e7, 3e6, 4096) < law.loss(1e6, 1e7, 3e6, 4096)
    assert law.loss(4e6, 2e7, 3e6, 4096) < law.loss(4e6, 1e7, 3e6, 4096)
    record = SHIPPED["laws"][optimizer]
    assert {p["optimizer"] for p in record["points"]} == {optimizer}
    for p in record["points"]:  # what the file records is what the law predicts
        predicted = law.loss(p["params"], p["tokens"], p["unique_tokens"], p["tokens_per_step"])
        assert predicted == pytest.approx(p["predicted"], abs=1e-3) and abs(predicted - p["loss"]) < 0.1
    rms = math.sqrt(sum((law.loss(p["params"], p["tokens"], p["unique_tokens"], p["tokens_per_step"]) - p["loss"]) ** 2
                        for p in record["points"]) / len(record["points"]))
    assert law.error == pytest.approx(rms, abs=1e-4) == record["rms_error"]


def test_a_law_file_without_the_optimizers_law_names_it(tmp_path):
    path = tmp_path / "scaling.json"
    path.write_text(json.dumps({"laws": {"adamw": SHIPPED["laws"]["adamw"]}}))
    assert ScalingLaw.load("adamw", path) == ScalingLaw(**SHIPPED["laws"]["adamw"]["law"])
    with pytest.raises(ValueError, match=r"scaling\.json holds scaling laws for adamw, not for train\.optimizer='muon'"):
        ScalingLaw.load("muon", path)


def test_the_context_term_is_a_windows_mean_excess_loss_against_the_laws_context():
    law = ScalingLaw(E=1.5, A=30.0, B=400.0, alpha=0.34, beta=0.28, context=256, position_scale=1.5,
                     position_exponent=1.0)
    # c / t summed over a window is c times the harmonic number: H_T = ln T + Euler-Mascheroni + 1 / 2T - ...
    harmonic = lambda n: math.log(n) + 0.5772156649 + 1 / (2 * n) - 1 / (12 * n * n)  # noqa: E731
    assert window_excess(256, 1.5, 1.0) == pytest.approx(1.5 * harmonic(256) / 256, rel=1e-6)
    assert law.context_loss(128) == pytest.approx(1.5 * (harmonic(128) / 128 - harmonic(256) / 256), rel=1e-5)
    assert law.context_loss(256) == 0 and law.context_loss(128) > 0 > law.context_loss(512)
    assert law.loss(1e6, 1e7, None, None, 128) == pytest.approx(law.loss(1e6, 1e7) + law.context_loss(128))
    assert law.loss(1e6, 1e7) == law.loss(1e6, 1e7, None, None, 256)  # the law's own context: no term
    assert dataclasses.replace(law, position_scale=0.0).context_loss(64) == 0  # no term: the context is free


def test_the_position_fit_recovers_a_curve_it_was_given():
    t = [float(x) for x in range(1, 257)]
    wobble = [0.01 * math.sin(x) for x in t]  # what a finite held-out split adds
    c, gamma, l_inf, rms = fit_positions([3.8 + 1.2 * x ** -0.7 + w for x, w in zip(t, wobble)])
    assert gamma == pytest.approx(0.7, abs=0.02) and c == pytest.approx(1.2, rel=0.05)
    assert l_inf == pytest.approx(3.8, abs=0.01) and rms < 0.011
    with pytest.raises(ValueError, match="does not fall"):
        fit_positions([3.8 - 0.5 * x ** -0.7 for x in t])  # context that hurts: no term


def test_the_shipped_context_term_is_the_fit_of_the_losses_it_records_in_every_law():
    record = SHIPPED["positions"]
    c, gamma, l_inf, _ = fit_positions(record["losses"])
    for optimizer in OPTIMIZERS:
        law = ScalingLaw.load(optimizer)
        assert (law.position_scale, law.position_exponent) == (pytest.approx(c, rel=1e-4), gamma)
        assert law.context == 256 == record["context_measured"] == len(record["losses"])
        assert all(p["tokens_per_step"] // p["batch_size"] == law.context for p in SHIPPED["laws"][optimizer]["points"])
        assert 0 < law.context_loss(128) < 0.1 and -0.1 < law.context_loss(512) < 0


def test_a_size_decides_the_shape_and_refuses_one_set_beside_it():
    cfg = load_config("cpu-demo")
    assert cfg.model.size == "auto"
    with pytest.raises(ConfigError, match=r"model\.dim=384 is set beside model\.size='auto'"):
        load_config("cpu-demo", {"model.dim": 384})
    with pytest.raises(ConfigError, match="model.size must be"):
        load_config("cpu-demo", {"model.size": "huge"})
    assert load_config("cpu-demo", {"model.size": ""}).model.dim == ModelConfig().dim  # the shape as set
    m = shaped(cfg.model, "l")
    assert (m.size, m.dim, m.n_layers, m.n_heads, m.n_kv_heads) == ("", *LADDER["l"])
    assert m.max_seq_len == cfg.model.max_seq_len  # context stays as set


def _fake_pace(monkeypatch, seconds_per_gflop: float, overhead_s: float = 0.0):
    """Step times proportional to the work (plus a fixed cost a step), so that the test knows what each
    size and batch costs."""
    timed = []

    def time_step(model, tc, rt, batch_size, seq_len, repeats=2):
        timed.append((model.cfg.dim, seq_len))
        return model.flops_per_token(seq_len) * batch_size * seq_len / 1e9 * seconds_per_gflop + overhead_s

    monkeypatch.setattr(sizing, "time_step", time_step)
    return timed


def test_the_choice_is_the_lowest_predicted_loss_and_the_search_stops_past_it(monkeypatch):
    from tinylm.train import setup_runtime

    model_cfg = ModelConfig(size="auto", max_seq_len=64, vocab_size=512)
    tc = load_config("tiny", {"train.compile": "false", "train.max_steps": 0, "train.max_time": 60}).train
    rt = setup_runtime(tc)
    timed = _fake_pace(monkeypatch, 0.02)
    law = ScalingLaw(E=1.5, A=30.0, B=400.0, alpha=0.34, beta=0.28)
    tokens_per_step = tc.batch_size * 64
    chosen = choose_size(model_cfg, tc, rt, 64, 60.0, 10**9, tokens_per_step, None, law=law, say=lambda s: None)

    def predicted(name):  # the same arithmetic, from the fake pace, for every size
        m = Transformer(shaped(model_cfg, name))
        step = m.flops_per_token(64) * tokens_per_step / 1e9 * 0.02
        return law.loss(m.num_params(embeddings=False), 60.0 / step * tokens_per_step, 10**9)

    losses = {name: predicted(name) for name in LADDER}
    best = min(losses, key=losses.get)
    assert chosen.name == best and chosen.loss == pytest.approx(losses[best])
    order = list(LADDER)
    assert len(timed) == order.index(best) + 2  # one past the best was timed, none after it


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_without_a_law_given_the_choice_predicts_with_the_law_of_the_optimizer_it_trains_with(monkeypatch, optimizer):
    from tinylm.train import setup_runtime

    model_cfg = ModelConfig(size="auto", max_seq_len=64, vocab_size=512)
    tc = load_config("tiny", {"train.compile": "false", "train.max_steps": 0, "train.max_time": 60,
                              "train.optimizer": optimizer}).train
    _fake_pace(monkeypatch, 0.02)
    said = []
    chosen = choose_size(model_cfg, tc, setup_runtime(tc), 64, 60.0, 10**9, tc.batch_size * 64, None, say=said.append)
    law = ScalingLaw.load(optimizer)
    assert chosen.loss == pytest.approx(law.loss(chosen.params, chosen.tokens, 10**9, None, 64))
    assert any(f"scaling law of {optimizer} runs" in line for line in said)


def test_with_a_noise_scale_the_batch_is_chosen_too_between_steps_learning_more_and_running_slower(monkeypatch):
    from tinylm.train import setup_runtime

    model_cfg = ModelConfig(size="auto", max_seq_len=64, vocab_size=512)
    tc = load_config("tiny", {"train.compile": "false", "train.max_steps": 0, "train.max_time": 60,
                              "train.batch_size": 16}).train
    law = ScalingLaw(E=1.5, A=30.0, B=400.0, alpha=0.34, beta=0.28, noise_scale=1024.0)
    assert sizing.batch_choices(16, law) == [16, 8, 4] and sizing.batch_choices(2, law) == [2, 1]
    assert sizing.batch_choices(16, dataclasses.replace(law, noise_scale=0.0)) == [16]  # no term: the batch as set

    def predicted(name, batch, overhead_s):
        m = Transformer(shaped(model_cfg, name))
        step = m.flops_per_token(64) * batch * 64 / 1e9 * 0.02 + overhead_s
        return law.loss(m.num_params(embeddings=False), 60.0 / step * batch * 64, 10**9, batch * 64)

    for overhead_s in (0.0, 0.2):  # free small steps favour the quarter batch; a cost a step, a larger one
        timed = _fake_pace(monkeypatch, 0.02, overhead_s)
        chosen = choose_size(model_cfg, tc, setup_runtime(tc), 64, 60.0, 10**9, 16 * 64, None, law=law,
                             say=lambda s: None)
        tried = {(name, b): predicted(name, b, overhead_s) for name in list(LADDER)[:len(timed) // 3] for b in (16, 8, 4)}
        assert (chosen.name, chosen.batch_size) == min(tried, key=tried.get)
        assert chosen.loss == pytest.approx(min(tried.values()))
        assert chosen.batch_size == 4 if overhead_s == 0 else chosen.batch_size > 4
    unsure = dataclasses.replace(law, error=1.0)  # a gain within the law's error does not move the batch
    chosen = choose_size(model_cfg, tc, setup_runtime(tc), 64, 60.0, 10**9, 16 * 64, None, law=unsure, say=lambda s: None)
    assert chosen.batch_size == 16 and chosen.score == chosen.loss


def test_a_size_the_budget_cannot_train_is_not_timed(monkeypatch):
    from tinylm.train import setup_runtime

    tc = load_config("tiny", {"train.compile": "false", "train.max_steps": 0, "train.max_time": 1}).train
    timed = _fake_pace(monkeypatch, 0.05)
    law = ScalingLaw(E=1.5, A=1e6, B=1e-9, alpha=0.34, beta=0.28)  # bigger is always better
    chosen = choose_size(ModelConfig(size="auto", max_seq_len=64, vocab_size=512), tc, setup_runtime(tc), 64, 1.0,
                         10**9, tc.batch_size * 64, None, law=law, say=lambda s: None)
    assert chosen.name == "xs" and len(timed) == 1  # "s" would make fewer than MIN_STEPS: not even measured


def test_half_the_context_is_timed_where_its_work_could_pay_and_trained_where_it_does(monkeypatch):
    from tinylm.train import setup_runtime

    model_cfg = ModelConfig(size="auto", max_seq_len=1024, vocab_size=512)  # attention is ~40% of xs's work here
    tc = load_config("tiny", {"train.compile": "false", "train.max_steps": 0, "train.max_time": 60,
                              "train.batch_size": 4}).train
    law = ScalingLaw(E=1.5, A=30.0, B=40.0, alpha=0.34, beta=0.28, context=1024, position_scale=1.5,
                     position_exponent=1.0)
    assert sizing.context_choices(1024, law) == [1024, 512] and sizing.context_choices(100, law) == [100]
    assert sizing.context_choices(1024, dataclasses.replace(law, position_scale=0.0)) == [1024]

    def predicted(context, batch):  # xs (the budget gives s fewer than MIN_STEPS steps) from the fake pace
        m = Transformer(dataclasses.replace(shaped(model_cfg, "xs"), max_seq_len=context))
        step = m.flops_per_token(context) * batch * context / 1e9 * 0.02
        return law.loss(m.num_params(embeddings=False), 60.0 / step * batch * context, 10**9, batch * context, context)

    def choose(law):
        timed = _fake_pace(monkeypatch, 0.02)
        return choose_size(model_cfg, tc, setup_runtime(tc), 1024, 60.0, 10**9, 4 * 1024, None, law=law,
                           say=lambda s: None), timed

    assert predicted(512, 8) < predicted(1024, 4) - 0.05  # 1.23x the steps outweigh the shorter context's 0.009 nats
    chosen, timed = choose(law)
    assert (chosen.name, chosen.model.max_seq_len, chosen.batch_size) == ("xs", 512, 8)  # a step keeps its tokens
    assert chosen.loss == pytest.approx(predicted(512, 8)) and (128, 512) in timed
    for unpaid in (dataclasses.replace(law, position_scale=15.0), dataclasses.replace(law, error=0.1)):
        chosen, timed = choose(unpaid)  # too dear a context, or a gain within the law's error: not even timed
        assert (chosen.model.max_seq_len, chosen.batch_size) == (1024, 4) and all(t == 1024 for _, t in timed)


def _sized(prepared, size: str, **overrides):
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **overrides)
    return dataclasses.replace(cfg, model=ModelConfig(size=size, max_seq_len=cfg.model.max_seq_len))


def test_a_run_trains_the_size_it_names_and_auto_needs_a_time_budget(prepared, tmp_path):
    pretrain(_sized(prepared, "xs", **{"train.max_steps": 2, "train.save_every": 0}), prepared["shards"], tmp_path / "xs")
    saved = checkpoint_model_config(latest_checkpoint(tmp_path / "xs"))
    assert (saved.size, saved.dim, saved.n_layers) == ("", 128, 4)  # a checkpoint records the shape
    with pytest.raises(ConfigError, match="needs|time budget"):
        pretrain(_sized(prepared, "auto", **{"train.max_steps": 2}), prepared["shards"], tmp_path / "auto")


def test_auto_trains_what_it_chose_and_a_resumed_run_keeps_it(prepared, tmp_path, monkeypatch):
    chosen = []
    real = sizing.choose_size

    def spy(*args, **kwargs):
        chosen.append(real(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(sizing, "choose_size", spy)
    _fake_pace(monkeypatch, 0.5)
    cfg = _sized(prepared, "auto", **{"train.max_steps": 0, "train.max_time": 2, "train.save_every": 0,
                                      "train.compile": "false"})
    pretrain(cfg, prepared["shards"], tmp_path)
    saved = checkpoint_model_config(latest_checkpoint(tmp_path))
    assert len(chosen) == 1 and (saved.dim, saved.n_layers) == (chosen[0].model.dim, chosen[0].model.n_layers)
    assert checkpoint_config(latest_checkpoint(tmp_path)).train.batch_size == chosen[0].batch_size
    pretrain(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_time=3)), prepared["shards"], tmp_path)
    assert len(chosen) == 1  # resumed: its checkpoint's shape and batch, nothing measured again
    assert checkpoint_config(latest_checkpoint(tmp_path)).train.batch_size == chosen[0].batch_size


def test_auto_trains_and_validates_at_the_context_it_chose(prepared, tmp_path, monkeypatch):
    real = sizing.choose_size

    def halved(*args, **kwargs):  # what the sizer returns where half the context wins
        c = real(*args, **kwargs)
        return dataclasses.replace(c, model=dataclasses.replace(c.model, max_seq_len=c.model.max_seq_len // 2),
                                   batch_size=c.batch_size * 2)

    monkeypatch.setattr(sizing, "choose_size", halved)
    _fake_pace(monkeypatch, 0.5)
    cfg = _sized(prepared, "auto", **{"train.max_steps": 0, "train.max_time": 2, "train.save_every": 0,
                                      "train.compile": "false"})
    pretrain(cfg, prepared["shards"], tmp_path)  # a window longer than the model's context would raise
    saved = checkpoint_config(latest_checkpoint(tmp_path))
    assert saved.model.max_seq_len == cfg.model.max_seq_len // 2 and saved.train.batch_size == 2 * cfg.train.batch_size
    tok_cfg = json.loads((latest_checkpoint(tmp_path) / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == saved.model.max_seq_len  # what transformers truncates at is the model's
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)


def test_a_cpu_peak_read_low_under_load_gives_way_to_the_best_seen(tmp_path, monkeypatch):
    import torch

    from tinylm.device import best_cpu_peak

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert best_cpu_peak(torch.bfloat16, 4e11) == 4e11
    assert best_cpu_peak(torch.bfloat16, 1.5e11) == 4e11  # a neighbour halved this one: the earlier stands
    assert best_cpu_peak(torch.bfloat16, 5e11) == 5e11 and best_cpu_peak(torch.bfloat16, 1e11) == 5e11
    assert best_cpu_peak(torch.float32, 1e11) == 1e11  # each precision apart
    (tmp_path / "tinylm" / "peak.json").write_text("not json")
    assert best_cpu_peak(torch.bfloat16, 2e11) == 2e11  # a damaged cache is no error
