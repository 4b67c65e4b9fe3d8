"""config.py: settings from the environment, with errors naming the variable."""

from __future__ import annotations

import pytest

from nanogpt_operator.config import config_from_env
from nanogpt_operator.errors import ConfigError


def test_defaults() -> None:
    config = config_from_env({})
    assert (config.peering_name, config.standalone, config.request_timeout_s) == ("nanogpt-operator", False, 30.0)
    assert 1 <= config.priority < 2**31 and config.kubeconfig is None


def test_values() -> None:
    config = config_from_env({"NANOGPT_OPERATOR_PEERING": "p", "NANOGPT_OPERATOR_PRIORITY": "7",
                              "NANOGPT_OPERATOR_STANDALONE": "true", "NANOGPT_OPERATOR_REQUEST_TIMEOUT": "5",
                              "KUBECONFIG": "/k"})
    assert (config.peering_name, config.priority, config.standalone, config.request_timeout_s,
            config.kubeconfig) == ("p", 7, True, 5.0, "/k")


def test_fetch_log_settings() -> None:
    assert (config_from_env({}).fetch_log_bytes, config_from_env({}).fetch_log_timeout_s) == (8192, 5.0)
    config = config_from_env({"NANOGPT_OPERATOR_FETCH_LOG_BYTES": "0", "NANOGPT_OPERATOR_FETCH_LOG_TIMEOUT": "2"})
    assert (config.fetch_log_bytes, config.fetch_log_timeout_s) == (0, 2.0)


def test_random_priorities_differ() -> None:
    assert len({config_from_env({}).priority for _ in range(20)}) > 1


@pytest.mark.parametrize(("env", "variable"), [
    ({"NANOGPT_OPERATOR_PRIORITY": "high"}, "NANOGPT_OPERATOR_PRIORITY"),
    ({"NANOGPT_OPERATOR_PRIORITY": "0"}, "NANOGPT_OPERATOR_PRIORITY"),
    ({"NANOGPT_OPERATOR_STANDALONE": "maybe"}, "NANOGPT_OPERATOR_STANDALONE"),
    ({"NANOGPT_OPERATOR_PEERING": " "}, "NANOGPT_OPERATOR_PEERING"),
    ({"NANOGPT_OPERATOR_REQUEST_TIMEOUT": "0"}, "NANOGPT_OPERATOR_REQUEST_TIMEOUT"),
    ({"NANOGPT_OPERATOR_FETCH_LOG_BYTES": str(2 << 20)}, "NANOGPT_OPERATOR_FETCH_LOG_BYTES"),
    ({"NANOGPT_OPERATOR_FETCH_LOG_TIMEOUT": "0"}, "NANOGPT_OPERATOR_FETCH_LOG_TIMEOUT"),
])
def test_errors_name_the_variable(env, variable) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_env(env)
    assert caught.value.variable == variable
