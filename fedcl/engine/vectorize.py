"""Resolving ``engine.vectorize`` on the driver, once per run, so every actor trains the same way.

``on`` and ``off`` are taken as given (``on`` falls back to ``off``, said once, where the model or
the ClientApp cannot be vectorized). ``auto`` vectorizes where `vectorization_gain` measures a
gain for this model, batch size and clients per actor on this machine; the decision is kept in the
cache folder, so later runs of the same setting decide alike (and give the same metrics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedcl.client.batched import batched_forward
from fedcl.client.vectorized import can_vectorize, vectorization_gain
from fedcl.config import DEFAULT_APP

logger = logging.getLogger(__name__)

MIN_GAIN = 1.1  # auto vectorizes above this measured speed-up (below it the noise dominates)
PROBE_FILE = "vectorize-probe.json"


def resolve_vectorize(
    mode: str,
    *,
    model: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    batch_size: int,
    clients_per_round: int,
    client_app: str,
    device: str,
    cache: Path | None,
) -> tuple[str, str]:
    """("on" | "off", why) for the run; `cache` is the folder for auto's decisions (None: none).

    The decision depends on the clients trained per round, not on how many actors share them:
    vectorized results do not depend on how clients are grouped, so a run gives the same metrics
    with any number of actors."""
    if mode == "off":
        return "off", "engine.vectorize=off"
    if client_app != DEFAULT_APP:
        return "off", f"client.app {client_app} is not fedcl's default ClientApp"
    if clients_per_round < 2:
        return "off", "at most one client trains in a round"
    reason = can_vectorize(model, tuple(input_shape))
    if reason is not None:
        return "off", f"the model cannot be vectorized: {reason}"
    if mode == "on":
        return "on", "engine.vectorize=on"
    clients = min(clients_per_round, 32)
    key = _probe_key(model, input_shape, num_classes, batch_size, clients, device)
    decisions = _read(cache)
    if key not in decisions:
        gain = vectorization_gain(
            model,
            tuple(input_shape),
            num_classes,
            batch_size=batch_size,
            clients=clients,
            device=device,
        )
        decisions[key] = round(gain, 3)
        _write(cache, decisions)
    gain = decisions[key]
    verdict = "on" if gain > MIN_GAIN else "off"
    return verdict, f"engine.vectorize=auto: probe measured {gain:.2f}x over sequential"


def _probe_key(model, input_shape, num_classes, batch_size, clients, device) -> str:
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    # How vectorized steps run (batched layers or vmap) is part of what the probe measured.
    stepping = "batched" if batched_forward(model)[0] is not None else "vmap"
    text = repr(
        (type(model).__name__, shapes, tuple(input_shape), num_classes, batch_size, clients)
        + (device, torch.__version__, torch.get_num_threads(), os.cpu_count(), stepping)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(cache: Path | None) -> dict[str, float]:
    if cache is None or not (cache / PROBE_FILE).is_file():
        return {}
    try:
        return json.loads((cache / PROBE_FILE).read_text())
    except (OSError, ValueError):  # a damaged cache is only a cache: probe again
        return {}


def _write(cache: Path | None, decisions: dict[str, float]) -> None:
    if cache is None:
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"{PROBE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(decisions, indent=1))
        os.replace(tmp, cache / PROBE_FILE)
    except OSError as exc:  # a read-only cache costs a probe per run, nothing else
        logger.warning("cannot write the vectorize probe cache in %s: %s", cache, exc)
