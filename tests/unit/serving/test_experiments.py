"""A/B assignment and statistics without a server."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from server.errors import ApiError
from server.serving.cache import make_redis
from server.serving.experiments import (
    Arm,
    Experiment,
    Experiments,
    ExperimentStats,
    MemoryStats,
    RedisStats,
    summarize,
    uniform,
)
from tests.conftest import free_port


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


# --- One outcome per served user --------------------------------------------------------------
def _book(stats: ExperimentStats) -> Experiments:
    """An Experiments over ``stats`` serving one 50/50 experiment, without a registry."""
    book = Experiments.__new__(Experiments)
    book.stats = stats
    book.items = {"e": Experiment("e", "iris", (Arm("a", "1", 50), Arm("b", "2", 50)))}
    return book


def _refusal(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(ApiError) as err:
        call()
    return err.value.status, err.value.code


def test_an_outcome_is_taken_once_for_a_served_user_and_counts_for_its_arm() -> None:
    book = _book(MemoryStats())
    exp = book.items["e"]
    assert _refusal(lambda: book.record_outcome("e", "u1", 1)) == (409, "not_served")
    book.note_served(exp, Arm("b", "2", 50), "u1")  # whatever assign() says today
    assert book.record_outcome("e", "u1", 1).name == "b"
    assert _refusal(lambda: book.record_outcome("e", "u1", 0)) == (409, "outcome_recorded")
    book.note_served(exp, Arm("a", "1", 50), "u1")  # served again: still one outcome
    assert _refusal(lambda: book.record_outcome("e", "u1", 1)) == (409, "outcome_recorded")
    assert _refusal(lambda: book.record_outcome("ghost", "u1", 1)) == (404,
                                                                       "experiment_not_found")
    counts = summarize(exp, book.stats.read("e"))["arms"]
    assert (counts["a"]["outcomes"], counts["b"]["outcomes"]) == (0, 1)


def test_an_arm_removed_since_the_user_was_served_takes_no_outcome() -> None:
    book = _book(MemoryStats())
    book.note_served(book.items["e"], Arm("gone", "1", 1), "u1")
    assert _refusal(lambda: book.record_outcome("e", "u1", 1)) == (409, "not_served")


def test_memory_forgets_users_after_the_ttl_and_beyond_its_bound() -> None:
    now = [0.0]
    stats = MemoryStats(max_users=3, ttl=100, clock=lambda: now[0])
    for user in ("u1", "u2", "u3"):
        stats.note_served("e", user, "a")
    stats.note_served("e", "u1", "a")  # most recently served again: u2 is the oldest
    stats.note_served("e", "u4", "a")
    assert _refusal(lambda: stats.claim_outcome("e", "u2")) == (409, "not_served")
    assert stats.claim_outcome("e", "u1") == "a"
    now[0] = 50.0
    stats.note_served("e", "u1", "b")
    assert _refusal(lambda: stats.claim_outcome("e", "u1")) == (409, "outcome_recorded")
    now[0] = 120.0
    assert _refusal(lambda: stats.claim_outcome("e", "u3")) == (409, "not_served")  # expired
    # u1 was served within the TTL and their outcome is older than it: a new one is taken.
    assert stats.claim_outcome("e", "u1") == "b"


def test_memory_not_served_says_that_workers_do_not_share_users() -> None:
    with pytest.raises(ApiError) as err:
        MemoryStats().claim_outcome("e", "u1")
    assert "REDIS_URL" in err.value.message and "'u1'" in err.value.message


def test_redis_keys_of_users_never_collide_and_hide_the_user() -> None:
    keys = {RedisStats.user_key(kind, exp, user)
            for kind in ("served", "outcome") for exp, user in (("a", "b:served:c"),
                                                                ("a:b", "c"), ("a", "c"))}
    assert len(keys) == 6 and not any("c" == k.rsplit(":", 1)[1] for k in keys)


def test_dead_redis_loses_no_prediction_and_refuses_the_outcome_with_503() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    stats = RedisStats(make_redis(url, 0.2, 2))
    stats.note_served("e", "u1", "a")  # logged, never raised: the prediction was answered
    assert stats.errors == 1
    assert _refusal(lambda: stats.claim_outcome("e", "u1")) == (503, "stats_unavailable")
