"""The README is a test: its quick start and Python example are run here."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def quick_start() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    return [ln for ln in _blocks_in(section)[0].splitlines() if ln.strip()]


def _blocks_in(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _tinylm_command(line: str) -> list[str]:
    """The `tinylm ...` part of a `pip install ... && tinylm ...` line."""
    part = [p.strip() for p in line.split("&&") if p.strip().startswith("tinylm")]
    assert part, f"no tinylm command in {line!r}"
    return part[0].split()


def _run_cli(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tinylm.cli", *args[1:]]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_readme_is_a_short_front_door_whose_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (README.parent / target).is_file(), target


def test_quick_start_has_the_two_commands():
    lines = quick_start()
    assert len(lines) == 2
    assert "torch==2.13.0" in lines[0] and _tinylm_command(lines[0])[:2] == ["tinylm", "run"]
    assert ".[dev]" in lines[1] and lines[1].endswith("python -m pytest")


@pytest.mark.slow
def test_quick_start_pipeline_on_the_tiny_preset(tmp_path):
    """The quick start's command with the tiny preset: the built-in corpus end to end, then a rerun."""
    cmd = _tinylm_command(quick_start()[0]) + ["--config", "tiny"]
    first = _run_cli(cmd, tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Next:" in first.stdout and "tinylm chat" in first.stdout
    run_dir = tmp_path / "runs" / "default"
    for stage in ("tokenizer", "shards"):
        assert (run_dir / stage / "meta.json").is_file() and (run_dir / stage / "config.toml").is_file()
    assert "eval: validation_shards: bits/byte" in first.stdout and "eval: chat:held-out" in first.stdout
    report = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "Supervised fine-tuning" in report and "A chat with the fine-tuned model" in report
    second = _run_cli(_tinylm_command(quick_start()[0]), tmp_path, timeout=300)  # the run's own config is reused
    assert second.returncode == 0, second.stderr[-3000:]
    assert "tokenizer: up to date" in second.stdout and "shards: up to date" in second.stdout
    assert "resuming from step-0000030" in second.stdout


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_quick_start_exactly_as_written(tmp_path):
    """`tinylm run` with no arguments: cpu-demo on the built-in corpus, ~15 minutes on 2 cores."""
    result = _run_cli(_tinylm_command(quick_start()[0]), tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = (tmp_path / "runs/default/samples.json").read_text()
    words = re.findall(r"[a-z']+", samples.lower())
    common = {"the", "i", "you", "to", "a", "and", "is", "it", "that", "of", "what", "do", "like", "have"}
    assert sum(w in common for w in words) > 0.15 * len(words)  # recognisable English, not byte soup
    assert (tmp_path / "runs/default/report.html").is_file() and (tmp_path / "runs/default/report/sft.png").is_file()
    verdict = [ln for ln in result.stdout.splitlines() if ln.startswith("run: ")]
    assert verdict and "of the 15m00s planned" in verdict[-1] and "late" not in verdict[-1]  # the promised time holds
    print(result.stdout[-3000:])


def _section_python(heading: str, doc: Path = README) -> str:
    """The one Python example under `heading` in the README (or another document)."""
    section = doc.read_text(encoding="utf-8").split(heading, 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.mark.slow
def test_python_example_runs(tmp_path, monkeypatch):
    code = _section_python("## Python API")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs/api-demo/pretrain/checkpoints/latest").is_file()
