"""The server image a model runs without spec.image: the operator's GPU image, or its CPU image for gpus 0."""

from __future__ import annotations

import pytest

from nanogpt_operator.config import OperatorConfig, config_from_env
from nanogpt_operator.errors import ConfigError
from nanogpt_operator.model.build import Owner, desired_deployment
from nanogpt_operator.model.spec import parse_model

OWNER = Owner(name="llm", uid="u")


def image_of(body, config: OperatorConfig = OperatorConfig()) -> str:
    deployment = desired_deployment(parse_model(body, config), OWNER)
    image: str = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    return image


def test_defaults_pick_the_cpu_image_for_zero_gpus(model_body) -> None:
    assert image_of(model_body()) == "nanogpt-server:latest"
    assert image_of(model_body(gpus=2)) == "nanogpt-server:latest"
    assert image_of(model_body(gpus=0)) == "nanogpt-server:latest-cpu"


def test_an_explicit_image_wins(model_body) -> None:
    assert image_of(model_body(gpus=0, image="reg/srv:1")) == "reg/srv:1"
    assert image_of(model_body(gpus=1, image="reg/srv:1")) == "reg/srv:1"


def test_both_defaults_are_settings(model_body) -> None:
    config = config_from_env({"NANOGPT_OPERATOR_IMAGE": "reg/gpu:2", "NANOGPT_OPERATOR_CPU_IMAGE": "reg/cpu:2"})
    assert (config.image, config.cpu_image) == ("reg/gpu:2", "reg/cpu:2")
    assert image_of(model_body(gpus=1), config) == "reg/gpu:2"
    assert image_of(model_body(gpus=0), config) == "reg/cpu:2"
    assert config_from_env({}).cpu_image == "nanogpt-server:latest-cpu"


@pytest.mark.parametrize("name", ["NANOGPT_OPERATOR_CPU_IMAGE", "NANOGPT_OPERATOR_IMAGE"])
def test_a_bad_image_setting_names_the_variable(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_env({name: "two words"})
    assert caught.value.variable == name


def test_a_bad_cluster_domain_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_env({"NANOGPT_OPERATOR_CLUSTER_DOMAIN": "Not A Domain"})
    assert caught.value.variable == "NANOGPT_OPERATOR_CLUSTER_DOMAIN"
