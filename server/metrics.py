"""Prometheus metrics, on a registry owned by the app (never the global one), so
tests can build many apps. Names follow Prometheus conventions under `nanogpt_`;
where vLLM exports the same quantity, its `vllm:` name is exported too (same values),
so routers and dashboards built for vLLM work unchanged.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)


class _Pair:
    """One observation recorded under our name and vLLM's (vLLM labels by model_name)."""

    def __init__(self, ours, theirs, metrics: "Metrics"):
        self._ours, self._theirs, self._metrics = ours, theirs, metrics

    def observe(self, value: float) -> None:
        self._ours.observe(value)
        self._theirs.labels(model_name=self._metrics.model_name).observe(value)

    def inc(self, value: float = 1) -> None:
        self._ours.inc(value)
        self._theirs.labels(model_name=self._metrics.model_name).inc(value)


class EngineCollector:
    """Reads the engine's stats at scrape time (running, waiting, KV cache, batch size)."""

    def __init__(self, stats: Callable[[], object | None], ready: Callable[[], bool], metrics: "Metrics"):
        self._stats, self._ready, self._metrics = stats, ready, metrics

    def collect(self):
        ready = GaugeMetricFamily("nanogpt_ready", "1 when the model is loaded, warmed up and not draining")
        ready.add_metric([], 1.0 if self._ready() else 0.0)
        yield ready
        s = self._stats()
        if s is None:
            return
        gauges = [
            ("nanogpt_num_requests_running", "requests decoding in the engine", s.running),
            ("nanogpt_num_requests_waiting", "requests queued for an engine slot", s.waiting),
            ("nanogpt_max_batch", "engine slots", s.max_batch),
            ("nanogpt_kv_cache_usage_ratio", "fraction of KV-cache rows in use (0..1)", s.kv_cache_usage),
            ("nanogpt_kv_cache_bytes", "bytes allocated for the KV cache", s.kv_cache_bytes),
            ("nanogpt_batch_size", "rows decoded in the engine's last step", s.last_batch_size),
            ("nanogpt_decode_tokens_per_second", "recent measured decode throughput", s.tokens_per_second),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        steps = CounterMetricFamily("nanogpt_engine_steps", "engine steps run")
        steps.add_metric([], float(s.total_steps))
        yield steps
        for name, doc, value in [
            ("vllm:num_requests_running", "Number of requests in model execution batches.", s.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage),
            ("vllm:gpu_cache_usage_perc", "KV-cache usage (vLLM's older name).", s.kv_cache_usage),
        ]:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self._metrics.model_name], float(value))
            yield g
        # vLLM's info gauge, read by the Gateway API Inference Extension's endpoint picker; one cache
        # "block" here is one request's row of block_size positions, and there are max_batch of them.
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=["block_size", "num_gpu_blocks"])
        info.add_metric([str(s.block_size), str(s.max_batch)], 1.0)
        yield info


class Metrics:
    def __init__(self, model_name: str = "unknown"):
        # model_name labels the vllm: series; set again once the checkpoint has loaded.
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.requests = Counter("nanogpt_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("nanogpt_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = self._histograms("time_to_first_token_seconds", "time to first token",
                                     "Histogram of time to first token in seconds.", LATENCY_BUCKETS)
        self.tpot = self._histograms("time_per_output_token_seconds", "time per output token after the first",
                                     "Histogram of time per output token in seconds.", TOKEN_LATENCY_BUCKETS)
        self.queue_time = self._histograms("request_queue_time_seconds", "time waiting for an engine slot",
                                           "Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS)
        self.e2e = self._histograms("e2e_request_latency_seconds", "engine request latency, submit to finish",
                                    "Histogram of end to end request latency in seconds.", LATENCY_BUCKETS)
        self.prompt_tokens = self._counters("prompt_tokens", "prompt tokens processed",
                                            "Number of prefill tokens processed.")
        self.generation_tokens = self._counters("generation_tokens", "tokens generated",
                                                "Number of generation tokens processed.")
        self.finished = Counter("nanogpt_request_finished", "engine requests by finish reason",
                                ["finish_reason"], registry=r)
        self.vllm_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                    ["model_name", "finished_reason"], registry=r)
        self.cache_hits = Counter("nanogpt_cache_hits", "responses served from the cache", registry=r)
        self.cache_misses = Counter("nanogpt_cache_misses", "cacheable requests not in the cache", registry=r)
        self.rate_limited = Counter("nanogpt_rate_limited", "requests refused with 429", registry=r)
        self.rejected = Counter("nanogpt_rejected", "requests refused before generation, by reason",
                                ["reason"], registry=r)
        for reason in ("overloaded", "prompt_too_long"):  # zero series from the start, for rate()
            self.rejected.labels(reason=reason)
        # The queue's limit beside its depth, so an alert can say "80% full" on any MAX_QUEUE.
        self.queue_capacity = Gauge("nanogpt_queue_capacity", "waiting requests allowed before 503 (MAX_QUEUE)",
                                    registry=r)

    # Each quantity vLLM also measures is exported twice: nanogpt_<name> and vllm:<name>{model_name}.
    def _histograms(self, name: str, doc: str, vllm_doc: str, buckets) -> "_Pair":
        return _Pair(Histogram(f"nanogpt_{name}", doc, buckets=buckets, registry=self.registry),
                     Histogram(f"vllm:{name}", vllm_doc, ["model_name"], buckets=buckets, registry=self.registry),
                     self)

    def _counters(self, name: str, doc: str, vllm_doc: str) -> "_Pair":
        return _Pair(Counter(f"nanogpt_{name}", doc, registry=self.registry),
                     Counter(f"vllm:{name}", vllm_doc, ["model_name"], registry=self.registry), self)

    def watch_engine(self, stats: Callable[[], object | None], ready: Callable[[], bool]) -> None:
        self.registry.register(EngineCollector(stats, ready, self))

    def record_result(self, result) -> None:
        """Per-request engine timings and token counts from a GenerationResult."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)
        self.finished.labels(finish_reason=result.finish_reason).inc()
        if result.finish_reason in ("length", "stop", "eos"):
            self.vllm_success.labels(model_name=self.model_name, finished_reason=result.finish_reason).inc()
        if result.queue_s is not None:
            self.queue_time.observe(result.queue_s)
        if result.ttft_s is not None and result.completion_tokens > 0:
            self.ttft.observe(result.ttft_s)
            if result.completion_tokens > 1 and result.total_s is not None:
                self.tpot.observe(max(0.0, result.total_s - result.ttft_s) / (result.completion_tokens - 1))
        if result.total_s is not None:
            self.e2e.observe(result.total_s)
