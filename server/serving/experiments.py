"""A/B experiments: declared in MODEL_DIR/experiments.json, arms assigned by a stable hash.

Assignment is weighted rendezvous hashing: each arm scores ``weight / -ln(u)`` where ``u`` is
a uniform number drawn from SHA-256 of (experiment, arm, user), and the highest score wins.
The same user gets the same arm in every process, after restarts and on every host, and
changing one arm's weight moves only users into or out of that arm.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from scipy import stats

from server.errors import ApiError, not_found
from server.model.registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    name: str
    version: str
    weight: int


@dataclass(frozen=True)
class Experiment:
    name: str
    model: str
    arms: tuple[Arm, ...]
    shadow: str | None = None  # version that gets a copy of the traffic
    error: str | None = None  # why the experiment is invalid (then it serves nothing)

    def assign(self, user_id: str) -> Arm:
        return max(self.arms, key=lambda arm: _score(self.name, arm, user_id))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "model": self.model, "valid": self.error is None,
            "arms": {a.name: {"version": a.version, "weight": a.weight} for a in self.arms},
        }
        if self.shadow is not None:
            out["shadow"] = {"version": self.shadow}
        if self.error:
            out["error"] = self.error
        return out


def uniform(*parts: str) -> float:
    """A number in (0, 1) that depends only on ``parts`` (SHA-256, never Python's hash())."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2.0**64


def _score(experiment: str, arm: Arm, user_id: str) -> float:
    if arm.weight <= 0:
        return -math.inf
    return arm.weight / -math.log(uniform(experiment, arm.name, user_id))


def parse_experiments(raw: dict[str, Any] | None, registry: ModelRegistry) -> dict[str, Experiment]:
    """Every experiment of the file; an invalid one is kept with its error, the rest serve."""
    out: dict[str, Experiment] = {}
    for name, spec in (raw or {}).items():
        try:
            out[name] = _parse_one(str(name), spec, registry)
        except (ValueError, TypeError, KeyError, ApiError) as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            log.error("experiment rejected", extra={"experiment": name, "err": message})
            model = spec.get("model", "") if isinstance(spec, dict) else ""
            out[name] = Experiment(str(name), str(model), (), None, message)
    return out


def _parse_one(name: str, spec: Any, registry: ModelRegistry) -> Experiment:
    if not isinstance(spec, dict):
        raise ValueError("an experiment must be an object")
    model = spec.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("'model' must name a model")
    registry.get(model)
    raw_arms = spec.get("arms")
    if not isinstance(raw_arms, dict) or len(raw_arms) < 2:
        raise ValueError("'arms' must map two or more arm names to {version, weight}")
    arms = []
    for arm_name, arm in raw_arms.items():
        if not isinstance(arm, dict):
            raise ValueError(f"arm '{arm_name}' must be an object")
        weight = arm.get("weight")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise ValueError(f"arm '{arm_name}': weight must be an integer >= 0")
        version = str(arm.get("version", "latest"))
        registry.locate(model, version)  # unknown version or label: rejected here (not loaded)
        arms.append(Arm(str(arm_name), version, weight))
    if sum(a.weight for a in arms) <= 0:
        raise ValueError("the arms' weights add up to zero")
    shadow = None
    if spec.get("shadow") is not None:
        raw_shadow = spec["shadow"]
        shadow = str(raw_shadow.get("version") if isinstance(raw_shadow, dict) else raw_shadow)
        registry.locate(model, shadow)
    return Experiment(name, model, tuple(arms), shadow)


# --- Counting ---------------------------------------------------------------------------------
# How long a served user may report their outcome, from their last prediction through the
# experiment (and how long their outcome keeps them from reporting another): outcomes
# (a click, a purchase) come within days; a week bounds what is remembered.
SERVED_TTL_SECONDS = 7 * 24 * 3600
# Without Redis, the users one worker remembers per experiment; the least recently served
# are forgotten first (they then get 409 not_served).
MEMORY_SERVED_MAX = 100_000


class ExperimentStats(Protocol):
    scope: str

    def count_request(self, experiment: str, arm: str) -> None: ...

    def count_outcome(self, experiment: str, arm: str, value: float) -> None: ...

    def count_shadow(self, experiment: str, ok: bool, agreed: bool) -> None: ...

    def read(self, experiment: str) -> dict[str, float]: ...

    def note_served(self, experiment: str, user_id: str, arm: str) -> None: ...

    def claim_outcome(self, experiment: str, user_id: str) -> str: ...


def not_served(experiment: str, user_id: str, per_worker: bool = False) -> ApiError:
    why = ("; without REDIS_URL each worker knows only the users it served" if per_worker
           else "")
    return ApiError(409, "not_served",
                    f"user '{user_id}' was not served by experiment '{experiment}' in the last "
                    f"{SERVED_TTL_SECONDS // 86400} days: an outcome is taken only for a user "
                    f"who got a prediction through the experiment{why}")


def outcome_recorded(experiment: str, user_id: str) -> ApiError:
    return ApiError(409, "outcome_recorded",
                    f"an outcome for user '{user_id}' is already recorded in experiment "
                    f"'{experiment}': one outcome per user")


def _outcome_fields(arm: str, value: float) -> dict[str, float]:
    value = float(value)
    return {f"{arm}:n": 1, f"{arm}:sum": value, f"{arm}:sumsq": value * value,
            f"{arm}:nonbinary": 0 if value in (0, 1) else 1}


def _shadow_fields(ok: bool, agreed: bool) -> dict[str, float]:
    return {"shadow:requests": 1, "shadow:errors": 0 if ok else 1, "shadow:agreed": int(agreed)}


class _Counting:
    """What every stats backend counts; a backend only says how to add and read."""

    def _add(self, experiment: str, fields: dict[str, float]) -> None:
        raise NotImplementedError

    def count_request(self, experiment: str, arm: str) -> None:
        self._add(experiment, {f"{arm}:requests": 1})

    def count_outcome(self, experiment: str, arm: str, value: float) -> None:
        self._add(experiment, _outcome_fields(arm, value))

    def count_shadow(self, experiment: str, ok: bool, agreed: bool) -> None:
        self._add(experiment, _shadow_fields(ok, agreed))


@dataclass
class _Served:
    arm: str
    at: float  # when last served (the clock of MemoryStats)
    outcome_at: float | None = None


class MemoryStats(_Counting):
    """Per-process counts and served users (said so in the answers)."""

    scope = "this worker"

    def __init__(self, max_users: int = MEMORY_SERVED_MAX, ttl: float = SERVED_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._data: dict[str, dict[str, float]] = {}
        # Per experiment, user -> what they were served, least recently served first.
        self._served: dict[str, dict[str, _Served]] = {}
        self._lock = threading.Lock()
        self.max_users, self.ttl, self.clock = max_users, ttl, clock

    def note_served(self, experiment: str, user_id: str, arm: str) -> None:
        now = self.clock()
        with self._lock:
            users = self._served.setdefault(experiment, {})
            before = users.pop(user_id, None)  # re-inserted: most recently served last
            outcome_at = before.outcome_at if before is not None else None
            if outcome_at is not None and now - outcome_at > self.ttl:
                outcome_at = None
            users[user_id] = _Served(arm, now, outcome_at)
            while len(users) > self.max_users:
                del users[next(iter(users))]

    def claim_outcome(self, experiment: str, user_id: str) -> str:
        now = self.clock()
        with self._lock:  # the check and the mark are one step: one outcome per user
            served = self._served.get(experiment, {}).get(user_id)
            if served is None or now - served.at > self.ttl:
                raise not_served(experiment, user_id, per_worker=True)
            if served.outcome_at is not None and now - served.outcome_at <= self.ttl:
                raise outcome_recorded(experiment, user_id)
            served.outcome_at = now
            return served.arm

    def _add(self, experiment: str, fields: dict[str, float]) -> None:
        with self._lock:
            into = self._data.setdefault(experiment, {})
            for key, value in fields.items():
                into[key] = into.get(key, 0) + value

    def read(self, experiment: str) -> dict[str, float]:
        with self._lock:
            return dict(self._data.get(experiment, {}))


class RedisStats(_Counting):
    """Counts in one Redis hash per experiment (``ab:<experiment>``), summed over every worker
    and host. A Redis fault loses those increments and is logged; it never fails a request.

    Served users are keys ``ab:<experiment>:served:<user digest>`` (the arm, SETEX
    SERVED_TTL_SECONDS, renewed at each prediction) and a recorded outcome is
    ``ab:<experiment>:outcome:<user digest>`` set with NX: whichever worker or host sets it
    first takes the outcome. Users are stored as a SHA-256 digest, never in clear."""

    scope = "all workers (redis)"

    def __init__(self, client: redis.Redis, ttl: int = SERVED_TTL_SECONDS) -> None:
        self.client = client
        self.ttl = ttl
        self.errors = 0

    @staticmethod
    def user_key(kind: str, experiment: str, user_id: str) -> str:
        # A fixed-length digest last: no two (experiment, user) pairs share a key.
        digest = hashlib.sha256(user_id.encode()).hexdigest()[:32]
        return f"ab:{experiment}:{kind}:{digest}"

    def note_served(self, experiment: str, user_id: str, arm: str) -> None:
        try:
            self.client.set(self.user_key("served", experiment, user_id), arm, ex=self.ttl)
        except (redis.RedisError, OSError) as exc:
            self.errors += 1
            log.warning("served user not written", extra={"err": str(exc)[:200]})

    def claim_outcome(self, experiment: str, user_id: str) -> str:
        try:
            arm = self.client.get(self.user_key("served", experiment, user_id))
            if arm is None:
                raise not_served(experiment, user_id)
            first = self.client.set(self.user_key("outcome", experiment, user_id), arm,
                                    nx=True, ex=self.ttl)
        except (redis.RedisError, OSError) as exc:
            raise ApiError(503, "stats_unavailable", f"experiment users unreadable: {exc}") \
                from exc
        if not first:
            raise outcome_recorded(experiment, user_id)
        return arm.decode() if isinstance(arm, bytes) else str(arm)

    def _add(self, experiment: str, fields: dict[str, float]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in fields.items():
                if isinstance(value, int):
                    pipe.hincrby(f"ab:{experiment}", key, value)
                else:
                    pipe.hincrbyfloat(f"ab:{experiment}", key, value)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.errors += 1
            log.warning("experiment counts not written", extra={"err": str(exc)[:200]})

    def read(self, experiment: str) -> dict[str, float]:
        try:
            raw = self.client.hgetall(f"ab:{experiment}")
        except (redis.RedisError, OSError) as exc:
            raise ApiError(503, "stats_unavailable", f"experiment counts unreadable: {exc}") \
                from exc
        return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}


# --- Statistics -------------------------------------------------------------------------------
def summarize(exp: Experiment, counts: dict[str, float]) -> dict[str, Any]:
    """Per-arm requests and outcomes, and each arm's test against the first (control) arm:
    two-proportion test (chi-square on the 2x2 table, no continuity correction, which is the
    two-sided z-test) for 0/1 outcomes, Welch's t-test for numeric ones."""
    numeric = any(counts.get(f"{a.name}:nonbinary", 0) for a in exp.arms)
    arms: dict[str, Any] = {}
    for arm in exp.arms:
        n = int(counts.get(f"{arm.name}:n", 0))
        total = counts.get(f"{arm.name}:sum", 0.0)
        row: dict[str, Any] = {"version": arm.version, "weight": arm.weight,
                               "requests": int(counts.get(f"{arm.name}:requests", 0)),
                               "outcomes": n}
        if n:
            row["mean" if numeric else "rate"] = total / n
            if not numeric:
                row["successes"] = int(round(total))
        arms[arm.name] = row
    control = exp.arms[0]
    for arm in exp.arms[1:]:
        arms[arm.name]["vs"] = control.name
        arms[arm.name]["p_value"] = (_welch if numeric else _two_proportions)(
            counts, control.name, arm.name)
    out: dict[str, Any] = {"outcome_type": "numeric" if numeric else "binary",
                           "test": "welch_t" if numeric else "two_proportion_z", "arms": arms}
    if exp.shadow is not None:
        out["shadow"] = {"version": exp.shadow,
                         "requests": int(counts.get("shadow:requests", 0)),
                         "errors": int(counts.get("shadow:errors", 0)),
                         "agreed": int(counts.get("shadow:agreed", 0))}
    return out


def _two_proportions(counts: dict[str, float], a: str, b: str) -> float | None:
    na, nb = int(counts.get(f"{a}:n", 0)), int(counts.get(f"{b}:n", 0))
    sa, sb = int(round(counts.get(f"{a}:sum", 0))), int(round(counts.get(f"{b}:sum", 0)))
    if not na or not nb or sa + sb in (0, na + nb):
        return None  # no data, or every outcome alike: the test is undefined
    table = [[sa, na - sa], [sb, nb - sb]]
    return float(stats.chi2_contingency(table, correction=False).pvalue)


def _welch(counts: dict[str, float], a: str, b: str) -> float | None:
    moments = []
    for arm in (a, b):
        n = counts.get(f"{arm}:n", 0)
        if n < 2:
            return None
        mean = counts.get(f"{arm}:sum", 0) / n
        var = max(counts.get(f"{arm}:sumsq", 0) - n * mean * mean, 0.0) / (n - 1)
        moments.append((mean, math.sqrt(var), n))
    (m1, s1, n1), (m2, s2, n2) = moments
    if s1 == 0 and s2 == 0:
        return None
    result = stats.ttest_ind_from_stats(m1, s1, n1, m2, s2, n2, equal_var=False)
    return float(result.pvalue)


@dataclass
class Experiments:
    """The experiments one worker serves; reloaded with the repository."""

    registry: ModelRegistry
    stats: ExperimentStats
    items: dict[str, Experiment] = field(default_factory=dict)
    stamp: int = -1
    file_error: str | None = None

    def reload(self, force: bool = False) -> bool:
        """Re-read experiments.json when it changed on disk (or models changed: force)."""
        stamp, raw, error = self.registry.repository.experiments_file()
        if stamp == self.stamp and not force:
            return False
        self.stamp, self.file_error = stamp, error
        if error:
            log.error("experiments file rejected", extra={"err": error})
        self.items = parse_experiments(raw, self.registry)
        return True

    def get(self, name: str) -> Experiment:
        exp = self.items.get(name)
        if exp is None:
            raise not_found("experiment", f"unknown experiment '{name}'")
        return exp

    def targeting(self, model: str) -> Experiment | None:
        """The one valid experiment that targets ``model`` (None when there is none); 422
        when several do, since a user could then land in either."""
        found = [e for e in self.items.values() if e.model == model and e.error is None]
        if len(found) > 1:
            names = ", ".join(sorted(e.name for e in found))
            raise ApiError(422, "ambiguous_experiment",
                           f"experiments {names} all target model '{model}': "
                           "use /predict/ab with one of them", [{"loc": ["user_id"],
                                                               "msg": "ambiguous"}])
        return found[0] if found else None

    def serving(self, name: str) -> Experiment:
        exp = self.get(name)
        if exp.error:
            raise ApiError(503, "experiment_invalid",
                           f"experiment '{name}' is invalid: {exp.error}")
        return exp

    def note_served(self, exp: Experiment, arm: Arm, user_id: str) -> None:
        """Remember that ``user_id`` got a prediction from ``arm``: their outcome is taken."""
        self.stats.note_served(exp.name, user_id, arm.name)

    def record_outcome(self, name: str, user_id: str, value: float) -> Arm:
        """The outcome of a user the experiment served, counted once, against the arm that
        served them (which a weight change since may no longer assign them)."""
        exp = self.serving(name)
        served = self.stats.claim_outcome(name, user_id)
        arm = next((a for a in exp.arms if a.name == served), None)
        if arm is None:
            raise ApiError(409, "not_served",
                           f"user '{user_id}' was served by arm '{served}', which experiment "
                           f"'{name}' no longer has")
        self.stats.count_outcome(name, arm.name, value)
        return arm

    def view(self, name: str) -> dict[str, Any]:
        exp = self.get(name)
        out = exp.describe()
        out["counts_scope"] = self.stats.scope
        if exp.error is None:
            out.update(summarize(exp, self.stats.read(name)))
        return out
