"""Prometheus metrics after traffic, our names and vLLM's, on a per-app registry."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


async def test_metrics_after_traffic(client):
    await client.post("/generate", json={"prompt": "abc", "max_length": 10})
    await (await client.post("/generate", json={"prompt": "abc", "max_length": 5, "stream": True})).text()
    await client.post("/generate", json={"prompt": 3})
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    s = samples(text)
    requests = {(x.labels["route"], x.labels["status"]): x.value for x in s["nanogpt_http_requests_total"]}
    assert requests[("/generate", "200")] == 2 and requests[("/generate", "400")] == 1
    assert s["nanogpt_generation_tokens_total"][0].value == 15
    assert s["nanogpt_prompt_tokens_total"][0].value == 6
    for name in ("nanogpt_time_to_first_token_seconds_count", "nanogpt_time_per_output_token_seconds_count",
                 "nanogpt_request_queue_time_seconds_count", "nanogpt_http_request_duration_seconds_count"):
        assert sum(x.value for x in s[name]) >= 2, name
    for name in ("nanogpt_num_requests_running", "nanogpt_num_requests_waiting", "nanogpt_kv_cache_usage_ratio",
                 "nanogpt_batch_size", "nanogpt_ready"):
        assert name in s, name
    # vLLM's names, labelled with the model name, so vLLM dashboards and routers work unchanged
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total"):
        assert name in text, name
    assert all(x.labels["model_name"] == "tiny-char" for x in s["vllm:generation_tokens_total"])
    assert s["vllm:generation_tokens_total"][0].value == 15


async def test_each_app_has_its_own_registry(make_client, make_engine):
    a = await make_client()
    b = await make_client(engine=make_engine())
    await a.post("/generate", json={"prompt": "a", "max_length": 3})
    sa = samples(await (await a.get("/metrics")).text())
    sb = samples(await (await b.get("/metrics")).text())
    assert sa["nanogpt_generation_tokens_total"][0].value == 3
    assert sb["nanogpt_generation_tokens_total"][0].value == 0


async def test_cache_config_info_for_the_gateway_endpoint_picker(client):
    # The Inference Extension's endpoint picker reads vLLM's info gauge: value 1, the config in labels.
    await client.post("/generate", json={"prompt": "abc", "max_length": 2})
    s = samples(await (await client.get("/metrics")).text())
    [info] = s["vllm:cache_config_info"]
    assert info.value == 1
    assert int(info.labels["num_gpu_blocks"]) == s["nanogpt_max_batch"][0].value
    assert int(info.labels["block_size"]) > 0
