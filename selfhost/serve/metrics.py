"""`GET /metrics`: Prometheus metrics through prometheus-client (its own registry per app).

Requests by endpoint and status (an ASGI middleware), prompt and generated tokens, time to first
token and time per output token (observed as each reply is finished by a Service, whatever its
protocol or model), slots, slots busy, queue length, models loaded and their load time (read from
the model manager when scraped).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from selfhost.runtime.jobs import JobEnd
from selfhost.serve.runner import Served

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self, served: Served) -> None:
        self.registry = reg = CollectorRegistry()
        self.requests = Counter(
            "selfhost_requests", "HTTP requests answered", ["endpoint", "status"], registry=reg
        )
        self.prompt_tokens = Counter(
            "selfhost_prompt_tokens", "Prompt tokens of finished replies", registry=reg
        )
        self.generated_tokens = Counter("selfhost_generated_tokens", "Tokens generated", registry=reg)
        self.ttft = Histogram(
            "selfhost_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY, registry=reg
        )
        self.per_token = Histogram(
            "selfhost_time_per_output_token_seconds",
            "Time per generated token after the first",
            buckets=_PER_TOKEN,
            registry=reg,
        )
        reg.register(ModelGauges(served.manager))
        served.manager.observers.append(self.observe)

    def observe(self, end: JobEnd) -> None:
        """One finished reply (called by Service.finish, for every protocol)."""
        self.prompt_tokens.inc(end.prompt_tokens)
        self.generated_tokens.inc(end.generated_tokens)
        if end.generated_tokens:
            self.ttft.observe(end.time_to_first_token_s)
        if end.generated_tokens > 1:
            self.per_token.observe((end.total_s - end.time_to_first_token_s) / (end.generated_tokens - 1))


class ModelGauges(Collector):
    """Slots, queue and loaded models, read from the model manager when scraped."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def collect(self) -> Any:
        models = self.manager.status()["models"]
        for name, doc, key in (
            ("selfhost_slots", "Slots decoded together", "slots"),
            ("selfhost_slots_busy", "Slots generating now", "slots_busy"),
            ("selfhost_queue_length", "Requests waiting for a slot", "queued"),
        ):
            yield GaugeMetricFamily(name, doc, value=sum(m[key] for m in models))
        yield GaugeMetricFamily("selfhost_models_loaded", "Models loaded", value=len(models))
        load = GaugeMetricFamily(
            "selfhost_model_load_seconds", "Seconds each loaded model took to load", labels=["model"]
        )
        for managed in list(self.manager.loaded.values()):
            load.add_metric([managed.name], managed.load_seconds)
        yield load
        yield from _engine_counters(models)


# (family name, help, the status section, its key): counted per loaded model since it loaded
ENGINE_COUNTERS = (
    ("selfhost_spec_drafted_tokens", "Tokens drafted by speculation", "speculative", "drafted_tokens"),
    ("selfhost_spec_accepted_tokens", "Drafted tokens the model accepted", "speculative", "accepted_tokens"),
    ("selfhost_prompt_cache_restored_tokens", "Prompt tokens restored from the prompt cache instead of "
     "evaluated", "prompt_cache", "restored_tokens"),
    ("selfhost_prompt_cache_saved", "Slot states saved to the prompt cache", "prompt_cache", "saved"),
)


def _engine_counters(models: list[dict[str, Any]]) -> Any:
    """Speculation and prompt-cache counters of each loaded model (engine.counters(), in its status)."""
    for name, doc, section, key in ENGINE_COUNTERS:
        family = CounterMetricFamily(name, doc, labels=["model"])
        for model in models:
            if section in model:
                family.add_metric([model["name"]], model[section][key])
        yield family


class CountRequests:
    """ASGI middleware: count each answered request by its route and status code."""

    def __init__(self, app: Any, metrics: Metrics, paths: set[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.paths else "other"  # bounded label values

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def register(app: FastAPI, served: Served, *, public: bool) -> None:
    metrics = Metrics(served)

    @app.get("/metrics", dependencies=[] if public else [served.auth])
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    paths = {getattr(route, "path", "") for route in app.routes}
    app.add_middleware(CountRequests, metrics=metrics, paths=paths)
