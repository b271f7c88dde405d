"""Checkpoints: a run's latest complete state, written safely and read back without running code.

A checkpoint is a folder, `checkpoints/round_XXXXX/`, holding the state after round XXXXX:

    model.npz      the global arrays
    strategy.npz   the strategy's `state_dict()` (absent when the strategy cannot be saved)
    clients.npz    every node's `Context.state` (replay buffers, counters, ...)
    state.json     the round, the accuracy before training, the deletion audit, the strategy's
                   class (and why it could not be saved), the resolved `engine.vectorize`
    MANIFEST.json  size and SHA-256 of each file above; written last

The .npz files hold plain arrays only (`fedcl.engine.record_codec`) and are read with
`allow_pickle=False`. A checkpoint is written into a temporary folder (each file fsynced, the
manifest last), renamed into place, and the parent folder fsynced: a crash leaves either the
whole checkpoint or none. One whose manifest is missing or disagrees with its files is skipped in
favour of the previous good one.

What a checkpoint does not hold is rebuilt. The scenario keeps no state that the rounds change:
`Scenario` is frozen, built from the config and the seed (which `config.yaml` keeps), and answers
every question by round from tables made up front (each sample's deletion round, each client's
task starts and drift spans), so rebuilding it gives the state of any round; what does change,
each client's replay buffer, lives in its `Context.state`. The records so far are re-read from
`metrics.jsonl`. A resume (`prepare_resume`, then `restore`) rebuilds the strategy and the
actors from `config.yaml`, loads the state into them, and runs the rounds after the checkpoint's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from flwr.app import ArrayRecord, RecordDict
from omegaconf import DictConfig

from fedcl.config import load_config
from fedcl.engine.grid import RayGrid
from fedcl.engine.record_codec import (
    UnencodableError,
    decode_records,
    encode_records,
    from_npz_bytes,
    merge_encoded,
    to_npz_bytes,
)
from fedcl.errors import FedclError
from fedcl.metrics.continual import read_metrics
from fedcl.metrics.recorder import RunLock
from fedcl.strategies.base import attribute_state, load_attribute_state

logger = logging.getLogger(__name__)

FORMAT = 1
FOLDER = "checkpoints"
MANIFEST = "MANIFEST.json"
MODEL, STRATEGY, CLIENTS, STATE = "model.npz", "strategy.npz", "clients.npz", "state.json"
_NAME = re.compile(r"^round_(\d+)$")
_MODEL_RECORD = "arrays"


class CorruptCheckpoint(Exception):
    """A checkpoint folder whose manifest is missing or does not match its files."""


# --- writing --------------------------------------------------------------------------------
def strategy_state(strategy: Any) -> tuple[RecordDict | None, str | None]:
    """(state, None), or (None, why the strategy cannot be saved).

    The strategy's own `state_dict()` if it has one (every `ContinualStrategy`), else its
    attributes taken as arrays and scalars (`attribute_state`: stock Flower strategies).
    """
    try:
        state_dict = getattr(strategy, "state_dict", None)
        state = state_dict() if callable(state_dict) else attribute_state(strategy)
    except NotImplementedError as exc:
        return None, str(exc) or f"{type(strategy).__name__}.state_dict is not implemented"
    if not isinstance(state, RecordDict):
        return None, f"{type(strategy).__name__}.state_dict returned {type(state).__name__}"
    return state, None


def load_strategy_state(strategy: Any, state: RecordDict) -> None:
    """Give `strategy` back the state `strategy_state` took."""
    load_state_dict = getattr(strategy, "load_state_dict", None)
    if callable(load_state_dict):
        load_state_dict(state)
    else:
        load_attribute_state(strategy, state)


def client_states(grid: RayGrid) -> dict[str, np.ndarray]:
    """Every node's `Context.state`, encoded by the actors themselves (in parallel)."""
    return merge_encoded(ray.get([actor.export_state_arrays.remote() for actor in grid.actors]))


@dataclass
class Snapshot:
    """What one checkpoint holds, in memory."""

    server_round: int
    arrays: ArrayRecord
    strategy: Any
    clients: dict[str, np.ndarray]
    init_acc: dict[str, float]
    audit: dict[str, Any]
    vectorize: str


@dataclass
class Written:
    """A checkpoint just written: its folder, its size, and why the strategy was not saved."""

    path: Path
    size: int
    unsaved_strategy: str | None


def write_checkpoint(run_dir: Path, snapshot: Snapshot) -> Written:
    """Write `snapshot` as `checkpoints/round_XXXXX/` atomically.

    The strategy is saved through `strategy_state`; when it cannot be, state.json says why and
    no strategy.npz is written (a resume from it is then refused).
    """
    model = encode_records({0: RecordDict({_MODEL_RECORD: snapshot.arrays})})
    files = {MODEL: to_npz_bytes(model), CLIENTS: to_npz_bytes(snapshot.clients)}
    state, why = strategy_state(snapshot.strategy)
    if state is not None:
        try:
            files[STRATEGY] = to_npz_bytes(encode_records({0: state}))
        except UnencodableError as exc:
            why = f"its state_dict holds {exc}"
    cls = type(snapshot.strategy)
    name = f"{cls.__module__}:{cls.__qualname__}"
    unsaved = None if STRATEGY in files else f"strategy {name} cannot be saved: {why}"
    # Python's JSON keeps NaN and every float exactly, as the summary computed from them needs.
    files[STATE] = json.dumps(
        {
            "format": FORMAT,
            "round": snapshot.server_round,
            "init_acc": snapshot.init_acc,
            "audit": snapshot.audit,
            "strategy": {"class": name, "saved": unsaved is None, "reason": unsaved},
            "engine": {"vectorize": snapshot.vectorize},
        },
        indent=1,
    ).encode()
    path = checkpoint_dir(run_dir, snapshot.server_round)
    _write_folder(path, files)
    return Written(path, sum(len(data) for data in files.values()), unsaved)


def checkpoint_dir(run_dir: Path, server_round: int) -> Path:
    """The folder of the checkpoint after `server_round`."""
    return Path(run_dir) / FOLDER / f"round_{server_round:05d}"


def _write_folder(target: Path, files: dict[str, bytes]) -> None:
    """`files` in folder `target`, all or nothing: temp folder, fsyncs, manifest last, rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest: dict[str, Any] = {"format": FORMAT, "files": {}}
    for name, data in files.items():
        _write_synced(tmp / name, data)
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if target.exists():  # a leftover of an earlier attempt at this round (never a good one)
        shutil.rmtree(target)
    os.rename(tmp, target)
    _fsync_dir(target.parent)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints."""
    for _, path in list(_checkpoints(run_dir))[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def _checkpoints(run_dir: Path) -> Iterator[tuple[int, Path]]:
    """(round, folder) of every checkpoint folder, newest first (good or not)."""
    folder = Path(run_dir) / FOLDER
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return iter(sorted(found, reverse=True))


# --- reading --------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A checkpoint read back and verified against its manifest."""

    path: Path
    server_round: int
    state: dict[str, Any]
    files: dict[str, bytes] = field(repr=False)

    def arrays(self) -> ArrayRecord:
        """The global arrays after `server_round`."""
        return decode_records(from_npz_bytes(self.files[MODEL]))[0][_MODEL_RECORD]

    def strategy_state(self) -> RecordDict:
        """The strategy's saved state (only where `state["strategy"]["saved"]`)."""
        return decode_records(from_npz_bytes(self.files[STRATEGY]))[0]

    def client_states(self) -> dict[int, RecordDict]:
        """Every node's `Context.state` (node id -> RecordDict)."""
        return decode_records(from_npz_bytes(self.files[CLIENTS]))


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in folder `path`, every file checked against the manifest.

    Raises `CorruptCheckpoint` naming the first problem (no manifest, a missing, truncated or
    altered file).
    """
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"no readable {MANIFEST} ({type(exc).__name__})") from None
    if manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"format {manifest.get('format')!r}, this fedcl reads {FORMAT}")
    files = {}
    for name, entry in listed.items():
        try:
            data = (path / name).read_bytes()
        except OSError:
            raise CorruptCheckpoint(f"{name} is missing") from None
        if len(data) != entry["bytes"]:
            raise CorruptCheckpoint(
                f"{name} has {len(data)} bytes, the manifest says {entry['bytes']}"
            )
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptCheckpoint(f"{name} does not match its SHA-256 in the manifest")
        files[name] = data
    for name in (MODEL, CLIENTS, STATE):
        if name not in files:
            raise CorruptCheckpoint(f"the manifest lists no {name}")
    state = json.loads(files[STATE])
    match = _NAME.match(path.name)
    if match is None or state.get("round") != int(match.group(1)):
        raise CorruptCheckpoint(
            f"state.json says round {state.get('round')}, the folder {path.name}"
        )
    return Checkpoint(path, int(state["round"]), state, files)


def latest_checkpoint(
    run_dir: Path, max_round: int | None = None
) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest good checkpoint (of a round <= `max_round`), and the (folder, problem) of each
    newer one that is corrupt."""
    bad = []
    for server_round, path in _checkpoints(run_dir):
        if max_round is not None and server_round > max_round:
            continue
        try:
            return read_checkpoint(path), bad
        except CorruptCheckpoint as exc:
            bad.append((path, str(exc)))
    return None, bad


# --- resuming -------------------------------------------------------------------------------
def finished_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """summary.json of the run in `run_dir` if that run completed, else None."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "completed" else None


@dataclass
class ResumePoint:
    """Where a resumed run starts: its folder (locked), the checkpoint (None: from round 1) and
    the records of the rounds up to it."""

    run_dir: Path
    lock: RunLock
    checkpoint: Checkpoint | None
    records: list[dict[str, Any]]

    @property
    def server_round(self) -> int:
        """The last round the checkpoint holds (0 without one)."""
        return self.checkpoint.server_round if self.checkpoint is not None else 0


def prepare_resume(run_dir: str | Path) -> tuple[DictConfig, ResumePoint]:
    """Lock `run_dir`, find its latest good checkpoint, and cut the run folder back to it.

    Returns the run's config (from its config.yaml) and the `ResumePoint`, which holds the lock
    (release it when the run ends). Raises `FedclError` (one line) when `run_dir` holds no run,
    another process writes it, or its checkpoint has no strategy state. Corrupt checkpoints newer
    than the good one are deleted, with a warning; without any good checkpoint the run starts
    again from round 1. The records after the checkpoint (metrics.jsonl, events.jsonl,
    trained_samples/) are removed: the resumed rounds write them again.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FedclError(f"nothing to resume in {run_dir}: no config.yaml (not a fedcl run folder)")
    lock = RunLock.acquire(run_dir)
    try:
        cfg = load_config(run_dir / "config.yaml")
        metrics = run_dir / "metrics.jsonl"
        records = read_metrics(metrics) if metrics.exists() else []
        whole = 0  # metrics.jsonl holds rounds 1..whole
        while whole < len(records) and records[whole].get("round") == whole + 1:
            whole += 1
        checkpoint, bad = latest_checkpoint(run_dir, max_round=whole)
        if checkpoint is not None and not checkpoint.state["strategy"]["saved"]:
            reason = checkpoint.state["strategy"]["reason"]
            raise FedclError(f"cannot resume {run_dir}: {reason}")
        for path, problem in bad:
            logger.warning("skipping checkpoint %s: %s", path, problem)
        point = ResumePoint(
            run_dir, lock, checkpoint, records[: checkpoint.server_round if checkpoint else 0]
        )
        _discard_after(run_dir, point.server_round)
        if checkpoint is not None and cfg.engine.vectorize == "auto":
            # auto is decided by timing; the resumed rounds must train as the first ones did.
            cfg.engine.vectorize = checkpoint.state["engine"]["vectorize"]
        return cfg, point
    except BaseException:
        lock.release()
        raise


def _discard_after(run_dir: Path, server_round: int) -> None:
    """Remove what the rounds after `server_round` left in the run folder."""
    _keep_lines(run_dir / "metrics.jsonl", server_round)
    _keep_lines(run_dir / "events.jsonl", server_round)
    for path in (run_dir / "trained_samples").glob("round_*.npz"):
        if int(path.stem.split("_")[1]) > server_round:
            path.unlink()
    (run_dir / "summary.json").unlink(missing_ok=True)
    for found, path in _checkpoints(run_dir):
        if found > server_round:
            shutil.rmtree(path)
    folder = run_dir / FOLDER
    for path in folder.glob(".round_*.tmp-*") if folder.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True)


def _keep_lines(path: Path, server_round: int) -> None:
    """Keep the JSON lines of `path` whose round is <= `server_round` (a cut-off last line goes)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            break
        if entry.get("round", 0) <= server_round:
            kept.append(line + "\n")
    tmp = path.with_suffix(path.suffix + ".tmp")
    _write_synced(tmp, "".join(kept).encode())
    os.replace(tmp, path)


@dataclass
class Restored:
    """The loop's state after the checkpoint's round, as `_round_loop` continues from it."""

    server_round: int
    arrays: ArrayRecord
    init_acc: dict[str, float]
    records: list[dict[str, Any]]
    audit: dict[str, Any]


def restore(point: ResumePoint, strategy: Any, grid: RayGrid) -> Restored | None:
    """Load the checkpoint of `point` into `strategy` and the actors of `grid`; return what the
    round loop continues from (None: no checkpoint, the loop starts at round 1).

    Call it after `on_run_start` and before the first round. Raises `FedclError` when the
    strategy built from config.yaml is not the class the checkpoint saved.
    """
    checkpoint = point.checkpoint
    if checkpoint is None:
        return None
    cls = type(strategy)
    saved = checkpoint.state["strategy"]["class"]
    if f"{cls.__module__}:{cls.__qualname__}" != saved:
        raise FedclError(
            f"cannot resume {point.run_dir}: the checkpoint holds strategy {saved}, the config "
            f"builds {cls.__module__}:{cls.__qualname__}"
        )
    load_strategy_state(strategy, checkpoint.strategy_state())
    grid.import_states(checkpoint.client_states())
    return Restored(
        checkpoint.server_round,
        checkpoint.arrays(),
        dict(checkpoint.state["init_acc"]),
        point.records,
        dict(checkpoint.state["audit"]),
    )
