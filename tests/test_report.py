"""The run report: built from what the stages wrote, self-contained, and rendered by a real browser."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tinylm.report import read_metrics, write_report

from conftest import tiny_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT_DIR = Path(os.environ.get("TINYLM_SCREENSHOTS", ""))


@pytest.fixture(scope="module")
def run_dir(prepared, tmp_path_factory):
    """A small run: pretraining, its evaluation and samples, laid out as `tinylm run` lays it out."""
    from tinylm.pipeline import evaluate_stage, pretrain, print_samples

    run = tmp_path_factory.mktemp("report") / "run"
    run.mkdir()
    for stage in ("shards", "tokenizer"):
        os.symlink(prepared[stage], run / stage)
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 12, "train.eval_every": 4,
                                                        "sample.max_new_tokens": 12, "eval.max_items": 8})
    summary = pretrain(cfg, run / "shards", run / "pretrain", tokenizer_dir=run / "tokenizer")
    print_samples(summary["checkpoint"], cfg, run / "samples.json")
    evaluate_stage(summary["checkpoint"], cfg)
    (run / "config.toml").write_text("[train]\nmax_steps = 12\n")
    return run


def test_report_shows_what_the_run_wrote(run_dir):
    html_path, md_path = write_report(run_dir)
    page = html_path.read_text(encoding="utf-8")
    assert not re.findall(r'(?:src|href)="(?!data:)', page), "the page must not load anything from elsewhere"
    assert page.count('<img src="data:image/png;base64,') == 1  # the pretraining curves, inlined
    scores = json.loads((run_dir / "pretrain/checkpoints/step-0000012/eval.json").read_text())
    bpb = scores["validation_shards"]
    assert f"{bpb['bits_per_byte']:.4f}" in page and f"{bpb['ci95'][0]:.4f}" in page and f"{bpb['chance']:.4f}" in page
    shards = json.loads((run_dir / "shards/meta.json").read_text())
    assert f"{shards['splits']['train']['tokens']:,}" in page
    samples = json.loads((run_dir / "samples.json").read_text())
    assert all(s["prompt"] in page for s in samples["samples"])
    assert "max_steps = 12" in page and "torch" in page

    md = md_path.read_text(encoding="utf-8")
    assert "![pretrain curves" in md and (run_dir / "report/pretrain.png").stat().st_size > 10_000
    assert f"{bpb['bits_per_byte']:.4f}" in md and "| stage | wall time | result |" in md


def test_metrics_logged_twice_after_a_resume_keep_the_last_record(tmp_path):
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "loss": 3.9}, {"step": 3, "loss": 3.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 5.0), (2, 3.9), (3, 3.5)]


def test_report_of_an_empty_folder_says_so(tmp_path):
    with pytest.raises(ValueError, match="nothing to report"):
        write_report(tmp_path)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_offline_in_chromium(run_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    html_path, _ = write_report(run_dir)
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("request", lambda r: requests.append(r.url))
        page.goto(html_path.as_uri(), wait_until="load")
        assert page.title().startswith("tinylm run report")
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        assert widths and all(w >= 800 for w in widths)  # decoded, full-size plots
        headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
        assert headings[:2] == ["Summary", "Data"] and "Evaluation" in headings
        shot = (SCREENSHOT_DIR if SCREENSHOT_DIR.name else tmp_path) / "report.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 20_000
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


def test_shortfall_says_planned_against_done_and_the_peak_learning_rate():
    from tinylm.config import TrainConfig
    from tinylm.train import shortfall

    tc = TrainConfig(lr=1e-3, warmup_steps=300, max_time=60, max_epochs=1)
    text = shortfall(71, 2433, 0.24e-3, tc)
    assert "71 of 2,433 planned steps (3%)" in text and "train.max_time=60 s ran out" in text
    assert "24% of its peak train.lr=0.001" in text and "warm-up of 300 steps outlasted the run" in text
    assert "raise train.max_time" in text and "train.warmup_steps to at most 7" in text
    assert shortfall(2433, 2433, 1e-3, tc) is None  # ran as planned and reached its peak
    # a warm-up that ended, then a cosine that had already begun to fall: no shortfall (it read 96% as one)
    assert shortfall(960, None, 0.96e-3, TrainConfig(lr=1e-3, warmup_steps=30, max_time=215)) is None
    assert shortfall(71, None, 0.24e-3, TrainConfig(lr=1e-3, warmup_fraction=0.05, max_time=60)) is None


def test_a_starved_run_is_named_in_the_log_and_the_report(prepared, tmp_path, capsys):
    from tinylm.pipeline import pretrain

    run = tmp_path / "run"
    run.mkdir()
    for stage in ("shards", "tokenizer"):
        os.symlink(prepared[stage], run / stage)
    cfg = tiny_config(prepared["cfg"].data.corpus[0], **{"train.max_steps": 100_000, "train.max_time": 1.5,
                                                        "train.warmup_steps": 100_000, "train.eval_every": 0})
    summary = pretrain(cfg, run / "shards", run / "pretrain", tokenizer_dir=run / "tokenizer")
    assert 0 < summary["steps"] < 100_000
    log = capsys.readouterr()
    assert f"WARNING pretrain: starved run: stopped after {summary['steps']:,} of 100,000 planned steps" in log.out + log.err
    from tinylm.evaluate import evaluate_checkpoint

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    evaluate_checkpoint(summary["checkpoint"], texts=[str(empty)])
    _, md_path = write_report(run)
    md = md_path.read_text(encoding="utf-8")
    assert md.count("starved run") >= 2 and "of its peak train.lr" in md  # the stage section and the summary
    assert "no score: " in md and "empty.txt: no document with text to score" in md  # not 0.0000
