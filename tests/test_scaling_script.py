"""benchmarks/scaling.py's bookkeeping: one law per optimizer in one file, the context term in each."""

import json

import pytest
from conftest import load_benchmark

from tinylm.sizing import ScalingLaw


@pytest.fixture(scope="module")
def scaling():
    return load_benchmark("scaling")


def record(optimizer: str, E: float, context: int = 256) -> dict:
    law = ScalingLaw(E=E, A=30.0, B=400.0, alpha=0.34, beta=0.28)
    return {"law": dict(law.__dict__), "points": [{"optimizer": optimizer, "tokens_per_step": 16 * context,
                                                   "batch_size": 16, "max_seq_len": context}]}


def test_writing_one_optimizers_law_keeps_the_others_and_gives_each_the_context_term(scaling, tmp_path):
    path = tmp_path / "scaling.json"
    scaling.write_laws(path, {"adamw": record("adamw", 1.5)}, None)
    assert "positions" not in json.loads(path.read_text())
    assert ScalingLaw.load("adamw", path).position_scale == 0  # no term measured yet

    positions = {"c": 1.2, "gamma": 0.8, "context_measured": 256}
    scaling.write_laws(path, {"muon": record("muon", 1.4)}, positions)
    laws = {name: ScalingLaw.load(name, path) for name in ("adamw", "muon")}
    assert (laws["adamw"].E, laws["muon"].E) == (1.5, 1.4)  # the earlier law is kept
    for law in laws.values():
        assert (law.context, law.position_scale, law.position_exponent) == (256, 1.2, 0.8)

    scaling.write_laws(path, {"muon": record("muon", 1.3, context=128)}, None)  # refit: replaces, keeps the term
    muon = ScalingLaw.load("muon", path)
    assert (muon.E, muon.context, muon.position_scale) == (1.3, 128, 1.2)
    assert ScalingLaw.load("adamw", path).E == 1.5
