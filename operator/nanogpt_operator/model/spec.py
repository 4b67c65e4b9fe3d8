"""Parse a NanoGPTModel once into a frozen, typed `ModelSpec` (with the shared helper of fields.py).

Defaults are the CRD's (crds/nanogptmodels.yaml); the rules are the CRD's schema and CEL rules, repeated
here so that a cluster without the CRD's validation (or an older stored object) still gets a precise
`SpecError` naming the field path instead of a half-applied Deployment.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nanogpt_operator.config import OperatorConfig
from nanogpt_operator.errors import SpecError
from nanogpt_operator.fields import (DNS_LABEL_1035, DNS_SUBDOMAIN, QUANTITY, REMOTE_FIELDS, SHA256, Fields,
                                     display_source, is_uri, pvc_target, uri_problem)
from nanogpt_operator.model.integrations_spec import (GatewaySpec, KedaSpec, MonitorSpec, check_min_replicas,
                                                      parse_gateway, parse_keda, parse_monitoring)
from nanogpt_operator.model.serving_spec import ChatTemplateRef, parse_chat_template, parse_served_names

RATE_LIMIT = re.compile(r"^[1-9][0-9]*/(second|minute|hour|day)$")
PERCENT = re.compile(r"^[0-9]+%$")
REDIS_URL = re.compile(r"^(redis|rediss|unix)://.+$")
# Environment variables the operator sets itself; letting a user override them would break rollbacks.
RESERVED_ENV = frozenset({"MODEL_CHECKPOINT", "PORT", "HOST"})
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8",)  # the server's QUANTIZE (model/quant.py)
SERVICE_TYPES = ("ClusterIP", "LoadBalancer", "NodePort")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
DELETE_POLICIES = ("Retain", "Delete")
# The name becomes the Service's name (a DNS-1035 label) and a label value: both at most 63 characters.
NAME_MAX = 63
# A Deployment's rollout deadline must cover the pods' load budget, plus the readiness probe's first passes.
LOAD_MARGIN_S = 60
GPU_RESOURCE = "nvidia.com/gpu"
ENDPOINT = re.compile(r"^https?://[^\s/]+(/\S*)?$")
# Fields of spec.checkpoint that only a fetched (remote) uri uses.


@dataclass(frozen=True)
class PvcTemplate:
    """spec.checkpoint.create: the operator creates the claim itself."""

    size: str
    storage_class_name: str | None = None
    # None: ReadWriteOnce for one replica, ReadWriteMany for more (see `access_modes_for`).
    access_modes: tuple[str, ...] | None = None
    # Retain: the claim outlives the model (it holds checkpoints a person copied in); Delete: owned by it.
    delete_policy: str = "Retain"


@dataclass(frozen=True)
class FetchCache:
    """spec.checkpoint.cache: where the init container keeps what it fetched."""

    claim_name: str | None = None  # a shared PVC (replicas and restarts reuse one download); None: emptyDir
    size_limit: str | None = None  # the emptyDir's sizeLimit (it holds the checkpoint the server loads)


@dataclass(frozen=True)
class CheckpointSpec:
    """Either a claim and a path in it (pvc://claim/path is spelled this way too), or a remote `uri`
    that an init container fetches before the server starts."""

    claim_name: str | None = None
    path: str | None = None
    create: PvcTemplate | None = None
    uri: str | None = None  # https://, http://, s3://, hf://; None for a claim
    sha256: str | None = None
    allow_http: bool = False
    endpoint: str | None = None  # an S3-compatible store
    secret_ref: str | None = None  # a Secret with AWS_* / HF_TOKEN keys, passed to the fetch as env
    cache: FetchCache = FetchCache()
    fetch_resources: Mapping[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """What the pod template records (servedCheckpoint, the rollback target): the path inside the
        claim, or the URI without its query (a pre-signed URL's signature is a credential)."""
        return display_source(self.uri) if self.uri else self.path or ""

    @property
    def display(self) -> str:
        """The source for people (status.source, the printer column): the URI, or pvc://claim/path."""
        return self.source if self.uri else f"pvc://{self.claim_name}/{self.path}"

    def with_source(self, source: str) -> CheckpointSpec | None:
        """This checkpoint moved to `source` (a recorded `source`), or None when that cannot be rebuilt:
        the other form (a claim for a URI, or the reverse), or a URI whose query was cut."""
        if is_uri(source) != bool(self.uri) or source.endswith("?…"):
            return None
        if not self.uri:
            return dataclasses.replace(self, path=source)
        return dataclasses.replace(self, uri=source, sha256=self.sha256 if source == self.uri else None)


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str = "keys"


@dataclass(frozen=True)
class ServerSpec:
    max_length: int = 1000
    api_key_secret: SecretKeyRef | None = None
    rate_limit: str | None = None
    redis_url: str | None = None
    dtype: str | None = None  # None: bfloat16 on GPU, float32 on CPU
    quantize: str | None = None  # QUANTIZE: "int8" weight-only int8; None: weights as stored
    drain_seconds: int = 30
    startup_timeout_seconds: int = 900
    # Seconds a terminating pod keeps serving before SIGTERM, while endpoints stop sending it traffic.
    pre_stop_seconds: int = 5
    chat_template: ChatTemplateRef | None = None
    served_model_names: tuple[str, ...] = ()  # SERVED_MODEL_NAME: the name, then its aliases


@dataclass(frozen=True)
class ServiceSpec:
    type: str = "ClusterIP"
    port: int = 80
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CustomMetric:
    """A per-pod metric served by a custom-metrics adapter, e.g. in-flight requests."""

    name: str
    target_average_value: str


@dataclass(frozen=True)
class AutoscalingSpec:
    max_replicas: int
    min_replicas: int = 1
    target_cpu_utilization: int | None = None
    custom_metric: CustomMetric | None = None
    keda: KedaSpec | None = None  # a KEDA ScaledObject instead of an HPA


@dataclass(frozen=True)
class RollingUpdateSpec:
    """spec.rollout: how one model's Deployment replaces its pods, and whether it rolls itself back."""

    # Surge 0: a full GPU node has no room for an extra pod, so replace in place.
    max_surge: int | str = 0
    max_unavailable: int | str = 1
    progress_deadline_seconds: int | None = None  # None: server.startupTimeoutSeconds + LOAD_MARGIN_S
    auto_rollback: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """Everything the builders need, typed and defaulted."""

    name: str
    namespace: str
    checkpoint: CheckpointSpec
    tokenizer_path: str | None = None
    image: str = OperatorConfig.image
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    replicas: int = 1
    gpus: int = 1
    resources: Mapping[str, Any] = field(default_factory=dict)
    server: ServerSpec = ServerSpec()
    service: ServiceSpec = ServiceSpec()
    autoscaling: AutoscalingSpec | None = None
    rollout: RollingUpdateSpec = RollingUpdateSpec()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    priority_class_name: str | None = None
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    env: tuple[Mapping[str, Any], ...] = ()
    cluster_domain: str = OperatorConfig.cluster_domain
    monitoring: MonitorSpec | None = None
    gateway: GatewaySpec | None = None

    @property
    def dtype(self) -> str:
        return self.server.dtype or ("bfloat16" if self.gpus > 0 else "float32")

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    @property
    def progress_deadline_seconds(self) -> int:
        given = self.rollout.progress_deadline_seconds
        return given if given is not None else self.server.startup_timeout_seconds + LOAD_MARGIN_S

    @property
    def pvc_access_modes(self) -> tuple[str, ...]:
        """The created claim's modes: one replica attaches anywhere with RWO; pods on many nodes need RWX."""
        create = self.checkpoint.create
        if create is not None and create.access_modes:
            return create.access_modes
        return ("ReadWriteOnce",) if self.max_replicas <= 1 else ("ReadWriteMany",)


def _parse_create(f: Fields) -> PvcTemplate:
    modes = f.list("accessModes")
    for i, mode in enumerate(modes):
        if mode not in ACCESS_MODES:
            raise SpecError(f"{f.at('accessModes')}[{i}]", f"must be one of {', '.join(ACCESS_MODES)}")
    return PvcTemplate(
        size=f.str("size", required=True, pattern=QUANTITY),
        storage_class_name=f.str("storageClassName"),
        access_modes=tuple(modes) or None,
        delete_policy=f.str("deletePolicy", "Retain", choices=DELETE_POLICIES),
    )


def _parse_checkpoint(spec: Fields) -> CheckpointSpec:
    f = spec.child("checkpoint")
    if f is None:
        raise SpecError(spec.at("checkpoint"), "is required")
    uri = f.str("uri")
    if uri is not None and ("claimName" in f.data or "path" in f.data):
        raise SpecError(f.at("uri"), "set either uri, or claimName and path, not both")
    if uri is not None and not uri.startswith("pvc://"):
        return _parse_remote(f, uri)
    remote_only = [k for k in REMOTE_FIELDS if k in f.data]
    if remote_only:
        raise SpecError(f.at(remote_only[0]), "applies only to an https://, http://, s3:// or hf:// uri")
    create = f.child("create")
    if uri is not None:  # pvc://claim/path: the claim form, spelled as a URI
        problem = uri_problem(uri, False)
        if problem:
            raise SpecError(f.at("uri"), problem)
        claim, path = pvc_target(uri)
        return CheckpointSpec(claim_name=claim, path=path, create=None if create is None else _parse_create(create))
    return CheckpointSpec(
        claim_name=f.str("claimName", required=True, pattern=DNS_SUBDOMAIN),
        path=f.relative_path("path"),
        create=None if create is None else _parse_create(create),
    )


def _parse_remote(f: Fields, uri: str) -> CheckpointSpec:
    allow_http = f.bool("allowHttp", False)
    problem = uri_problem(uri, allow_http)
    if problem:
        raise SpecError(f.at("uri"), problem)
    if "create" in f.data:
        raise SpecError(f.at("create"), "creates a claim for claimName; a uri is fetched into spec.checkpoint.cache")
    endpoint = f.str("endpoint", pattern=ENDPOINT)
    if endpoint is not None and not uri.startswith("s3://"):
        raise SpecError(f.at("endpoint"), "is the S3-compatible store of an s3:// uri")
    sha256 = f.str("sha256", pattern=SHA256)
    secret = f.child("secretRef")
    cache = f.child("cache")
    return CheckpointSpec(
        uri=uri, allow_http=allow_http, endpoint=endpoint,
        sha256=None if sha256 is None else sha256.lower().removeprefix("sha256:"),
        secret_ref=None if secret is None else secret.str("name", required=True, pattern=DNS_SUBDOMAIN),
        cache=FetchCache() if cache is None else _parse_cache(cache),
        fetch_resources=f.map("fetchResources"),
    )


def _parse_cache(f: Fields) -> FetchCache:
    claim = f.str("claimName", pattern=DNS_SUBDOMAIN)
    size = f.str("sizeLimit", pattern=QUANTITY)
    if claim is not None and size is not None:
        raise SpecError(f.at("sizeLimit"), "limits the emptyDir cache; a claim's size is its own")
    return FetchCache(claim_name=claim, size_limit=size)


def _parse_server(f: Fields | None) -> ServerSpec:
    if f is None:
        return ServerSpec()
    ref = f.child("apiKeySecretRef")
    return ServerSpec(
        max_length=f.int("maxLength", 1000, 1, 1_000_000),
        api_key_secret=None if ref is None else SecretKeyRef(
            name=ref.str("name", required=True, pattern=DNS_SUBDOMAIN), key=ref.str("key", "keys")),
        rate_limit=f.str("rateLimit", pattern=RATE_LIMIT),
        redis_url=f.str("redisUrl", pattern=REDIS_URL),
        dtype=f.str("dtype", choices=DTYPES),
        quantize=f.str("quantize", choices=QUANTIZATIONS),
        drain_seconds=f.int("drainSeconds", 30, 0, 3600),
        startup_timeout_seconds=f.int("startupTimeoutSeconds", 900, 10, 86400),
        pre_stop_seconds=f.int("preStopSeconds", 5, 0, 300),
        chat_template=parse_chat_template(f.child("chatTemplate")),
        served_model_names=parse_served_names(f),
    )


def _parse_service(f: Fields | None) -> ServiceSpec:
    if f is None:
        return ServiceSpec()
    return ServiceSpec(type=f.str("type", "ClusterIP", choices=SERVICE_TYPES),
                       port=f.int("port", 80, 1, 65535), annotations=f.map("annotations"))


def _parse_autoscaling(f: Fields | None) -> AutoscalingSpec | None:
    if f is None:
        return None
    metric = f.child("customMetric")
    f.required("maxReplicas")
    check_min_replicas(f)
    scaling = AutoscalingSpec(
        min_replicas=f.int("minReplicas", 1, 1),
        max_replicas=f.int("maxReplicas", None, 1),
        target_cpu_utilization=f.int("targetCPUUtilization", None, 1, 100),
        custom_metric=None if metric is None else CustomMetric(
            name=metric.str("name", required=True),
            target_average_value=_quantity(metric, "targetAverageValue")),
        keda=parse_keda(f.child("keda"), f.int("maxReplicas", None, 1)),
    )
    if scaling.min_replicas > scaling.max_replicas:
        raise SpecError(f.at("minReplicas"), f"must be <= maxReplicas ({scaling.max_replicas})")
    if scaling.keda is not None and (scaling.target_cpu_utilization or scaling.custom_metric):
        raise SpecError(f.at("keda"), "replaces the HPA: drop targetCPUUtilization and customMetric")
    if scaling.keda is None and scaling.target_cpu_utilization is None and scaling.custom_metric is None:
        raise SpecError(f.at("targetCPUUtilization"), "set it or autoscaling.customMetric: the HPA needs a metric")
    return scaling


def _quantity(f: Fields, key: str) -> str:
    # An int-or-string quantity, checked as the API server's resource.Quantity parser would: a bad one
    # would otherwise only be refused (422) when the HPA is written, after the Deployment exists.
    value = f.required(key)
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not QUANTITY.match(text):
        raise SpecError(f.at(key), f"must be a quantity such as 4, 500m or 1k, got {value!r}")
    return text


def _surge(f: Fields, key: str, default: int) -> int | str:
    value = f.data.get(key, default)
    if isinstance(value, str) and PERCENT.match(value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise SpecError(f.at(key), f"must be a non-negative integer or a percentage like '25%', got {value!r}")


def _is_zero(value: int | str) -> bool:
    return value in (0, "0%")


def _parse_rollout(f: Fields | None) -> RollingUpdateSpec:
    if f is None:
        return RollingUpdateSpec()
    rollout = RollingUpdateSpec(
        max_surge=_surge(f, "maxSurge", 0),
        max_unavailable=_surge(f, "maxUnavailable", 1),
        progress_deadline_seconds=f.int("progressDeadlineSeconds", None, 10),
        auto_rollback=f.bool("autoRollback", True),
    )
    # The Deployment API rejects this pair: nothing could ever be replaced.
    if _is_zero(rollout.max_surge) and _is_zero(rollout.max_unavailable):
        raise SpecError(f.at("maxUnavailable"), "must not be 0 when maxSurge is 0")
    return rollout


def _parse_resources(spec: Fields) -> dict[str, Any]:
    resources = spec.map("resources")
    for part in ("limits", "requests"):
        if GPU_RESOURCE in (resources.get(part) or {}):
            raise SpecError(f"spec.resources.{part}", f"set GPUs with spec.gpus, not {GPU_RESOURCE}")
    return resources


def _parse_env(spec: Fields) -> tuple[dict[str, Any], ...]:
    env = spec.list("env")
    for i, var in enumerate(env):
        item = Fields(var, f"spec.env[{i}]")
        name = item.str("name", required=True)
        if name in RESERVED_ENV:
            raise SpecError(item.at("name"), f"{name} is set by the operator and cannot be overridden")
    return tuple(dict(var) for var in env)


def _parse_name(meta: Mapping[str, Any]) -> str:
    # Checked before any child is written: a Service named after a bad name would be refused (422)
    # after the Deployment already holds GPUs (the CRD's CEL rule refuses it at admission too).
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > NAME_MAX or not DNS_LABEL_1035.match(name):
        raise SpecError("metadata.name", f"must be a DNS-1035 label (a lowercase letter first, then letters, "
                                         f"digits or '-', no dots) of at most {NAME_MAX} characters, got {name!r}")
    return name


def _image(spec: Fields, gpus: int, config: OperatorConfig) -> str:
    image: str | None = spec.str("image")
    if image:
        return image
    return config.image if gpus > 0 else config.cpu_image


def parse_model(body: Mapping[str, Any], config: OperatorConfig = OperatorConfig()) -> ModelSpec:
    """Turn a NanoGPTModel object into a ModelSpec, or raise SpecError naming the bad field.

    `config` supplies the operator-wide defaults: the server images and the cluster domain."""
    meta = body.get("metadata") or {}
    spec = Fields(body.get("spec") or {}, "spec")
    tokenizer = spec.child("tokenizer")
    gpus: int = spec.int("gpus", 1, 0, 16)
    model = ModelSpec(
        name=_parse_name(meta),
        namespace=meta.get("namespace") or "default",
        checkpoint=_parse_checkpoint(spec),
        tokenizer_path=None if tokenizer is None else tokenizer.relative_path("path"),
        image=_image(spec, gpus, config),
        image_pull_policy=spec.str("imagePullPolicy", "IfNotPresent", choices=PULL_POLICIES),
        image_pull_secrets=tuple(Fields(s, f"spec.imagePullSecrets[{i}]").str("name", required=True)
                                 for i, s in enumerate(spec.list("imagePullSecrets"))),
        replicas=spec.int("replicas", 1, 0, 1000),
        gpus=gpus,
        resources=_parse_resources(spec),
        server=_parse_server(spec.child("server")),
        service=_parse_service(spec.child("service")),
        autoscaling=_parse_autoscaling(spec.child("autoscaling")),
        rollout=_parse_rollout(spec.child("rollout")),
        node_selector=spec.map("nodeSelector"),
        tolerations=tuple(dict(t) for t in spec.list("tolerations")),
        affinity=spec.map("affinity") or None,
        priority_class_name=spec.str("priorityClassName") or None,
        pod_annotations=spec.map("podAnnotations"),
        env=_parse_env(spec),
        cluster_domain=config.cluster_domain,
        monitoring=parse_monitoring(spec.child("monitoring")),
        gateway=parse_gateway(spec.child("gateway")),
    )
    _check_cpu_request(model)
    _check_deadline(model)
    if model.tokenizer_path and model.checkpoint.uri:
        raise SpecError("spec.tokenizer.path", "is a path inside the claim; a fetched uri has none "
                                               "(use a directory source that carries its tokenizer)")
    return model


def _check_deadline(m: ModelSpec) -> None:
    given = m.rollout.progress_deadline_seconds
    if given is not None and given < m.server.startup_timeout_seconds:
        raise SpecError("spec.rollout.progressDeadlineSeconds",
                        f"must be >= spec.server.startupTimeoutSeconds ({m.server.startup_timeout_seconds}): "
                        "a pod may take that long to load, and the rollout would be judged failed before")


def _check_cpu_request(m: ModelSpec) -> None:
    # The HPA computes CPU utilization against the request; without one it never scales.
    if m.autoscaling and m.autoscaling.target_cpu_utilization is not None:
        if "cpu" not in (m.resources.get("requests") or {}):
            raise SpecError("spec.autoscaling.targetCPUUtilization", "needs spec.resources.requests.cpu")
