"""drift.py: merge patches against server-defaulted live objects."""

from __future__ import annotations

from nanogpt_operator.model.drift import changed_paths, merge_patch, same


def test_server_defaults_are_not_drift() -> None:
    desired = {"spec": {"containers": [{"name": "s", "ports": [{"containerPort": 5000}]}]}}
    live = {"spec": {"containers": [{"name": "s", "ports": [{"containerPort": 5000, "protocol": "TCP"}],
                                     "terminationMessagePath": "/dev/termination-log"}], "dnsPolicy": "ClusterFirst"}}
    assert merge_patch(desired, live) == {}


def test_changed_scalar_is_patched_alone() -> None:
    assert merge_patch({"spec": {"replicas": 2, "x": 1}}, {"spec": {"replicas": 5, "x": 1}}) == {"spec": {"replicas": 2}}


def test_lists_are_replaced_whole() -> None:
    desired = {"env": [{"name": "A", "value": "1"}]}
    assert merge_patch(desired, {"env": [{"name": "A", "value": "2"}]}) == desired
    assert merge_patch(desired, {"env": [{"name": "A", "value": "1"}, {"name": "B"}]}) == desired


def test_quantities_compare_by_value() -> None:
    assert same({"limits": {"nvidia.com/gpu": 1, "cpu": "1000m"}}, {"limits": {"nvidia.com/gpu": "1", "cpu": "1"}})
    assert not same({"memory": "1Gi"}, {"memory": "1G"})
    assert not same(1, True)


def test_fields_dropped_from_the_spec_are_removed() -> None:
    last = {"spec": {"nodeSelector": {"gpu": "a100"}, "replicas": 1}}
    desired = {"spec": {"replicas": 1}}
    live = {"spec": {"nodeSelector": {"gpu": "a100"}, "replicas": 1, "default": True}}
    assert merge_patch(desired, live, last) == {"spec": {"nodeSelector": None}}


def test_keys_dropped_inside_lists_replace_the_list() -> None:
    last = {"c": [{"limits": {"gpu": 1, "memory": "1Gi"}}]}
    desired = {"c": [{"limits": {"memory": "1Gi"}}]}
    live = {"c": [{"limits": {"gpu": "1", "memory": "1Gi"}}]}
    assert merge_patch(desired, live, last) == desired


def test_kept_paths_are_only_set_when_missing() -> None:
    keep = frozenset({("spec", "replicas")})
    assert merge_patch({"spec": {"replicas": 2}}, {"spec": {"replicas": 7}}, keep=keep) == {}
    assert merge_patch({"spec": {"replicas": 2}}, {"spec": {}}, keep=keep) == {"spec": {"replicas": 2}}
    assert merge_patch({"spec": {}}, {"spec": {"replicas": 7}}, {"spec": {"replicas": 2}}, keep=keep) == {}


def test_missing_object_parts_are_added() -> None:
    assert merge_patch({"metadata": {"labels": {"a": "b"}}}, {"metadata": {}}) == {"metadata": {"labels": {"a": "b"}}}


def test_changed_paths_for_events() -> None:
    patch = {"spec": {"replicas": 1, "template": {"spec": {"containers": [{}]}}}, "metadata": {"labels": None}}
    assert changed_paths(patch) == ["spec.replicas", "spec.template.spec.containers", "metadata.labels"]
