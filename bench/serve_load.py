"""`fluid serve` under load: N concurrent clients x M requests each, FLUID against greedy decoding (`--decoder ar`).

    python bench/serve_load.py --model DIR [--clients 1,4,16] [--requests 4] [--max-tokens 128]
                               [--prompt-file recipes/stories260k-prompts.txt] [--decoders fluid,ar] [--json out.json]

For each decoder it starts `fluid serve --model DIR --decoder D --max-batch-size max(clients)` on a free port of
127.0.0.1 (the server's threads follow OMP_NUM_THREADS), waits for /health, and for each client count runs one
untimed request, then N clients that each send M streamed completions one after another (prompts taken in turn
from the file). Reported per decoder and client count: requests completed (a finish_reason, the usage chunk and
`data: [DONE]` seen) and failed (with the error), generated tokens per second of wall-clock time, p50/p95 latency
and time to first token, tokens per forward (generated tokens per forward each request took part in) and the mean
batch (requests per forward), both from the server's /metrics, and how many outputs equal the other decoder's
(verified FLUID decoding writes the greedy text). Bounded: N x M requests, each of at most --max-tokens tokens,
with a timeout. Exits 1 if a request failed (each error is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import openai
from rich.console import Console
from rich.table import Table

from fluid_cli.prompts import read_prompt_file

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    prompt: str
    text: str = ""
    tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    error: str | None = None


@dataclass
class Level:
    decoder: str
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    forwards: float = 0.0  # the server's batched forwards during the level
    row_forwards: float = 0.0  # the same forwards counted once per request in them

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is None]

    def summary(self) -> dict:
        done = self.completed
        tokens = sum(o.tokens for o in done)
        latency = sorted(o.latency_s for o in done)
        ttft = sorted(o.ttft_s for o in done if o.ttft_s is not None)
        return {"decoder": self.decoder, "clients": self.clients, "requests": len(self.outcomes),
                "completed": len(done), "failed": len(self.outcomes) - len(done),
                "errors": sorted({o.error for o in self.outcomes if o.error}), "tokens": tokens,
                "wall_s": self.wall_s, "tokens_per_s": tokens / self.wall_s if self.wall_s else 0.0,
                "p50_latency_s": percentile(latency, 50), "p95_latency_s": percentile(latency, 95),
                "p50_ttft_s": percentile(ttft, 50), "p95_ttft_s": percentile(ttft, 95),
                "tokens_per_forward": tokens / self.row_forwards if self.row_forwards else 0.0,
                "mean_batch": self.row_forwards / self.forwards if self.forwards else 0.0}


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile (0 for no values)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, decoder: str, batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "fluid_cli", "serve", "--model", model, "--port", str(port),
                             "--decoder", decoder, "--max-batch-size", str(batch), "--model-name", "bench", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"fluid serve exited with status {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("fluid serve did not answer /health within 300 s")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def forwards(url: str) -> tuple[float, float]:
    """The server's forwards and row-forwards so far."""
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    values = {line.split()[0]: float(line.split()[-1]) for line in lines if line.startswith("fluid_")}
    return values["fluid_forwards_total"], values["fluid_row_forwards_total"]


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> Outcome:
    out = Outcome(prompt)
    start = time.perf_counter()
    finished, usage = None, None
    try:
        stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True})
        parts = []
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices:
                if chunk.choices[0].text and out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - start
                parts.append(chunk.choices[0].text)
                finished = chunk.choices[0].finish_reason or finished
        out.text = "".join(parts)
    except openai.APIError as e:
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.latency_s = time.perf_counter() - start
    if finished is None or usage is None:  # the stream ended early: [DONE] is only sent after both
        out.error = "the stream ended without a finish_reason and usage"
    else:
        out.tokens = usage.completion_tokens
    return out


async def run_level(url: str, decoder: str, clients: int, requests: int, prompts: list[str], max_tokens: int,
                    timeout: float) -> Level:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
    await one_request(client, prompts[0], max_tokens)  # untimed: the first request's lazy set-up
    level = Level(decoder, clients)
    before = forwards(url)

    async def worker(w: int) -> list[Outcome]:
        return [await one_request(client, prompts[(w * requests + r) % len(prompts)], max_tokens)
                for r in range(requests)]

    start = time.perf_counter()
    per_worker = await asyncio.gather(*(worker(w) for w in range(clients)))
    level.wall_s = time.perf_counter() - start
    after = forwards(url)
    level.forwards, level.row_forwards = after[0] - before[0], after[1] - before[1]
    level.outcomes = [o for outs in per_worker for o in outs]
    await client.close()
    return level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="FLUID model folder (as fluid serve --model)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-file", default=str(ROOT / "recipes" / "stories260k-prompts.txt"))
    parser.add_argument("--decoders", default="fluid,ar")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--server-arg", action="append", default=[], help="passed on to fluid serve (repeatable)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    prompts = [p for p in read_prompt_file(Path(args.prompt_file)) if isinstance(p, str)]
    levels: list[Level] = []
    for decoder in args.decoders.split(","):
        proc, url = start_server(args.model, decoder, max(clients), args.server_arg)
        try:
            for n in clients:
                levels.append(asyncio.run(run_level(url, decoder, n, args.requests, prompts, args.max_tokens,
                                                    args.timeout)))
        finally:
            stop_server(proc)
    rows = [level.summary() for level in levels]
    for level, row in zip(levels, rows):  # outputs equal to the other decoder's at the same client count
        other = next((o for o in levels if o.clients == level.clients and o is not level), None)
        if other is not None:
            row["same_as_other"] = sum(a.error is None and b.error is None and a.text == b.text
                                       for a, b in zip(level.outcomes, other.outcomes))
    table = Table(title=f"fluid serve under load: {args.model}, {args.max_tokens} tokens per request, "
                        f"{args.requests} requests per client")
    for col in ("decoder", "clients", "done/failed", "tokens/s", "p50 latency", "p95 latency", "p50 TTFT",
                "p95 TTFT", "tok/fwd", "batch", "same"):
        table.add_column(col, justify="left" if col == "decoder" else "right")
    for row in rows:
        table.add_row(row["decoder"], str(row["clients"]), f"{row['completed']}/{row['failed']}",
                      f"{row['tokens_per_s']:,.0f}", f"{row['p50_latency_s']:.3f} s", f"{row['p95_latency_s']:.3f} s",
                      f"{row['p50_ttft_s']:.3f} s", f"{row['p95_ttft_s']:.3f} s", f"{row['tokens_per_forward']:.2f}",
                      f"{row['mean_batch']:.1f}",
                      str(row.get("same_as_other", "-")))
    Console(width=150).print(table)  # whole, also when piped
    for row in rows:
        for error in row["errors"]:
            print(f"{row['decoder']}, {row['clients']} clients: {error}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows,
                                               "outcomes": [[asdict(o) for o in lv.outcomes] for lv in levels]},
                                              indent=2) + "\n")
    if any(row["failed"] for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
