"""What a real Kubernetes API server and kube-controller-manager do that kmock's emulator does not, as
small pure functions derived from the documented rules, so tests can check the operator against them.

- `admit`: a custom resource's admission: structural-schema defaulting, then every CRD CEL rule
  (x-kubernetes-validations) evaluated with cel-python on the defaulted object. Rules and semantics:
  https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation-rules
  (defaulting happens before validation; `self` is the node the rule sits on; at the root only
  metadata.name and metadata.generateName are visible).
- `stored`: what a write of a core object reads back as. The Go types of k8s.io/api mark optional fields
  `json:",omitempty"`, so an empty string sent for one is dropped on decode/encode (EnvVar.value,
  Toleration.key/operator/value/effect, PodSpec.priorityClassName, Container.image...). Map values
  (labels, annotations, nodeSelector) are kept: an empty map value is a value.
- `garbage_collect`: the garbage collector deletes a dependent once none of its ownerReferences points
  to an existing owner, and leaves objects without ownerReferences alone
  (https://kubernetes.io/docs/concepts/architecture/garbage-collection/#owners-dependents).
- `deletion_completes`: an object is removed only once metadata.finalizers is empty; until then a
  DELETE only sets deletionTimestamp
  (https://kubernetes.io/docs/concepts/overview/working-with-objects/finalizers/).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import celpy

# Maps whose values are data, not optional struct fields: an empty string there is stored as is.
_DATA_MAPS = frozenset({"labels", "annotations", "nodeSelector", "data", "stringData", "matchLabels"})


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Structural-schema defaulting: a missing property with a `default` gets it, recursively."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key in value:
                if key not in (schema.get("properties") or {}):
                    value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


def cel_violations(schema: Mapping[str, Any], value: Any, path: str = "") -> list[str]:
    """Every failing CEL rule of `schema` on `value`, as 'path: message'."""
    env = celpy.Environment()
    found = []
    for rule in schema.get("x-kubernetes-validations") or []:
        program = env.program(env.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, Exception) or not bool(result):
            found.append(f"{path or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, Mapping):
        props = schema.get("properties") or {}
        for key, sub in value.items():
            node = props.get(key)
            if node is None and isinstance(schema.get("additionalProperties"), Mapping):
                node = schema["additionalProperties"]
            if node is not None:
                found.extend(cel_violations(node, sub, f"{path}.{key}"))
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            found.extend(cel_violations(schema["items"], item, f"{path}[{i}]"))
    return found


def admit(crd: Mapping[str, Any], obj: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The object as stored after defaulting, and the CEL rules it breaks (admission refuses it if any)."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    body = apply_defaults(schema, copy.deepcopy(dict(obj)))
    # At the root, CEL sees only metadata.name and metadata.generateName.
    visible = {**body, "metadata": {k: v for k, v in (body.get("metadata") or {}).items()
                                    if k in ("name", "generateName")}}
    return body, cel_violations(schema, visible)


def stored(obj: Any, _key: str = "") -> Any:
    """`obj` as the API server stores a core object: empty optional strings dropped (omitempty)."""
    if isinstance(obj, Mapping):
        if _key in _DATA_MAPS:
            return copy.deepcopy(dict(obj))
        return {k: stored(v, k) for k, v in obj.items() if v != ""}
    if isinstance(obj, list):
        return [stored(v, _key) for v in obj]
    return copy.deepcopy(obj)


def garbage_collect(objects: Iterable[Mapping[str, Any]], deleted_uids: set[str]) -> list[Mapping[str, Any]]:
    """The objects left once the garbage collector has handled owners with `deleted_uids`."""
    survivors = []
    for obj in objects:
        owners = (obj.get("metadata") or {}).get("ownerReferences") or []
        if owners and all(o["uid"] in deleted_uids for o in owners):
            continue
        survivors.append(obj)
    return survivors


def deletion_completes(obj: Mapping[str, Any]) -> bool:
    """Whether a DELETE removes the object now, with no controller running to clear finalizers."""
    return not (obj.get("metadata") or {}).get("finalizers")
