"""The CLI's success path and its interrupt: exit 0 with the summary line and the run-folder line;
the run folder's config.yaml reloads to the config that ran; its accuracy_matrix.png is a real
PNG; and SIGINT during a run exits 130 with one line."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from fedcl.cli import main
from fedcl.config import load_config, to_container

QUICKSTART = str(Path(__file__).resolve().parents[1] / "simulations" / "quickstart.yaml")
# Small, but with what a config.yaml must carry back: lists, an event, strategy arguments.
OVERRIDES = [
    "rounds=4",
    "scenario.num_tasks=2",
    "clients.num=3",
    "model.hidden=[16, 8]",
    "engine.num_actors=1",
    "strategy.name=fedprox",
    "strategy.proximal_mu=0.01",
    "events=[{round: 3, kind: drift, clients: [1], type: label_swap, pairs: [[6, 7]]}]",
]


@pytest.fixture(scope="module")
def cli_run(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """`fedcl run` in this process: (exit code, stdout, run folder)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["run", QUICKSTART, *OVERRIDES, "--out", str(out), "--quiet"])
    return code, stdout.getvalue(), out


def test_a_completed_run_exits_0_and_prints_its_summary_and_folder(
    cli_run: tuple[int, str, Path],
) -> None:
    code, stdout, out = cli_run
    assert code == 0
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout
    printed = json.loads(lines[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    # the headline values of summary.json, as they are there
    assert {"acc", "rounds", "wall_s"} <= set(printed) <= set(summary)
    for key, value in printed.items():
        assert value == pytest.approx(summary[key]), key
    assert printed["rounds"] == 4 and 0.0 <= printed["acc"] <= 1.0
    assert lines[1] == f"run folder: {out}"


def test_the_resolved_config_yaml_reloads_to_an_equal_config(
    cli_run: tuple[int, str, Path],
) -> None:
    _, _, out = cli_run
    written = load_config(out / "config.yaml")
    assert to_container(written) == to_container(load_config(QUICKSTART, OVERRIDES))
    assert written.strategy.proximal_mu == 0.01 and list(written.model.hidden) == [16, 8]


def test_the_accuracy_matrix_png_is_a_real_image(cli_run: tuple[int, str, Path]) -> None:
    _, _, out = cli_run
    data = (out / "accuracy_matrix.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 200 <= width <= 4000 and 200 <= height <= 4000
    with Image.open(out / "accuracy_matrix.png") as image:
        image.load()  # decodes every chunk: a truncated or corrupt file raises
        assert image.size == (width, height)
        pixels = np.asarray(image.convert("RGB"))
    # a drawn matrix, not a blank canvas: many distinct colours
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


@pytest.mark.usefixtures("ray_session")
def test_sigint_during_a_run_exits_130_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Many rounds: the run is still going when the interrupt comes. It attaches to this
    # session's Ray (starting one costs seconds); its actors go with it.
    address = ray.get_runtime_context().gcs_address
    args = [*OVERRIDES[1:], "rounds=500", f"engine.ray_address={address}", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "fedcl.cli", "run", QUICKSTART, *args, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 240  # a bound against a hang, not a timing assertion
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never finished a round"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "fedcl: interrupted"
    assert "Traceback" not in stderr
    assert stdout == ""  # no summary printed for a run that did not finish
