"""monitoring.py, gateway.py, keda.py, integrations_spec.py: the ecosystem children of a NanoGPTModel.

Each generated object is validated against its kind's CRD schema (vendored in crd_schemas/, sources in its
README.md), strictly: an API server prunes fields a structural schema does not name, so a misspelt field
would vanish silently; here it fails the test.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from operator_helpers import BASE_MODEL, K8S_VERSION

from nanogpt_operator.errors import SpecError
from nanogpt_operator.model.build import (ENGINE_LABEL, LLMD_ENGINE_LABEL, Owner, desired_children, desired_deployment,
                                           unwanted_children)
from nanogpt_operator.model.gateway import desired_http_route, desired_inference_pool
from nanogpt_operator.model.integrations import (desired_integrations, integrations_condition,
                                                 unwanted_integrations)
from nanogpt_operator.model.keda import desired_scaled_object
from nanogpt_operator.model.monitoring import desired_monitor
from nanogpt_operator.model.spec import parse_model

SCHEMAS = Path(__file__).parent / "crd_schemas"
OWNER = Owner(name="llm", uid="0b5e2c1a-0000-4000-8000-000000000001")
KEDA = {"minReplicas": 1, "maxReplicas": 6, "keda": {"serverAddress": "http://prometheus.monitoring:9090"}}
GATEWAY = {"endpointPicker": {"name": "llm-epp"},
           "httpRoute": {"parentRefs": [{"name": "inference-gw", "namespace": "gateway"}],
                         "hostnames": ["llm.example.com"]}}


def model(**spec: Any) -> Any:
    body = copy.deepcopy(BASE_MODEL)
    body["spec"].update(copy.deepcopy(spec))
    return parse_model(body)


def strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def validate(obj: dict[str, Any], schema_file: str) -> None:
    schema = yaml.safe_load((SCHEMAS / schema_file).read_text())["openAPIV3Schema"]
    jsonschema.validate(obj, strict(schema), cls=jsonschema.Draft7Validator)
    # The metadata is ours; kubernetes-validate checks it as ObjectMeta (via a ConfigMap with that metadata).
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]},
                                 K8S_VERSION, strict=True)


@pytest.mark.parametrize("schema,build,bad", [
    ("servicemonitors.yaml", lambda: desired_monitor(model(monitoring={"serviceMonitor": {}}), OWNER),
     lambda spec: spec["endpoints"][0].update(interval="fast")),
    ("servicemonitors.yaml", lambda: desired_monitor(model(monitoring={"serviceMonitor": {}}), OWNER),
     lambda spec: spec["endpoints"][0].update(scrapeInterval="30s")),
    ("podmonitors.yaml", lambda: desired_monitor(model(monitoring={"podMonitor": {}}), OWNER),
     lambda spec: spec["podMetricsEndpoints"][0]["relabelings"][0].update(action="rename")),
    ("inferencepools.yaml", lambda: desired_inference_pool(model(gateway=GATEWAY), OWNER),
     lambda spec: spec.update(targetPorts=[{"number": 5000 + i} for i in range(9)])),
    ("inferencepools.yaml", lambda: desired_inference_pool(model(gateway=GATEWAY), OWNER),
     lambda spec: spec["endpointPickerRef"].update(portNumber=9002)),
    ("httproutes.yaml", lambda: desired_http_route(model(gateway=GATEWAY), OWNER),
     lambda spec: spec["rules"][0]["matches"][0]["path"].update(type="Prefix")),
    ("httproutes.yaml", lambda: desired_http_route(model(gateway=GATEWAY), OWNER),
     lambda spec: spec.update(hostnames=["LLM.example.com"])),
])
def test_the_vendored_schemas_catch_wrong_values_and_unknown_fields(schema: str, build: Any, bad: Any) -> None:
    """A value past a published pattern, enum or limit fails (the API server refuses it); so does an unknown
    field (the API server would prune it silently, strict() makes that a failure here)."""
    obj = build()
    validate(obj, schema)
    bad(obj["spec"])
    with pytest.raises(jsonschema.ValidationError):
        validate(obj, schema)


def owned(obj: dict[str, Any]) -> None:
    ref = obj["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("NanoGPTModel", OWNER.uid, True)
    assert obj["metadata"]["namespace"] == "ml" and obj["metadata"]["name"] == "llm"


class TestMonitor:
    def test_service_monitor_selects_the_service_and_labels_series_for_the_dashboard(self) -> None:
        m = model(monitoring={"serviceMonitor": {"interval": "15s", "labels": {"release": "kube-prometheus-stack"}}})
        obj = desired_monitor(m, OWNER)
        assert obj is not None
        validate(obj, "servicemonitors.yaml")
        owned(obj)
        assert (obj["apiVersion"], obj["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert obj["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "nanogpt",
                                                           "app.kubernetes.io/instance": "llm"}}
        assert obj["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
        [endpoint] = obj["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("http", "/metrics", "15s")
        targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
        assert targets == {"namespace": ["__meta_kubernetes_namespace"], "pod": ["__meta_kubernetes_pod_name"],
                           "model": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"]}

    def test_pod_monitor(self) -> None:
        obj = desired_monitor(model(monitoring={"podMonitor": {}}), OWNER)
        assert obj is not None
        validate(obj, "podmonitors.yaml")
        assert obj["kind"] == "PodMonitor" and "endpoints" not in obj["spec"]
        assert obj["spec"]["podMetricsEndpoints"][0]["interval"] == "30s"

    def test_none_without_the_section(self) -> None:
        assert desired_monitor(model(), OWNER) is None
        assert desired_monitor(model(monitoring={}), OWNER) is None

    @pytest.mark.parametrize("section,path", [
        ({"serviceMonitor": {}, "podMonitor": {}}, "spec.monitoring"),
        ({"serviceMonitor": {"interval": "fast"}}, "spec.monitoring.serviceMonitor.interval"),
        ({"podMonitor": {"labels": {"release": 1}}}, "spec.monitoring.podMonitor.labels.release"),
    ])
    def test_bad_sections_name_the_field(self, section: dict[str, Any], path: str) -> None:
        with pytest.raises(SpecError) as err:
            model(monitoring=section)
        assert err.value.path == path


class TestGateway:
    def test_inference_pool_names_pods_port_and_endpoint_picker(self) -> None:
        obj = desired_inference_pool(model(gateway=GATEWAY), OWNER)
        assert obj is not None
        validate(obj, "inferencepools.yaml")
        owned(obj)
        assert obj["apiVersion"] == "inference.networking.k8s.io/v1"
        assert obj["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "llm"
        assert obj["spec"]["targetPorts"] == [{"number": 5000}]
        assert obj["spec"]["endpointPickerRef"] == {"group": "", "kind": "Service", "name": "llm-epp",
                                                    "port": {"number": 9002}, "failureMode": "FailClose"}

    def test_http_route_sends_the_prefix_to_the_pool(self) -> None:
        obj = desired_http_route(model(gateway=GATEWAY), OWNER)
        assert obj is not None
        validate(obj, "httproutes.yaml")
        owned(obj)
        assert obj["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                              "name": "inference-gw", "namespace": "gateway"}]
        assert obj["spec"]["hostnames"] == ["llm.example.com"]
        [rule] = obj["spec"]["rules"]
        assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
        assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                        "name": "llm"}]

    def test_route_is_optional_and_pods_carry_the_engine_label(self) -> None:
        m = model(gateway={"endpointPicker": {"name": "epp", "port": 9003, "failureMode": "FailOpen"}})
        assert desired_http_route(m, OWNER) is None
        pool = desired_inference_pool(m, OWNER)
        assert pool is not None and pool["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
        labels = desired_deployment(m, OWNER)["spec"]["template"]["metadata"]["labels"]
        # GAIE's endpoint picker reads the first (DefaultEngineTypeLabelKey), llm-d's the second.
        assert labels["inference.networking.k8s.io/engine-type"] == labels["llm-d.ai/engine-type"] == "vllm"
        # The Deployment's selector is immutable: the labels must not enter it.
        for label in (ENGINE_LABEL, LLMD_ENGINE_LABEL):
            assert label not in desired_deployment(m, OWNER)["spec"]["selector"]["matchLabels"]
            assert label not in desired_deployment(model(), OWNER)["spec"]["template"]["metadata"]["labels"]
        kubernetes_validate.validate(desired_deployment(m, OWNER), K8S_VERSION, strict=True)

    def test_behind_the_gateway_the_server_counts_callers_by_fairness_id(self) -> None:
        def env(m: Any) -> dict[str, Any]:
            [container] = desired_deployment(m, OWNER)["spec"]["template"]["spec"]["containers"]
            names = [e["name"] for e in container["env"]]
            assert len(names) == len(set(names))
            return {e["name"]: e.get("value") for e in container["env"]}

        gateway = {"endpointPicker": {"name": "epp"}}
        assert env(model(gateway=gateway))["RATE_LIMIT_KEY"] == "fairness"
        assert "RATE_LIMIT_KEY" not in env(model())
        own = model(gateway=gateway, env=[{"name": "RATE_LIMIT_KEY", "value": "header:x-tenant"}])
        assert env(own)["RATE_LIMIT_KEY"] == "header:x-tenant"  # the user's entry wins

    @pytest.mark.parametrize("section,path", [
        ({}, "spec.gateway.endpointPicker"),
        ({"endpointPicker": {"name": "Bad_Name"}}, "spec.gateway.endpointPicker.name"),
        ({"endpointPicker": {"name": "e", "failureMode": "Open"}}, "spec.gateway.endpointPicker.failureMode"),
        ({"endpointPicker": {"name": "e"}, "httpRoute": {}}, "spec.gateway.httpRoute.parentRefs"),
        ({"endpointPicker": {"name": "e"}, "httpRoute": {"parentRefs": [{"name": "g"}], "pathPrefix": "v1"}},
         "spec.gateway.httpRoute.pathPrefix"),
    ])
    def test_bad_sections_name_the_field(self, section: dict[str, Any], path: str) -> None:
        with pytest.raises(SpecError) as err:
            model(gateway=section)
        assert err.value.path == path


class TestKeda:
    def test_scaled_object_scales_the_deployment_on_queue_depth(self) -> None:
        m = model(autoscaling={**KEDA, "keda": {**KEDA["keda"], "targetQueueDepth": 8, "cooldownSeconds": 600,
                                                "fallback": {"replicas": 2}}})
        obj = desired_scaled_object(m, OWNER)
        assert obj is not None
        validate(obj, "scaledobjects.yaml")
        owned(obj)
        spec = obj["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"}
        assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (1, 6, 600)
        assert spec["fallback"] == {"failureThreshold": 3, "replicas": 2}
        [trigger] = spec["triggers"]
        assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")
        assert trigger["metadata"] == {"serverAddress": "http://prometheus.monitoring:9090",
                                       "query": 'sum(nanogpt_num_requests_waiting{namespace="ml",model="llm"})',
                                       "threshold": "8"}

    def test_vllm_metric_or_own_query(self) -> None:
        vllm = model(autoscaling={**KEDA, "keda": {**KEDA["keda"], "metric": "vllm:num_requests_waiting"}})
        obj = desired_scaled_object(vllm, OWNER)
        assert obj is not None and obj["spec"]["triggers"][0]["metadata"]["query"].startswith(
            "sum(vllm:num_requests_waiting{")
        own = model(autoscaling={**KEDA, "keda": {**KEDA["keda"], "query": "sum(x)"}})
        obj = desired_scaled_object(own, OWNER)
        assert obj is not None and obj["spec"]["triggers"][0]["metadata"]["query"] == "sum(x)"

    def test_keda_replaces_the_hpa(self) -> None:
        m = model(autoscaling=KEDA)
        kinds = [o["kind"] for o in desired_children(m, OWNER)]
        assert "HorizontalPodAutoscaler" not in kinds
        assert ("HorizontalPodAutoscaler", "llm") in unwanted_children(m)
        assert ("ScaledObject", "llm") not in unwanted_integrations(m)

    def test_scale_to_zero_is_refused_with_the_reason(self) -> None:
        with pytest.raises(SpecError) as err:
            model(autoscaling={**KEDA, "minReplicas": 0})
        assert err.value.path == "spec.autoscaling.minReplicas"
        assert "does not hold requests while a replica starts" in err.value.problem

    @pytest.mark.parametrize("keda,path", [
        ({}, "spec.autoscaling.keda.serverAddress"),
        ({"serverAddress": "prometheus:9090"}, "spec.autoscaling.keda.serverAddress"),
        ({"serverAddress": "http://p:9090", "metric": "cpu"}, "spec.autoscaling.keda.metric"),
        ({"serverAddress": "http://p:9090", "targetQueueDepth": 0}, "spec.autoscaling.keda.targetQueueDepth"),
        ({"serverAddress": "http://p:9090", "fallback": {"replicas": 7}}, "spec.autoscaling.keda.fallback.replicas"),
    ])
    def test_bad_sections_name_the_field(self, keda: dict[str, Any], path: str) -> None:
        with pytest.raises(SpecError) as err:
            model(autoscaling={**KEDA, "keda": keda})
        assert err.value.path == path

    def test_keda_with_an_hpa_metric_is_refused(self) -> None:
        with pytest.raises(SpecError) as err:
            model(autoscaling={**KEDA, "targetCPUUtilization": 50}, resources={"requests": {"cpu": "1"}})
        assert err.value.path == "spec.autoscaling.keda"


class TestIntegrations:
    def test_everything_at_once_and_what_goes_when_dropped(self) -> None:
        m = model(monitoring={"serviceMonitor": {}}, gateway=GATEWAY, autoscaling=KEDA)
        kinds = [o["kind"] for o in desired_integrations(m, OWNER)]
        assert kinds == ["ServiceMonitor", "InferencePool", "HTTPRoute", "ScaledObject"]
        assert unwanted_integrations(m) == [("PodMonitor", "llm")]
        assert {k for k, _ in unwanted_integrations(model())} == {
            "ServiceMonitor", "PodMonitor", "InferencePool", "HTTPRoute", "ScaledObject"}

    def test_condition_names_what_to_install(self) -> None:
        m = model(monitoring={"serviceMonitor": {}}, autoscaling=KEDA)
        cond = integrations_condition(m, ["ServiceMonitor"], 3, {}, "2026-01-01T00:00:00Z")
        assert cond is not None
        assert (cond["type"], cond["status"], cond["reason"]) == ("Integrations", "False", "CRDNotInstalled")
        assert "Prometheus Operator" in cond["message"] and "spec.monitoring" in cond["message"]
        ok = integrations_condition(m, [], 3, {}, "2026-01-01T00:00:00Z")
        assert ok is not None and ok["status"] == "True" and "ServiceMonitor, ScaledObject" in ok["message"]
        assert integrations_condition(model(), [], 3, {}, "2026-01-01T00:00:00Z") is None


def test_the_sections_are_valid_against_the_models_crd() -> None:
    from test_model_crd import validate as validate_crd

    body = copy.deepcopy(BASE_MODEL)
    body["spec"].update(monitoring={"podMonitor": {"interval": "1m", "labels": {"a": "b"}}}, gateway=GATEWAY,
                        autoscaling={**KEDA, "keda": {**KEDA["keda"], "metric": "vllm:num_requests_waiting",
                                                      "fallback": {"failureThreshold": 2, "replicas": 2}}})
    validate_crd(body)
    parse_model(body)
    bad = copy.deepcopy(body)
    bad["spec"]["gateway"]["endpointPicker"]["failureMode"] = "Open"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(bad)


class TestServing:
    def test_chat_template_is_mounted_and_named_and_served_names_set(self) -> None:
        m = model(server={"chatTemplate": {"configMapKeyRef": {"name": "templates", "key": "chatml.jinja"}},
                          "servedModelName": "nanogpt-small", "modelAliases": ["gpt2", "default"]})
        deployment = desired_deployment(m, OWNER)
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
        pod = deployment["spec"]["template"]["spec"]
        env = {v["name"]: v.get("value") for v in pod["containers"][0]["env"]}
        assert env["CHAT_TEMPLATE"] == "/etc/nanogpt/chat-template/chatml.jinja"
        assert env["SERVED_MODEL_NAME"] == "nanogpt-small,gpt2,default"
        mount = next(v for v in pod["containers"][0]["volumeMounts"] if v["name"] == "chat-template")
        assert mount == {"name": "chat-template", "mountPath": "/etc/nanogpt/chat-template", "readOnly": True}
        volume = next(v for v in pod["volumes"] if v["name"] == "chat-template")
        assert volume["configMap"] == {"name": "templates", "items": [{"key": "chatml.jinja", "path": "chatml.jinja"}]}

    def test_unset_means_no_env(self) -> None:
        env = {v["name"] for v in desired_deployment(model(), OWNER)["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert not {"CHAT_TEMPLATE", "SERVED_MODEL_NAME"} & env

    @pytest.mark.parametrize("server,path", [
        ({"chatTemplate": {}}, "spec.server.chatTemplate.configMapKeyRef"),
        ({"chatTemplate": {"configMapKeyRef": {"name": "t", "key": "a/b"}}}, "spec.server.chatTemplate.configMapKeyRef.key"),
        ({"servedModelName": "a,b"}, "spec.server.servedModelName"),
        ({"modelAliases": ["x"]}, "spec.server.servedModelName"),
        ({"servedModelName": "a", "modelAliases": ["a"]}, "spec.server.modelAliases"),
        ({"servedModelName": "a", "modelAliases": ["b c"]}, "spec.server.modelAliases[0]"),
    ])
    def test_bad_fields_are_named(self, server: dict[str, Any], path: str) -> None:
        with pytest.raises(SpecError) as err:
            model(server=server)
        assert err.value.path == path
