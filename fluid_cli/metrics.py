"""`fluid serve`'s Prometheus metrics, and the `fluid` statistics object of every response.

Counted per server (one registry each, so several servers can live in one process): HTTP requests by endpoint and
status, finished generations by finish reason, prompt and generated tokens, forwards (batched model calls) and
row-forwards (a forward counted once per request in it: row-forwards / forwards is the mean batch occupancy),
drafted and accepted tokens per draft position, each request's tokens per forward, and, read live from the
engine, the queue length and the rows in use.

A block of horizon `K_t` drafts positions `1..K_t - 1` (slot 0 is the greedy token, no draft); verification
accepts positions `1..a - 1` when it accepts `a` tokens of the block.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fluid_cli.decode import DecodeResult, DecodeStats
from fluid_cli.engine import Engine
from fluid_cli.openai_api import FINISH_REASONS

TOKENS_PER_FORWARD_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 16.0)


def fluid_stats(stats: DecodeStats) -> dict[str, Any]:
    """The `fluid` object of a response: how the decoder wrote it."""
    return {"forwards": stats.forwards, "verify_forwards": stats.verify_forwards,
            "drafted_tokens": sum(k - 1 for k in stats.horizons),
            "accepted_drafts": sum(a - 1 for a in stats.accepted),
            "tokens_per_forward": round(stats.tokens_per_forward, 4), "mean_horizon": round(stats.mean_horizon, 4),
            "exact_to": stats.exact_to, "sampling": stats.sampling}


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.http = Counter("fluid_http_requests", "HTTP requests by endpoint and status code",
                            ["endpoint", "status"], registry=self.registry)
        self.finished = Counter("fluid_requests_finished", "Generations by finish reason (stop, length, or "
                                "cancelled: the client hung up)", ["reason"], registry=self.registry)
        self.prompt_tokens = Counter("fluid_prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=self.registry)
        self.generated = Counter("fluid_generation_tokens", "Generated tokens", registry=self.registry)
        self.drafted = Counter("fluid_drafted_tokens", "Drafted tokens offered for verification, by draft position",
                               ["position"], registry=self.registry)
        self.accepted = Counter("fluid_accepted_tokens", "Drafted tokens that verification accepted, by draft "
                                "position", ["position"], registry=self.registry)
        self.tokens_per_forward = Histogram("fluid_request_tokens_per_forward", "Each request's generated tokens "
                                            "per forward it took part in", buckets=TOKENS_PER_FORWARD_BUCKETS,
                                            registry=self.registry)

    def watch(self, engine: Engine) -> None:
        """Export the engine's live numbers too."""
        self.registry.register(_EngineCollector(engine))

    def observe(self, result: DecodeResult) -> None:
        """A finished generation (called in the decoding thread)."""
        stats = result.stats
        self.finished.labels(FINISH_REASONS.get(stats.stop_reason, stats.stop_reason)).inc()
        self.generated.inc(stats.new_tokens)
        drafted, accepted = Tally(), Tally()
        for k, a in zip(stats.horizons, stats.accepted):
            drafted.update(range(1, k))
            accepted.update(range(1, a))
        for position, n in drafted.items():
            self.drafted.labels(str(position)).inc(n)
        for position, n in accepted.items():
            self.accepted.labels(str(position)).inc(n)
        if stats.forwards:
            self.tokens_per_forward.observe(stats.tokens_per_forward)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's live numbers, read at each scrape."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        batch = self.engine.batch
        yield CounterMetricFamily("fluid_forwards", "Batched model forwards for decoding", value=batch.forwards)
        yield CounterMetricFamily("fluid_row_forwards", "Forwards counted once per request in them (divided by "
                                  "fluid_forwards: the mean batch occupancy)", value=batch.row_forwards)
        yield GaugeMetricFamily("fluid_queue_length", "Requests waiting for a row", value=self.engine.queued)
        yield GaugeMetricFamily("fluid_batch_rows_in_use", "Requests decoding now", value=self.engine.rows_in_use)
        yield GaugeMetricFamily("fluid_batch_rows", "Rows the engine decodes at most (max_batch_size)",
                                value=batch.batch_size)
