"""The run report: the whole run on one page, `RUN/report.html` (self-contained: plots inlined, no
scripts, opens offline) and its Markdown twin `RUN/report.md` (plots in `RUN/report/`).

It only reads what the stages left on disk: raw/manifest.json, clean/report.json, tokenizer/meta.json,
shards/meta.json, <stage>/metrics.jsonl, the newest checkpoint's meta.json and eval.json,
samples.json, demo_chat.json, config.toml. A stage that did not run is left out.

The page is built once as a list of sections made of a few block kinds (paragraph, table, image,
preformatted text); one renderer turns them into HTML, another into Markdown.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .checkpoint import latest_checkpoint
from .files import read_json, write_text
from .layout import TRAINING_STAGES as STAGES, RunLayout
from .logs import format_duration

EXAMPLE_CHARS = 160


@dataclass
class Section:
    title: str
    blocks: list[tuple] = field(default_factory=list)  # ("p", text) | ("table", header, rows) | ("img", name, alt) | ("pre", text)

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list]) -> None:
        if rows:
            self.blocks.append(("table", header, rows))

    def img(self, name: str, alt: str) -> None:
        self.blocks.append(("img", name, alt))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))


# --- reading the run ------------------------------------------------------------------------------
def _json(path: Path):
    return read_json(path) if path.is_file() else None


def read_metrics(stage_dir: Path) -> list[dict]:
    """metrics.jsonl, one record per step; a step logged twice (before and after a resume) keeps its last record."""
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _short(text: str, limit: int = EXAMPLE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _n(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def versions() -> list[list[str]]:
    rows = [["python", platform.python_version()]]
    for package in ("tinylm", "torch", "tokenizers", "transformers", "safetensors", "numpy", "datasets"):
        try:
            rows.append([package, metadata.version(package)])
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rows.append(["machine", f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"])
    try:
        import torch

        if torch.cuda.is_available():
            rows.append(["gpu", f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"])
    except Exception:  # noqa: BLE001 - a report must not fail on a driver problem
        pass
    return rows


# --- plots ----------------------------------------------------------------------------------------
def plot_curves(records: list[dict], out_png: Path, title: str) -> None:
    """Loss (train and validation), learning rate, gradient norm and tokens/s against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), dpi=100)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in records], lw=1, label="train", color="#4c72b0")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation", color="#dd8452")
    ax.set_title("loss (nats/token)")
    ax.legend()
    for ax, key, name in ((axes[0][1], "lr", "learning rate"), (axes[1][0], "grad_norm", "gradient norm (before clipping)"),
                          (axes[1][1], "tok_per_s", "tokens / s")):
        ax.plot(steps, [r[key] for r in records], lw=1, color="#55a868")
        ax.set_title(name)
    if max((r["grad_norm"] for r in records), default=0) > 20 * (sorted(r["grad_norm"] for r in records)[len(records) // 2] or 1):
        axes[1][0].set_yscale("log")  # early spikes would flatten the rest
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out_png)


# --- the sections ---------------------------------------------------------------------------------
def build_sections(run_dir: Path, image_dir: Path) -> tuple[list[Section], dict]:
    run = RunLayout(run_dir)
    """Every section of the report, and a few headline facts for the summary."""
    sections: list[Section] = []
    data_meta = {stage: _json(getattr(run, stage) / "meta.json") for stage in ("clean", "tokenizer", "shards")}
    head: dict = {"data_meta": data_meta}

    data = Section("Data")
    manifest = _json(run.raw / "manifest.json")
    if manifest:
        data.p("Collected sources (`raw/`):")
        data.table(["source", "file", "documents", "characters", "finished"],
                   [[name, e["file"], e["documents"], e["chars"], e.get("finished_at", "")]
                    for name, e in manifest["sources"].items() if name in manifest.get("plan", manifest["sources"])])
    clean = _json(run.clean / "report.json")
    if clean:
        kept = clean["docs_out"] / max(1, clean["docs_in"])
        data.p(f"Cleaning (`clean/`): {clean['docs_in']:,} documents in ({clean['bytes_in']:,} bytes), "
               f"{clean['docs_out']:,} kept ({kept:.1%}, {clean['bytes_out']:,} bytes); "
               f"{clean['duplicate_clusters']:,} duplicate clusters.")
        data.table(["rule", "documents dropped", "bytes dropped", "example"],
                   [[rule, d["docs"], d["bytes"], _short(d["examples"][0]["text"]) if d["examples"] else ""]
                    for rule, d in clean["dropped"].items() if d["docs"]])
        if clean.get("contamination"):
            data.table(["contamination probe", "documents", "sharing an n-gram with training text", "share"],
                       [[name, c["docs"], c["contaminated"], f"{c['share']:.2%}"] for name, c in clean["contamination"].items()])
    shards = data_meta["shards"]
    if shards:
        data.p("Token shards (`shards/`):")
        data.table(["split", "documents", "bytes", "tokens", "bytes/token"],
                   [[split, s["docs"], s["bytes"], s["tokens"], _n(s["bytes"] / max(1, s["tokens"]), 3)]
                    for split, s in shards["splits"].items()])
        cut = shards.get("cut_documents", {})
        if cut.get("documents"):
            data.p(f"{cut['documents']:,} documents longer than {cut['max_doc_chars']:,} characters were cut "
                   f"at whitespace into {cut['pieces']:,} pieces (`data.max_doc_chars`).")
    sft_meta = _json(run.sft_data / "meta.json")
    if sft_meta:
        from .conversations import held_out_summary

        val, pre_val = sft_meta["splits"]["val"], shards["splits"]["val"]["docs"] if shards else 0
        data.p(f"Held out: the tokenizer and pretraining never saw the {pre_val:,} validation documents of "
               f"`shards/`; fine-tuning (`sft/data/`) {held_out_summary(sft_meta)} "
               f"({val['conversations']:,} held-out conversations).")
    tok = data_meta["tokenizer"]
    if tok:
        comp = tok.get("held_out_compression", {})
        data.p(f"Tokenizer (`tokenizer/`): {tok['kind']}, {tok['vocab_size']:,} tokens; "
               f"{_n(comp.get('bytes_per_token'), 3)} bytes/token on {comp.get('docs', 0):,} held-out documents.")
    if data.blocks:
        sections.append(data)

    evals, eval_rows = Section("Evaluation"), []
    for stage in STAGES:
        stage_dir = getattr(run, stage)
        ckpt = latest_checkpoint(stage_dir)
        records = read_metrics(stage_dir)
        if ckpt is None and not records:
            continue
        sec = Section({"pretrain": "Pretraining", "sft": "Supervised fine-tuning"}.get(stage, "Preference alignment (DPO)"))
        if ckpt is not None:
            meta = read_json(ckpt / "meta.json")
            t = meta["trainer"]
            if "model" not in head:
                m = meta["model"]
                head["model"] = (f"{meta['params']:,} parameters: {m['n_layers']} layers, width {m['dim']}, "
                                 f"{m['n_heads']} heads ({m['n_kv_heads'] or m['n_heads']} key/value), "
                                 f"context {m['max_seq_len']}, vocabulary {m['vocab_size']:,}")
            head[stage] = t
            tc = meta["config"]["train"]
            ran_on = t.get("ran_on") or f"device {tc['device']}, dtype {tc['dtype']}"
            sec.p(f"{t['step']:,} steps, {t['tokens']:,} tokens in {format_duration(t['elapsed'])} of training; "
                  f"best validation loss {_n(t.get('best_val_loss'))}; newest checkpoint `{ckpt.relative_to(run_dir)}` "
                  f"({ran_on}, compile {tc['compile']}).")
            if warning := _shortfall(t, tc):
                t = head[stage] = {**t, "warning": warning}
                sec.p(f"Warning: {warning}")
            scores = _json(ckpt / "eval.json")
            if scores:
                from .evaluate import score_table

                eval_rows += [[stage, r["task"], r["metric"], _n(r["value"]) if r["value"] is not None else f"no score: {r['why']}",
                               f"{_n(r['ci95'][0])} – {_n(r['ci95'][1])}" if r.get("ci95") else "–", r["n"], _n(r.get("chance"))]
                              for r in score_table(scores)]
        if records:
            png = image_dir / f"{stage}.png"
            plot_curves(records, png, f"{stage}: {len(records):,} steps")
            sec.img(png.name, f"{stage} curves: loss, learning rate, gradient norm, tokens/s")
            last = records[-1]
            speeds = sorted(r["tok_per_s"] for r in records)
            sec.table(["final train loss", "last validation loss", "last validation bits/byte", "median tokens/s"],
                      [[_n(last["loss"]), _n(next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)),
                        _n(next((r["val_bpb"] for r in reversed(records) if "val_bpb" in r), None)),
                        f"{speeds[len(speeds) // 2]:,}"]])
        sections.append(sec)
    if eval_rows:
        evals.table(["checkpoint", "task", "metric", "score", "95% interval", "items", "chance"], eval_rows)
        evals.p("Bits/byte and losses: lower is better; accuracies: higher. Chance is what a uniform guess scores.")
        sections.append(evals)

    talk = Section("Samples")
    samples = _json(run.samples)
    if samples:
        talk.p("Continuations by the pretrained model:")
        talk.table(["prompt", "completion"], [[s["prompt"], _short(s["completion"], 400)] for s in samples["samples"]])
    chat = _json(run.demo_chat)
    if chat:
        talk.p("A chat with the fine-tuned model:")
        talk.table(["role", "message"], [[m["role"], _short(m["content"], 400)] for m in chat["messages"]])
    if talk.blocks:
        sections.append(talk)

    setup = Section("Configuration and versions")
    if run.config.is_file():
        setup.p("The resolved configuration (`config.toml`):")
        setup.pre(run.config.read_text(encoding="utf-8"))
    setup.table(["component", "version"], versions())
    sections.append(setup)
    return sections, head


def _shortfall(trainer: dict, train_config: dict) -> str | None:
    """train.shortfall on a checkpoint's trainer state and saved train settings."""
    import dataclasses

    from .config import TrainConfig
    from .train import shortfall

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in train_config.items() if k in names})
    return shortfall(trainer["step"], trainer.get("total_steps"), trainer.get("lr_max", 0.0), tc)


def _summary(run_dir: Path, head: dict) -> Section:
    s = Section("Summary")
    s.p(f"Run `{run_dir}`, report written {time.strftime('%Y-%m-%d %H:%M')}.")
    if "model" in head:
        s.p(f"Model: {head['model']}.")
    rows = []
    for stage, made in (("clean", lambda m: f"{m['docs']:,} documents kept"),
                        ("tokenizer", lambda m: f"{m['vocab_size']:,} tokens"),
                        ("shards", lambda m: f"{m['splits']['train']['tokens']:,} training tokens")):
        meta = head["data_meta"][stage]
        if meta:
            rows.append([stage, format_duration(meta["seconds"]) if "seconds" in meta else "–", made(meta)])
    for stage in STAGES:
        if stage in head:
            t = head[stage]
            rows.append([stage, format_duration(t["elapsed"]),
                         f"{t['step']:,} steps, {t['tokens']:,} tokens, best validation loss {_n(t.get('best_val_loss'))}"
                         + (f". Warning: {t['warning']}" if t.get("warning") else "")])
    s.table(["stage", "wall time", "result"], rows)
    return s


# --- rendering ------------------------------------------------------------------------------------
CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}code{background:#f2f2f2;padding:0 .2em}"""


def _inline(text: str) -> str:
    """Escape for HTML, turning `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, sections: list[Section], image_dir: Path) -> str:
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{html.escape(sec.title)}</h2>")
        for kind, *args in sec.blocks:
            if kind == "p":
                out.append(f"<p>{_inline(args[0])}</p>")
            elif kind == "pre":
                out.append(f"<details><summary>show</summary><pre>{html.escape(args[0])}</pre></details>")
            elif kind == "img":
                data = base64.b64encode((image_dir / args[0]).read_bytes()).decode()
                out.append(f'<p><img src="data:image/png;base64,{data}" alt="{html.escape(args[1])}"></p>')
            else:
                header, rows = args
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                for row in rows:
                    cells = (f'<td class=num>{_n(c)}</td>' if isinstance(c, (int, float)) else f"<td>{_inline(str(c))}</td>"
                             for c in row)
                    out.append("<tr>" + "".join(cells) + "</tr>")
                out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def render_markdown(title: str, sections: list[Section], image_prefix: str) -> str:
    def cell(c) -> str:
        return (_n(c) if isinstance(c, (int, float)) else str(c)).replace("|", "\\|").replace("\n", " ")

    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for kind, *args in sec.blocks:
            if kind == "p":
                out += [args[0], ""]
            elif kind == "pre":
                out += ["```toml", args[0].rstrip(), "```", ""]
            elif kind == "img":
                out += [f"![{args[1]}]({image_prefix}{args[0]})", ""]
            else:
                header, rows = args
                out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
                out.append("")
    return "\n".join(out)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN/report.html and RUN/report.md (plots in RUN/report/); returns both paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    run = RunLayout(run_dir)
    image_dir = run.report_images
    sections, head = build_sections(run_dir, image_dir)
    if not any(stage in head for stage in STAGES) and len(sections) <= 1:
        raise ValueError(f"{run_dir}: nothing to report (no stage outputs: raw/, clean/, shards/, pretrain/, sft/)")
    sections.insert(0, _summary(run_dir, head))
    title = f"tinylm run report: {run_dir.resolve().name}"
    html_path, md_path = run.report_html, run.report_md
    write_text(html_path, render_html(title, sections, image_dir))
    write_text(md_path, render_markdown(title, sections, "report/"))
    return html_path, md_path
