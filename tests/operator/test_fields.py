"""The spec-parsing helper both resources use: typed getters whose errors name the field path."""

from __future__ import annotations

import pytest

from nanogpt_operator.errors import SpecError
from nanogpt_operator.fields import Fields


def path_of_error(call) -> str:
    with pytest.raises(SpecError) as err:
        call()
    return err.value.path


def test_getters_return_typed_values_and_defaults():
    f = Fields({"n": 3, "s": "x", "b": False, "d": "5m", "p": "a/b.pt", "o": {"k": 1}}, "spec")
    assert (f.int("n", 1, 0), f.int("missing", 7, 0), f.str("s"), f.bool("b", True)) == (3, 7, "x", False)
    assert (f.duration("d", 0), f.duration("missing", 0), f.relative_path("p")) == (300, 0, "a/b.pt")
    assert f.section("o").int("k", None, 0) == 1
    assert f.section("missing").data == {} and f.section("missing").path == "spec.missing"
    assert f.child("missing") is None


def test_errors_name_the_full_path():
    f = Fields({"n": -1, "s": 5, "b": "yes", "d": "5 min", "p": "../x", "o": {"deep": {"v": "no"}}, "l": {"a": 1}},
               "spec")
    assert path_of_error(lambda: f.int("n", 0, 0)) == "spec.n"
    assert path_of_error(lambda: f.str("s")) == "spec.s"
    assert path_of_error(lambda: f.str("missing", required=True)) == "spec.missing"
    assert path_of_error(lambda: f.bool("b", True)) == "spec.b"
    assert path_of_error(lambda: f.duration("d", 0)) == "spec.d"
    assert path_of_error(lambda: f.relative_path("p")) == "spec.p"
    assert path_of_error(lambda: f.section("o").section("deep").int("v", 0, 0)) == "spec.o.deep.v"
    assert path_of_error(lambda: f.list("l")) == "spec.l"
    assert path_of_error(lambda: Fields([], "spec.x")) == "spec.x"
