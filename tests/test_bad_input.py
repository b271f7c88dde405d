"""Everything a user can get wrong is refused before Ray starts: one line naming the key or event
and the problem, exit code 2, no traceback, nothing written. And the run folder's name and
config.yaml give nothing away: no path outside runs/, no value read from the environment; a
Ctrl-C during Ray's start-up leaves no Ray process behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import ray
import yaml
from omegaconf import OmegaConf

import fedcl
from fedcl import api
from fedcl.cli import main
from fedcl.config import RANGES, load_config, numeric_keys, to_container, to_yaml
from fedcl.engine import pool
from fedcl.engine.loop import default_out_dir
from fedcl.engine.pool import init_ray
from fedcl.errors import ConfigError, FedclError

# A small run that would start if nothing were wrong with it.
BASE = {
    "name": "bad-input",
    "rounds": 10,
    "dataset": {"name": "digits"},
    "scenario": {"num_tasks": 2},
    "clients": {"num": 4},
    "engine": {"num_actors": 1},
    "log": {"progress": False},
}
BASE_YAML = yaml.safe_dump(BASE)
UNSET = "FEDCL_TEST_NEVER_SET_VARIABLE"


@dataclass(frozen=True)
class Bad:
    """One malformed input and the fragment its error line must hold."""

    message: str
    overrides: tuple[str, ...] = ()
    extra: str = ""  # YAML added to BASE's (events, generators)
    config: str | bytes | None = None  # the whole config file instead; "DIR": a folder
    out: str | None = None  # what --out is: file | under-file | proc | holds-run


def event(text: str) -> str:
    return f"events:\n  - {text}\n"


def generator(text: str) -> str:
    return f"generate:\n  - {text}\n"


CASES = {
    # Numeric ranges, through overrides.
    "eval batch 0": Bad("eval.batch_size must be >= 1, got 0", ("eval.batch_size=0",)),
    "hidden width 0": Bad("model.hidden entries must be >= 1, got [0]", ("model.hidden=[0]",)),
    "channels 0": Bad("model.channels entries must be >= 1", ("model.channels=[16,0]",)),
    "max steps 0": Bad("train.max_steps must be >= 1 or null, got 0", ("train.max_steps=0",)),
    "momentum -1": Bad("train.momentum must be in [0, 1), got -1", ("train.momentum=-1",)),
    "momentum 1": Bad("train.momentum must be in [0, 1), got 1", ("train.momentum=1",)),
    "weight decay <0": Bad("train.weight_decay must be >= 0", ("train.weight_decay=-0.1",)),
    "lr inf": Bad("train.lr must be a finite number > 0, got inf", ("train.lr=inf",)),
    "lr nan": Bad("train.lr must be a finite number > 0, got nan", ("train.lr=nan",)),
    "timeout -1": Bad("engine.timeout_s must be > 0, got -1", ("engine.timeout_s=-1",)),
    "start timeout 0": Bad("engine.start_timeout_s must be > 0", ("engine.start_timeout_s=0",)),
    "torch threads 0": Bad("engine.torch_threads must be >= 1", ("engine.torch_threads=0",)),
    "gpus -1": Bad("engine.num_gpus_per_actor must be >= 0", ("engine.num_gpus_per_actor=-1",)),
    "alpha 0": Bad("clients.alpha must be > 0, got 0", ("clients.alpha=0",)),
    "shards 0": Bad("clients.shards_per_client must be >= 1", ("clients.shards_per_client=0",)),
    "seed -1": Bad("seed must be >= 0, got -1", ("seed=-1",)),
    "class order -1": Bad(
        "scenario.class_order entries must be >= 0", ("scenario.class_order=[-1]",)
    ),
    "async span": Bad(
        "scenario.async_rounds_per_task must be [low, high] with low <= high, got [3, 1]",
        ("scenario.async_rounds_per_task=[3,1]",),
    ),
    "checkpoint every -1": Bad("checkpoint.every must be >= 0", ("checkpoint.every=-1",)),
    "ray address": Bad(
        "engine.ray_address must be auto, local, host:port", ("engine.ray_address=5",)
    ),
    # The shape of values.
    "section given a number": Bad("train must be a mapping of keys, got 5", ("train=5",)),
    "list given a number": Bad("model.hidden must be a list, got 5", ("model.hidden=5",)),
    "event not a mapping": Bad("events[0] must be a mapping like {kind: join", ("events=[5]",)),
    "list entry not a number": Bad(
        "bad value for config key 'model.hidden[0]'", ("model.hidden=[a]",)
    ),
    "unparsable override": Bad(
        "override 'events=[{round:1,clients:[true]}]': cannot parse its value",
        ("events=[{round:1,clients:[true]}]",),
    ),
    # The strategy's constructor arguments.
    "fraction abc": Bad(
        "strategy.fraction_train must be a number, got 'abc'", ("strategy.fraction_train=abc",)
    ),
    "fraction 2": Bad(
        "strategy.fraction_train must be in [0, 1], got 2", ("strategy.fraction_train=2",)
    ),
    "min nodes abc": Bad(
        "strategy.min_train_nodes must be an integer, got 'abc'", ("strategy.min_train_nodes=abc",)
    ),
    "proximal mu -1": Bad(
        "strategy.proximal_mu must be >= 0, got -1",
        ("strategy.name=fedprox", "strategy.proximal_mu=-1"),
    ),
    "adam beta 1": Bad(
        "strategy.beta_1 must be in [0, 1), got 1", ("strategy.name=fedadam", "strategy.beta_1=1")
    ),
    "trimmed beta (Flower's ValueError)": Bad(
        "strategy.beta: `beta` must be in the range [0, 0.5)",
        ("strategy.name=fedtrimmedavg", "strategy.beta=0.9"),
    ),
    "fot threshold (fedcl's ValueError)": Bad(
        "strategy.threshold must be a number in [0, 1], got 2",
        ("strategy.name=fot", "strategy.threshold=2"),
    ),
    "callable from a config": Bad(
        "strategy.train_metrics_aggr_fn must be a function", ("strategy.train_metrics_aggr_fn=x",)
    ),
    # What the config names.
    "app is a module": Bad(
        "client.app 'os:path' is not a ClientApp (it is a module)", ("client.app=os:path",)
    ),
    "app is a string": Bad(
        "is not a ClientApp (it is a str)", ("client.app=fedcl.config:DEFAULT_APP",)
    ),
    "relative import": Bad("imports: cannot import module '.mine'", ("imports=[.mine]",)),
    # Events and generators.
    "fraction abc event": Bad(
        "events[0]: fraction must be a number in (0, 1], got 'abc'",
        extra=event("{round: 1, kind: delete, what: samples, fraction: abc}"),
    ),
    "client true": Bad(
        "events[0]: unknown client True", extra=event("{round: 1, kind: join, clients: [true]}")
    ),
    "round true": Bad(
        "events[0]: round True is not within", extra=event("{round: true, kind: leave}")
    ),
    "task true": Bad(
        "events[0]: task True is not one of", extra=event("{round: 2, kind: task, task: true}")
    ),
    "sample ids abc": Bad(
        "events[0]: samples must be a non-empty list of sample ids >= 0, got ['abc']",
        extra=event("{round: 1, kind: delete, what: samples, samples: [abc]}"),
    ),
    "drift parameter": Bad(
        "events[0]: drift 'noise': std must be >= 0",
        extra=event("{round: 2, kind: drift, type: noise, std: -1}"),
    ),
    "ramp true": Bad(
        "events[0]: ramp must be a number of rounds >= 1, got True",
        extra=event("{round: 2, kind: drift, type: noise, std: 1, mode: incremental, ramp: true}"),
    ),
    "rate abc": Bad(
        "generate[0]: needs 'rate', a number >= 0 of expected events per round, got 'abc'",
        extra=generator("{kind: leave, rate: abc}"),
    ),
    "rate inf": Bad("generate[0]: needs 'rate'", extra=generator("{kind: leave, rate: .inf}")),
    "rate huge": Bad(
        "generate[0]: rate 1e+09 over 10 rounds draws about 1e+10 events",
        extra=generator("{kind: leave, rate: 1.0e+9}"),
    ),
    "generator without kind": Bad("generate[0]: unknown kind None", extra=generator("{rate: 0.5}")),
    "clients per event true": Bad(
        "generate[0]: clients_per_event must be in 1..4, got True",
        extra=generator("{kind: leave, rate: 0.5, clients_per_event: true}"),
    ),
    "from round 0": Bad(
        "generate[0]: from_round must be a round in 1..10, got 0",
        extra=generator("{kind: leave, rate: 0.5, from_round: 0}"),
    ),
    "generator sets round": Bad(
        "generate[0]: 'round' is drawn for each event",
        extra=generator("{kind: leave, rate: 0.5, round: 3}"),
    ),
    "generator that never fires": Bad(
        "generate[0]: drift 'noise': std must be >= 0",
        extra=generator("{kind: drift, rate: 0, type: noise, std: -1}"),
    ),
    # The config file itself.
    "file is a list": Bad("holds a list; a config is a mapping of keys", config="- 1\n- 2\n"),
    "file is a number": Bad("holds a number; a config is a mapping of keys", config="5\n"),
    "file is a string": Bad("holds a string; a config is a mapping of keys", config="hello\n"),
    "file is empty": Bad("is empty; a config is a mapping of keys", config=""),
    "file is null": Bad("is empty; a config is a mapping of keys", config="# nothing\nnull\n"),
    "file is a folder": Bad("is not a file", config="DIR"),
    "file is not YAML": Bad("cannot parse", config="rounds: [\n"),
    "file repeats a key": Bad("cannot parse", config="rounds: 5\nrounds: 6\n"),
    "file is binary": Bad("cannot parse", config=b"\xff\xfe\x00\x81rounds"),
    "unset variable": Bad(
        f"Environment variable '{UNSET}' not found", config=f"rounds: ${{oc.env:{UNSET}}}\n"
    ),
    # The output path.
    "out is a file": Bad("is a file, not a folder", out="file"),
    "out under a file": Bad("lies under the file", out="under-file"),
    "out cannot be made": Bad("no folder can be made in /proc", out="proc"),
    "out holds a run": Bad("already holds a run (metrics.jsonl)", out="holds-run"),
}


@pytest.fixture
def no_ray(monkeypatch):
    """Fails a test whose input gets as far as starting Ray; checks that Ray did not start."""
    running = ray.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("the input was not refused: Ray was about to start")

    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert ray.is_initialized() is running  # False, unless another test's Ray runs


def _config_file(case: Bad, tmp_path: Path) -> Path:
    if case.config == "DIR":
        (tmp_path / "folder.yaml").mkdir()
        return tmp_path / "folder.yaml"
    path = tmp_path / "exp.yaml"
    if isinstance(case.config, bytes):
        path.write_bytes(case.config)
    else:
        path.write_text(BASE_YAML + case.extra if case.config is None else case.config)
    return path


def _out_folder(case: Bad, tmp_path: Path) -> Path:
    """--out as the case wants it; what is there is checked afterwards to be unchanged."""
    if case.out == "file":
        (tmp_path / "taken").write_text("a file\n")
        return tmp_path / "taken"
    if case.out == "under-file":
        (tmp_path / "taken").write_text("a file\n")
        return tmp_path / "taken" / "run"
    if case.out == "proc":
        return Path("/proc/fedcl-test-run")
    if case.out == "holds-run":
        (tmp_path / "done").mkdir()
        (tmp_path / "done" / "metrics.jsonl").write_text('{"round": 1}\n')
        return tmp_path / "done"
    return tmp_path / "out"


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder`, with a file's bytes (None for a folder)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in folder.rglob("*")
    }


@pytest.mark.usefixtures("no_ray")
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(UNSET, raising=False)
    config = _config_file(case, tmp_path)
    out = _out_folder(case, tmp_path)
    before = _snapshot(tmp_path)
    code = main(["run", str(config), *case.overrides, "--out", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("fedcl: error: ") and err.count("\n") == 1, err
    assert case.message in err
    assert code == 2
    assert _snapshot(tmp_path) == before  # nothing written (no out folder), nothing changed
    assert not Path("/proc/fedcl-test-run").exists()


def test_the_table_holds_at_least_forty_inputs():
    assert len(CASES) >= 40


def test_every_numeric_key_of_the_schema_has_a_range():
    assert sorted(numeric_keys()) == sorted(RANGES)


LIST_KEYS = {
    "scenario.class_order",
    "scenario.stream",
    "scenario.async_rounds_per_task",
    "model.hidden",
    "model.channels",
}
JUST_OUTSIDE = [
    (key, bound.low if bound.low_open else bound.low - 1) for key, bound in RANGES.items()
] + [
    (key, bound.high if bound.high_open else bound.high + 1)
    for key, bound in RANGES.items()
    if bound.high is not None
]


@pytest.mark.parametrize(("key", "outside"), JUST_OUTSIDE)
def test_every_range_refuses_a_value_just_outside_it(key, outside):
    value = f"[{outside}]" if key in LIST_KEYS else outside
    with pytest.raises(ConfigError, match=rf"^{key}( entries)? must be .*, got \[?{outside}"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("../..", "run"),
        ("../../etc/escape", "etc-escape"),
        ("/abs/path", "abs-path"),
        ("a b\\c:d", "a-b-c-d"),
        (".hidden", "hidden"),
        ("", "run"),
        ("x" * 300, "x" * 64),
        ("expérience_1.2", "expérience_1.2"),
    ],
)
def test_the_default_run_folder_is_a_safe_name_directly_in_runs(name, folder):
    path = default_out_dir(load_config(None, values={"name": name}))
    assert path.parent == Path("runs")
    assert path.name.rpartition("-")[0].rpartition("-")[0] == folder


def test_a_name_from_the_environment_is_not_the_folder_name(monkeypatch):
    monkeypatch.setenv("FEDCL_TEST_SECRET", "hunter2")
    cfg = load_config(None, values={"name": "${oc.env:FEDCL_TEST_SECRET}"})
    assert cfg.name == "hunter2"
    assert default_out_dir(cfg).name.startswith("run-")


def test_environment_values_stay_interpolations_in_the_written_config(monkeypatch):
    monkeypatch.setenv("FEDCL_TEST_SECRET", "hunter2")
    cfg = load_config(
        {
            "dataset": {"root": "/data/${oc.env:FEDCL_TEST_SECRET}"},
            "name": "copy-${dataset.root}",  # holds the secret through another key
            "rounds": 8,
            "train": {"epochs": "${rounds}"},  # no secret: resolved
        }
    )
    assert (cfg.dataset.root, cfg.name, cfg.train.epochs) == (
        "/data/hunter2",
        "copy-/data/hunter2",
        8,
    )
    written = to_yaml(cfg)
    assert "hunter2" not in written
    assert "root: /data/${oc.env:FEDCL_TEST_SECRET}" in written
    assert "epochs: 8" in written
    assert to_container(cfg)["dataset"]["root"] == "/data/hunter2"
    again = load_config(OmegaConf.create(written))
    assert again.dataset.root == "/data/hunter2"


@pytest.mark.usefixtures("ray_session")
def test_a_real_run_writes_no_secret_and_stays_in_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDCL_TEST_SECRET", "s3cr3t-t0ken")
    tiny = [
        "rounds=2",
        "scenario.num_tasks=1",
        "clients.num=2",
        "engine.num_actors=1",
        "log.progress=false",
    ]
    secret = fedcl.run(None, [*tiny, "name=${oc.env:FEDCL_TEST_SECRET}"])
    escape = fedcl.run(None, [*tiny, "name=../../escape"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert secret.out_dir.parent == escape.out_dir.parent == Path("runs")
    assert secret.out_dir.name.startswith("run-") and escape.out_dir.name.startswith("escape-")
    for path in secret.out_dir.rglob("*"):
        assert not path.is_file() or b"s3cr3t-t0ken" not in path.read_bytes(), path
    assert "name: ${oc.env:FEDCL_TEST_SECRET}" in (secret.out_dir / "config.yaml").read_text()


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init and ray.shutdown replaced: `calls` records them; `start` is what init does."""
    calls: list[str] = []
    fake = {"start": lambda: None, "calls": calls}

    def init(**kwargs):
        calls.append("init")
        fake["start"]()
        calls.append("init returned")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    return fake


def test_a_ctrl_c_during_the_start_waits_for_ray_then_stops_it(fake_ray):
    def start():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the start goes on after the Ctrl-C

    fake_ray["start"] = start
    with pytest.raises(KeyboardInterrupt):
        init_ray(None)
    assert fake_ray["calls"] == ["init", "init returned", "shutdown"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_cuts_the_start_short_and_kills_what_it_started(fake_ray):
    started = []

    def start():
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)

    fake_ray["start"] = start
    with pytest.raises(KeyboardInterrupt):
        init_ray(None)
    assert fake_ray["calls"] == ["init", "shutdown"]
    assert started[0].wait(timeout=10) is not None  # killed, not left to sleep


def test_a_failed_start_is_one_line(fake_ray):
    def start():
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify ...")

    fake_ray["start"] = start
    with pytest.raises(FedclError) as error:
        init_ray("auto")
    assert str(error.value) == (
        "could not reach Ray at engine.ray_address='auto': Could not find any running Ray instance."
    )
    assert fake_ray["calls"] == ["init", "shutdown"]


@pytest.mark.parametrize("running_before", [False, True])
def test_an_interrupted_run_stops_only_the_ray_it_started(running_before, monkeypatch):
    state = {"running": running_before, "shutdowns": 0}

    def simulate(cfg, out_dir, progress=None):
        state["running"] = True  # as init_ray
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "is_initialized", lambda: state["running"])
    monkeypatch.setattr(ray, "shutdown", lambda: state.update(shutdowns=state["shutdowns"] + 1))
    monkeypatch.setattr(api, "run_simulation", simulate)
    with pytest.raises(KeyboardInterrupt):
        api.run(None)
    assert state["shutdowns"] == (0 if running_before else 1)


def test_the_cli_stops_ray_on_ctrl_c_and_says_so_in_one_line(monkeypatch, capsys):
    stopped = []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "run", interrupted)
    monkeypatch.setattr(pool, "shutdown_ray", lambda: stopped.append(True))
    assert main(["run", "any.yaml"]) == 130
    assert capsys.readouterr().err == "fedcl: interrupted\n"
    assert stopped == [True]


def _ray_processes_of(marker: str) -> list[psutil.Process]:
    """Live processes that inherited the environment variable FEDCL_TEST_MARKER=`marker`: Ray's
    processes keep their parent's environment, even the agents that rename themselves."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get("FEDCL_TEST_MARKER") == marker:
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize(
    "presses",
    [1, pytest.param(2, marks=pytest.mark.slow)],  # twice: outside CI (-m slow)
    ids=["ctrl-c", "ctrl-c twice"],
)
def test_ctrl_c_during_ray_start_up_exits_130_and_leaves_no_ray_process(presses, tmp_path):
    # A short temp dir: Ray's socket paths must fit in 107 characters.
    ray_tmp = tempfile.mkdtemp(prefix="fcli-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, FEDCL_TEST_MARKER=ray_tmp)
    config = tmp_path / "exp.yaml"
    config.write_text(BASE_YAML)
    command = [sys.executable, "-m", "fedcl.cli", "run", str(config), "--out", str(tmp_path / "o")]
    driver = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Start-up: Ray's raylet is running, the driver is not yet connected to it.
        deadline = time.monotonic() + 120
        while not any(p.name() == "raylet" for p in _children(driver.pid)):
            assert driver.poll() is None and time.monotonic() < deadline, "Ray never started"
            time.sleep(0.01)
        for _ in range(presses):
            driver.send_signal(signal.SIGINT)
            time.sleep(0.2)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert driver.returncode == 130, err
    assert err == "fedcl: interrupted\n"
    deadline = time.monotonic() + 5  # a killed process may take a moment to go
    while _ray_processes_of(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _ray_processes_of(ray_tmp)
    for process in left:  # not to leave them to other tests
        process.kill()
    assert [p.name() for p in left] == []


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
