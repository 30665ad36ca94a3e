"""benchmarks/gpu.py's own logic that a CPU can check: fitting the e2e run into the wall-time target."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_bench", BENCH / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def e2e(gpu):
    return dict(gpu.PLANS["cuda"]["e2e"])


def test_the_e2e_run_keeps_its_limits_when_they_fit(gpu):
    plan = e2e(gpu)
    enough = plan["pretrain_s"] + plan["sft_s"] + plan["overhead_s"]
    assert gpu.fit_e2e(plan, enough + 1) is None
    assert (plan["pretrain_s"], plan["sft_s"]) == (120, 60)


def test_the_e2e_run_shrinks_to_what_is_left_of_the_wall_time(gpu):
    plan = e2e(gpu)
    left = gpu.TARGETS["wall_s"] - 240  # the measurements took four minutes
    said = gpu.fit_e2e(plan, left)
    assert said is not None and f"pretraining {plan['pretrain_s']} s" in said
    assert plan["pretrain_s"] + plan["sft_s"] + plan["overhead_s"] <= left
    assert plan["pretrain_s"] / plan["sft_s"] == pytest.approx(2, rel=0.05)  # both shrink alike
    assert plan["pretrain_s"] + plan["sft_s"] >= left - plan["overhead_s"] - 2  # and no more than needed


def test_the_e2e_run_never_shrinks_below_its_floor(gpu):
    plan = e2e(gpu)
    assert gpu.fit_e2e(plan, 10) is not None
    assert (plan["pretrain_s"], plan["sft_s"]) == (plan["min_pretrain_s"], plan["min_sft_s"])
