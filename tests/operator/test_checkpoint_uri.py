"""spec.checkpoint.uri: one grammar in three places. The operator's patterns (nanogpt_operator/fields.py),
the CRD's CEL rules (crds/nanogptmodels.yaml, evaluated by k8s_rules.admit) and the fetcher that runs in
the pod (model/fetch/uri.py) must give the same verdict, or a model would be admitted and then fail in
its init container (or be refused although the fetcher would take it)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from k8s_rules import admit
from operator_helpers import BASE_MODEL, CRD_PATH

from nanogpt_operator.errors import SpecError
from nanogpt_operator.fields import uri_problem
from nanogpt_operator.model.spec import parse_model

CRD: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())

GOOD = [
    "https://example.com/out/ckpt.pt", "https://example.com:8443/ckpt.pt", "https://10.0.0.1/a/b/model.safetensors",
    "https://[::1]:9000/ckpt.pt", "https://s3.example.com/b/ckpt.pt?X-Amz-Signature=abc&X-Amz-Expires=60",
    "https://example.com//double", "https://h/a#frag",
    "s3://models/out/ckpt.pt", "s3://my.bucket-1/gpt2/", "s3://abc/k", "s3://abc//odd-key",
    "hf://openai-community/gpt2", "hf://org/repo@v1.0", "hf://org/repo@main/out/ckpt.pt", "hf://o/r/sub/folder",
    "hf://Org_1/Repo.Name-2@refs%2Fpr%2F1", "hf://a/b/x..y",
]
BAD = [
    "ftp://example.com/ckpt.pt", "gs://bucket/ckpt.pt", "example.com/ckpt.pt", "", "https://", "https:///ckpt.pt",
    "https://example.com", "https://example.com/", "https://example.com/?q=1", "https://user:pw@example.com/ckpt.pt",
    "https://example.com:99999/ckpt.pt", "https://example.com:port/ckpt.pt",
    "s3://models", "s3://models/", "s3://models//", "s3://ab/key", "s3://UPPER/key", "s3://-bad/key",
    "hf://gpt2", "hf://org/", "hf://org/re--po", "hf://o..rg/repo", "hf://org/repo@", "hf://org/repo/a/../b",
    "hf://datasets/org/data", "hf://spaces/org/app", "hf://-org/repo", "hf://org/repo-", "hf://" + "a" * 97 + "/r",
]
HTTP = ["http://models.internal/ckpt.pt", "http://127.0.0.1:8080/a/ckpt.pt"]


def _fetcher_accepts(uri: str, allow_http: bool) -> bool:
    from model.fetch.errors import InvalidSource
    from model.fetch.uri import LocalSource, parse_source

    try:
        return not isinstance(parse_source(uri, allow_http), LocalSource)
    except InvalidSource:
        return False


def model(**checkpoint: Any) -> dict[str, Any]:
    body = copy.deepcopy(BASE_MODEL)
    body["spec"]["checkpoint"] = checkpoint
    return body


@pytest.mark.parametrize("uri", GOOD + BAD + HTTP)
def test_operator_crd_and_fetcher_agree(uri: str) -> None:
    for allow_http in (False, True):
        fetcher = _fetcher_accepts(uri, allow_http)
        assert (uri_problem(uri, allow_http) is None) == fetcher, (uri, allow_http, uri_problem(uri, allow_http))
        spec = {"uri": uri, **({"allowHttp": True} if allow_http else {})}
        assert (admit(CRD, model(**spec))[1] == []) == fetcher, admit(CRD, model(**spec))[1]
    assert fetcher == (uri in GOOD + HTTP)


@pytest.mark.parametrize("uri", ["pvc://models/out/ckpt.pt", "pvc://a.b-c/dir/"])
def test_pvc_uris_are_the_claim_form(uri: str) -> None:
    assert admit(CRD, model(uri=uri))[1] == []
    c = parse_model(model(uri=uri)).checkpoint
    assert (c.uri, f"pvc://{c.claim_name}/{c.path}") == (None, uri)


@pytest.mark.parametrize("uri", ["pvc://Bad/x", "pvc://claim", "pvc://claim/", "pvc://claim//abs", "pvc://c/a/../b"])
def test_bad_pvc_uris_are_refused(uri: str) -> None:
    assert admit(CRD, model(uri=uri))[1] != []
    with pytest.raises(SpecError) as caught:
        parse_model(model(uri=uri))
    assert caught.value.path == "spec.checkpoint.uri"


@pytest.mark.parametrize(("checkpoint", "path", "message"), [
    ({"uri": "ftp://h/x"}, "spec.checkpoint.uri", "must be https://"),
    ({"uri": "http://h/ckpt.pt"}, "spec.checkpoint.uri", "plain http:// is refused"),
    ({"uri": "s3://bucket"}, "spec.checkpoint.uri", "must be https://"),
    ({"uri": "hf://org/re--po"}, "spec.checkpoint.uri", "must be https://"),
    ({"uri": "https://h/ckpt.pt", "sha256": "abc"}, "spec.checkpoint.sha256", "64 hex digits"),
    ({"uri": "https://h/ckpt.pt", "claimName": "c", "path": "p"}, "spec.checkpoint.uri", "set either uri"),
    ({"claimName": "c"}, "spec.checkpoint.path", "set either uri"),
    ({}, "spec.checkpoint.claimName", "set either uri"),
    ({"uri": "https://h/ckpt.pt", "endpoint": "http://minio:9000"}, "spec.checkpoint.endpoint", "s3://"),
    ({"uri": "s3://bucket/k", "endpoint": "minio:9000"}, "spec.checkpoint.endpoint", "http"),
    ({"claimName": "c", "path": "p", "sha256": "a" * 64}, "spec.checkpoint.sha256", "apply only to"),
    ({"uri": "https://h/ckpt.pt", "create": {"size": "1Gi"}}, "spec.checkpoint.create", "cache"),
    ({"uri": "https://h/ckpt.pt", "cache": {"claimName": "c", "sizeLimit": "1Gi"}},
     "spec.checkpoint.cache.sizeLimit", "sizeLimit"),
])
def test_bad_checkpoints_are_refused_at_admission_and_by_the_parser(checkpoint, path, message) -> None:
    violations = admit(CRD, model(**checkpoint))[1]
    assert violations and any(message.split(" ")[-1] in v for v in violations), violations
    with pytest.raises(SpecError) as caught:
        parse_model(model(**checkpoint))
    assert caught.value.path == path, caught.value


def test_the_parser_names_the_field_and_the_rule() -> None:
    with pytest.raises(SpecError) as caught:
        parse_model(model(uri="http://h/ckpt.pt"))
    assert str(caught.value).startswith("spec.checkpoint.uri: plain http:// is refused")
    with pytest.raises(SpecError) as caught:
        parse_model(model(uri="gs://b/k"))
    assert "unsupported scheme gs://" in str(caught.value)


def _literals(rule: str) -> list[str]:
    return re.findall(r"(?<![r\w])'((?:[^'\\]|\\.)*)'", rule)


def test_cel_regexes_with_backslashes_are_raw_strings() -> None:
    # cel-go refuses an unknown escape such as '\s' in a quoted string (cel-python lets it pass).
    def rules(node: Any) -> list[str]:
        found = [r["rule"] for r in node.get("x-kubernetes-validations") or []] if isinstance(node, dict) else []
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
        return found + [r for child in children for r in rules(child)]
    for rule in rules(CRD):
        assert not [lit for lit in _literals(rule) if "\\" in lit], rule
