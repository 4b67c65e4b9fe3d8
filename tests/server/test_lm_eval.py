"""lm-eval itself against a running server: `local-completions` with the server's own tokenizer
(`tokenizer_backend=remote`), on two tasks defined here from local files (multiple-choice
loglikelihood and generate-until), over a GPT-2-shaped Hugging Face checkpoint.

Its loglikelihoods equal those computed directly from the model's logits, and its scores equal
lm-eval's own `hf` model on the same weights. Nothing reaches the network: the datasets are
JSON files, the tokenizers are local (tiktoken's cache for the server, vocab.json/merges.txt
for `hf`), and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import hf_reference, save_hf  # noqa: E402
from server_helpers import wait_for_sync  # noqa: E402

# tests/conftest.py points TIKTOKEN_CACHE_DIR into ../shared/tokenizers, which also holds vocab.json/merges.txt.
SHARED_TOKENIZER = Path(os.environ["TIKTOKEN_CACHE_DIR"]).parent
MC = [  # question, choices, answer index
    ("The capital of France is", [" Paris", " London", " Rome"], 0),
    ("Two plus two equals", [" four", " five"], 0),
    ("The sky on a clear day is", [" blue", " green", " red"], 0),
    ("Water freezes at zero degrees", [" Celsius", " Fahrenheit"], 0),
    ("A cat says", [" meow", " woof"], 1),
]
GEN = [("Once upon a time", " there"), ("The quick brown fox", " jumps")]

# Two evaluations, a server process and lm-eval's imports: minutes on a busy 2-core runner.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random GPT-2-shaped model (GPT-2's vocabulary, 2 layers, 64 positions) with its tokenizer files."""
    from transformers import GPT2TokenizerFast

    path = save_hf(hf_reference(), tmp_path_factory.mktemp("hf") / "nano-gpt2")
    tok = GPT2TokenizerFast.from_pretrained(str(SHARED_TOKENIZER))  # vocab.json + merges.txt, offline
    tok.model_max_length = 64
    tok.save_pretrained(path)
    return path


def _tasks(tmp: Path) -> Path:
    data = tmp / "data"
    data.mkdir()
    with open(data / "mc.jsonl", "w") as f:
        for q, choices, answer in MC:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    with open(data / "gen.jsonl", "w") as f:
        for q, a in GEN:
            f.write(json.dumps({"question": q, "answer": a}) + "\n")
    tasks = tmp / "tasks"
    tasks.mkdir()
    common = f"dataset_path: json\ntest_split: test\ndoc_to_text: \"{{{{question}}}}\"\ndoc_to_target: \"{{{{answer}}}}\"\n"
    (tasks / "nano_mc.yaml").write_text(
        f"task: nano_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
        "metric_list:\n  - metric: acc\n")
    (tasks / "nano_gen.yaml").write_text(
        f"task: nano_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'gen.jsonl'}\n"
        "output_type: generate_until\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0.0\n"
        "metric_list:\n  - metric: exact_match\n")
    return tasks


def _evaluate(model: str, model_args: str, tasks_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["nano_mc", "nano_gen"],
                                   task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                                   batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0)


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-softmax(logits) over the continuation's tokens, split as lm-eval splits the pair
    (a context's trailing spaces move to the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole]))
    lp = torch.log_softmax(logits[0].float(), dim=-1)
    return sum(lp[p - 1, whole[p]].item() for p in range(len(ctx), len(whole)))


def test_lm_eval_local_completions_equals_direct_and_hf(hf_dir, server_process, tmp_path, monkeypatch):
    import requests

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    proc, base = server_process(hf_dir, SERVED_MODEL_NAME="nano", DTYPE="float32")
    wait_for_sync(lambda: proc.poll() is not None or _healthy(requests, base), timeout=300, what="server /health")
    assert proc.poll() is None, proc.log_path.read_text()[-2000:]
    tasks = _tasks(tmp_path)

    served = _evaluate("local-completions", f"model=nano,base_url={base}/v1/completions,tokenizer_backend=remote,"
                                            "max_length=64,num_concurrent=1,max_retries=1,timeout=120", tasks)
    hf = _evaluate("hf", f"pretrained={hf_dir},tokenizer={hf_dir},device=cpu,dtype=float32,max_length=64", tasks)

    from model import load_model_from_checkpoint

    model = load_model_from_checkpoint(hf_dir, device="cpu", dtype="float32")
    samples, hf_samples = served["samples"]["nano_mc"], hf["samples"]["nano_mc"]
    assert len(samples) == len(MC)
    for s, h in zip(sorted(samples, key=lambda s: s["doc_id"]), sorted(hf_samples, key=lambda s: s["doc_id"])):
        for arguments, (ll, _greedy), (hf_ll, _) in zip(s["arguments"], [r[0] for r in s["resps"]],
                                                        [r[0] for r in h["resps"]]):
            context, continuation = arguments[0], arguments[1]
            direct = _direct_loglikelihood(model, model.tokenizer, context, continuation)
            assert math.isclose(ll, direct, abs_tol=1e-4), (context, continuation, ll, direct)
            assert math.isclose(ll, hf_ll, abs_tol=1e-3), (context, continuation, ll, hf_ll)
    for task, metric in (("nano_mc", "acc,none"), ("nano_gen", "exact_match,none")):
        assert served["results"][task][metric] == hf["results"][task][metric], task
    gen = sorted(served["samples"]["nano_gen"], key=lambda s: s["doc_id"])
    hf_gen = sorted(hf["samples"]["nano_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"] for s in gen] == [s["resps"] for s in hf_gen]  # greedy: the same continuations


def _healthy(requests, base: str) -> bool:
    try:
        return requests.get(base + "/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False
