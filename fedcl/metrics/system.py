"""System figures of a run: bytes moved between the driver and the actors, and peak memory.

* Bytes: what crossed between the driver and the actors. Everything that crosses is bytes
  fedcl pickles itself (`fedcl.engine.packing`): each message content the driver puts in the
  object store, each actor call's arguments (message metadata, the sum plan), each call's result.
  `fedcl.engine.grid.RayGrid` counts their lengths per actor call: a content goes to every actor
  that serves one of its messages (each actor reads it), a call sent again after an actor died
  counts again, and a reply summed on its actor counts as what crossed (the stub and the actor's
  one sum), not as a whole model.
* Peak memory: the peak resident set size (``ru_maxrss``) of the driver and of each actor
  process, so far. Pages of Ray's shared object store count in every process that maps them:
  the sum over processes is an upper bound.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Mapping, Sequence
from typing import Any

MB = 1024 * 1024
# What a metrics.jsonl line and summary.json measure of the machine rather than of the learning:
# they differ between runs of the same seed (memory always; bytes and messages per actor with the
# number of actors, bytes in the first round after a resume), so comparisons of runs leave them out.
MEASURED_RECORD_KEYS = (
    "bytes_sent",
    "bytes_received",
    "peak_rss_driver_mb",
    "peak_rss_actors_mb",
    "messages_per_actor",
)
MEASURED_SUMMARY_KEYS = (
    "bytes_sent",
    "bytes_received",
    "bytes_sent_per_round",
    "bytes_received_per_round",
    "peak_rss_driver_mb",
    "peak_rss_actor_mb",
    "peak_rss_actors_total_mb",
)
# ru_maxrss is in kibibytes on Linux, in bytes on macOS.
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes: never less than what it holds
    now. Linux updates ``ru_maxrss`` from approximate per-CPU page counters, so it can trail
    the resident size read this moment by a few hundred kB; the larger of the two is the peak."""
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * _RSS_UNIT
    return max(peak, _resident_bytes())


def _resident_bytes() -> int:
    """The resident set size now (Linux's /proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def system_record(grid: Any) -> dict[str, Any]:
    """A round's system figures for metrics.jsonl, from a grid with `take_traffic` and
    `actor_peak_rss` (`fedcl.engine.grid.RayGrid`): ``bytes_sent`` and ``bytes_received`` since
    the last call, ``peak_rss_driver_mb`` and ``peak_rss_actors_mb`` (one per actor slot, as its
    latest reply reported it; 0 before its first) and ``messages_per_actor`` (how many messages
    each actor was sent: with `engine.balance`, no actor more than one over another per push)."""
    sent, received = grid.take_traffic()
    return {
        "messages_per_actor": grid.take_loads(),
        "bytes_sent": sent,
        "bytes_received": received,
        "peak_rss_driver_mb": peak_rss_bytes() / MB,
        "peak_rss_actors_mb": [peak / MB for peak in grid.actor_peak_rss],
    }


def system_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """summary.json's system keys from the rounds' records: ``bytes_sent`` and
    ``bytes_received`` (totals) and their means per round (``..._per_round``),
    ``peak_rss_driver_mb``, ``peak_rss_actor_mb`` (the largest actor) and
    ``peak_rss_actors_total_mb`` (each actor slot's peak, summed: an upper bound, see the module
    docstring). Keys a run did not record are left out."""
    rows = [r for r in records if "bytes_sent" in r]
    if not rows:
        return {}
    sent = sum(r["bytes_sent"] for r in rows)
    received = sum(r["bytes_received"] for r in rows)
    per_actor: dict[int, float] = {}
    for row in rows:
        for slot, peak in enumerate(row.get("peak_rss_actors_mb") or []):
            per_actor[slot] = max(per_actor.get(slot, 0.0), peak)
    return {
        "bytes_sent": sent,
        "bytes_received": received,
        "bytes_sent_per_round": sent / len(rows),
        "bytes_received_per_round": received / len(rows),
        "peak_rss_driver_mb": max(r["peak_rss_driver_mb"] for r in rows),
        "peak_rss_actor_mb": max(per_actor.values(), default=None),
        "peak_rss_actors_total_mb": sum(per_actor.values()) if per_actor else None,
    }
