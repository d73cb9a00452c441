"""`fluid serve` through the real `openai` client, on servers started here on 127.0.0.1 (a tiny random model)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_decode import sharp_model
from typer.testing import CliRunner

import fluid_cli
from fluid_cli.cli import app
from fluid_cli.config import load_recipe_text
from fluid_cli.folder import save_model
from fluid_cli.openai_api import CompletionText
from fluid_cli.server import Service, bind, build_service, server_for
from fluid_cli.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
N = 24  # tokens per completion
PROMPTS = ["hello", "2+3=", "Once upon", "The cat sat", "abc", "xyz 123", "Q: why?", "A", "zz top", "road",
           "tea time", "3*4=", "sun", "moon rise", "edge", "final one"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / NAME
    save_model(sharp_model("llama", max_k=8), folder)
    return folder


@dataclass
class Running:
    url: str
    service: Service

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=60, **kw)

    def metric(self, line_start: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


@contextmanager
def serving(model_dir: Path, *keys: str, generate: tuple[str, ...] = ()) -> Iterator[Running]:
    """A server in a thread of this process, on a free port, with `[serve]` keys (`"max_queue=1"`) and
    `[generate]` keys."""
    recipe = load_recipe_text("", [f"generate.model_dir={model_dir}", *(f"serve.{k}" for k in keys),
                                   *(f"generate.{k}" for k in generate)])
    service = build_service(recipe)
    sock = bind("127.0.0.1", 0)
    server = server_for(service, drain_s=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", service)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[Running]:
    with serving(model_dir) as running:
        yield running


def generate(model_dir: Path, prompts: list[str], *flags: str, max_new_tokens: int = N) -> list[dict]:
    """`fluid generate --json`: the reference, one prompt at a time."""
    args = ["generate", "--model", str(model_dir), "--json", "--max-new-tokens", str(max_new_tokens), *flags]
    for p in prompts:
        args += ["-p", p]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


@pytest.fixture(scope="module")
def plain_refs(model_dir) -> list[dict]:
    return generate(model_dir, PROMPTS, "--no-chat-template")


def test_chat_and_completion_equal_fluid_generate_with_usage_and_stats(server, model_dir, plain_refs):
    client = server.client()
    chat_ref = generate(model_dir, ["hello"])[0]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=N)
    assert chat.choices[0].message.content == chat_ref["text"] and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (chat_ref["prompt_tokens"], N)
    assert chat.usage.total_tokens == chat_ref["prompt_tokens"] + N
    done = client.completions.create(model=NAME, prompt="hello", max_tokens=N)
    assert done.choices[0].text == plain_refs[0]["text"]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (plain_refs[0]["prompt_tokens"], N)
    stats = done.model_extra["fluid"]
    assert stats["exact_to"] == "adapted" and 1 <= stats["forwards"] <= N
    assert stats["tokens_per_forward"] == pytest.approx(N / stats["forwards"], abs=1e-3)
    assert 0 <= stats["accepted_drafts"] <= stats["drafted_tokens"]
    assert stats["verify_forwards"] <= stats["forwards"]
    ids = client.completions.create(model=NAME, prompt=plain_refs[1]["tokens"][:3], max_tokens=2)
    assert ids.usage.prompt_tokens == 3  # token ids are a prompt too
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_streamed_deltas_join_to_the_text(server, model_dir, plain_refs):
    client = server.client()
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=N, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == generate(model_dir, ["hello"])[0]["text"]
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["length"] and "fluid" in finish[0].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N  # the usage chunk comes last
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # block by block
    plain = list(server.client().completions.create(model=NAME, prompt="2+3=", max_tokens=N, stream=True))
    assert "".join(c.choices[0].text for c in plain) == plain_refs[1]["text"]
    assert all(c.usage is None for c in plain)  # not asked for


def test_stop_strings_and_max_tokens_give_their_finish_reasons(server, plain_refs):
    client = server.client()
    ref = plain_refs[2]["text"]
    stop = ref[6:8]
    cut = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=N, stop=[stop, "never seen"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == ref[: ref.find(stop)]
    streamed = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=N, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref[: ref.find(stop)]  # the stop string is never sent
    short = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=5)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5


def test_completion_text_holds_back_a_possible_stop_string():
    tok = build_char_tokenizer()
    text = CompletionText(tok, ["<END>"])
    ids = tok.encode("ab<EN", add_special_tokens=False)
    assert text.add(ids[:3]) == "ab" and text.add(ids[3:]) == ""  # "<", "<EN" may start the stop string
    assert text.add(tok.encode("X", add_special_tokens=False)) == "<ENX" and text.finish() == ""


def test_sixteen_concurrent_requests_each_equal_their_own_decoding(server, plain_refs):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

    async def all_at_once():
        return await asyncio.gather(*(client.completions.create(model=NAME, prompt=p, max_tokens=N)
                                      for p in PROMPTS))

    before = server.metric("fluid_forwards_total")
    results = asyncio.run(all_at_once())
    assert [r.choices[0].text for r in results] == [ref["text"] for ref in plain_refs]
    # decoded together: fewer forwards than one request after another would take
    assert server.metric("fluid_forwards_total") - before < sum(r.model_extra["fluid"]["forwards"] for r in results)


def test_a_late_request_starts_while_others_decode(server):
    client = server.client()
    before = server.metric("fluid_forwards_total")
    stream = client.completions.create(model=NAME, prompt="a long one", max_tokens=230, stream=True)
    first = next(stream)
    late = client.completions.create(model=NAME, prompt="late", max_tokens=3)
    rest = list(stream)
    assert first.choices[0].text and late.choices[0].finish_reason == "length"
    assert sum(bool(c.choices[0].text) for c in rest) > 10  # the long one was still going when the late one ended
    # they shared forwards: the late request did not wait for the long one to finish
    long_forwards = rest[-1].model_extra["fluid"]["forwards"]
    assert server.metric("fluid_forwards_total") - before < long_forwards + late.model_extra["fluid"]["forwards"]


@pytest.mark.parametrize("fields, param", [
    ({"n": 2}, "n"), ({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"temperature": -1}, "temperature"), ({"top_p": 0.9}, "top_p"), ({"temperature": 0.7, "top_p": 1.5}, "top_p"),
    ({"temperature": 0.7, "seed": -1}, "seed"), ({"extra_body": {"top_k": 5}}, "top_k"),
    ({"temperature": 0.7, "extra_body": {"top_k": -2}}, "top_k"),
    ({"prompt": "x" * 300}, "prompt"), ({"max_tokens": 0}, "max_tokens"), ({"prompt": "a <|mask|> b"}, "prompt"),
])
def test_refused_fields_are_bad_requests_naming_the_field(server, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(**{"model": NAME, "prompt": "hi", "max_tokens": 4, **fields})
    assert e.value.body["param"] == param and e.value.body["message"].startswith(param)


def test_chat_refusals_unknown_model_and_greedy_defaults(server):
    client = server.client()
    hi = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=hi, tools=[tool])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=hi, logprobs=True)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=hi)
    assert e.value.body["param"] == "model"
    # greedy is asked for explicitly: temperature 0, top_p 1
    greedy = client.chat.completions.create(model=NAME, messages=hi, max_completion_tokens=4, temperature=0,
                                            top_p=1)
    assert greedy.usage.completion_tokens == 4 and greedy.choices[0].finish_reason == "length"


def test_api_key_and_full_queue(model_dir):
    with serving(model_dir, "api_key='s3cret'", "max_batch_size=1", "max_queue=1") as running:
        for key in ("none", "wrong"):
            with pytest.raises(openai.AuthenticationError):
                running.client(api_key=key).models.list()
        assert httpx.get(running.url + "/health").status_code == 200  # health and metrics need no key
        client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="s3cret", max_retries=0, timeout=120)

        async def many():
            return await asyncio.gather(*(client.completions.create(model=NAME, prompt=p, max_tokens=200)
                                          for p in PROMPTS[:6]), return_exceptions=True)

        outcomes = asyncio.run(many())
        refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
        served = [o for o in outcomes if not isinstance(o, Exception)]
        assert refused and len(refused) + len(served) == 6  # every request completed or got a 429
        assert all(s.usage.completion_tokens == 200 for s in served)
        assert running.metric('fluid_http_requests_total{endpoint="/v1/completions",status="429"}') == len(refused)


def test_a_client_that_hangs_up_mid_stream_does_not_disturb_the_next(server, plain_refs):
    body = {"model": NAME, "prompt": "a long one", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # gone: its row is freed before the next forward
    deadline = time.monotonic() + 10
    while server.metric('fluid_requests_finished_total{reason="cancelled"}') < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.metric("fluid_batch_rows_in_use") == 0
    after = server.client().completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=N)
    assert after.choices[0].text == plain_refs[3]["text"]


def test_metrics_count_requests_tokens_and_drafts(server):
    server.client().completions.create(model=NAME, prompt="metrics", max_tokens=N)
    text = httpx.get(server.url + "/metrics").text
    for name in ("fluid_http_requests_total", "fluid_prompt_tokens_total", "fluid_generation_tokens_total",
                 "fluid_forwards_total", "fluid_row_forwards_total", "fluid_request_tokens_per_forward_count",
                 "fluid_queue_length", "fluid_batch_rows_in_use", 'fluid_drafted_tokens_total{position="1"}'):
        assert name in text, name
    assert server.metric("fluid_accepted_tokens_total") <= server.metric("fluid_drafted_tokens_total")
    assert server.metric("fluid_generation_tokens_total") >= N
    assert server.metric("fluid_row_forwards_total") >= server.metric("fluid_forwards_total") > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fluid_serve_command_drains_and_exits_0_on_sigterm(model_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fluid_cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--decoder", "ar"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model=NAME, prompt="in flight", max_tokens=200, stream=True)
        next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the request in flight finishes
        assert rest[-1].choices[0].finish_reason == "length"
        assert proc.wait(60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_flags_are_checked_like_recipe_keys(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--max-batch-size", "0"])
    assert result.exit_code == 2 and "--max-batch-size 0" in result.output


@pytest.mark.slow
def test_load_script_runs_fluid_and_ar_and_checks_every_request(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n2+3=\nOnce upon\n")
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--model", str(model_dir),
                           "--clients", "1,2", "--requests", "2", "--max-tokens", "8", "--prompt-file", str(prompts),
                           "--json", str(out)], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["decoder"], r["clients"]) for r in rows] == [("fluid", 1), ("fluid", 2), ("ar", 1), ("ar", 2)]
    assert all(r["completed"] == r["requests"] == 2 * r["clients"] and r["tokens"] == 8 * r["requests"]
               for r in rows)
    assert all(r["same_as_other"] == r["requests"] for r in rows)  # verified FLUID writes the greedy text
    assert all(r["tokens_per_forward"] >= 1 and r["p95_latency_s"] >= r["p50_latency_s"] > 0 for r in rows)
    assert "tokens/s" in done.stdout


def test_without_the_serve_extra_the_command_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "fluid_cli.server")
    monkeypatch.delattr(fluid_cli, "server")
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # not installed
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "uvicorn is missing" in result.output and "fluid-cli[serve]" in result.output


def test_sampled_requests_follow_their_seed_as_fluid_generate_does(model_dir):
    """With fixed horizons a seeded request is reproducible: the same text again, alone or among concurrent
    requests, streamed or not, and the same as `fluid generate` with that seed."""
    flags = ("--no-chat-template", "--horizon", "fixed", "--temperature", "1.5", "--top-p", "0.95", "--seed", "5")
    ref = generate(model_dir, ["hello"], *flags)[0]
    with serving(model_dir, generate=("horizon='fixed'",)) as running:
        client = running.client()

        def ask(seed: int, prompt: str = "hello") -> Any:
            return client.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=1.5, top_p=0.95,
                                             seed=seed)

        first = ask(5)
        assert first.choices[0].text == ref["text"]
        assert first.model_extra["fluid"]["sampling"] == {"temperature": 1.5, "top_p": 0.95, "top_k": 0, "seed": 5}
        alone = {s: ask(s, p).choices[0].text for s, p in enumerate(PROMPTS[:8])}
        with ThreadPoolExecutor(8) as pool:
            together = dict(zip(alone, pool.map(lambda sp: ask(*sp).choices[0].text, enumerate(PROMPTS[:8]))))
        assert together == alone
        streamed = client.completions.create(model=NAME, prompt="hello", max_tokens=N, temperature=1.5, top_p=0.95,
                                             seed=5, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == ref["text"]
        greedy = client.completions.create(model=NAME, prompt="hello", max_tokens=N, temperature=0, seed=5)
        assert greedy.model_extra["fluid"]["sampling"] is None
