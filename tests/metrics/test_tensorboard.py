"""Optional TensorBoard logging: scalars read back from the event file; a one-line message when
the package is absent and it was asked for."""

from __future__ import annotations

import builtins

import pytest

import fedcl
from fedcl.errors import FedclError
from fedcl.metrics.tensorboard import FOLDER, TensorBoardObserver, require_tensorboard

RECORDS = [
    {
        "round": 1,
        "task": 0,
        "acc": {"0": 0.5},
        "avg_acc": 0.5,
        "val_acc": {"0": 0.25},
        "bytes_sent": 1000,
        "bytes_received": 3000,
        "peak_rss_driver_mb": 100.0,
        "peak_rss_actors_mb": [50.0, 70.0],
        "replies": 4,
        "failures": [{"node": 3, "reason": "x"}],
        "train": {"train_loss": 1.5, "note": "text"},
    },
    {"round": 2, "task": 0, "bytes_sent": 1100, "bytes_received": 2900, "replies": 3},
    {"round": 3, "task": 1, "acc": {"0": 0.25, "1": 0.75}, "avg_acc": 0.5, "replies": 4},
]


@pytest.fixture
def no_tensorboard(monkeypatch):
    """Imports of tensorboard fail, as where the package is not installed."""
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name.startswith("tensorboard") or name.startswith("torch.utils.tensorboard"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)


def test_absent_package_gives_one_line_naming_the_install(no_tensorboard):
    with pytest.raises(FedclError) as caught:
        require_tensorboard()
    message = str(caught.value)
    assert "\n" not in message
    assert "pip install 'fedcl[tensorboard]'" in message and "log.tensorboard=false" in message


def test_absent_package_stops_the_run_before_anything_is_written(no_tensorboard, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FedclError, match="log.tensorboard needs the tensorboard package"):
        fedcl.run("simulations/quickstart.yaml", "log.tensorboard=true", out=out, progress=False)
    assert not out.exists()


def test_scalars_are_read_back_from_the_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    observer = TensorBoardObserver(tmp_path)
    for record in RECORDS:
        observer.on_round_end(record, None, None)
    observer.close()
    events = EventAccumulator(str(tmp_path / FOLDER))
    events.Reload()

    def series(tag):
        return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]

    assert series("acc/avg") == [(1, 0.5), (3, 0.5)]  # round 2 was not evaluated
    assert series("acc/task_0") == [(1, 0.5), (3, 0.25)]
    assert series("acc/task_1") == [(3, 0.75)]
    assert series("val_acc/avg") == [(1, 0.25)]
    assert series("system/bytes_sent") == [(1, 1000), (2, 1100)]
    assert series("system/peak_rss_actor_mb") == [(1, 70.0)]
    assert series("clients/replies") == [(1, 4), (2, 3), (3, 4)]
    assert series("clients/failures") == [(1, 1)]
    assert series("train/train_loss") == [(1, 1.5)]
    assert "train/note" not in events.Tags()["scalars"]  # text is not a scalar
