"""The server's Prometheus metrics (GET /metrics), in a registry of its own:

    idefics_jax_http_requests_total{code}           chat-completion requests answered, by HTTP status
    idefics_jax_requests_finished_total{reason}     requests the engine ended: stop, length, cancelled, error
    idefics_jax_prompt_tokens_total, idefics_jax_generation_tokens_total
    idefics_jax_requests_running, idefics_jax_requests_waiting (the queue), idefics_jax_slots
    idefics_jax_time_to_first_token_seconds         histogram: submit -> first token
    idefics_jax_inter_token_latency_seconds         histogram, one observation per request: (last token - first
                                                    token) / (tokens - 1)
    idefics_jax_request_latency_seconds             histogram: submit -> end
    idefics_jax_cache_queries_total{cache}, idefics_jax_cache_hits_total{cache}, idefics_jax_cache_hit_rate{cache}

Caches report through the engine's `stats` counter: a cache named NAME counts `stats["NAME_cache_queries"]` and
`stats["NAME_cache_hits"]` (in its own unit: tokens for a prefix cache, images for an image cache); a cache the
engine does not count is absent here.
"""

from __future__ import annotations

CACHES = ("prefix", "image")
# Seconds: from a token on a fast accelerator to a slow CPU prefill of several images.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    """The metrics of one server over `engine`: `observe(result)` for each ended request, `http(code)` for each
    response; queue, slots and caches are read from the engine at scrape time. Thread-safe."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.engine = engine
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter("idefics_jax_http_requests", "Chat-completion requests answered, by HTTP status",
                                     ["code"], registry=r)
        self.finished = Counter("idefics_jax_requests_finished", "Requests the engine ended, by finish reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("idefics_jax_prompt_tokens", "Prompt tokens of ended requests", registry=r)
        self.generation_tokens = Counter("idefics_jax_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("idefics_jax_time_to_first_token_seconds", "From submission to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("idefics_jax_inter_token_latency_seconds",
                             "Per request: (last token - first token) / (tokens - 1)", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("idefics_jax_request_latency_seconds", "From submission to the end of the request",
                             buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def observe(self, result) -> None:
        """An ended request's `serve.engine.Result`."""
        self.finished.labels(result.finish_reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)
        self.e2e.observe(result.t_done - result.t_submit)
        if result.t_first is not None:
            self.ttft.observe(result.t_first - result.t_submit)
            if result.completion_tokens > 1:
                self.itl.observe((result.t_done - result.t_first) / (result.completion_tokens - 1))

    def failed(self) -> None:
        self.finished.labels("error").inc()

    def http(self, code: int) -> None:
        self.http_requests.labels(str(code)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Gauges and cache counters read from the engine when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        load = self.engine.load()
        yield GaugeMetricFamily("idefics_jax_requests_running", "Requests decoding in a slot", value=load["active"])
        yield GaugeMetricFamily("idefics_jax_requests_waiting", "Requests in the queue", value=load["waiting"])
        yield GaugeMetricFamily("idefics_jax_slots", "Decode slots", value=self.engine.slots)
        stats = dict(self.engine.stats)
        present = [c for c in CACHES if f"{c}_cache_queries" in stats]
        if not present:
            return
        queries = CounterMetricFamily("idefics_jax_cache_queries", "Cache look-ups (tokens or images)",
                                      labels=["cache"])
        hits = CounterMetricFamily("idefics_jax_cache_hits", "Cache hits (tokens or images)", labels=["cache"])
        rate = GaugeMetricFamily("idefics_jax_cache_hit_rate", "Hits / queries since start", labels=["cache"])
        for c in present:
            q, h = stats[f"{c}_cache_queries"], stats.get(f"{c}_cache_hits", 0)
            queries.add_metric([c], q)
            hits.add_metric([c], h)
            rate.add_metric([c], h / q if q else 0.0)
        yield from (queries, hits, rate)


class CountResponses:
    """ASGI middleware: counts the responses to `path` by status (`Metrics.http`)."""

    def __init__(self, app, *, metrics: Metrics, path: str):
        self.app, self.metrics, self.path = app, metrics, path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http(message["status"])
            await send(message)

        await self.app(scope, receive, counted_send)
