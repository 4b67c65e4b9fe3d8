"""The wave planner: sizes, rounding, cumulative semantics, ordering and already-done models."""

import pytest

from nanogpt_operator.errors import SpecError
from nanogpt_operator.rollout.waves import WaveSize, cumulative_targets, parse_wave, parse_waves, plan_waves


def keys(n: int, ns: str = "a") -> list[tuple[str, str]]:
    return [(ns, f"m{i:02d}") for i in range(n)]


@pytest.mark.parametrize(("value", "expected"), [
    (1, WaveSize(count=1)), ("3", WaveSize(count=3)), ("25%", WaveSize(percent=25)), ("100%", WaveSize(percent=100)),
])
def test_parse_wave_accepts_counts_and_percentages(value, expected):
    assert parse_wave(value, "w") == expected


@pytest.mark.parametrize("value", [0, -1, "0", "0%", "101%", "25 %", "abc", 2.5, True, None])
def test_parse_wave_rejects_with_the_field_path(value):
    with pytest.raises(SpecError) as err:
        parse_waves([1, value], "spec.strategy.waves")
    assert err.value.path == "spec.strategy.waves[1]"


def test_parse_waves_needs_one_wave():
    with pytest.raises(SpecError) as err:
        parse_waves([], "spec.strategy.waves")
    assert err.value.path == "spec.strategy.waves"


@pytest.mark.parametrize(("percent", "total", "expected"), [
    (25, 10, 3),   # 2.5 rounds up
    (1, 10, 1),    # 0.1 rounds up to at least one
    (33, 3, 1),    # 0.99 -> 1
    (50, 3, 2),    # 1.5 -> 2
    (100, 7, 7),
    (10, 100, 10),  # exact: no rounding up past it
])
def test_percentages_round_up_with_at_least_one(percent, total, expected):
    assert WaveSize(percent=percent).cumulative(total) == expected


def test_counts_are_capped_at_the_selection():
    assert WaveSize(count=50).cumulative(4) == 4
    assert WaveSize(count=1).cumulative(0) == 0


def test_targets_are_cumulative_non_decreasing_and_end_at_the_whole_selection():
    sizes = parse_waves([5, 1, "25%"], "w")
    assert cumulative_targets(sizes, 20) == [5, 5, 5, 20]  # smaller later waves add nothing; 100% implied
    assert cumulative_targets(parse_waves([1, "25%", "100%"], "w"), 10) == [1, 3, 10]


def test_plan_one_25_100_of_ten():
    plan = plan_waves(keys(10), [], parse_waves([1, "25%", "100%"], "w"))
    assert [len(w) for w in plan] == [1, 2, 7]
    assert plan[0] == (("a", "m00"),)
    assert [k for w in plan for k in w] == keys(10)  # every model exactly once, in order


def test_order_is_namespace_then_name_whatever_the_input_order():
    selected = [("b", "a"), ("a", "z"), ("a", "b"), ("c", "a")]
    plan = plan_waves(list(reversed(selected)), [], parse_waves([1, 2, "100%"], "w"))
    assert plan == [(("a", "b"),), (("a", "z"),), (("b", "a"), ("c", "a"))]
    assert plan == plan_waves(selected, [], parse_waves([1, 2, "100%"], "w"))


def test_models_already_on_the_target_count_as_done_and_fill_the_quota_first():
    done = [("a", "m09"), ("a", "m05")]
    plan = plan_waves(keys(10), done, parse_waves([1, "50%", "100%"], "w"))
    # The canary quota (1) is met by the done models: that wave is dropped; 50% needs 3 more.
    assert plan == [(("a", "m00"), ("a", "m01"), ("a", "m02")),
                    (("a", "m03"), ("a", "m04"), ("a", "m06"), ("a", "m07"), ("a", "m08"))]


def test_everything_done_or_nothing_selected_plans_no_wave():
    assert plan_waves(keys(3), keys(3), parse_waves([1], "w")) == []
    assert plan_waves([], [], parse_waves([1, "100%"], "w")) == []


def test_done_models_outside_the_selection_are_ignored():
    plan = plan_waves(keys(2), [("z", "other")], parse_waves([1], "w"))
    assert plan == [(("a", "m00"),), (("a", "m01"),)]


def test_a_single_wave_list_gets_the_implicit_final_wave():
    assert [len(w) for w in plan_waves(keys(5), [], parse_waves(["20%"], "w"))] == [1, 4]
