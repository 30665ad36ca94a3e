"""benchmarks/compile.py: both ways it times train the same model, and the compile time it reports."""

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("compile")


def test_both_ways_compile_the_model_and_step_alike(bench, monkeypatch):
    """Whole and blocks apart: the same first losses as each other (Dynamo's eager backend stands in for
    Inductor to keep the test fast), and every block of the "blocks" way compiled, the head not."""
    real_compile, compiled = torch.compile, []

    def counting_compile(fn, **kwargs):
        compiled.append(getattr(fn, "__self__", fn))
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", counting_compile)
    losses = {}
    for way in bench.WAYS:
        torch._dynamo.reset()
        compiled.clear()
        step, about = bench.stepper(way, "cpu-speedrun", "xs")
        losses[way] = [step()[0] for _ in range(3)]
        kinds = [type(module).__name__ for module in compiled]
        assert kinds == (["Transformer"] if way == "whole" else ["Block"] * 4)
    assert "xs (dim 128 x 4 layers)" in about
    assert losses["blocks"] == pytest.approx(losses["whole"], rel=1e-3)
    assert losses["whole"][-1] < losses["whole"][0]  # the steps train


def test_compile_time_is_the_first_steps_excess(bench, monkeypatch):
    """compile s = the first two steps less two settled ones (the median after ten)."""
    times = iter([5.0, 1.5] + [0.5] * 20)
    monkeypatch.setattr(bench, "stepper", lambda *args: (lambda: None, "about"))
    monkeypatch.setattr(bench, "timed", lambda fn: next(times))
    assert bench.compile_seconds("whole", "tiny", "xs", 22) == {"compile_s": 5.5, "about": "about"}
