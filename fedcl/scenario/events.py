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
from collections.abc import Mapping, Sequence
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
    if not isinstance(server_round, int) or not 1 <= server_round <= rounds:
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
        if not isinstance(task, int) or not 0 <= task < num_tasks:
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
    bad = [c for c in clients if not isinstance(c, int) or not 0 <= c < num_clients]
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
        if not isinstance(ramp, int) or ramp < 1:
            raise _fail(where, f"ramp must be a number of rounds >= 1, got {ramp!r}")
    if mode == "recurrent":
        until = params.get("until")
        if not isinstance(until, int) or not start < until <= rounds:
            raise _fail(where, f"a recurrent drift needs 'until', a round in {start + 1}..{rounds}")


def _check_delete(params: dict[str, Any], where: str, *, num_classes: int) -> None:
    what = params.get("what")
    if what not in DELETE_WHAT:
        raise _fail(where, f"unknown delete 'what' {what!r}; valid: {', '.join(DELETE_WHAT)}")
    if what == "class":
        cls = params.get("class")
        if not isinstance(cls, int) or not 0 <= cls < num_classes:
            raise _fail(
                where, f"class {cls!r} is not in the dataset (classes 0..{num_classes - 1})"
            )
    if what == "samples":
        has_ids, has_fraction = "samples" in params, "fraction" in params
        if has_ids == has_fraction:
            raise _fail(
                where, "a samples deletion needs exactly one of 'samples' (ids) or 'fraction'"
            )
        if has_fraction and not 0 < float(params["fraction"]) <= 1:
            raise _fail(where, f"fraction must be in (0, 1], got {params['fraction']!r}")


def generate_events(
    generators: Sequence[Mapping[str, Any]],
    *,
    rounds: int,
    num_clients: int,
    rng_for: Any,
) -> list[dict[str, Any]]:
    """Config events drawn from rates: each generator `{kind, rate, clients_per_event, ...}` fires
    Poisson(`rate`) times per round, each time on `clients_per_event` clients drawn at random;
    its other keys become the event's parameters. `rng_for(i, round)` gives the Generator of
    generator i in that round, so the timeline depends on the seed alone."""
    drawn: list[dict[str, Any]] = []
    for i, spec in enumerate(generators):
        spec = dict(spec)
        where = f"generate[{i}]"
        if "rate" not in spec or float(spec["rate"]) < 0:
            raise _fail(where, "needs a non-negative 'rate' (expected events per round)")
        rate = float(spec.pop("rate"))
        per_event = int(spec.pop("clients_per_event", 1))
        if not 1 <= per_event <= num_clients:
            raise _fail(where, f"clients_per_event must be in 1..{num_clients}, got {per_event}")
        first = int(spec.pop("from_round", 1))
        for server_round in range(max(1, first), rounds + 1):
            rng = rng_for(i, server_round)
            for _ in range(rng.poisson(rate)):
                clients = sorted(int(c) for c in rng.choice(num_clients, per_event, replace=False))
                drawn.append({**spec, "round": server_round, "clients": clients})
    return drawn


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
