"""lm-evaluation-harness scores a multiple-choice task through `tinylm serve` and agrees with `tinylm eval`.

Its `local-completions` model sends echo + logprobs=1 + max_tokens=1 requests with the prompt as token
ids (our tokenizer, loaded by transformers from the checkpoint directory) and sums
`token_logprobs[ctxlen:-1]`; the server reads the ids after a <|bos|>, as `tinylm eval` does.
"""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from tinylm.evaluate import continuation_logprobs, multiple_choice, read_jsonl  # noqa: E402
from tinylm.server import create_app  # noqa: E402

from conftest import DATA  # noqa: E402
from test_server import LiveServer  # noqa: E402

TASK = """task: tinylm_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_through_the_api_agrees_with_tinylm_eval(lm, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tok = lm.tokenizer
    # the HellaSwag sample, cut to its last six words of context and first six of each ending so that an
    # item fits the tiny model's 64-token context (a longer one would be cut differently by each side)
    rows = [{"ctx": " ".join(r["ctx"].split()[-6:]), "endings": [" ".join(e.split()[:6]) for e in r["endings"]],
             "label": r["label"]} for r in read_jsonl(DATA / "hellaswag_sample.jsonl")]
    rows = [r for r in rows if max(len(tok.encode(r["ctx"] + " " + e)) for e in r["endings"]) + 2 < lm.context_length]
    assert len(rows) >= 8
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    ours = multiple_choice(lm.model, tok, rows)

    with LiveServer(create_app(lm, "tiny")) as url:
        model_args = (f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                      f"tokenizer={lm.meta['path']},max_length={lm.context_length},num_concurrent=1,max_retries=1")
        out = simple_evaluate(model="local-completions", model_args=model_args, tasks=["tinylm_choice"],
                              task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    theirs = out["results"]["tinylm_choice"]["acc,none"]
    print(f"lm-eval acc {theirs:.4f}, tinylm eval acc {ours['raw']['accuracy']:.4f} on {len(rows)} items")
    assert theirs == pytest.approx(ours["raw"]["accuracy"])
    samples = sorted(out["samples"]["tinylm_choice"], key=lambda s: s["doc_id"])
    for row, sample in zip(rows, samples):
        expected = continuation_logprobs(lm.model, [([tok.bos_id, *tok.encode(row["ctx"])], tok.encode(" " + e))
                                                     for e in row["endings"]])
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(expected, abs=1e-3)
