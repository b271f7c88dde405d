"""The run figures are written as real, non-trivial PNG files."""

from __future__ import annotations

import struct

import pytest

from fedcl.metrics.plots import plot_run

THREE_TASKS = [
    {"round": 1, "task": 0, "acc": {"0": 0.5}, "acc_next": {"1": 0.1}},
    {"round": 2, "task": 0, "acc": {"0": 0.8}, "acc_next": {"1": 0.2}},
    {"round": 3, "task": 1, "acc": {"0": 0.4, "1": 0.6}, "acc_next": {"2": 0.15}},
    {"round": 4, "task": 1, "acc": {"0": 0.85, "1": 0.9}, "acc_next": {"2": 0.3}},
    {"round": 5, "task": 2, "acc": {"0": 0.3, "1": 0.7, "2": 0.5}},
    {"round": 6, "task": 2, "acc": {"0": 0.5, "1": 0.8, "2": 0.9}},
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_run_writes_both_pngs(tmp_path):
    out = tmp_path / "figures"
    paths = plot_run(THREE_TASKS, out, num_tasks=3, title="hand-built run")
    assert paths == [out / "accuracy.png", out / "accuracy_matrix.png"]
    for path in paths:
        data = path.read_bytes()
        width, height = png_size(data)
        assert width >= 400 and height >= 300
        # A blank canvas compresses to a few kB; curves, text and a heatmap do not.
        assert len(data) > 15_000


def test_plot_run_handles_a_run_that_stopped_early(tmp_path):
    paths = plot_run(THREE_TASKS[:3], tmp_path, num_tasks=3)
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_plot_run_rejects_bad_records_before_writing(tmp_path):
    out = tmp_path / "figures"
    with pytest.raises(ValueError):
        plot_run([], out, num_tasks=3)
    assert not out.exists()
