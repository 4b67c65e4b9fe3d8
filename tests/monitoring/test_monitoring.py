"""The dashboard and alerts in manifests/monitoring, checked by a real Prometheus and promtool.

A real `python -m server` on the demo model and the operator's metrics registry are scraped by
a real Prometheus on loopback; every dashboard query must answer with series, every alert
expression must evaluate, and no expression may name a metric that nothing exports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from nanogpt_operator.metrics import OperatorMetrics

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "manifests" / "monitoring"
sys.path.insert(0, str(REPO / "tests" / "server"))
from server_helpers import free_port, wait_for_sync  # noqa: E402


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is not installed, and CI=true requires the monitoring tests to run")
        pytest.skip(f"{name} is not installed (apt-get install prometheus); CI installs it")
    return path


def _rules() -> list[dict]:
    spec = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]
    return [rule for group in spec["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    board = json.loads((MONITORING / "nanogpt-dashboard.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


METRIC = re.compile(r"\b(?:nanogpt_[a-z0-9_]+|vllm:[a-z0-9_:]+)")


def test_dashboard_json_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("monitoring_script", REPO / "scripts" / "monitoring.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (MONITORING / "nanogpt-dashboard.json").read_text() == script.render()


def test_kustomization_labels_the_dashboard_for_grafanas_sidecar():
    out = subprocess.run(["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, check=True).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out)}
    assert docs["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(docs["ConfigMap"]["data"]["nanogpt-dashboard.json"])["uid"] == "nanogpt-serving"
    assert docs["PrometheusRule"]["spec"]["groups"]


def test_promtool_checks_and_unit_tests_the_alerts(tmp_path):
    promtool = _binary("promtool")
    spec = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(MONITORING / "alerts.test.yaml", tmp_path)
    check = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "alerts.test.yaml"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "alerts.test.yaml").read_text()))
    assert tested == {r["alert"] for r in _rules()}, "every alert has a promtool test"


# ------------------------------------------------------------------ a live Prometheus

class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.get("/api/v1/query", query=expr)["result"]


def _http(url: str, body: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
def scraped(tmp_path):
    """A served demo model and the operator's registry, after traffic, scraped by Prometheus twice."""
    prometheus = _binary("prometheus")
    procs: list[subprocess.Popen] = []
    server_port, op_port, prom_port = free_port(), free_port(), free_port()
    env = {**os.environ, "MODEL_CHECKPOINT": str(REPO / "model" / "demo"), "HOST": "127.0.0.1",
           "PORT": str(server_port), "DEVICE": "cpu", "MAX_BATCH": "2", "CACHE_TTL": "60", "RATE_LIMIT": "5/minute"}
    with open(tmp_path / "server.log", "wb") as log:
        procs.append(subprocess.Popen([sys.executable, "-m", "server"], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    op = OperatorMetrics()
    op_server, _ = op.serve(op_port, addr="127.0.0.1")
    op.rollbacks.labels(namespace="ns", name="m").inc()
    op.rollouts.labels(namespace="ns", name="r", outcome="succeeded").inc()
    op.reconciles.labels(kind="NanoGPTModel", result="ok").inc(3)
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [
                  {"job_name": "nanogpt", "static_configs": [
                      {"targets": [f"127.0.0.1:{server_port}"],
                       "labels": {"namespace": "ns", "model": "demo", "pod": "demo-0"}}]},
                  {"job_name": "nanogpt-operator", "static_configs": [{"targets": [f"127.0.0.1:{op_port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with open(tmp_path / "prometheus.log", "wb") as log:
        procs.append(subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=log, stderr=subprocess.STDOUT))
    try:
        base = f"http://127.0.0.1:{server_port}"
        def ready() -> bool:
            assert procs[0].poll() is None, (tmp_path / "server.log").read_text()
            return _served(base + "/readyz")

        wait_for_sync(ready, timeout=180, what="the server's /readyz")
        statuses = [_http(base + "/generate", {"prompt": "A class", "max_length": 8, "seed": 1})
                    for _ in range(3)]  # the repeats are cache hits
        statuses.append(_http(base + "/generate", {"prompt": "x" * 500, "max_length": 8}))  # past block_size
        statuses += [_http(base + "/generate", {"prompt": "The", "max_length": 4}) for _ in range(6)]
        assert 200 in statuses and 400 in statuses and 429 in statuses, statuses
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")

        def scraped_after_traffic() -> bool:
            try:
                # Two scrapes that saw the traffic: a 1m rate() then has two samples to work with.
                seen = prom.query('count_over_time(nanogpt_http_requests_total{route="/generate"}[1m])')
                ops = prom.query("count_over_time(nanogpt_operator_rollbacks_total[1m])")
                return bool(seen) and min(float(s["value"][1]) for s in seen) >= 2 and bool(ops)
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for_sync(scraped_after_traffic, timeout=60, what="Prometheus scraping the traffic")
        yield prom
    finally:
        op_server.shutdown()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=120)  # the server drains first; a loaded host makes that slow
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def _served(url: str) -> bool:
    try:
        return _http(url) == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def test_a_real_prometheus_answers_every_query_and_alert(scraped):
    exported = set(scraped.get("/api/v1/label/__name__/values"))
    for expr in _dashboard_exprs():
        names = set(METRIC.findall(expr))
        assert names and names <= exported, f"{expr} names {names - exported}, which nothing exports"
        live = expr.replace("$__rate_interval", "1m").replace("$namespace", ".*").replace("$model", ".*")
        assert scraped.query(live), f"no series for dashboard query {live}"
    for rule in _rules():
        names = set(METRIC.findall(rule["expr"]))
        assert names and names <= exported, f"alert {rule['alert']} names {names - exported}, which nothing exports"
        scraped.query(rule["expr"])  # evaluates (a healthy system fires nothing)
