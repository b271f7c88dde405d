"""Checkpoints and resume: a driver killed with SIGKILL and resumed ends as an uninterrupted run;
damaged checkpoints are skipped; checkpoints hold no pickle; one run per folder; finished runs
are left alone; every saved state (strategies, client records, audit) comes back exactly."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM
from momentum_ewc import MomentumEWC

import fedcl
from fedcl.cli import main
from fedcl.config import load_config, to_yaml
from fedcl.engine.audit import DeletionAudit
from fedcl.engine.checkpoint import (
    Snapshot,
    latest_checkpoint,
    load_strategy_state,
    prepare_resume,
    prune,
    read_checkpoint,
    strategy_state,
    write_checkpoint,
)
from fedcl.engine.record_codec import (
    decode_records,
    encode_records,
    from_npz_bytes,
    merge_encoded,
    to_npz_bytes,
)
from fedcl.errors import ConfigError, FedclError
from fedcl.metrics.recorder import RunLock
from fedcl.metrics.system import MEASURED_RECORD_KEYS, MEASURED_SUMMARY_KEYS
from fedcl.strategies.fisher import FisherMerging
from fedcl.strategies.fot import FOT
from fedcl.strategies.prototypes import PrototypeAveraging
from fedcl.strategies.prototypes.math import PrototypeBank
from tests.engine.runs import read_jsonl

FEDCL = [sys.executable, "-m", "fedcl.cli"]
# Wall-clock, bytes and memory fields of a metrics.jsonl line ...
TIMINGS = ("round_s", "train_s", *MEASURED_RECORD_KEYS)
# ... and of summary.json.
WALL_CLOCK = ("wall_s", "loop_s", "client_updates_per_s", *MEASURED_SUMMARY_KEYS)

BASE = [
    "dataset.name=digits",
    "clients.num=4",
    "train.batch_size=16",
    "model.hidden=[32]",
    "engine.num_actors=2",
    "log.progress=false",
    "checkpoint.max_overhead=0",  # a checkpoint after every round, however long it takes
]
FEDAVG = [*BASE, "scenario.num_tasks=1", "rounds=8", "strategy.name=fedavg", "engine.vectorize=off"]
# FOT keeps a basis per layer from the first task end (round 3) on; clients keep replay buffers;
# client 0 deletes a quarter of its samples at round 7, after the kill.
FOT_REPLAY = [
    *BASE,
    "scenario.num_tasks=3",
    "rounds=9",
    "strategy.name=fot",
    "train.replay_size=20",
    "engine.vectorize=on",
    "events=[{round: 7, kind: delete, clients: [0], what: samples, fraction: 0.25}]",
]


# --- helpers --------------------------------------------------------------------------------
def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FEDCL, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _run_and_stop(overrides: list[str], out: Path, after: int) -> subprocess.Popen:
    """Start `fedcl run` on `overrides`; freeze it (SIGSTOP) once metrics.jsonl has `after`
    lines, so that it is alive but goes no further until `_kill`."""
    config = out.parent / "empty.yaml"
    config.write_text("name: killed\n")
    process = subprocess.Popen(
        [*FEDCL, "run", str(config), *overrides, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while len(_lines(out / "metrics.jsonl")) < after:
        assert process.poll() is None, f"the run ended before round {after}: {process.stderr}"
        assert time.monotonic() < deadline, "the run did not reach the kill round in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGSTOP)
    return process


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL, as a pre-empted or OOM-killed driver dies: no cleanup runs."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()


def _without(records: list[dict], keys: tuple[str, ...]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in keys} for r in records]


def _summary(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in WALL_CLOCK}


def _checkpoint_rounds(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("round_*"))


def _trained_samples(run: Path) -> dict[str, dict[str, np.ndarray]]:
    found = {}
    for path in sorted((run / "trained_samples").glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            found[path.name] = {name: data[name] for name in data.files}
    return found


def _assert_same_run(resumed: Path, reference: Path) -> None:
    """metrics.jsonl, summary.json (but wall-clock fields), events.jsonl and trained_samples/
    of `resumed` equal those of `reference`."""
    records = read_jsonl(resumed / "metrics.jsonl")
    assert _without(records, TIMINGS) == _without(read_jsonl(reference / "metrics.jsonl"), TIMINGS)
    assert _summary(resumed) == _summary(reference)
    assert _lines(resumed / "events.jsonl") == _lines(reference / "events.jsonl")
    ours, theirs = _trained_samples(resumed), _trained_samples(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].keys() == theirs[name].keys()
        assert all(np.array_equal(ours[name][k], theirs[name][k]) for k in ours[name])


@pytest.fixture(scope="module")
def finished_result(tmp_path_factory, ray_session) -> fedcl.RunResult:
    """A completed 4-round FedAvg run keeping all 4 checkpoints (do not modify: copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return fedcl.run(None, *FEDAVG, "rounds=4", "checkpoint.keep=4", out=out)


@pytest.fixture(scope="module")
def finished_run(finished_result) -> Path:
    """The folder of `finished_result`."""
    return finished_result.out_dir


def _unfinished_copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of `finished` as a driver killed after its last checkpoint would leave it."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").unlink()
    return run


# --- a killed driver, resumed ---------------------------------------------------------------
@pytest.mark.usefixtures("ray_session")
def test_fedavg_killed_after_round_3_resumes_to_the_uninterrupted_metrics(tmp_path):
    killed = tmp_path / "killed"
    process = _run_and_stop(FEDAVG, killed, after=3)
    # While it runs, the folder is its own: a second run on it is refused, before Ray starts.
    second = _cli("run", "--resume", str(killed))
    _kill(process)
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1 and "in use by another fedcl run" in second.stderr
    assert not (killed / "summary.json").exists()
    saved = max(_checkpoint_rounds(killed))
    assert 2 <= saved < 8
    kept = _lines(killed / "metrics.jsonl")[:saved]

    resumed = _cli("run", "--resume", str(killed), "--quiet")
    assert resumed.returncode == 0, resumed.stderr

    # The rounds up to the checkpoint were not run again (their timings are the first run's)...
    assert _lines(killed / "metrics.jsonl")[:saved] == kept
    # ...and the run ends exactly as one that was never interrupted.
    reference = tmp_path / "reference"
    fedcl.run(None, *FEDAVG, out=reference)
    _assert_same_run(killed, reference)
    assert len(read_jsonl(killed / "metrics.jsonl")) == 8


@pytest.mark.slow  # the FedAvg kill-and-resume test covers resume in CI
@pytest.mark.usefixtures("ray_session")
def test_fot_with_replay_killed_after_round_5_resumes_to_the_uninterrupted_metrics(tmp_path):
    killed = tmp_path / "killed"
    _kill(_run_and_stop(FOT_REPLAY, killed, after=5))
    saved = max(_checkpoint_rounds(killed))
    assert saved >= 4  # after the first task end: FOT holds bases, clients replay buffers
    checkpoint = read_checkpoint(killed / "checkpoints" / f"round_{saved:05d}")
    bases = checkpoint.strategy_state()["fot.bases"]
    assert len(bases) > 0 and all(b.numpy().shape[1] > 0 for b in bases.values())
    buffers = [s["fedcl.replay"]["ids"].numpy() for s in checkpoint.client_states().values()]
    assert len(buffers) == 4 and all(len(b) == 20 for b in buffers)
    kept = _lines(killed / "metrics.jsonl")[:saved]

    result = fedcl.run(resume=killed)

    assert _lines(killed / "metrics.jsonl")[:saved] == kept
    reference = tmp_path / "reference"
    expected = fedcl.run(None, *FOT_REPLAY, out=reference)
    _assert_same_run(killed, reference)
    assert result.summary["deletion_audit"]["deleted"] > 0
    for name in expected.arrays:
        assert np.array_equal(result.arrays[name].numpy(), expected.arrays[name].numpy())
    assert all(
        torch.equal(result.strategy.bases[k], expected.strategy.bases[k])
        for k in expected.strategy.bases
    )


# --- damaged checkpoints --------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_good_one(
    finished_run, tmp_path, damage
):
    run = _unfinished_copy(finished_run, tmp_path)
    newest = run / "checkpoints" / "round_00004"
    if damage == "truncate":
        data = (newest / "clients.npz").read_bytes()
        (newest / "clients.npz").write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray((newest / "model.npz").read_bytes())
        data[-100] ^= 0xFF  # same size, different content
        (newest / "model.npz").write_bytes(bytes(data))
    else:
        (newest / "MANIFEST.json").unlink()

    checkpoint, bad = latest_checkpoint(run)
    assert checkpoint.server_round == 3
    assert [path.name for path, _ in bad] == ["round_00004"]

    _, point = prepare_resume(run)
    point.lock.release()
    assert point.server_round == 3
    assert not newest.exists()  # it would be written again by round 4
    assert len(_lines(run / "metrics.jsonl")) == 3
    assert [r["round"] for r in point.records] == [1, 2, 3]


@pytest.mark.usefixtures("ray_session")
def test_resuming_from_the_previous_checkpoint_gives_the_same_run(finished_run, tmp_path):
    run = _unfinished_copy(finished_run, tmp_path)
    data = (run / "checkpoints" / "round_00004" / "clients.npz").read_bytes()
    (run / "checkpoints" / "round_00004" / "clients.npz").write_bytes(data[:100])

    fedcl.run(resume=run)

    _assert_same_run(run, finished_run)
    assert _checkpoint_rounds(run) == [1, 2, 3, 4]


def test_checkpoints_write_a_complete_folder_or_none(tmp_path, monkeypatch):
    import fedcl.engine.checkpoint as checkpoint_module

    def fail(path, data):  # the disk fills up while the clients' states are written
        if path.name == "clients.npz":
            raise OSError("No space left on device")
        (path).write_bytes(data)

    monkeypatch.setattr(checkpoint_module, "_write_synced", fail)
    with pytest.raises(OSError):
        write_checkpoint(tmp_path, _snapshot(FedAvg(), 1))
    assert _checkpoint_rounds(tmp_path) == []
    assert latest_checkpoint(tmp_path) == (None, [])


# --- no pickle ------------------------------------------------------------------------------
def test_checkpoint_files_are_plain_arrays_and_json_read_without_unpickling(
    finished_result, monkeypatch
):
    finished_run = finished_result.out_dir
    folder = finished_run / "checkpoints" / "round_00004"
    assert sorted(p.name for p in folder.iterdir()) == [
        "MANIFEST.json",
        "clients.npz",
        "model.npz",
        "state.json",
        "strategy.npz",
    ]
    for path in folder.glob("*.npz"):
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                header = archive.read(member)[:256]
                assert b"'descr': '|O'" not in header and b"'descr': 'O'" not in header
        with np.load(path, allow_pickle=False) as data:
            assert all(not data[name].dtype.hasobject for name in data.files)
    for name in ("state.json", "MANIFEST.json"):
        json.loads((folder / name).read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    checkpoint = read_checkpoint(folder)
    arrays = checkpoint.arrays()
    strategy = FedAvg()
    load_strategy_state(strategy, checkpoint.strategy_state())
    states = checkpoint.client_states()
    result = read_jsonl(finished_run / "metrics.jsonl")
    assert checkpoint.server_round == 4 and len(result) == 4
    assert set(states) == {1000, 1001, 1002, 1003}
    assert {s["fedcl"]["train-count"] for s in states.values()} == {4}
    final = finished_result.arrays
    assert list(arrays.keys()) == list(final.keys())
    for name, array in arrays.items():
        assert array.dtype == final[name].dtype and array.shape == final[name].shape
        assert np.array_equal(array.numpy(), final[name].numpy())


# --- one run per folder ---------------------------------------------------------------------
def test_a_folder_is_claimed_by_one_run_at_a_time(tmp_path):
    lock = RunLock.acquire(tmp_path)
    with pytest.raises(FedclError, match=f"in use by another fedcl run \\(pid {os.getpid()}"):
        RunLock.acquire(tmp_path)
    lock.release()
    RunLock.acquire(tmp_path).release()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fedcl.metrics.recorder import RunLock; "
            f"RunLock.acquire({str(tmp_path)!r}); print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FedclError, match=f"pid {holder.pid} on"):
        RunLock.acquire(tmp_path)
    holder.kill()
    holder.wait(timeout=30)
    holder.stdout.close()
    assert f"pid {holder.pid}" in (tmp_path / ".fedcl-run.lock").read_text()  # stale
    RunLock.acquire(tmp_path).release()


# --- a finished run -------------------------------------------------------------------------
def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    done = _cli("run", "--resume", str(finished_run), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"fedcl: {finished_run} already finished; nothing to resume\n"
    result = fedcl.run(resume=finished_run)
    assert result.summary == json.loads((finished_run / "summary.json").read_text())
    assert result.records == read_jsonl(finished_run / "metrics.jsonl")
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == before


def test_resume_refuses_a_folder_without_a_run_and_extra_arguments(tmp_path, capsys):
    with pytest.raises(FedclError, match="nothing to resume .* no config.yaml"):
        fedcl.run(resume=tmp_path)
    with pytest.raises(ConfigError, match="give no config, overrides or out"):
        fedcl.run(None, "rounds=3", resume=tmp_path)
    assert main(["run", "--resume", str(tmp_path), "rounds=3"]) == 2
    assert capsys.readouterr().err == (
        "fedcl: error: --resume takes the config from RUN_DIR/config.yaml: "
        "give no config, overrides or --out with it\n"
    )
    assert sorted(tmp_path.iterdir()) == []


# --- strategies that cannot be saved --------------------------------------------------------
class Unsaveable(FedAvg):
    """FedAvg holding an object a checkpoint cannot store."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.generator = np.random.default_rng(0)


def _snapshot(strategy, server_round: int) -> Snapshot:
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    clients = encode_records({1000: RecordDict({"s": ConfigRecord({"n": 1})})})
    return Snapshot(server_round, arrays, strategy, clients, {"0": 0.1}, {}, "off")


def test_an_unsaveable_strategy_is_named_in_the_checkpoint_and_resume_refuses(tmp_path):
    written = write_checkpoint(tmp_path, _snapshot(Unsaveable(), 1))
    assert "Unsaveable.generator holds a Generator" in written.unsaved_strategy
    state = json.loads((written.path / "state.json").read_text())
    assert state["strategy"]["saved"] is False
    assert not (written.path / "strategy.npz").exists()
    (tmp_path / "config.yaml").write_text(
        to_yaml(load_config(None, ["rounds=2", "scenario.num_tasks=1"]))
    )
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    with pytest.raises(FedclError, match="cannot resume .*Unsaveable.generator") as error:
        prepare_resume(tmp_path)
    assert "\n" not in str(error.value)
    RunLock.acquire(tmp_path).release()  # the refusal gave the folder back


# --- state round trips (no Ray) -------------------------------------------------------------
def _through_disk(state: RecordDict) -> RecordDict:
    return decode_records(from_npz_bytes(to_npz_bytes(encode_records({7: state}))))[7]


def _same_records(a: RecordDict, b: RecordDict) -> bool:
    if list(a.keys()) != list(b.keys()):
        return False
    for name in a:
        if type(a[name]) is not type(b[name]) or list(a[name].keys()) != list(b[name].keys()):
            return False
        for key, value in a[name].items():
            other = b[name][key]
            if isinstance(value, Array):
                x, y = value.numpy(), other.numpy()
                if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
                    return False
                if x.flags.f_contiguous != y.flags.f_contiguous:
                    return False
            elif type(value) is not type(other) or value != other:
                return False
    return True


def test_client_records_of_every_kind_come_back_exactly():
    states = {
        1000 + i: RecordDict(
            {
                "fedcl": ConfigRecord({"train-count": i}),
                "fedcl.replay": ArrayRecord(
                    {
                        "ids": Array(np.arange(i, dtype=np.int64)),  # ragged across nodes
                        "tasks": Array(np.full(i, i % 2, dtype=np.int64)),
                    }
                ),
                "mixed": ConfigRecord(
                    {
                        "s": f"node-{i}é",
                        "b": bytes([i, 0, 255]),
                        "f": 0.1 * i,
                        "t": i % 2 == 0,
                        "li": [i, -i],
                        "lf": [1.5, float(i)],
                        "lb": [True],
                        "ls": ["a", "", "ç"],
                        "lby": [b"x", b""],
                        "empty": [],
                    }
                ),
                "m": MetricRecord({"loss": 0.25 * i, "n": i, "hist": [1, 2, i]}),
                "w": ArrayRecord(
                    {
                        "c": Array(np.random.default_rng(i).random((3, 2))),
                        "f": Array(np.asfortranarray(np.random.default_rng(i).random((4, 2)))),
                    }
                ),
            }
        )
        for i in range(6)
    }
    states[2000] = RecordDict()  # a node whose state is still empty
    encoded = encode_records(states)
    assert len(encoded) < 60  # columns per layout, not files per node
    back = decode_records(from_npz_bytes(to_npz_bytes(encoded)))
    assert list(back) == sorted(states)
    assert all(_same_records(states[n], back[n]) for n in states)
    halves = [{n: s for n, s in states.items() if n % 2 == k} for k in (0, 1)]
    merged = decode_records(merge_encoded([encode_records(h) for h in halves]))
    assert sorted(merged) == sorted(states)
    assert all(_same_records(states[n], merged[n]) for n in states)


def _fot_with_state() -> FOT:
    fot = FOT()
    generator = torch.Generator().manual_seed(0)
    # Column-major, as QR leaves FOT's bases: the layout must come back too.
    basis = torch.linalg.qr(torch.rand(64, 5, dtype=torch.float64, generator=generator))[0]
    fot.bases = {"layers.0": basis}
    fot.epsilon, fot._sampled = 0.97, [1003, 1001]
    return fot


def _prototypes_with_state() -> PrototypeAveraging:
    strategy = PrototypeAveraging()
    rng = np.random.default_rng(1)
    strategy.frozen, strategy._querying, strategy._answered = True, True, {1002, 1000}
    for node, task in ((1002, 0), (1000, 1), (1002, 1)):
        bank = PrototypeBank(rng.random((10, 8)), rng.integers(0, 9, 10))
        strategy.banks.setdefault(node, {})[task] = bank
    return strategy


def _fisher_with_state() -> FisherMerging:
    strategy = FisherMerging(prior_weight=1.0)
    strategy.theta_old = {"w": np.random.default_rng(2).random((3, 4)), "b": np.zeros(3)}
    strategy.fisher_old = {"w": np.ones((3, 4)), "b": np.full(3, 0.5)}
    return strategy


def _momentum_ewc_with_state() -> MomentumEWC:
    strategy = MomentumEWC()
    strategy.velocity = {"w": np.full((2, 2), 0.5, dtype=np.float32)}
    return strategy


def _fedadam_with_state() -> FedAdam:
    strategy = FedAdam()
    strategy.m_t = {"w": np.full(3, 0.1, dtype=np.float32)}
    strategy.v_t = {"w": np.full(3, 0.2, dtype=np.float32)}
    strategy.current_arrays = {"w": np.arange(3, dtype=np.float32)}
    return strategy


def _fedavgm_with_state() -> FedAvgM:
    strategy = FedAvgM(server_momentum=0.9)
    strategy.momentum_vector = [np.ones((2, 2), dtype=np.float32), np.zeros(2, dtype=np.float32)]
    strategy.current_arrays = ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))})
    return strategy


STATEFUL = {
    "FOT": (_fot_with_state, ("bases", "epsilon", "_sampled")),
    "prototypes": (_prototypes_with_state, ("banks", "frozen", "_querying", "_answered")),
    "Fisher": (_fisher_with_state, ("theta_old", "fisher_old")),
    "momentum-EWC": (_momentum_ewc_with_state, ("velocity",)),
    "FedAdam": (_fedadam_with_state, ("m_t", "v_t", "current_arrays")),
    "FedAvgM": (_fedavgm_with_state, ("momentum_vector", "current_arrays")),
}


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):  # the layout too: it changes how later products round
        return a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        layout = (a.flags.c_contiguous, a.flags.f_contiguous)
        same_layout = layout == (b.flags.c_contiguous, b.flags.f_contiguous)
        return a.dtype == b.dtype and same_layout and np.array_equal(a, b)
    if isinstance(a, ArrayRecord):
        return list(a.keys()) == list(b.keys()) and all(
            _same(a[k].numpy(), b[k].numpy()) for k in a
        )
    if isinstance(a, PrototypeBank):
        return _same(a.sums, b.sums) and _same(a.counts, b.counts)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", list(STATEFUL))
def test_strategy_state_comes_back_exactly_through_a_checkpoint(name):
    build, attributes = STATEFUL[name]
    saved = build()
    state, problem = strategy_state(saved)
    assert problem is None
    fresh = type(saved)(prior_weight=1.0) if name == "Fisher" else type(saved)()
    load_strategy_state(fresh, _through_disk(state))
    for attribute in attributes:
        assert _same(getattr(saved, attribute), getattr(fresh, attribute)), attribute
    assert not _same(getattr(build(), attributes[0]), getattr(type(saved)(), attributes[0]))


def test_the_deletion_audit_comes_back(tmp_path):
    class Scenario:
        deletion_round = np.array([3, 5, np.iinfo(np.int64).max])

        def deleted(self, ids, server_round):
            return self.deletion_round[ids] <= server_round

    audit = DeletionAudit(Scenario(), None)
    audit.record(4, {0: np.array([0, 1]), 1: np.array([0])})
    resumed = DeletionAudit(Scenario(), None)
    resumed.load_state_dict(json.loads(json.dumps(audit.state_dict())))
    for each in (audit, resumed):
        each.record(6, {2: np.array([1, 2])})
    assert resumed.summary() == audit.summary()
    assert audit.summary()["used_after_delete"] == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),
        ("checkpoint.every_s=-1", "checkpoint.every_s must be >= 0"),
        ("checkpoint.every=-2", "checkpoint.every must be >= 0"),
        ("checkpoint.max_overhead=1.5", "checkpoint.max_overhead must be in \\[0, 1\\]"),
    ],
)
def test_checkpoint_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_checkpoints_follow_every_every_s_and_keep(tmp_path, monkeypatch):
    import fedcl.engine.observers as observers

    class Recorder:
        out_dir = tmp_path

        def sync(self) -> None:
            return None

    now = [0.0]  # round r ends at 10 r seconds
    monkeypatch.setattr(observers.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(observers, "client_states", lambda grid: encode_records({}))
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})

    def rounds_written(
        every: int, every_s: float, keep: int = 9, max_overhead: float = 0, cost: float = 0
    ) -> list[int]:
        """The rounds of 1..9 after which a checkpoint was written; each takes `cost` s."""
        shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)

        def slow_prune(run_dir: Path, keep: int) -> None:  # the last step of a checkpoint
            now[0] += cost
            prune(run_dir, keep)

        monkeypatch.setattr(observers, "prune", slow_prune)
        settings = {"every": every, "every_s": every_s, "keep": keep, "max_overhead": max_overhead}
        observer = observers.CheckpointObserver(Recorder(), None, settings, "off")
        now[0] = 0.0
        observer.on_loop_start(1, {"0": 0.1}, None)
        written = []
        for server_round in range(1, 10):
            now[0] = 10.0 * server_round
            observer.on_round_end({"round": server_round}, arrays, FedAvg())
            written.append(max(_checkpoint_rounds(tmp_path), default=0))
        return sorted(set(written) - {0})

    assert rounds_written(every=3, every_s=0) == [3, 6, 9]
    # 25 s after the last checkpoint (or the start) is every third round end.
    assert rounds_written(every=0, every_s=25) == [3, 6, 9]
    assert rounds_written(every=4, every_s=25) == [3, 4, 7, 8]
    # A checkpoint taking 5 s may take 10% of the time: the next one comes 50 s later.
    assert rounds_written(every=1, every_s=0, max_overhead=0.1, cost=5) == [1, 7]
    assert rounds_written(every=1, every_s=0, max_overhead=0.1, cost=0.5) == list(range(1, 10))
    rounds_written(every=1, every_s=0, keep=2)
    assert _checkpoint_rounds(tmp_path) == [8, 9]
