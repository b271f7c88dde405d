"""The one place for fedcl's config: schema with defaults, loading, dot-list overrides, validation.

Every key a run understands is declared here. Unknown keys and ill-typed values are refused with a
one-line `ConfigError` naming the key and the valid choices. Two sections are open on purpose:
`strategy` (keyword arguments of the chosen strategy) and `dataset.options` (dataset-specific).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedcl.errors import ConfigError


@dataclass
class DatasetConfig:
    """Which built-in or on-disk dataset to load (see `fedcl.scenario.datasets.DATASETS`)."""

    name: str = "digits"
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # Where generated datasets (mnist1d, gaussian) are cached: None means $FEDCL_CACHE, else
    # ~/.cache/fedcl; off (or false) turns the cache off.
    cache_dir: str | None = None


@dataclass
class ScenarioConfig:
    """How the dataset becomes tasks, and how each client's stream of tasks runs over rounds."""

    # class_incremental | task_incremental (a head per task) | domain_incremental | permuted
    kind: str = "class_incremental"
    num_tasks: int = 5
    class_order: list[int] | None = None
    shuffle_classes: bool = False
    domain_transform: str = "permutation"  # domain_incremental: permutation | rotation
    # The order tasks come in; tasks may recur (e.g. [0, 1, 2, 0, 1, 2]). None: 0..num_tasks-1.
    stream: list[int] | None = None
    # None: rounds // len(stream), the last entry taking any remainder.
    rounds_per_task: int | None = None
    boundaries: str = "global"  # global: all clients switch together | async: per client
    async_start: int = 0  # async: each client starts at round 1 + U{0..async_start}
    async_rounds_per_task: list[int] | None = None  # async: [low, high] rounds per task
    async_shuffle: bool = False  # async: each client sees the stream in its own order
    blurry: float = 0.0  # share of the previous task's data mixed in after a switch
    blurry_rounds: int = 1  # ... for this many rounds after the switch


@dataclass
class ClientsConfig:
    """How many virtual clients there are and how each task's data is split among them."""

    num: int = 10
    participation: float = 1.0  # share of the available clients online in a round
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2


@dataclass
class ModelConfig:
    """The model every client trains: `mlp` (hidden sizes) or `cnn` (channels, 1-D or 2-D input)."""

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    channels: list[int] = field(default_factory=lambda: [16, 32])


@dataclass
class TrainConfig:
    """Local training on each client per round (plain SGD, cross-entropy)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_steps: int | None = None
    replay_size: int = 0  # per-client experience-replay buffer (reservoir sampling); 0: off


DEFAULT_APP = "fedcl.client.app:app"
VECTORIZE = ("auto", "on", "off")


@dataclass
class ClientConfig:
    """The Flower ClientApp the actors run, as `module:attribute`."""

    app: str = DEFAULT_APP


@dataclass
class EngineConfig:
    """The Ray actor pool behind fedcl's Flower Grid."""

    # None: as many actors as the Ray resources fit (num_cpus / num_gpus per actor).
    num_actors: int | None = None
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    # None: start (or reuse) a local Ray; "auto" or "ray://host:port" attaches to a cluster.
    ray_address: str | None = None
    torch_threads: int = 1  # torch threads per actor, and on the driver (evaluation)
    # Train an actor's clients of a round together (torch.func.vmap over stacked parameters):
    # on | off | auto (on where a quick probe of the model, on this machine, shows a gain).
    vectorize: str = "auto"
    timeout_s: float = 3600.0  # a round's replies are waited for this long
    start_timeout_s: float = 300.0  # actors must be placed and ready within this


@dataclass
class EvalConfig:
    """Continual evaluation of the global model after every round."""

    batch_size: int = 1024
    forward_transfer: bool = True


@dataclass
class CheckpointConfig:
    """Checkpoints of global arrays, strategy and client state; `every: 0` turns them off."""

    every: int = 0


@dataclass
class LogConfig:
    """What the user sees while a run goes."""

    progress: bool = True
    verbose: bool = False
    # Record the sample ids each client trained on per round (trained_samples/, compressed).
    trained_samples: bool = True


@dataclass
class FedclConfig:
    """A complete fedcl experiment."""

    seed: int = 0
    rounds: int = 20
    name: str = "run"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    # Modules imported before the strategy is built (e.g. ones that `register_strategy`).
    imports: list[str] = field(default_factory=list)
    # The event timeline (see fedcl/scenario/events.py): explicit events, and generators of
    # events from rates ({kind, rate, clients_per_event, ...}).
    events: list[dict[str, Any]] = field(default_factory=list)
    generate: list[dict[str, Any]] = field(default_factory=list)
    client: ClientConfig = field(default_factory=ClientConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def default_config() -> DictConfig:
    """Return the schema with every default filled in (struct mode: unknown keys are refused)."""
    return OmegaConf.structured(FedclConfig)


def _valid_keys(cfg: DictConfig, parent: str) -> list[str]:
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(exc: OmegaConfBaseException, schema: DictConfig) -> ConfigError:
    """Turn OmegaConf's multi-line error into one line naming the key and the valid choices."""
    key = getattr(exc, "full_key", None) or ""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    parent, _, leaf = key.rpartition(".")
    valid = _valid_keys(schema, parent)
    if leaf and valid and leaf not in valid:
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
        where = f"under '{parent}'" if parent else "at the top level"
        return ConfigError(
            f"unknown config key '{key}'{hint}; valid keys {where}: {', '.join(valid)}"
        )
    return ConfigError(f"bad value for config key '{key}': {reason}")


def load_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> DictConfig:
    """Load an experiment (YAML path, mapping or config) over the defaults, apply `key=value`
    overrides and then `values` (dotted key -> Python value), validate and resolve it.

    Raises `ConfigError` (one line) for a missing file, an unknown key, a bad value or a malformed
    override; nothing is created on disk.
    """
    schema = default_config()
    layers: list[Any] = []
    if isinstance(source, Mapping):
        layers.append(OmegaConf.create(dict(source)))
    elif source is not None:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as exc:  # yaml errors come in several types
            raise ConfigError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        if values:
            layer = OmegaConf.create()
            for key, value in values.items():
                OmegaConf.update(layer, key, value, force_add=True)
            layers.append(layer)
        cfg = OmegaConf.merge(schema, *layers)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema) from None
    # YAML reads a bare on/off as a boolean.
    cfg.engine.vectorize = {"True": "on", "False": "off"}.get(
        cfg.engine.vectorize, cfg.engine.vectorize
    )
    validate(cfg)
    return cfg


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> None:
    """Check cross-key constraints the schema cannot express; raise `ConfigError` on failure."""
    _check(cfg.rounds >= 1, f"rounds must be >= 1, got {cfg.rounds}")
    _check(cfg.clients.num >= 1, f"clients.num must be >= 1, got {cfg.clients.num}")
    _check(
        cfg.scenario.num_tasks >= 1,
        f"scenario.num_tasks must be >= 1, got {cfg.scenario.num_tasks}",
    )
    _check(
        cfg.scenario.num_tasks <= cfg.rounds,
        f"scenario.num_tasks ({cfg.scenario.num_tasks}) must not exceed rounds ({cfg.rounds})",
    )
    rpt = cfg.scenario.rounds_per_task
    _check(rpt is None or rpt >= 1, f"scenario.rounds_per_task must be >= 1, got {rpt}")
    _check(cfg.scenario.async_start >= 0, "scenario.async_start must be >= 0")
    _check(
        0 <= cfg.scenario.blurry <= 1,
        f"scenario.blurry must be in [0, 1], got {cfg.scenario.blurry}",
    )
    _check(cfg.scenario.blurry_rounds >= 1, "scenario.blurry_rounds must be >= 1")
    participation = cfg.clients.participation
    _check(0 < participation <= 1, f"clients.participation must be in (0, 1], got {participation}")
    _check(
        cfg.train.replay_size >= 0, f"train.replay_size must be >= 0, got {cfg.train.replay_size}"
    )
    _check(cfg.train.epochs >= 1, f"train.epochs must be >= 1, got {cfg.train.epochs}")
    _check(cfg.train.batch_size >= 1, f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    _check(cfg.train.lr > 0, f"train.lr must be > 0, got {cfg.train.lr}")
    num_actors = cfg.engine.num_actors
    _check(
        num_actors is None or num_actors >= 1, f"engine.num_actors must be >= 1, got {num_actors}"
    )
    _check(cfg.engine.num_cpus_per_actor >= 0, "engine.num_cpus_per_actor must be >= 0")
    _check(cfg.engine.num_gpus_per_actor >= 0, "engine.num_gpus_per_actor must be >= 0")
    _check(
        cfg.engine.num_cpus_per_actor > 0 or cfg.engine.num_gpus_per_actor > 0,
        "an actor needs some resource: set engine.num_cpus_per_actor or "
        "engine.num_gpus_per_actor > 0",
    )
    _check(
        cfg.engine.vectorize in VECTORIZE,
        f"unknown engine.vectorize '{cfg.engine.vectorize}'; valid: {', '.join(VECTORIZE)}",
    )
    _check(cfg.checkpoint.every >= 0, f"checkpoint.every must be >= 0, got {cfg.checkpoint.every}")
    _check(":" in cfg.client.app, f"client.app must be 'module:attribute', got '{cfg.client.app}'")
    strategy = cfg.strategy
    _check(
        strategy.get("name") is not None or strategy.get("target") is not None,
        "set strategy.name (a registered strategy) or strategy.target (an import path)",
    )


def to_yaml(cfg: DictConfig) -> str:
    """Return the fully resolved config as YAML text."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Return the resolved config as plain dicts and lists (picklable, JSON-able)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
