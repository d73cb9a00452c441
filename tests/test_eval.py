"""`fluid eval` and the lm-eval model `fluid`: real task files and filters, local data, AR vs FLUID, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.tasks._yaml_loader import load_yaml
from tiny import tiny_fluid_model, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from fluid_cli import evaluate
from fluid_cli.cli import app
from fluid_cli.config import EvalConfig
from fluid_cli.folder import save_model
from fluid_cli.lm_eval_adapter import FluidLM
from fluid_cli.tasks import utils as task_utils

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
runner = CliRunner()


def needs_data(test):
    """A test that reads the benchmark files in ../shared/data: marked `shared`, skipped where they are absent."""
    skip = pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").is_file(),
                              reason=f"benchmark files not found under {DATA}")
    return pytest.mark.shared(skip(test))


def untied_fluid_model(seed: int = 1):
    """A tiny random FLUID model with its own output head: with tied embeddings a random model only repeats the
    last prompt token, which would make AR-vs-FLUID comparisons trivial."""
    model = tiny_fluid_model("llama", max_k=4, seed=seed)
    model.lm.config.tie_word_embeddings = False
    torch.manual_seed(100 + seed)
    model.lm.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm.lm_head.weight))
    return model


@pytest.fixture(scope="module")
def fluid_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fluid-model")
    save_model(untied_fluid_model(), folder)
    return folder


@pytest.fixture(scope="module")
def arithmetic_dir(tmp_path_factory) -> Path:
    from fluid_cli.synthetic import arithmetic_rows

    folder = tmp_path_factory.mktemp("data")
    (folder / "arithmetic").mkdir()
    rows = arithmetic_rows(4, seed=0)
    (folder / "arithmetic" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def invoke(*args: str):
    result = runner.invoke(app, ["eval", *args])
    return result, " ".join(result.output.split())  # rich wraps long lines


# --------------------------------------------------------------------------------------------- scoring plumbing


class Oracle(LM):
    """Answers every generation request with the document's gold `answer`, or with one digit appended to it
    (`wrong`): right format, wrong value, so only a filter that extracts the final answer scores it 0."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.wrong = wrong

    def generate_until(self, requests, disable_tqdm=False):
        return [r.doc["answer"] + ("1" if self.wrong else "") for r in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


@needs_data
@pytest.mark.parametrize("wrong, expected", [(False, 1.0), (True, 0.0)], ids=["oracle", "wrong-answer"])
def test_local_gsm8k_and_math500_score_gold_answers_and_only_them(tmp_path, wrong, expected):
    plan = evaluate.plan_tasks(["gsm8k", "math500"], DATA, tmp_path)
    results = evaluate.evaluate_plan(Oracle(wrong), plan, evaluate.task_manager(plan), EvalConfig(limit=20))
    for task in ("gsm8k", "math500"):
        metrics = evaluate._metrics(results, task)
        assert results["n-samples"][task]["effective"] == 20
        assert metrics and all(v == expected for v in metrics.values()), (task, metrics)
    # The local files replace the hub datasets; prompts and filters are lm-eval's own.
    assert results["configs"]["gsm8k"]["dataset_path"] == "json"
    assert [f["name"] for f in results["configs"]["gsm8k"]["filter_list"]] == ["strict-match", "flexible-extract"]
    assert results["configs"]["math500"]["doc_to_text"] == "Problem: {{problem}}\nAnswer:"


@needs_data
def test_humaneval_runs_the_programs_only_when_allowed(tmp_path, monkeypatch):
    class Canonical(LM):  # completes each prompt with the reference solution, or with a body that fails
        def __init__(self, broken: bool):
            super().__init__()
            self.broken = broken

        def generate_until(self, requests, disable_tqdm=False):
            return ["    return None\n" if self.broken else r.doc["canonical_solution"] for r in requests]

        loglikelihood = loglikelihood_rolling = Oracle.loglikelihood

    plan = evaluate.plan_tasks(["humaneval"], DATA, tmp_path)
    assert plan.unsafe == ["humaneval"]
    manager = evaluate.task_manager(plan)
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    for broken, expected in ((False, 1.0), (True, 0.0)):
        results = evaluate.evaluate_plan(Canonical(broken), plan, manager,
                                         EvalConfig(limit=3, allow_code_execution=True))
        assert evaluate._metrics(results, "humaneval") == {"pass@1,create_test": expected}
    assert "HF_ALLOW_CODE_EVAL" not in os.environ  # allowed for the run only
    with pytest.raises(PermissionError, match="allow-code-execution"):
        task_utils.pass_at_k(["assert True"], [["pass"]], k=[1])


def test_program_runner_times_out():
    assert task_utils.run_program("assert 1 + 1 == 2\n")
    assert not task_utils.run_program("raise SystemExit(3)\n")
    assert not task_utils.run_program("while True:\n    pass\n", timeout_s=1.0)


@needs_data
def test_local_mmlu_keeps_lm_evals_subjects(tmp_path):
    plan = evaluate.plan_tasks(["mmlu"], DATA, tmp_path)
    assert len(plan.leaves["mmlu"]) == 57 and not plan.generative
    task = evaluate.task_manager(plan).load(["mmlu_anatomy"])["tasks"]["mmlu_anatomy"]
    docs, shots = task.test_docs(), task.fewshot_docs()
    assert len(docs) == 135 and {d["subject"] for d in docs} == {"anatomy"}  # the anatomy test split's size
    assert len(shots) == 5 and {d["subject"] for d in shots} == {"anatomy"}  # few-shot from its own dev split
    assert task.config.description.startswith("The following are multiple choice questions (with answers) about anat")


def test_package_tasks_copy_lm_evals_prompts_and_filters():
    lm_eval_tasks = evaluate.LM_EVAL_TASKS
    gsm8k = load_yaml(lm_eval_tasks / "gsm8k" / "gsm8k.yaml", resolve_func=False)
    arithmetic = load_yaml(evaluate.PACKAGE_TASKS / "arithmetic.yaml", resolve_func=False)
    for key in ("output_type", "doc_to_text", "doc_to_target", "metric_list", "generation_kwargs", "filter_list"):
        assert arithmetic[key] == gsm8k[key], key
    ours = load_yaml(evaluate.PACKAGE_TASKS / "humaneval.yaml", resolve_func=False)
    theirs = load_yaml(lm_eval_tasks / "humaneval" / "humaneval.yaml", resolve_func=False)
    # `!function` references load as paths next to each file: compare the function names.
    for cfg in (ours, theirs):
        cfg["metric_list"][0]["metric"] = Path(cfg["metric_list"][0]["metric"]).suffix
        cfg["filter_list"][0]["filter"][0]["filter_fn"] = Path(cfg["filter_list"][0]["filter"][0]["filter_fn"]).suffix
    assert {k: v for k, v in ours.items() if k != "metadata"} == {k: v for k, v in theirs.items() if k != "metadata"}


# --------------------------------------------------------------------------------------------- the model


def test_loglikelihood_matches_unbatched_forwards():
    model = untied_fluid_model()
    lm = FluidLM(model, batch_size=2)
    tok = model.tokenizer
    pairs = [("Question: 1+1?\nAnswer:", " 2"), ("A", "BCD"), ("a longer context, " * 4 + "and", " a tail")]
    got = lm.loglikelihood([_instance("loglikelihood", p) for p in pairs], disable_tqdm=True)
    for (ctx, cont), (logprob, greedy) in zip(pairs, got):
        ctx_ids, cont_ids = tok.encode(ctx), tok.encode(cont)
        with torch.no_grad():
            logits = model.lm(torch.tensor([ctx_ids + cont_ids])).logits[0, len(ctx_ids) - 1: -1]
        logp = torch.log_softmax(logits.float(), -1)
        assert logprob == pytest.approx(float(logp[range(len(cont_ids)), cont_ids].sum()), abs=1e-4)
        assert greedy == (logp.argmax(-1).tolist() == cont_ids)


def _generate(lm: FluidLM, *gen_kwargs: dict) -> list[str]:
    context = "Question: 2+2?\nAnswer:"
    return lm.generate_until([_instance("generate_until", (context, kw)) for kw in gen_kwargs], disable_tqdm=True)


def test_generation_stops_at_stop_strings_and_max_gen_toks():
    lm = FluidLM(untied_fluid_model())
    (free,) = _generate(lm, {"until": [], "max_gen_toks": 12, "do_sample": False})
    assert lm.samples[-1]["stats"]["new_tokens"] == 12 and len(free) >= 6
    stop = free[3:5]
    (cut,) = _generate(lm, {"until": [stop], "max_gen_toks": 12, "do_sample": False})
    assert cut == free.split(stop)[0] and lm.samples[-1]["stats"]["stop_reason"] == "stop"


def test_batched_generation_equals_one_request_at_a_time():
    """Requests with their own stop strings and limits, decoded 3 at a time, give what each gives alone."""
    model = untied_fluid_model()
    kwargs = [{"until": [], "max_gen_toks": n, "do_sample": False} for n in (12, 5, 9, 12, 3)]
    kwargs[3]["until"] = ["a"]
    one = [_generate(FluidLM(model, batch_size=1), kw)[0] for kw in kwargs]
    for decoder in ("fluid", "ar"):
        lm = FluidLM(model, batch_size=3, decoder=decoder)
        assert _generate(lm, *kwargs) == one, decoder
        assert len(lm.batches) == 1 and lm.batches[0]["batch_size"] == 3
        assert lm.batches[0]["new_tokens"] == sum(s["stats"]["new_tokens"] for s in lm.samples)


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@needs_data
def test_fluid_eval_gsm8k_both_decoders(fluid_dir, tmp_path):
    out = tmp_path / "eval"
    result, text = invoke("gsm8k", "--model", str(fluid_dir), "--limit", "5", "--decoder", "both",
                          "--data-dir", str(DATA), "--output-dir", str(out), "--set", "eval.max_gen_toks=16")
    assert result.exit_code == 0, text
    assert "speed-up" in text and "identical outputs" in text
    summary = json.loads((out / "results.json").read_text())["tasks"]["gsm8k"]
    assert summary["identical"] == 1.0  # verification makes FLUID's output greedy AR's
    for decoder in ("ar", "fluid"):
        assert summary[decoder]["n_samples"] == 5
        assert set(summary[decoder]["metrics"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
        assert summary[decoder]["speed"]["new_tokens"] > 0
    assert summary["ar"]["speed"]["tokens_per_forward"] == 1.0
    rows = [json.loads(line) for line in (out / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == list(range(5))
    assert all(r["identical"] and r["ar"]["output"] == r["fluid"]["output"] for r in rows)
    assert len(set(rows[0]["fluid"]["output"][0])) > 3  # a real generation, not one repeated character
    assert rows[0]["fluid"]["filters"]["strict-match"]["exact_match"] == 0.0
    assert (out / "fluid-config.toml").is_file()


def test_plain_model_with_ar_decoder_and_chat_template(arithmetic_dir, tmp_path):
    plain = tmp_path / "plain"
    tiny_model().save_pretrained(plain)
    tiny_tokenizer().save_pretrained(plain)
    out = tmp_path / "eval"
    result, text = invoke("arithmetic", "--model", str(plain), "--decoder", "ar", "--limit", "2",
                          "--apply-chat-template", "--data-dir", str(arithmetic_dir), "--output-dir", str(out),
                          "--set", "eval.max_gen_toks=4")
    assert result.exit_code == 0, text
    rows = [json.loads(line) for line in (out / "samples_arithmetic.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["prompt"].startswith("<|user|>Question: ")
    assert rows[0]["ar"]["decode"][0]["new_tokens"] <= 4


@pytest.mark.slow
def test_lm_eval_command_line_runs_fluid(fluid_dir, arithmetic_dir, tmp_path):
    """The harness's own command line (lm_eval's `cli_evaluate`), with `fluid` registered by the adapter module;
    the package's task folder is an ordinary --include_path (its data file is relative to the working folder)."""
    out = tmp_path / "lm-eval"
    done = subprocess.run(
        [sys.executable, "-m", "fluid_cli.lm_eval_adapter", "--model", "fluid",
         "--model_args", f"model={fluid_dir},decoder=fluid", "--tasks", "arithmetic",
         "--include_path", str(evaluate.PACKAGE_TASKS), "--limit", "2", "--gen_kwargs", "max_gen_toks=8",
         "--output_path", str(out)],
        cwd=arithmetic_dir, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"]["arithmetic"]["effective"] == 2
    assert "exact_match,strict-match" in results["results"]["arithmetic"]
    assert results["config"]["fluid_decoder"] == "fluid"


# --------------------------------------------------------------------------------------------- bad input


def test_unknown_task_lists_known_ones(tmp_path, monkeypatch):
    # Only lm-eval's gsm8k folder stands in for its ~15,000 task files, whose index takes seconds to build.
    monkeypatch.setattr(evaluate, "LM_EVAL_TASKS", evaluate.LM_EVAL_TASKS / "gsm8k")
    result, text = invoke("gsm8kk", "--model", str(tmp_path))
    assert result.exit_code == 2
    assert "unknown task 'gsm8kk'" in text and "gsm8k, gsm8k_cot, math500" in text and "did you mean gsm8k" in text


def test_missing_data_file_names_the_expected_path(tmp_path):
    result, text = invoke("gsm8k", "--model", str(tmp_path), "--data-dir", str(tmp_path))
    assert result.exit_code == 2
    assert f"data file {tmp_path / 'gsm8k' / 'train.jsonl'} not found" in text


def test_local_task_needs_a_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(evaluate.DATA_DIR_ENV, raising=False)
    result, text = invoke("arithmetic", "--model", str(tmp_path))
    assert result.exit_code == 2 and "arithmetic/test.jsonl" in text and "--data-dir" in text


def test_code_execution_needs_the_flag(tmp_path):
    result, text = invoke("humaneval", "--model", str(tmp_path))
    assert result.exit_code == 2 and "--allow-code-execution" in text


def test_a_plain_model_decodes_with_fluid_too(arithmetic_dir, tmp_path):
    plain = tmp_path / "plain"
    tiny_model().save_pretrained(plain)
    tiny_tokenizer().save_pretrained(plain)
    out = tmp_path / "eval"
    result, text = invoke("arithmetic", "--model", str(plain), "--decoder", "both", "--limit", "2",
                          "--data-dir", str(arithmetic_dir), "--output-dir", str(out), "--set", "eval.max_gen_toks=6")
    assert result.exit_code == 0, text
    summary = json.loads((out / "results.json").read_text())
    assert summary["exact_to"] == "base" and summary["tasks"]["arithmetic"]["identical"] == 1.0


def _instance(request_type: str, args: tuple) -> Instance:
    return Instance(request_type=request_type, doc={}, arguments=args, idx=0, metadata=("t", 0, 1))
