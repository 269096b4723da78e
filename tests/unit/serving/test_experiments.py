"""A/B assignment and statistics without a server."""

from __future__ import annotations

from collections import Counter

import pytest

from server.serving.experiments import Arm, Experiment, MemoryStats, summarize, uniform


def test_uniform_is_a_fixed_function_of_its_inputs() -> None:
    # Pinned: a change here would move every user of every running experiment.
    assert uniform("iris-ab", "control", "u42") == pytest.approx(0.5460494437146605, abs=0)
    assert 0 < uniform("", "", "") < 1


def test_three_arms_split_by_weight_and_zero_weight_gets_nobody() -> None:
    exp = Experiment("e", "m", (Arm("a", "1", 1), Arm("b", "1", 2), Arm("c", "1", 0),
                                Arm("d", "1", 1)))
    split = Counter(exp.assign(f"u{i}").name for i in range(8000))
    assert split["c"] == 0
    assert split["b"] / 8000 == pytest.approx(0.5, abs=0.03)
    assert split["a"] / 8000 == pytest.approx(0.25, abs=0.03)


def test_summary_without_data_has_no_p_value() -> None:
    exp = Experiment("e", "m", (Arm("a", "1", 1), Arm("b", "2", 1)))
    stats = MemoryStats()
    stats.count_request("e", "a")
    out = summarize(exp, stats.read("e"))
    assert out["arms"]["a"]["requests"] == 1 and out["arms"]["b"]["p_value"] is None
    for v in (1, 1, 1):
        stats.count_outcome("e", "a", v)
        stats.count_outcome("e", "b", v)
    assert summarize(exp, stats.read("e"))["arms"]["b"]["p_value"] is None  # all alike


def test_predict_with_user_id_needs_one_experiment_on_the_model() -> None:
    from server.errors import ApiError
    from server.serving.experiments import Experiments

    arms = (Arm("a", "1", 50), Arm("b", "2", 50))
    book = Experiments.__new__(Experiments)
    book.items = {"one": Experiment("one", "iris", arms),
                  "broken": Experiment("broken", "iris", arms, error="bad"),
                  "other": Experiment("other", "diabetes", arms)}
    assert book.targeting("iris") is book.items["one"]  # the invalid one does not count
    assert book.targeting("breast_cancer") is None
    book.items["two"] = Experiment("two", "iris", arms)
    with pytest.raises(ApiError) as err:
        book.targeting("iris")
    assert (err.value.status, err.value.code) == (422, "ambiguous_experiment")
    assert "one, two" in err.value.message
