"""The event timeline: new tasks, concept drift, data deletion, clients joining and leaving.

Events are data. Each has a round, the clients it touches and its parameters; they are written in
the config (`events:`), generated from rates (`generate:`, seeded), or implied by the task stream
(`scenario.*`), and validated together before a run starts. Every applied event is logged to
`events.jsonl`, so a run's history can be read and replayed.

An event in the config:

    {round: 8, kind: drift, clients: [0, 1, 2], type: label_swap, pairs: [[1, 2]], mode: sudden}
    {round: 12, kind: delete, clients: [3], what: client}
    {round: 12, kind: delete, what: class, class: 7}            # clients omitted: every client
    {round: 6, kind: delete, clients: [1], what: samples, fraction: 0.25}
    {round: 10, kind: task, clients: [0, 1], task: 0}            # a recurring task
    {round: 5, kind: join, clients: [9]}  /  {round: 15, kind: leave, clients: [4]}
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedcl.errors import ConfigError

EVENT_KINDS = ("task", "drift", "delete", "join", "leave")
DRIFT_MODES = ("sudden", "incremental", "recurrent")
DELETE_WHAT = ("samples", "class", "client")
_COMMON = ("round", "kind", "clients")
_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "task": ("task",),
    "delete": ("what", "samples", "fraction", "class"),
    "join": (),
    "leave": (),
}
DRIFT_EVENT_KEYS = ("type", "mode", "ramp", "until")  # plus the drift type's own parameters


@dataclass(frozen=True)
class Event:
    """One entry of the timeline: at `round`, `kind` happens to `clients` with `params`.

    `clients` are sorted and distinct; an event on every client holds them as a `range`, so a
    million clients cost a few bytes, not a tuple of a million ints.
    """

    round: int
    kind: str
    clients: tuple[int, ...] | range
    params: Mapping[str, Any] = field(default_factory=dict)
    index: int = 0  # position in the timeline, stable; drifts derive their seeds from it

    def to_json(self) -> dict[str, Any]:
        """The event as one line of events.jsonl."""
        return {
            "round": self.round,
            "kind": self.kind,
            "clients": list(self.clients),
            **self.params,
        }


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _is_int(value: Any) -> bool:
    # YAML's true/false are Python bools, which are ints too: a round or client `true` is a typo.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_event(
    raw: Mapping[str, Any],
    where: str,
    *,
    rounds: int,
    num_clients: int,
    num_classes: int,
    num_tasks: int,
) -> Event:
    """Validate one config event; raise a one-line `ConfigError` naming `where` and the problem."""
    raw = dict(raw)
    kind = raw.get("kind")
    if kind not in EVENT_KINDS:
        raise _fail(where, f"unknown kind {kind!r}; valid: {', '.join(EVENT_KINDS)}")
    server_round = raw.get("round")
    if not _is_int(server_round) or not 1 <= server_round <= rounds:
        raise _fail(where, f"round {server_round!r} is not within the run's rounds 1..{rounds}")
    clients = _clients(raw.get("clients", "all"), where, num_clients)
    params = {k: v for k, v in raw.items() if k not in _COMMON}
    if kind == "drift":
        _check_drift(params, where, rounds=rounds, start=server_round)
    else:
        unknown = [k for k in params if k not in _KIND_KEYS[kind]]
        if unknown:
            valid = ", ".join(_COMMON + _KIND_KEYS[kind])
            raise _fail(where, f"unknown key {unknown[0]!r} for a {kind} event; valid: {valid}")
    if kind == "task":
        task = params.get("task")
        if not _is_int(task) or not 0 <= task < num_tasks:
            raise _fail(
                where, f"task {task!r} is not one of the scenario's tasks 0..{num_tasks - 1}"
            )
    if kind == "delete":
        _check_delete(params, where, num_classes=num_classes)
    return Event(server_round, kind, clients, params)


def _clients(clients: Any, where: str, num_clients: int) -> tuple[int, ...] | range:
    """The event's clients, checked, sorted and distinct; `range` for every client."""
    if clients == "all" or clients is None:
        return range(num_clients)
    if not isinstance(clients, Sequence) or isinstance(clients, str) or not clients:
        raise _fail(
            where, f"clients must be a non-empty list of client ids or 'all', got {clients!r}"
        )
    bad = [c for c in clients if not _is_int(c) or not 0 <= c < num_clients]
    if bad:
        raise _fail(where, f"unknown client {bad[0]!r}; clients are 0..{num_clients - 1}")
    return tuple(sorted(set(clients)))


def _check_drift(params: dict[str, Any], where: str, *, rounds: int, start: int) -> None:
    if "type" not in params:
        raise _fail(where, "a drift event needs a 'type'")
    mode = params.setdefault("mode", "sudden")
    if mode not in DRIFT_MODES:
        raise _fail(where, f"unknown drift mode {mode!r}; valid: {', '.join(DRIFT_MODES)}")
    if mode == "incremental":
        ramp = params.setdefault("ramp", 5)
        if not _is_int(ramp) or ramp < 1:
            raise _fail(where, f"ramp must be a number of rounds >= 1, got {ramp!r}")
    if mode == "recurrent":
        until = params.get("until")
        if not _is_int(until) or not start < until <= rounds:
            raise _fail(where, f"a recurrent drift needs 'until', a round in {start + 1}..{rounds}")


def _check_delete(params: dict[str, Any], where: str, *, num_classes: int) -> None:
    what = params.get("what")
    if what not in DELETE_WHAT:
        raise _fail(where, f"unknown delete 'what' {what!r}; valid: {', '.join(DELETE_WHAT)}")
    if what == "class":
        cls = params.get("class")
        if not _is_int(cls) or not 0 <= cls < num_classes:
            raise _fail(
                where, f"class {cls!r} is not in the dataset (classes 0..{num_classes - 1})"
            )
    if what == "samples":
        has_ids, has_fraction = "samples" in params, "fraction" in params
        if has_ids == has_fraction:
            raise _fail(
                where, "a samples deletion needs exactly one of 'samples' (ids) or 'fraction'"
            )
        fraction = params.get("fraction")
        if has_fraction and not (_is_real(fraction) and 0 < fraction <= 1):
            raise _fail(where, f"fraction must be a number in (0, 1], got {fraction!r}")
        ids = params.get("samples")
        if has_ids and not (
            isinstance(ids, Sequence)
            and not isinstance(ids, str)
            and ids
            and all(_is_int(i) and i >= 0 for i in ids)
        ):
            raise _fail(where, f"samples must be a non-empty list of sample ids >= 0, got {ids!r}")


# Expected events per generator over the whole run: more would take minutes to draw and parse.
MAX_GENERATED = 1_000_000
_DRAWN_KEYS = ("round", "clients")  # what a generator draws for each of its events
_GENERATOR_KEYS = ("rate", "clients_per_event", "from_round")  # not passed on to its events


def generate_events(
    generators: Sequence[Mapping[str, Any]],
    *,
    rounds: int,
    num_clients: int,
    rng_for: Any,
    check: Callable[[dict[str, Any], str], Any] | None = None,
) -> list[dict[str, Any]]:
    """Config events drawn from rates: each generator `{kind, rate, clients_per_event, from_round,
    ...}` fires Poisson(`rate`) times per round from round `from_round` (default 1), each time on
    `clients_per_event` (default 1) clients drawn at random; its other keys become the event's
    parameters. `rng_for(i, round)` gives the Generator of generator i in that round, so the
    timeline depends on the seed alone.

    Every generator is validated before anything is drawn, whether or not it would fire: its
    own keys here, and the event it makes by `check(event, where)` (which raises
    `ConfigError`), called with an event of its first round. Raises a one-line `ConfigError`
    naming `generate[i]`."""
    drawn: list[dict[str, Any]] = []
    for i, spec in enumerate(generators):
        spec = dict(spec)
        where = f"generate[{i}]"
        rate, per_event, first = _check_generator(spec, where, rounds, num_clients)
        template = {k: v for k, v in spec.items() if k not in _GENERATOR_KEYS}
        if check is not None:
            check({**template, "round": first, "clients": list(range(per_event))}, where)
        for server_round in range(first, rounds + 1):
            rng = rng_for(i, server_round)
            for _ in range(rng.poisson(rate)):
                clients = sorted(int(c) for c in rng.choice(num_clients, per_event, replace=False))
                drawn.append({**template, "round": server_round, "clients": clients})
    return drawn


def _check_generator(
    spec: dict[str, Any], where: str, rounds: int, num_clients: int
) -> tuple[float, int, int]:
    """A generator's (rate, clients_per_event, first round), checked."""
    if spec.get("kind") not in EVENT_KINDS:
        raise _fail(where, f"unknown kind {spec.get('kind')!r}; valid: {', '.join(EVENT_KINDS)}")
    drawn = [k for k in _DRAWN_KEYS if k in spec]
    if drawn:
        raise _fail(where, f"'{drawn[0]}' is drawn for each event; a generator cannot set it")
    rate = spec.get("rate")
    if not (_is_real(rate) and rate >= 0):
        raise _fail(
            where, f"needs 'rate', a number >= 0 of expected events per round, got {rate!r}"
        )
    per_event = spec.get("clients_per_event", 1)
    if not (_is_int(per_event) and 1 <= per_event <= num_clients):
        raise _fail(where, f"clients_per_event must be in 1..{num_clients}, got {per_event!r}")
    first = spec.get("from_round", 1)
    if not (_is_int(first) and 1 <= first <= rounds):
        raise _fail(where, f"from_round must be a round in 1..{rounds}, got {first!r}")
    expected = rate * (rounds - first + 1)
    if expected > MAX_GENERATED:
        raise _fail(
            where,
            f"rate {rate:g} over {rounds - first + 1} rounds draws about {expected:.3g} events; "
            f"at most {MAX_GENERATED:.0e} are supported",
        )
    return float(rate), per_event, first


def build_timeline(events: Sequence[Event]) -> tuple[Event, ...]:
    """Events in application order (by round, then as given), each with its timeline index."""
    ordered = sorted(enumerate(events), key=lambda pair: (pair[1].round, pair[0]))
    return tuple(
        Event(e.round, e.kind, e.clients, dict(e.params), index=i)
        for i, (_, e) in enumerate(ordered)
    )


def events_at(timeline: Sequence[Event], server_round: int) -> list[Event]:
    """The events applied at the start of `server_round`, found by bisection: `timeline` must be in
    round order, as `build_timeline` returns it (cost: log of the timeline's length)."""
    first = bisect.bisect_left(timeline, server_round, key=_round_of)
    last = bisect.bisect_right(timeline, server_round, lo=first, key=_round_of)
    return list(timeline[first:last])


def _round_of(event: Event) -> int:
    return event.round
