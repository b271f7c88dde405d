"""The one place for fedcl's config: schema with defaults, loading, dot-list overrides, validation.

Every key a run understands is declared here. Unknown keys and ill-typed values are refused with a
one-line `ConfigError` naming the key and the valid choices. Two sections are open on purpose:
`strategy` (keyword arguments of the chosen strategy) and `dataset.options` (dataset-specific).
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import re
import typing
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
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
    # Share of each task's training data held out (stratified by class, seeded) for validation
    # metrics (val_acc, ...); never trained on. 0: no validation split.
    validation: float = 0.0


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
    # FedAvg-family strategies: actors sum their clients' models and send one sum each
    # (exact, the same with any number of actors); false sends every client's model.
    sum_on_actors: bool = True
    # Spread each round's clients evenly over the actors, moving a client (with its
    # Context.state) from the busiest actor to the idlest: a round lasts as long as its busiest
    # actor. false keeps each client on its first actor (for a ClientApp that keeps per-client
    # state outside Context.state).
    balance: bool = True
    timeout_s: float = 3600.0  # a round's replies are waited for this long
    start_timeout_s: float = 300.0  # actors must be placed and ready within this
    # A dead actor is replaced and its unanswered calls sent again, at most this many times;
    # past that, its clients of the call fail the round.
    max_retries: int = 2


@dataclass
class ScreenConfig:
    """What a client's train reply must satisfy to be aggregated (`fedcl.engine.replies`): besides
    the fixed checks (the global model's array names, shapes and dtypes; finite values; a positive
    weight), these bounds."""

    # Refuse an update further from the global model than this multiple of the global model's norm
    # (of 1, for a smaller model); null turns the bound off.
    max_update_norm: float | None = 10.0
    # Refuse a reply whose num-examples exceeds what the client holds in the round (its data plus
    # a full replay buffer); turn off for a ClientApp that counts examples otherwise.
    check_examples: bool = True
    # How many refused replies a round tolerates: past it, none of the round's replies is
    # aggregated (the round counts as one without updates). null: any number.
    max_rejected: int | None = None


@dataclass
class EvalConfig:
    """Continual evaluation of the global model after every round."""

    # 512 rather than more: a small CNN's activations for 1,024 samples outgrow the CPU's cache,
    # and its evaluation took 6.1 ms per 1,000 samples against 3.3 ms in batches of 512.
    batch_size: int = 512
    forward_transfer: bool = True
    # Evaluate every k rounds (always at each task's last round and the final round); the
    # stability-gap metrics are then computed at that resolution.
    every: int = 1


@dataclass
class MetricsConfig:
    """How summary metrics are computed from the evaluations."""

    # Drift recovery: a drift event's accuracy has recovered once it is back within this
    # (absolute) of the accuracy before the event.
    recovery_tolerance: float = 0.02


@dataclass
class CheckpointConfig:
    """The run's latest complete state (global arrays, strategy, client states), kept in
    `checkpoints/` for `fedcl run --resume`. Written after a round when `every` rounds have
    passed, unless the last checkpoint took more than `max_overhead` of the time since it (so
    big runs, whose checkpoints are slow, write them less often); or when `every_s` seconds have
    passed since the last one. 0 turns a rule off; `every: 0` and `every_s: 0`: no checkpoints."""

    every: int = 1
    every_s: float = 0.0
    max_overhead: float = 0.1  # share of the run's time checkpoints by `every` may take; 0: any
    keep: int = 2  # the newest checkpoints kept (an older one serves if the newest is damaged)


# Built-in unlearning methods (`fedcl.unlearning.methods`); an import path names a user's own.
UNLEARNING_METHODS = (
    "none",
    "retrain",
    "sharded",
    "native",
    "finetune",
    "ascent",
    "federaser",
)
# How `sharded` aggregates its shard models' predictions: averaged logits or a majority vote.
SHARD_AGGREGATES = ("logits", "vote")


@dataclass
class UnlearningConfig:
    """What happens to the global model at each delete event (`fedcl.unlearning`): `method` is
    `none` (the data is only excluded from then on), `retrain`, `sharded`, `native`,
    `finetune`, `ascent`, `federaser`, or the import path of a function (`module:function`,
    given `options`). `oracle: true` also runs the same seed with the deleted data absent from
    the start and measures against it."""

    method: str = "none"
    oracle: bool = False
    rounds: int = 2  # finetune and ascent: rounds of fine-tuning on the retained data
    ascent_lr: float = 0.01  # ascent: step size of gradient ascent on the forget set
    ascent_epochs: int = 1  # ascent: epochs over each affected client's forget set
    ascent_bound: float = 1.0  # ascent: largest L2 norm of the ascent's change to the model
    num_shards: int = 2  # sharded: client groups, each training its own model (SISA)
    aggregate: str = "logits"  # sharded: prediction from the shards' averaged logits, or a vote
    calibration_ratio: float = 0.5  # federaser: share of train.epochs the calibration trains
    calibration_interval: int = 1  # federaser: record (and calibrate) every this many rounds
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a user method


@dataclass
class LogConfig:
    """What the user sees while a run goes."""

    progress: bool = True
    verbose: bool = False
    # Record the sample ids each client trained on per round (trained_samples/, compressed).
    trained_samples: bool = True
    # Scalars per round to TensorBoard (run folder's tensorboard/); needs `fedcl[tensorboard]`.
    tensorboard: bool = False


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
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)
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
    # A list entry's key ends in its index (`model.hidden[0]`): the key itself is known.
    if leaf and valid and leaf.partition("[")[0] not in valid:
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

    Raises `ConfigError` (one line) for a missing or unreadable file, a file that is not a
    mapping of keys (a list, a scalar, nothing), an unknown key, a bad value or a malformed
    override; nothing is created on disk.

    Values taken from the environment (`${oc.env:NAME}`, and interpolations of such values) stay
    interpolations in the returned config: reading a key gives the value and `to_container`
    resolves them, but `to_yaml`, which writes the run folder's config.yaml, keeps
    `${oc.env:NAME}`, so a secret passed through the environment never reaches the disk, and a
    run re-started (or resumed) from that config.yaml reads the environment again.
    """
    schema = default_config()
    layers: list[Any] = []
    if isinstance(source, Mapping):
        layers.append(OmegaConf.create(dict(source)))
    elif source is not None:
        layers.append(_read_file(Path(source)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        for item in overrides:
            layers.append(_parse_override(item))
        if values:
            layer = OmegaConf.create()
            for key, value in values.items():
                OmegaConf.update(layer, key, value, force_add=True)
            layers.append(layer)
        for layer in layers:
            _check_shape(layer, schema)
        cfg = OmegaConf.merge(schema, *layers)
        written = OmegaConf.to_container(cfg, resolve=False)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema) from None
    except (TypeError, ValueError) as exc:  # e.g. merging a list into a section
        raise ConfigError(f"bad config: {_first_line(exc)}") from None
    _keep_env_interpolations(cfg, written)
    # YAML reads a bare on/off as a boolean.
    if cfg.engine.vectorize in ("True", "False"):
        cfg.engine.vectorize = {"True": "on", "False": "off"}[cfg.engine.vectorize]
    validate(cfg)
    return cfg


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _kind(document: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(document), f"a {type(document).__name__}")


def _read_file(path: Path) -> DictConfig:
    """The config file at `path` as a config; one-line `ConfigError` unless it is a YAML mapping."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
        # PyYAML for the document's shape only: OmegaConf's loader reads a scalar document as a
        # YAML text again (a file holding `hello` would become the key 'hello').
        document = yaml.safe_load(text)
        if isinstance(document, dict):
            return OmegaConf.load(io.StringIO(text))  # type: ignore[return-value]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot parse {path}: {_first_line(exc)}") from None
    what = "is empty" if document is None else f"holds {_kind(document)}"
    raise ConfigError(
        f"config file {path} {what}; a config is a mapping of keys (e.g. 'rounds: 10')"
    )


# Keys holding a list of mappings (one per event or generator).
_LISTS_OF_MAPPINGS = ("events", "generate")


def _check_shape(layer: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    """Refuse, naming the key, a scalar where the schema has a section (`train=5`) or a list
    (`model.hidden=5`), and a non-mapping in a list of mappings (`events=[5]`): OmegaConf's own
    errors name no key, or say it in its terms."""
    for key in layer:
        if key not in schema or OmegaConf.is_interpolation(layer, key):
            continue
        value, expected = layer[key], schema[key]
        name = f"{prefix}{key}"
        if isinstance(expected, DictConfig) and value is not None:
            if not isinstance(value, DictConfig):
                raise ConfigError(f"{name} must be a mapping of keys, got {value!r}")
            _check_shape(value, expected, f"{name}.")
        elif isinstance(expected, ListConfig) and value is not None:
            if not isinstance(value, ListConfig):
                raise ConfigError(f"{name} must be a list, got {value!r}")
            bad = [i for i, item in enumerate(value) if not isinstance(item, DictConfig)]
            if name in _LISTS_OF_MAPPINGS and bad:
                raise ConfigError(
                    f"{name}[{bad[0]}] must be a mapping like {{kind: join, ...}}, "
                    f"got {value[bad[0]]!r}"
                )


def _parse_override(item: str) -> DictConfig:
    """One `key=value` override as a config layer; its value is read as YAML."""
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override '{item}': cannot parse its value ({_first_line(exc)})"
        ) from None


def _interpolations(node: DictConfig | ListConfig, written: Any) -> Iterator[tuple[Any, Any, str]]:
    """(container, key, text) of every interpolation in `written` (the unresolved config as plain
    containers), found in `node`, the same config."""
    items = written.items() if isinstance(written, dict) else enumerate(written)
    for key, value in items:
        if isinstance(value, str) and "${" in value:
            yield node, key, value
        elif isinstance(value, dict | list):
            yield from _interpolations(node[key], value)


def _keep_env_interpolations(cfg: DictConfig, written: Any) -> None:
    """Put back, as interpolations, the resolved values that came from the environment: those
    whose interpolation reads it (`oc.env`) or whose value holds a value read from it."""
    found = list(_interpolations(cfg, written))
    secrets = {str(node[key]) for node, key, text in found if "oc.env" in text}
    for node, key, text in found:
        # Conservative: any value that contains an environment value is kept unresolved.
        if "oc.env" in text or any(s and s in str(node[key]) for s in secrets):
            node[key] = text


@dataclass(frozen=True)
class Bound:
    """The valid range of a numeric key: `low` and `high` (None: unbounded), each included
    unless `low_open` / `high_open`. Floats must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        """Whether `value` lies in the range."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_1 = Bound(1)
NON_NEGATIVE = Bound(0)
POSITIVE = Bound(0, low_open=True)
UNIT = Bound(0, 1)  # a share that may be 0
SHARE = Bound(0, 1, low_open=True)  # a share that must leave something

# Every numeric key of the schema and its range (a list key: each of its entries). A key set to
# null where the schema allows it is not checked. tests/test_bad_input.py checks that every
# numeric key of the schema is listed here.
RANGES: dict[str, Bound] = {
    "seed": NON_NEGATIVE,
    "rounds": AT_LEAST_1,
    "scenario.num_tasks": AT_LEAST_1,
    "scenario.class_order": NON_NEGATIVE,
    "scenario.stream": NON_NEGATIVE,
    "scenario.rounds_per_task": AT_LEAST_1,
    "scenario.async_start": NON_NEGATIVE,
    "scenario.async_rounds_per_task": AT_LEAST_1,
    "scenario.blurry": UNIT,
    "scenario.blurry_rounds": AT_LEAST_1,
    "clients.num": AT_LEAST_1,
    "clients.participation": SHARE,
    "clients.alpha": POSITIVE,
    "clients.shards_per_client": AT_LEAST_1,
    "model.hidden": AT_LEAST_1,
    "model.channels": AT_LEAST_1,
    "train.epochs": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.lr": POSITIVE,
    "train.momentum": Bound(0, 1, high_open=True),
    "train.weight_decay": NON_NEGATIVE,
    "train.max_steps": AT_LEAST_1,
    "train.replay_size": NON_NEGATIVE,
    "engine.num_actors": AT_LEAST_1,
    "engine.num_cpus_per_actor": NON_NEGATIVE,
    "engine.num_gpus_per_actor": NON_NEGATIVE,
    "engine.torch_threads": AT_LEAST_1,
    "engine.timeout_s": POSITIVE,
    "engine.start_timeout_s": POSITIVE,
    "engine.max_retries": NON_NEGATIVE,
    "screen.max_update_norm": POSITIVE,
    "screen.max_rejected": NON_NEGATIVE,
    "eval.batch_size": AT_LEAST_1,
    "eval.every": AT_LEAST_1,
    "metrics.recovery_tolerance": UNIT,
    "dataset.validation": Bound(0, 1, high_open=True),
    "checkpoint.every": NON_NEGATIVE,
    "checkpoint.every_s": NON_NEGATIVE,
    "checkpoint.keep": AT_LEAST_1,
    "checkpoint.max_overhead": UNIT,
    "unlearning.rounds": NON_NEGATIVE,
    "unlearning.ascent_lr": POSITIVE,
    "unlearning.ascent_epochs": AT_LEAST_1,
    "unlearning.ascent_bound": POSITIVE,
    "unlearning.num_shards": AT_LEAST_1,
    "unlearning.calibration_ratio": SHARE,
    "unlearning.calibration_interval": AT_LEAST_1,
}


def numeric_keys() -> dict[str, bool]:
    """Every key of the schema that holds a number or a list of numbers, with whether it may
    be null."""
    found: dict[str, bool] = {}

    def visit(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                visit(hint, f"{prefix}{f.name}.")
                continue
            args = typing.get_args(hint)
            nullable = type(None) in args
            inner = next((a for a in args if a is not type(None)), hint) if nullable else hint
            if typing.get_origin(inner) is list:
                inner = typing.get_args(inner)[0]
            if inner in (int, float):
                found[prefix + f.name] = nullable

    visit(FedclConfig, "")
    return found


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_ranges(cfg: DictConfig) -> None:
    nullable = numeric_keys()
    for key, bound in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        is_list = isinstance(value, ListConfig)
        entries = list(value) if is_list else [value]
        if all(bound.holds(v) for v in entries):
            continue
        what, shown = (f"{key} entries", entries) if is_list else (key, value)
        null = " or null" if nullable.get(key) and not is_list else ""
        finite = all(not isinstance(v, float) or math.isfinite(v) for v in entries)
        number = "" if finite else "a finite number "
        raise ConfigError(f"{what} must be {number}{bound}{null}, got {shown}")


# What Ray's `address` takes: a running cluster found by Ray, a new local one, host:port, or a
# Ray Client URL.
_RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|[^\s:/]+:\d{1,5}")


def validate(cfg: DictConfig) -> None:
    """Check every numeric key's range (`RANGES`) and the constraints between keys; raise a
    one-line `ConfigError` naming the key on the first failure."""
    _check_ranges(cfg)
    _check(
        cfg.scenario.num_tasks <= cfg.rounds,
        f"scenario.num_tasks ({cfg.scenario.num_tasks}) must not exceed rounds ({cfg.rounds})",
    )
    span = cfg.scenario.async_rounds_per_task
    _check(
        span is None or (len(span) == 2 and span[0] <= span[1]),
        f"scenario.async_rounds_per_task must be [low, high] with low <= high, got "
        f"{list(span) if span is not None else None}",
    )
    _check(
        cfg.engine.num_cpus_per_actor > 0 or cfg.engine.num_gpus_per_actor > 0,
        "an actor needs some resource: set engine.num_cpus_per_actor or "
        "engine.num_gpus_per_actor > 0",
    )
    address = cfg.engine.ray_address
    _check(
        address is None or _RAY_ADDRESS.fullmatch(address) is not None,
        "engine.ray_address must be auto, local, host:port or ray://host:port (null: start a "
        f"local Ray), got '{address}'",
    )
    _check(
        cfg.engine.vectorize in VECTORIZE,
        f"unknown engine.vectorize '{cfg.engine.vectorize}'; valid: {', '.join(VECTORIZE)}",
    )
    _check(":" in cfg.client.app, f"client.app must be 'module:attribute', got '{cfg.client.app}'")
    method = cfg.unlearning.method
    _check(
        method in UNLEARNING_METHODS or ":" in method,
        f"unknown unlearning.method '{method}'; valid: {', '.join(UNLEARNING_METHODS)} or an "
        "import path 'module:function'",
    )
    _check(
        cfg.unlearning.aggregate in SHARD_AGGREGATES,
        f"unknown unlearning.aggregate '{cfg.unlearning.aggregate}'; valid: "
        f"{', '.join(SHARD_AGGREGATES)}",
    )
    _check(
        method != "sharded" or cfg.unlearning.num_shards <= cfg.clients.num,
        f"unlearning.num_shards ({cfg.unlearning.num_shards}) must not exceed clients.num "
        f"({cfg.clients.num})",
    )
    strategy = cfg.strategy
    _check(
        strategy.get("name") is not None or strategy.get("target") is not None,
        "set strategy.name (a registered strategy) or strategy.target (an import path)",
    )


def to_yaml(cfg: DictConfig) -> str:
    """Return the config as YAML text, as a run folder's config.yaml keeps it: resolved, except
    the values `load_config` keeps as interpolations because they come from the environment
    (written as `${oc.env:NAME}`, never as the value)."""
    return OmegaConf.to_yaml(cfg, resolve=False)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Return the resolved config as plain dicts and lists (picklable, JSON-able)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# id(config) -> (a weak reference to it, its plain form); DictConfig is unhashable.
_PLAIN: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """`to_container(cfg)`, worked out once per config object, for the reads a run makes every
    round (an OmegaConf read costs ~0.1 ms; a round makes dozens). Only for a config that no
    longer changes: a run's, once it has started. Treat the result as read-only."""
    cached = _PLAIN.get(id(cfg))
    if cached is not None and cached[0]() is cfg:
        return cached[1]
    for key in [key for key, (ref, _) in _PLAIN.items() if ref() is None]:
        del _PLAIN[key]  # configs of finished runs
    plain = to_container(cfg)
    _PLAIN[id(cfg)] = (weakref.ref(cfg), plain)
    return plain
