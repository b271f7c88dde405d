"""The run folder: config.yaml, metrics.jsonl (a line per round), summary.json, plots."""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fedcl.errors import FedclError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null, tuples become lists, numpy scalars Python."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def ensure_no_run_in(out_dir: str | Path) -> None:
    """Raise `FedclError` if `out_dir` already holds a run (so no run is ever overwritten)."""
    existing = [name for name in RUN_FILES if (Path(out_dir) / name).exists()]
    if existing:
        raise FedclError(
            f"{out_dir} already holds a run ({existing[0]}); choose another --out folder, "
            f"or continue that run: fedcl run --resume {out_dir}"
        )


def check_out_dir(out_dir: str | Path, *, resuming: bool = False) -> None:
    """Raise a one-line `FedclError` unless a run can be written to `out_dir`: a folder, or a
    path that can be made one, writable, and (unless `resuming` the run it holds) holding no run.

    Leaves no trace: whether the folder it would be made in is writable is tried by making and
    removing an empty folder there (as root, permission bits say nothing: /proc or a read-only
    mount refuse anyway).
    """
    path = Path(out_dir)
    try:
        if path.exists() and not path.is_dir():
            raise FedclError(f"{out_dir} is a file, not a folder; choose another --out folder")
        # `path` itself, or the folder it would be made in.
        base = next(p for p in (path, *path.parents) if p.exists())
        if not base.is_dir():
            raise FedclError(f"{out_dir} lies under the file {base}; choose another --out folder")
    except OSError as exc:  # e.g. a folder on the way that may not be read
        raise FedclError(f"cannot use {out_dir}: {exc.strerror or exc}") from None
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedcl-write-test-", dir=base))
    except OSError as exc:
        raise FedclError(
            f"cannot write a run to {out_dir}: no folder can be made in {base} "
            f"({exc.strerror or exc}); choose another --out folder"
        ) from None
    if not resuming:
        ensure_no_run_in(path)


LOCK_FILE = ".fedcl-run.lock"


class RunLock:
    """The claim of one process on a run folder: only its holder writes the folder.

    An exclusive `flock` on `.fedcl-run.lock`, which also names the holder (pid, host). The
    kernel drops the flock when its process dies, even by SIGKILL, so a lock left by a dead
    run is stale by construction and the next claim takes it over.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, folder: str | Path) -> RunLock:
        """Claim `folder` (which must exist); raise `FedclError` naming the holder if a live
        process holds it, this one included."""
        path = Path(folder) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FedclError(
                f"{folder} is in use by another fedcl run ({holder}); wait for it to end"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        """Give the folder up (again: nothing happens)."""
        if self._fd is None:
            return
        # The file stays: removing it would let a process that opened it a moment before lock
        # an unlinked file while a third locks a new one.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


class RunRecorder:
    """Writes one run's files; refuses a folder that already holds a run, so none is overwritten,
    and one that another process writes (`RunLock`).

    With `lock` (a resumed run, whose folder `fedcl.engine.checkpoint.prepare_resume` claimed and
    cut back to its checkpoint) it appends to the folder's files instead, and keeps config.yaml.
    """

    def __init__(self, out_dir: str | Path, config_yaml: str, lock: RunLock | None = None) -> None:
        self.out_dir = Path(out_dir)
        if lock is None:
            ensure_no_run_in(self.out_dir)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock.acquire(self.out_dir)
            try:
                ensure_no_run_in(self.out_dir)  # again, holding the lock: one run per folder
            except FedclError:
                lock.release()
                raise
            (self.out_dir / "config.yaml").write_text(config_yaml)
        self.lock = lock
        self._metrics = (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._events: TextIO | None = None  # events.jsonl, opened at the first event

    def record_round(self, row: dict[str, Any]) -> None:
        """Append one round's metrics as a JSON line, flushed so a crash loses nothing written."""
        self._metrics.write(json.dumps(_json_safe(row)) + "\n")
        self._metrics.flush()

    def record_event(self, entry: dict[str, Any]) -> None:
        """Append one applied event to events.jsonl."""
        if self._events is None:
            self._events = (self.out_dir / "events.jsonl").open("a", encoding="utf-8")
        self._events.write(json.dumps(_json_safe(entry)) + "\n")
        self._events.flush()

    def write_deletion_ids(self, name: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write `arrays` (one delete event's ids) to `name`, a path relative to the run folder,
        as a compressed .npz, atomically: a file that exists is whole."""
        path = self.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        _atomic_write(path, buffer.getvalue())
        return path

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write summary.json (last, so its presence means the run completed)."""
        path = self.out_dir / "summary.json"
        _atomic_write(path, json.dumps(_json_safe(summary), indent=2).encode())
        return path

    def sync(self) -> None:
        """Force the lines written so far to disk (a checkpoint relies on its rounds' lines)."""
        for file in (self._metrics, self._events):
            if file is not None:
                file.flush()
                os.fsync(file.fileno())

    def close(self) -> None:
        """Close the metrics and events files and give the folder up."""
        self._metrics.close()
        if self._events is not None:
            self._events.close()
        self.lock.release()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
