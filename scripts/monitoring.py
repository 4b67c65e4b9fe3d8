"""Writes manifests/monitoring/nanogpt-dashboard.json: the Grafana dashboard for served models.

The panels' queries live here, once; tests/monitoring checks that the committed JSON is
what this script writes and that a real Prometheus answers every query with series.
Every series carries `namespace`, `model` and `pod` (the operator's ServiceMonitor
relabels the pod's `app.kubernetes.io/instance` label into `model`).

    python scripts/monitoring.py            # rewrite the JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "manifests" / "monitoring" / "nanogpt-dashboard.json"
SEL = 'namespace=~"$namespace", model=~"$model"'
RATE = "$__rate_interval"


def rate(metric: str, by: str = "model", extra: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{{{SEL}{extra}}}[{RATE}]))"


def quantiles(metric: str) -> list[tuple[str, str]]:
    return [(f"p{int(q * 100)} {{{{model}}}}",
             f"histogram_quantile({q}, sum by (le, model) (rate({metric}_bucket{{{SEL}}}[{RATE}])))")
            for q in (0.5, 0.95, 0.99)]


def errors_ratio() -> str:
    # `or ... * 0` keeps a zero series for a model that has served no 5xx yet.
    total = rate("nanogpt_http_requests_total")
    errors = rate("nanogpt_http_requests_total", extra=', status=~"5.."')
    return f"({errors} or {total} * 0) / {total}"


# (title, unit, [(legend, expr)])
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests by route and status", "reqps",
     [("{{route}} {{status}}", rate("nanogpt_http_requests_total", by="route, status"))]),
    ("5xx error ratio", "percentunit", [("{{model}}", errors_ratio())]),
    ("Time to first token", "s", quantiles("nanogpt_time_to_first_token_seconds")),
    ("Time per output token", "s", quantiles("nanogpt_time_per_output_token_seconds")),
    ("Request latency (engine, submit to finish)", "s", quantiles("nanogpt_e2e_request_latency_seconds")),
    ("Queue time", "s", quantiles("nanogpt_request_queue_time_seconds")),
    ("Tokens per second", "short",
     [("generated {{model}}", rate("nanogpt_generation_tokens_total")),
      ("prompt {{model}}", rate("nanogpt_prompt_tokens_total"))]),
    ("Queue depth (waiting requests)", "short",
     [("{{pod}}", f"sum by (model, pod) (nanogpt_num_requests_waiting{{{SEL}}})"),
      ("capacity {{pod}}", f"sum by (model, pod) (nanogpt_queue_capacity{{{SEL}}})")]),
    ("Running rows", "short",
     [("{{pod}}", f"sum by (model, pod) (nanogpt_num_requests_running{{{SEL}}})"),
      ("slots {{pod}}", f"sum by (model, pod) (nanogpt_max_batch{{{SEL}}})")]),
    ("KV-cache use", "percentunit",
     [("{{pod}}", f"max by (model, pod) (nanogpt_kv_cache_usage_ratio{{{SEL}}})")]),
    ("Response cache hit rate", "percentunit",
     [("{{model}}", f"{rate('nanogpt_cache_hits_total')} / "
                    f"({rate('nanogpt_cache_hits_total')} + {rate('nanogpt_cache_misses_total')})")]),
    ("Rate-limited and rejected requests", "reqps",
     [("rate limited {{model}}", rate("nanogpt_rate_limited_total")),
      ("rejected {{reason}} {{model}}", rate("nanogpt_rejected_total", by="model, reason"))]),
    ("Finished requests by reason", "reqps",
     [("{{finish_reason}}", rate("nanogpt_request_finished_total", by="model, finish_reason"))]),
    ("Ready replicas", "short", [("{{model}}", f"sum by (model) (nanogpt_ready{{{SEL}}})")]),
]


def panel(i: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict:
    return {
        "id": i + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                    for j, (legend, expr) in enumerate(targets)],
    }


def variable(name: str, query: str) -> dict:
    return {"name": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query,
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
            "current": {"text": "All", "value": "$__all"}}


def dashboard() -> dict:
    return {
        "uid": "nanogpt-serving", "title": "nanoGPT serving", "tags": ["nanogpt"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": "prometheus"}},
            variable("namespace", "label_values(nanogpt_ready, namespace)"),
            variable("model", 'label_values(nanogpt_ready{namespace=~"$namespace"}, model)'),
        ]},
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
