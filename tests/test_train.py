import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tinylm.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, remove_partial
from tinylm.config import TrainConfig
from tinylm.pipeline import pretrain
from tinylm.shards import load_split
from tinylm.train import lr_at

from conftest import tiny_config


def _weights(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def _cfg(prepared, **overrides):
    return tiny_config(prepared["cfg"].data.corpus[0], **overrides)


def test_pretraining_lowers_validation_loss(prepared, tmp_path):
    cfg = _cfg(prepared, **{"train.max_steps": 60, "train.eval_every": 3, "train.save_every": 0})
    summary = pretrain(cfg, prepared["shards"], tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    uniform = math.log(cfg.tokenizer.vocab_size)  # the loss of a model that knows nothing
    # the last validation ~1.0 nats below the first (4.80 against 5.80 on the windows validation scores since it
    # stopped recutting them; 0.8 leaves room for the sample) and below a uniform guess by more than 1 nat
    assert len(val) == 20 and val[0] > uniform - 0.5 and val[-1] < uniform - 1.0 and val[-1] < val[0] - 0.8
    assert all(math.isfinite(r["val_bpb"]) for r in records if "val_bpb" in r)
    assert summary["steps"] == 60 and (tmp_path / "config.toml").is_file()
    log = (tmp_path / "train.log").read_text()
    assert "activations per micro-batch" in log and log.count("pace: ") == 1


def test_validation_scores_every_held_out_window_once(prepared, tmp_path):
    """With train.eval_batches covering the split, pretraining's validation loss is the mean loss of
    every full window of the held-out shards at offset 0, each scored once: none left out, none
    scored twice or cut at another offset (the training loader's per-epoch recut once did both)."""
    cfg = _cfg(prepared, **{"train.max_steps": 2, "train.batch_size": 1, "train.eval_batches": 100_000,
                            "train.eval_every": 0, "train.dtype": "fp32"})
    summary = pretrain(cfg, prepared["shards"], tmp_path)
    model = load_checkpoint(latest_checkpoint(tmp_path))[0].eval()
    assert summary["best_val_loss"] == pytest.approx(_every_window_loss(model, prepared, model.cfg.max_seq_len), abs=1e-5)


def test_a_held_out_split_smaller_than_a_batch_trains_without_validation(prepared, tmp_path, capsys):
    """Fewer held-out windows than one validation batch: pretraining runs, says there is no
    validation loss, and records none (the validation loader refuses to be built; pretraining goes on)."""
    seq = prepared["cfg"].model.max_seq_len
    count = lambda split: sum((len(a) - 1) // seq for a in load_split(prepared["shards"], split)[0])  # noqa: E731
    val_windows, train_windows = count("val"), count("train")
    assert 1 <= val_windows < train_windows
    cfg = _cfg(prepared, **{"train.max_steps": 1, "train.batch_size": val_windows + 1, "train.eval_every": 1,
                            "train.save_every": 0, "train.dtype": "fp32"})
    summary = pretrain(cfg, prepared["shards"], tmp_path)
    assert "validation split too small for one batch" in capsys.readouterr().out
    assert summary["steps"] == 1 and summary["best_val_loss"] == float("inf")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and not any("val_loss" in r for r in records)


def test_resumed_run_ends_with_the_same_weights(prepared, tmp_path):
    """Steps 7-12 replayed from the step-6 checkpoint give bit-identical weights."""
    cfg = _cfg(prepared, **{"train.max_steps": 12, "train.save_every": 6, "train.keep_last": 5,
                            "train.eval_every": 4, "model.dropout": 0.1, "train.grad_accum": 2,
                            "train.dropout_from_epoch": 0.06})  # turned on after the step-6 save (epoch 0.041)
    pretrain(cfg, prepared["shards"], tmp_path / "straight")
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight/checkpoints/step-0000006", resumed / "step-0000006")
    pretrain(cfg, prepared["shards"], tmp_path / "resumed")
    a = _weights(tmp_path / "straight/checkpoints/step-0000012")
    b = _weights(resumed / "step-0000012")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "dropout: on from step 10 " in (tmp_path / "resumed" / "train.log").read_text()
    # and the replay really trained: step 12 differs from step 6
    six = _weights(resumed / "step-0000006")
    assert not all(torch.equal(six[k], b[k]) for k in six)


def test_a_short_context_first_grows_at_its_share_of_the_run_and_resumes_exactly(prepared, tmp_path, monkeypatch):
    """train.short_seq_len: the first half of 12 steps at half the context and twice the batch (the same
    tokens a step), the rest at the full context; resumed from a checkpoint before the switch and from one
    after it, the run ends with the same weights bit for bit."""
    from tinylm.data import GrowingBatches

    shapes = []
    real_next = GrowingBatches.next_batch
    monkeypatch.setattr(GrowingBatches, "next_batch", lambda self: shapes.append(tuple((b := real_next(self))[0].shape)) or b)
    full, batch = prepared["cfg"].model.max_seq_len, prepared["cfg"].train.batch_size
    cfg = _cfg(prepared, **{"train.max_steps": 12, "train.save_every": 4, "train.keep_last": 5, "train.eval_every": 4,
                            "train.short_seq_len": full // 2, "train.short_seq_fraction": 0.5, "train.dtype": "fp32"})
    pretrain(cfg, prepared["shards"], tmp_path / "straight")
    assert shapes == [(2 * batch, full // 2)] * 6 + [(batch, full)] * 6
    log = (tmp_path / "straight" / "train.log").read_text()
    assert f"context: {full} tokens at batch {batch} from step 7 (50% of the run" in log
    final = _weights(tmp_path / "straight/checkpoints/step-0000012")
    for before in (4, 8):  # in the short phase, and after the switch
        resumed = tmp_path / f"from{before}" / "checkpoints"
        resumed.mkdir(parents=True)
        shutil.copytree(tmp_path / f"straight/checkpoints/step-{before:07d}", resumed / f"step-{before:07d}")
        shapes.clear()
        pretrain(cfg, prepared["shards"], tmp_path / f"from{before}")
        assert shapes == [(2 * batch, full // 2)] * (6 - before if before < 6 else 0) + [(batch, full)] * min(6, 12 - before)
        again = _weights(resumed / "step-0000012")
        assert all(torch.equal(final[k], again[k]) for k in final)
    # a checkpoint of the other layout is refused by name, not resumed into other batches
    plain = _cfg(prepared, **{"train.max_steps": 12, "train.dtype": "fp32"})
    with pytest.raises(ValueError, match="trained on a short context first"):
        pretrain(plain, prepared["shards"], tmp_path / "straight")


def test_a_short_context_first_still_validates_at_the_full_context(prepared, tmp_path):
    """Validation scores every held-out window of the model's full context, whatever context trained last."""
    full = prepared["cfg"].model.max_seq_len
    cfg = _cfg(prepared, **{"train.max_steps": 2, "train.batch_size": 1, "train.eval_batches": 100_000,
                            "train.eval_every": 1, "train.short_seq_len": full // 2, "train.short_seq_fraction": 0.9,
                            "train.dtype": "fp32", "train.save_every": 1, "train.keep_last": 5})
    pretrain(cfg, prepared["shards"], tmp_path)
    first = load_checkpoint(tmp_path / "checkpoints" / "step-0000001")[0].eval()  # still in the short phase
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[0]["val_loss"] == pytest.approx(_every_window_loss(first, prepared, full), abs=1e-4)


def _every_window_loss(model, prepared, seq):
    """The mean loss of every full window of seq + 1 held-out tokens at offset 0, each scored once."""
    arrays, _ = load_split(prepared["shards"], "val")
    losses = []
    with torch.no_grad():
        for a in arrays:
            for start in range(0, len(a) - seq, seq):
                w = torch.from_numpy(a[start:start + seq + 1].astype(np.int64))[None]
                losses.append(model(w[:, :-1], w[:, 1:])[1].item())
    assert len(losses) > 10
    return sum(losses) / len(losses)


def test_dropout_from_epoch_leaves_the_first_pass_undropped(prepared, tmp_path):
    """Until train.dropout_from_epoch (1: until the data repeat; 0.02 here), the run is the
    dropout-free run step for step; from there on dropout is on (the losses part), and the log says
    from which step."""
    def losses(name, **overrides):
        cfg = _cfg(prepared, **{"train.max_steps": 14, "train.save_every": 0, "train.eval_every": 0,
                                "train.log_every": 1, "train.batch_size": 8, **overrides})
        pretrain(cfg, prepared["shards"], tmp_path / name)
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["epoch"], r["loss"]) for r in records if "loss" in r], (tmp_path / name / "train.log").read_text()

    plain, _ = losses("plain", **{"model.dropout": 0.0})
    late, log = losses("late", **{"model.dropout": 0.5, "train.dropout_from_epoch": 0.02})
    first = int(log.split("dropout: on from step ")[1].split()[0])  # the first step with dropout
    assert plain[first - 2][0] >= 0.02 > plain[first - 3][0]  # the epoch reached 0.02 after step first - 1
    assert 3 < first < len(plain) - 2
    assert plain[: first - 1] == late[: first - 1]
    assert all(late[i][1] != plain[i][1] for i in range(first - 1, len(plain)))


def test_checkpoints_are_pruned_and_latest_is_complete(prepared, tmp_path):
    cfg = _cfg(prepared, **{"train.max_steps": 9, "train.save_every": 3, "train.keep_last": 2})
    pretrain(cfg, prepared["shards"], tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-0000006", "step-0000009"]
    (tmp_path / "checkpoints" / "step-0000012.tmp").mkdir()  # as a crash mid-save would leave it
    assert latest_checkpoint(tmp_path).name == "step-0000009"  # a reader skips it and leaves it alone
    assert (tmp_path / "checkpoints" / "step-0000012.tmp").exists()
    assert remove_partial(tmp_path) == ["step-0000012.tmp"]  # the trainer removes it before resuming
    assert not (tmp_path / "checkpoints" / "step-0000012.tmp").exists()


def test_loading_is_strict_about_corruption(prepared, tmp_path):
    cfg = _cfg(prepared, **{"train.max_steps": 2, "train.save_every": 0})
    pretrain(cfg, prepared["shards"], tmp_path)
    ckpt = latest_checkpoint(tmp_path)
    model, tok, meta = load_checkpoint(ckpt)
    assert meta["trainer"]["step"] == 2 and tok.vocab_size == model.cfg.vocab_size
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its SHA-256"):
        load_checkpoint(ckpt)


def test_trainer_state_loads_without_unpickling_code(prepared, tmp_path):
    cfg = _cfg(prepared, **{"train.max_steps": 1})
    pretrain(cfg, prepared["shards"], tmp_path)
    state = torch.load(latest_checkpoint(tmp_path) / "trainer_state.pt", weights_only=True)
    assert {"optimizer", "scaler", "rng_cpu"} <= set(state)


@pytest.mark.parametrize("dtype,optimizer", [("fp32", "adamw"), ("bf16", "adamw"), ("fp16", "adamw"), ("fp16", "muon")])
def test_both_precisions_train(prepared, tmp_path, dtype, optimizer):
    """Every precision trains; fp16's gradient scaler also drives Muon beside AdamW (the default
    run's optimizer on a GPU without bf16)."""
    cfg = _cfg(prepared, **{"train.max_steps": 6, "train.dtype": dtype, "train.eval_every": 3,
                            "train.optimizer": optimizer})
    summary = pretrain(cfg, prepared["shards"], tmp_path)
    assert math.isfinite(summary["best_val_loss"])
    val = [json.loads(line)["val_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert val[-1] < val[0]
    if dtype == "fp16":
        state = torch.load(latest_checkpoint(tmp_path) / "trainer_state.pt", weights_only=True)
        assert state["scaler"]["scale"] > 0


def test_schedule_warms_up_then_decays_to_the_floor():
    tc = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 0.0, tc) == pytest.approx(0.1)
    assert lr_at(9, 0.09, tc) == pytest.approx(0.98, abs=0.02)
    assert lr_at(50, 0.5, tc) == pytest.approx(0.55)
    assert lr_at(100, 1.0, tc) == pytest.approx(0.1)


def test_warmup_as_a_share_of_the_run_and_warmup_stable_decay():
    """Warm-up measured in the run's progress (time, when time ends it) reaches the peak at the same
    share of the run on any machine; "wsd" holds the peak, then decays linearly over the last 30%."""
    tc = TrainConfig(lr=1.0, warmup_steps=0, warmup_fraction=0.1, schedule="wsd", decay_fraction=0.3, min_lr_ratio=0.1)
    assert lr_at(0, 0.05, tc) == pytest.approx(0.5)  # no floor in steps: a 5th step or a 500th, the same
    assert lr_at(500, 0.05, tc) == pytest.approx(0.5)
    assert lr_at(0, 0.0, tc) == pytest.approx(0.01)  # the first step is not wasted at zero
    assert lr_at(1, 0.1, tc) == lr_at(1, 0.7, tc) == pytest.approx(1.0)  # stable
    assert lr_at(1, 0.85, tc) == pytest.approx(1 - 0.9 * 0.5)  # halfway through the decay
    assert lr_at(1, 1.0, tc) == pytest.approx(0.1)


def test_a_warmup_share_has_a_floor_in_steps_up_to_a_quarter_of_the_run():
    """warmup_steps beside warmup_fraction: the warm-up takes the larger of the two, but the floor
    never more than a quarter of the steps the run expects (a 10-step warm-up of a 200-step run
    cost the AVX2 speedrun 0.16 bits/byte)."""
    tc = TrainConfig(lr=1.0, warmup_steps=30, warmup_fraction=0.05, min_lr_ratio=1.0)  # flat after warm-up
    assert lr_at(14, 0.1, tc, expected_steps=200) == pytest.approx(15 / 30)  # the floor: 30 steps, not 10
    assert lr_at(29, 0.2, tc, expected_steps=200) == pytest.approx(1.0)
    assert lr_at(49, 0.05, tc, expected_steps=2000) == pytest.approx(50 / 100)  # the share: 100 steps, not 30
    assert lr_at(4, 0.1, tc, expected_steps=40) == pytest.approx(5 / 10)  # the floor capped at 40 / 4
    assert lr_at(0, 0.2, tc) == pytest.approx(1 / 30)  # before the pace is known: the longer of the two


def test_bf16_counts_as_native_only_where_torch_may_use_it(monkeypatch):
    """A CPU with AVX512-BF16 trains in bf16 unless torch's kernels are capped below it (then bf16
    products are emulated): ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA=AVX2 mean fp32; Muon's
    iteration follows."""
    import tinylm.device as device
    from tinylm.train import build_optimizer
    from tinylm.config import ModelConfig
    from tinylm.model import Transformer

    class CpuInfo:
        def __init__(self, path):
            pass

        def read_text(self):
            return "flags : fpu avx2 avx512f avx512_bf16"

    monkeypatch.setattr(device, "Path", CpuInfo)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu = torch.device("cpu")
    model = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=2, vocab_size=100))
    muon_dtype = lambda: build_optimizer(model, TrainConfig(optimizer="muon"), cpu).optimizers[1].ns_dtype
    assert device.pick_dtype("auto", cpu) == torch.bfloat16 and muon_dtype() == torch.bfloat16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert device.cpu_supports_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert device.pick_dtype("auto", cpu) == torch.float32 and muon_dtype() == torch.float32
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert device.pick_dtype("auto", cpu) == torch.float32


def test_the_gradient_scaler_unscales_and_skips_both_optimizers():
    """fp16 with Muon: GradScaler unscales AdamW's and Muon's gradients alike, and an overflow skips
    both steps (and halves the scale)."""
    from tinylm.config import ModelConfig
    from tinylm.model import Transformer
    from tinylm.train import build_optimizer

    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=2, vocab_size=100))
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    matrix, embedding = model.layers[0].attn.wq.weight, model.tok_embeddings.weight
    for grad, moves in ((1024.0, True), (float("inf"), False)):
        scaler.scale(torch.ones(()))
        for p in model.parameters():
            p.grad = torch.full_like(p, grad)
        scaler.unscale_(opt)
        if moves:
            assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
        before = matrix.detach().clone(), embedding.detach().clone()
        scaler.step(opt)
        scaler.update()
        assert (not torch.equal(before[0], matrix)) == moves and (not torch.equal(before[1], embedding)) == moves
    assert scaler.get_scale() == 512.0


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_muon_makes_torchs_update(ns_dtype):
    """tinylm's Muon (the Newton-Schulz iteration in `ns_dtype`, once per shape on the stacked
    matrices) against torch.optim.Muon (bf16, one matrix at a time): the same update to bf16
    rounding, over three steps of momentum, on wide, tall and square matrices, two of each shape
    but one; in fp64 the iteration leaves every singular value near 1 (0.5-1.5, Jordan et al.)
    whatever the input's scale, stacked or not."""
    from tinylm.train import Muon, newton_schulz

    torch.manual_seed(0)
    start = [torch.randn(48, 96), torch.randn(96, 48), torch.randn(48, 96), torch.randn(96, 48), torch.randn(64, 64)]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    kwargs = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    opt_ours, opt_theirs = Muon(ours, ns_dtype=ns_dtype, **kwargs), torch.optim.Muon(theirs, **kwargs)
    for _ in range(3):
        grads = [torch.randn_like(w) * (1 + i) for i, w in enumerate(start)]  # each matrix its own scale
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for w, a, b in zip(start, ours, theirs):
        moved_a, moved_b = a.detach() - w, b.detach() - w
        assert moved_b.norm() > 0.005 * w.norm()  # torch moved it (~1% in three steps)
        assert (moved_a - moved_b).norm() < 0.03 * moved_b.norm()
    assert opt_ours.state_dict()["state"][0]["momentum_buffer"].shape == (48, 96)  # torch's state layout
    stack = torch.randn(3, 32, 80, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)[:, None, None]
    coefficients = (3.4445, -4.7750, 2.0315)
    a, b, c = coefficients
    for g, x in zip(stack, newton_schulz(stack, coefficients, 5, 1e-7, torch.float64)):
        ref = g / g.norm()  # the textbook iteration, one matrix: X <- a X + (b A + c A^2) X, A = X X^T
        for _ in range(5):
            gram = ref @ ref.T
            ref = a * ref + (b * gram + c * gram @ gram) @ ref
        torch.testing.assert_close(x, ref)
    for scale in (1e-3, 1.0, 1e3):
        sv = torch.linalg.svdvals(newton_schulz(scale * torch.randn(32, 80, dtype=torch.float64),
                                                (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float64))
        assert 0.4 < sv.min() and sv.max() < 1.6


def test_muon_trains_the_hidden_matrices_and_resumes_exactly(prepared, tmp_path):
    from tinylm.model import Transformer
    from tinylm.train import Optimizers, build_optimizer

    cfg = _cfg(prepared, **{"train.optimizer": "muon", "train.max_steps": 8, "train.save_every": 4,
                            "train.keep_last": 5, "train.eval_every": 0})
    model = Transformer(dataclasses.replace(cfg.model, vocab_size=384))
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    adamw, muon = opt.optimizers
    assert isinstance(opt, Optimizers) and isinstance(muon, torch.optim.Muon)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():  # block matrices to Muon; embeddings, head and norms to AdamW
        assert (id(p) in in_muon) == (p.dim() == 2 and name.startswith("layers.")), name
    straight = pretrain(cfg, prepared["shards"], tmp_path / "straight")
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight/checkpoints/step-0000004", resumed / "step-0000004")
    pretrain(cfg, prepared["shards"], tmp_path / "resumed")
    a, b = _weights(Path(straight["checkpoint"])), _weights(resumed / "step-0000008")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_embedding_lr_scales_the_embeddings_step_and_nothing_else(prepared, tmp_path, optimizer):
    """One step from the same weights on the same batch: AdamW's first update and decoupled decay are
    both proportional to the rate, so at embedding_lr = 2 and 3 times train.lr the embedding (tied
    head) moves 2 and 3 times as far as at train.lr, and every other weight moves the same."""
    lr = 1e-3
    moved = {}
    for scale in (0, 1, 2, 3):  # 0: a step at a rate of 1e-30 leaves the start (max_steps=0 would mean no limit)
        cfg = _cfg(prepared, **{"train.optimizer": optimizer, "train.max_steps": 1, "train.eval_every": 0,
                                "train.lr": lr if scale else 1e-30, "train.embedding_lr": scale * lr})
        pretrain(cfg, prepared["shards"], tmp_path / str(scale))
        moved[scale] = _weights(tmp_path / str(scale) / "checkpoints/step-0000001")
    start = moved.pop(0)
    delta = {s: {k: w[k] - start[k] for k in w} for s, w in moved.items()}
    emb = "output.weight"  # the tied embedding is saved once, under the head's name
    assert delta[1][emb].abs().max() > 0
    for s in (2, 3):
        torch.testing.assert_close(delta[s][emb], s * delta[1][emb], rtol=1e-3, atol=1e-7)
        for k in delta[1]:
            if k != emb:
                torch.testing.assert_close(delta[s][k], delta[1][k], rtol=1e-3, atol=1e-7)


def _rewrite_trainer_state(ckpt, edit) -> None:
    """Edit a checkpoint's optimizer state as an older tinylm would have written it, and re-sign it."""
    from tinylm.files import MARKER, sha256_file

    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    edit(state["optimizer"])
    torch.save(state, ckpt / "trainer_state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["trainer_state.pt"] = sha256_file(ckpt / "trainer_state.pt")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    marker = json.loads((ckpt / MARKER).read_text())  # the sizes that make the checkpoint complete
    marker["files"] = {name: (ckpt / name).stat().st_size for name in marker["files"]}
    (ckpt / MARKER).write_text(json.dumps(marker))


def test_resuming_a_checkpoint_of_the_older_grouping_keeps_the_embedding_rate_or_names_the_misfit(prepared, tmp_path):
    """Loading an optimizer state takes the saved groups' keys; a checkpoint written before the
    embedding had a group of its own lacks its mark. Muon's groups fit (the tied embedding was the
    only other matrix): the resumed run must still give it embedding_lr. AdamW's do not: refused by name."""
    cfg = _cfg(prepared, **{"train.optimizer": "muon", "train.lr": 1e-3, "train.embedding_lr": 3e-3, "train.max_steps": 4,
                            "train.save_every": 2, "train.keep_last": 5, "train.eval_every": 0})
    straight = pretrain(cfg, prepared["shards"], tmp_path / "straight")
    old = tmp_path / "resumed" / "checkpoints" / "step-0000002"
    shutil.copytree(tmp_path / "straight/checkpoints/step-0000002", old)
    marks = []
    _rewrite_trainer_state(old, lambda s: marks.extend(g.pop("embedding", False) for g in s["optimizers"][0]["param_groups"]))
    assert marks == [True, False]  # the embedding and the norms: the only other matrix is Muon's
    pretrain(cfg, prepared["shards"], tmp_path / "resumed")
    a, b = _weights(Path(straight["checkpoint"])), _weights(old.parent / "step-0000004")
    assert all(torch.equal(a[k], b[k]) for k in a)

    cfg = _cfg(prepared, **{"train.max_steps": 4, "train.save_every": 2, "train.keep_last": 5, "train.eval_every": 0})
    pretrain(cfg, prepared["shards"], tmp_path / "adamw")
    ckpt = tmp_path / "adamw-resumed" / "checkpoints" / "step-0000002"
    shutil.copytree(tmp_path / "adamw/checkpoints/step-0000002", ckpt)

    def older_grouping(optimizer):  # the embedding among the other matrices: two groups
        embedding, matrices, norms = optimizer["param_groups"]
        matrices["params"] = embedding["params"] + matrices["params"]
        optimizer["param_groups"] = [matrices, norms]

    _rewrite_trainer_state(ckpt, older_grouping)
    with pytest.raises(CheckpointError, match="does not fit this run's parameter groups"):
        pretrain(cfg, prepared["shards"], tmp_path / "adamw-resumed")


def test_time_limit_stops_training(prepared, tmp_path):
    cfg = _cfg(prepared, **{"train.max_steps": 0, "train.max_time": 1.5, "train.save_every": 0})
    summary = pretrain(cfg, prepared["shards"], tmp_path)
    elapsed = [json.loads(line)["elapsed"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line]
    trainer = json.loads((latest_checkpoint(tmp_path) / "meta.json").read_text())["trainer"]
    # the step that crossed the limit, less the time kept back for the final validation and save, was
    # the last (however long a busy machine made it)
    assert trainer["elapsed"] + trainer["reserve"] >= 1.5 and trainer["reserve"] > 0
    assert all(e < 1.505 for e in elapsed[:-1]) and summary["steps"] == len(elapsed)  # rounded to 0.01 s


def test_no_limit_is_an_error(prepared, tmp_path):
    cfg = _cfg(prepared, **{"train.max_steps": 0})
    with pytest.raises(ValueError, match="no training limit"):
        pretrain(cfg, prepared["shards"], tmp_path)


def test_token_and_epoch_limits_set_the_horizon(prepared, tmp_path):
    from tinylm.data import PackedBatches
    from tinylm.shards import load_split

    cfg = _cfg(prepared, **{"train.max_steps": 0, "train.max_tokens": 5000, "train.save_every": 0})
    assert pretrain(cfg, prepared["shards"], tmp_path / "tokens")["steps"] == math.ceil(5000 / (8 * 64))
    arrays, _ = load_split(prepared["shards"], "train")
    per_epoch = PackedBatches(arrays, 64, 8).steps_per_epoch
    cfg = _cfg(prepared, **{"train.max_steps": 0, "train.max_epochs": 0.05, "train.save_every": 0})
    assert pretrain(cfg, prepared["shards"], tmp_path / "epochs")["steps"] == math.ceil(0.05 * per_epoch)


@pytest.mark.slow
def test_compiled_training_matches_eager(prepared, tmp_path):
    """Compiled on a CPU the step also swaps SDPA for the chunked attention: the losses must not move."""
    from tinylm.attention import CHUNK

    losses = {}
    for compiled in (False, True):
        cfg = _cfg(prepared, **{"train.max_steps": 4, "train.compile": compiled, "train.dtype": "fp32",
                                "train.save_every": 0, "model.max_seq_len": 2 * CHUNK})
        pretrain(cfg, prepared["shards"], tmp_path / str(compiled))
        records = [json.loads(line) for line in (tmp_path / str(compiled) / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in records]
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], abs=2e-3)


def test_validation_runs_the_plain_module_not_the_compiled_step(prepared, tmp_path, monkeypatch):
    """A no-grad graph of the compiled step would be a second compile (13 s of cpu-speedrun's 215 on a
    fresh cache) for a validation that takes 1.1 s eagerly: only the training step is compiled."""
    import tinylm.train as train_module

    class Compiled(torch.nn.Module):  # stands in for torch.compile's wrapper, counting its calls
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

    wrappers, validated = [], []
    real_evaluate = train_module.evaluate

    def fake_compile(model, **options):
        wrappers.append(Compiled(model))
        return wrappers[-1]

    def recording_evaluate(model, *args, **kwargs):
        validated.append(model)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(train_module, "evaluate", recording_evaluate)
    cfg = _cfg(prepared, **{"train.max_steps": 3, "train.eval_every": 1, "train.compile": True, "train.save_every": 0})
    pretrain(cfg, prepared["shards"], tmp_path)
    assert len(wrappers) == 1 and wrappers[0].calls == 3  # the steps ran through the compiled module
    assert len(validated) == 3 and all(model is wrappers[0].inner for model in validated)


def test_resuming_a_different_model_is_a_clear_error(prepared, tmp_path):
    pretrain(_cfg(prepared, **{"train.max_steps": 2}), prepared["shards"], tmp_path)
    with pytest.raises(CheckpointError, match=r"its model differs \(n_layers: 2 then, 3 now\)"):
        pretrain(_cfg(prepared, **{"train.max_steps": 4, "model.n_layers": 3}), prepared["shards"], tmp_path)


def test_non_finite_steps_are_skipped_and_counted(prepared, tmp_path, monkeypatch):
    from tinylm.model import Transformer

    calls = {"n": 0}
    forward = Transformer.forward

    def flaky(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in (3, 4):
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(Transformer, "forward", flaky)
    summary = pretrain(_cfg(prepared, **{"train.max_steps": 6}), prepared["shards"], tmp_path)
    meta = json.loads((latest_checkpoint(tmp_path) / "meta.json").read_text())
    assert summary["steps"] == 6 and meta["trainer"]["nonfinite_total"] == 2
    assert "non-finite loss nan" in (tmp_path / "train.log").read_text()


def test_a_run_of_non_finite_steps_stops_with_the_last_checkpoint_kept(prepared, tmp_path, monkeypatch):
    from tinylm.model import Transformer

    forward = Transformer.forward
    calls = {"n": 0}

    def broken_after_four(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] > 4:
                loss = loss * float("inf")
        return logits, loss

    monkeypatch.setattr(Transformer, "forward", broken_after_four)
    with pytest.raises(FloatingPointError, match="5 non-finite steps in a row"):
        pretrain(_cfg(prepared, **{"train.max_steps": 20, "train.save_every": 2}), prepared["shards"], tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-0000004"
    load_checkpoint(latest_checkpoint(tmp_path))  # intact


def test_out_of_memory_backs_off_to_smaller_pieces_with_the_same_result(prepared, tmp_path, monkeypatch, capsys):
    """A simulated OOM for more than 2 training sequences at once: the step is redone in pieces of 2."""
    from tinylm.model import Transformer

    cfg = _cfg(prepared, **{"train.max_steps": 6, "train.save_every": 0, "train.eval_every": 0, "train.batch_size": 8,
                            "train.dtype": "fp32"})  # bf16 rounding would differ between piece sizes
    pretrain(cfg, prepared["shards"], tmp_path / "plain")
    forward = Transformer.forward
    calls = []

    def small_memory(self, idx, targets=None, cache=None):
        calls.append(idx.shape[0])
        if self.training and idx.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return forward(self, idx, targets, cache)

    monkeypatch.setattr(Transformer, "forward", small_memory)
    pretrain(cfg, prepared["shards"], tmp_path / "small")
    assert calls[:4] == [8, 4, 2, 2] and "in 4 pieces of 2" in (tmp_path / "small" / "train.log").read_text()
    a = _weights(latest_checkpoint(tmp_path / "plain"))
    b = _weights(latest_checkpoint(tmp_path / "small"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # same sequences, same updates


def test_compile_auto_compiles_only_when_it_pays_back(prepared, tmp_path, monkeypatch):
    """The decision: compile time against the time compiled steps save in what is left of the run."""
    from tinylm.compiling import CompileCost, known_cost

    assert CompileCost(60, 1.25, True).pays(600) and not CompileCost(60, 1.25, True).pays(215)  # 120 s saved vs 43
    assert not CompileCost(1, 1.01, True).pays(10_000)  # no faster: never
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    estimate = known_cost("unmeasured", torch.device("cpu"), torch.float32, 6)
    assert not estimate.measured and estimate.compile_s == 78 and estimate.speedup == 1.18  # cpu-demo on AVX2
    cfg = _cfg(prepared, **{"train.max_steps": 6, "train.compile": "auto", "train.eval_every": 0})
    monkeypatch.setattr("tinylm.compiling.MIN_TIMED_S", 3600.0)
    pretrain(cfg, prepared["shards"], tmp_path / "unsettled")  # the eager pace never covers an hour: no decision yet
    assert "compile (auto)" not in (tmp_path / "unsettled" / "train.log").read_text()
    monkeypatch.setattr("tinylm.compiling.MIN_TIMED_S", 0.0)  # decide after step 3, as for a model of 0.5 s steps
    pretrain(cfg, prepared["shards"], tmp_path / "run")  # seconds of training: a 60 s compile cannot pay
    log = (tmp_path / "run" / "train.log").read_text()
    assert "compile (auto): not compiling: " in log and "estimated" in log


def test_the_compile_cost_is_the_median_of_the_last_runs(tmp_path, monkeypatch):
    from tinylm.compiling import KEEP_RUNS, cache_file, known_cost, record_cost

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu = torch.device("cpu")
    record_cost("k", 10.0, 1.9)
    record_cost("k", 30.0, 3.0)  # measured while something else ran
    record_cost("k", 12.0, 1.8)
    cost = known_cost("k", cpu, torch.float32, 6)
    assert cost.measured and (cost.compile_s, cost.speedup) == (12.0, 1.9)  # medians, not the last run
    for i in range(KEEP_RUNS + 2):
        record_cost("k", 5.0 + i, 2.0)
    assert len(json.loads(cache_file().read_text())["k"]["runs"]) == KEEP_RUNS
    cache = json.loads(cache_file().read_text())
    cache["old"] = {"compile_s": 20.0, "speedup": 1.5}  # an entry written before the history was kept
    cache_file().write_text(json.dumps(cache))
    record_cost("old", 10.0, 2.5)
    assert json.loads(cache_file().read_text())["old"]["runs"] == [[20.0, 1.5], [10.0, 2.5]]
    assert known_cost("old", cpu, torch.float32, 6).speedup == 2.0


def test_a_compile_is_timed_over_a_second_of_steps_at_least(tmp_path, monkeypatch):
    """Five steps of a few hundredths of a second made one shape's speed-up 1.11x in one run, 1.71x in
    another: a pace is the median over MIN_TIMED_S of steps, however short they are."""
    from tinylm.compiling import MIN_TIMED_S, CompileTimer, known_cost, settled_pace

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert settled_pace([0.4, 0.5], 2) is None and settled_pace([0.6, 0.5], 2) == 0.55
    assert settled_pace([0.03] * 5, 2) is None and settled_pace([0.03] * 40, 2) == pytest.approx(0.03)
    timer = CompileTimer(0.06, "k")
    times = [10.0] + [0.03, 0.2] + [0.03] * 40  # the compile, one slow step, then the pace
    said = next(i for i, dt in enumerate(times) if timer.step(dt))
    assert said == 2 + math.ceil((MIN_TIMED_S - 0.23) / 0.03)  # when a second of steps is in
    cost = known_cost("k", torch.device("cpu"), torch.float32, 6)
    assert cost.measured and cost.speedup == pytest.approx(2.0) and cost.compile_s == pytest.approx(9.97, abs=0.05)  # kept to 0.1 s


def test_a_step_that_changes_shape_remembers_both_compiles(tmp_path, monkeypatch):
    """train.short_seq_len compiles the step twice: the cost remembered is both compiles, recorded once the
    second is measured; a shape change before the first measurement gives the measurement up."""
    from tinylm.compiling import CompileTimer, cache_file, known_cost

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    timer = CompileTimer(0.06, "k", reshapes=1)
    said = [timer.step(dt) for dt in [10.0] + [0.03] * 40]
    assert any(x and "compiles again" in x for x in said) and not cache_file().exists()  # waits for the second
    assert timer.step(0.03) is None and not timer.done
    timer.reshaped()
    said = [timer.step(dt) for dt in [5.0] + [0.05] * 30]
    assert any(x and "the new shape took 5 s" in x for x in said) and timer.done
    cost = known_cost("k", torch.device("cpu"), torch.float32, 6)
    assert cost.measured and cost.speedup == pytest.approx(2.0) and cost.compile_s == pytest.approx(14.9, abs=0.1)
    early = CompileTimer(0.06, "e", reshapes=1)
    early.step(10.0)
    early.reshaped()
    assert early.done and early.step(0.03) is None and "e" not in json.loads(cache_file().read_text())


@pytest.mark.slow
def test_a_compiled_step_that_changes_shape_trains_both_shapes(prepared, tmp_path, monkeypatch):
    """train.compile = true with a short context first: the compiled step takes both shapes (one
    specialised compile each) and training goes on past the switch."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    full = prepared["cfg"].model.max_seq_len
    cfg = _cfg(prepared, **{"train.max_steps": 8, "train.compile": "true", "train.eval_every": 0, "train.dtype": "fp32",
                            "train.short_seq_len": full // 2, "train.short_seq_fraction": 0.5, "train.log_every": 1})
    summary = pretrain(cfg, prepared["shards"], tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert summary["steps"] == 8 and len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert f"context: {full} tokens" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_compile_auto_switches_mid_run_and_remembers_the_cost(prepared, tmp_path, monkeypatch):
    from tinylm.compiling import cache_file, known_cost, plan_key, record_cost

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("tinylm.compiling.MIN_TIMED_S", 0.0)  # the tiny model's steps take milliseconds
    cfg = _cfg(prepared, **{"train.max_steps": 12, "train.compile": "auto", "train.eval_every": 0,
                            "train.dtype": "fp32"})
    from tinylm.train import setup_runtime

    rt = setup_runtime(cfg.train)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=384)
    key = plan_key(model_cfg, rt.device, rt.dtype, cfg.train.batch_size, cfg.model.max_seq_len)
    record_cost(key, 0.0, 10.0)  # as if this machine had measured a free, 10x compile
    pretrain(cfg, prepared["shards"], tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "compile (auto): compiling now" in log and "measured here" in log and "compile: took" in log
    measured = known_cost(key, rt.device, rt.dtype, 2)
    assert measured.measured and measured.speedup != 10.0 and cache_file().is_file()  # the real figures replace it


def test_compile_auto_goes_back_to_eager_where_the_compiled_step_is_slower(prepared, tmp_path, monkeypatch):
    import tinylm.train as train_mod
    from tinylm.compiling import CompileTimer, plan_key, record_cost

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("tinylm.compiling.MIN_TIMED_S", 0.0)
    real_step, real_wrap, wrapped = CompileTimer.step, train_mod.wrap, []
    monkeypatch.setattr(CompileTimer, "step", lambda self, dt: real_step(self, dt * 50))  # compiled steps 50x slower
    monkeypatch.setattr(train_mod, "wrap", lambda model, rt, tc, compiled: wrapped.append(compiled) or real_wrap(model, rt, tc, compiled))
    cfg = _cfg(prepared, **{"train.max_steps": 16, "train.compile": "auto", "train.eval_every": 0, "train.dtype": "fp32"})
    rt = train_mod.setup_runtime(cfg.train)
    key = plan_key(dataclasses.replace(cfg.model, vocab_size=384), rt.device, rt.dtype, cfg.train.batch_size,
                   cfg.model.max_seq_len)
    record_cost(key, 0.0, 10.0)  # the cache promises a free 10x compile
    pretrain(cfg, prepared["shards"], tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "slower than eager here: training on eagerly" in log
    assert wrapped == [False, True, False]  # eager, compiled mid-run, eager again once measured slower


def test_a_compile_pause_does_not_cut_a_time_measured_warmup_short():
    """A time-limited run warms up over a share of the steps its pace promises: the 8 s spent compiling
    at step 3 of a 215 s run would otherwise count as 4% of the run, and the peak would come at step ~5."""
    from tinylm.train import Pace, Progress

    tc = TrainConfig(lr=1.0, warmup_fraction=0.05, warmup_steps=0, max_time=215)
    pace = Pace(tc)
    for dt in (0.3, 0.3, 8.3, 0.23, 0.23):  # eager steps, the compiling one, compiled ones
        pace.update(dt)
    progress = Progress(step=5, elapsed=9.4)
    expected = pace.expected_steps(progress, None)
    assert 650 < expected < 900  # ~205 s left at ~0.28 s/step, not at the compiling step's 8 s
    assert lr_at(5, progress.elapsed / tc.max_time, tc, expected) == pytest.approx(6 / (0.05 * expected), rel=0.01)  # x the cosine, 0.996 here
    assert lr_at(5, progress.elapsed / tc.max_time, tc) == pytest.approx(1.0, abs=0.15)  # by time alone: near the peak


def test_a_warmup_share_is_of_the_steps_the_time_limit_allows_when_they_are_fewer_than_planned():
    """Fine-tuning planned for 2 epochs (2,238 steps) whose 240 s end it after ~400: a 5% warm-up is
    ~20 steps of those, not 112 (28% of the run, as it was before the pace capped the plan)."""
    from tinylm.train import Pace, Progress

    tc = TrainConfig(lr=1.0, warmup_fraction=0.05, warmup_steps=0, max_time=240, max_epochs=2)
    pace = Pace(tc)
    assert pace.expected_steps(Progress(step=0), 2238) == 2238  # no pace yet: the plan
    for _ in range(5):
        pace.update(0.6)
    progress = Progress(step=5, elapsed=3.0)
    expected = pace.expected_steps(progress, 2238)
    assert expected == pytest.approx(5 + 237 / 0.6)
    assert lr_at(19, progress.elapsed / tc.max_time, tc, expected) == pytest.approx(20 / (0.05 * expected), rel=0.01)
    assert pace.expected_steps(progress, 100) == 100  # a plan the time allows stays the plan
    assert Pace(TrainConfig(max_time=0)).expected_steps(progress, 100) == 100
