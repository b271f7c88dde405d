"""fedcl's strategy registry: stock Flower Message-API strategies and fedcl's own, by name.

A strategy is any `flwr.serverapp.strategy.Strategy`. Name one in a config with `strategy.name`
(a registered name) or `strategy.target` (an import path, which takes precedence); every other key
under `strategy` is passed to its constructor. Register your own with `register_strategy`, as a
decorator; a config's `imports` list names the modules to import first, so a strategy registered
in a user's module is found by name (and listed by `fedcl strategies --import MODULE`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from flwr.serverapp.strategy import Strategy

from fedcl.errors import ConfigError
from fedcl.imports import load_object

_REGISTRY: dict[str, str | type[Strategy]] = {
    "fedavg": "flwr.serverapp.strategy:FedAvg",
    "fedprox": "flwr.serverapp.strategy:FedProx",
    "fedavgm": "flwr.serverapp.strategy:FedAvgM",
    "fedadam": "flwr.serverapp.strategy:FedAdam",
    "fedadagrad": "flwr.serverapp.strategy:FedAdagrad",
    "fedyogi": "flwr.serverapp.strategy:FedYogi",
    "fedmedian": "flwr.serverapp.strategy:FedMedian",
    "fedtrimmedavg": "flwr.serverapp.strategy:FedTrimmedAvg",
    "fot": "fedcl.strategies.fot:FOT",
    "prototypes": "fedcl.strategies.prototypes:PrototypeAveraging",
    "fisher": "fedcl.strategies.fisher:FisherMerging",
}

S = TypeVar("S", bound=type[Strategy])


@overload
def register_strategy(name: str) -> Callable[[S], S]: ...
@overload
def register_strategy(name: str, strategy: str | type[Strategy]) -> None: ...
def register_strategy(
    name: str, strategy: str | type[Strategy] | None = None
) -> Callable[[S], S] | None:
    """Make a strategy selectable as `strategy.name=<name>`.

    As a decorator, ``@register_strategy("mine")`` above a Strategy class; or directly,
    ``register_strategy("mine", MyStrategy)`` with a class or an import path ("pkg.mod:Cls").
    """
    if strategy is not None:
        _REGISTRY[name] = strategy
        return None

    def register(cls: S) -> S:
        _REGISTRY[name] = cls
        return cls

    return register


@dataclass(frozen=True)
class StrategyInfo:
    """What `fedcl strategies` shows of a registered strategy."""

    name: str
    target: str
    description: str
    arguments: tuple[str, ...]


def describe_strategies() -> list[StrategyInfo]:
    """Every registered strategy: name, class path, first docstring line, constructor args."""
    infos = []
    for name in available_strategies():
        cls = strategy_class(name, None)
        doc = inspect.getdoc(cls) or ""
        infos.append(
            StrategyInfo(
                name,
                f"{cls.__module__}:{cls.__qualname__}",
                doc.splitlines()[0] if doc else "",
                tuple(_constructor_arguments(cls)),
            )
        )
    return infos


def _constructor_arguments(cls: type) -> list[str]:
    """The keyword arguments `cls(...)` accepts, as 'name=default' (or 'name')."""
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    arguments = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind not in plain:
            continue
        default = p.default
        shown = (
            ""
            if default is inspect.Parameter.empty
            else f"={getattr(default, '__name__', default)!s}"
        )
        arguments.append(name + shown)
    return arguments


def available_strategies() -> list[str]:
    """The registered strategy names."""
    return sorted(_REGISTRY)


def strategy_class(name: str | None, target: str | None) -> type[Strategy]:
    """The Strategy class named by `target` (import path) or else by registered `name`."""
    if target is not None:
        cls = load_object(target, what="strategy.target")
    elif name in _REGISTRY:
        entry = _REGISTRY[name]
        cls = load_object(entry, what="strategy") if isinstance(entry, str) else entry
    else:
        raise ConfigError(
            f"unknown strategy '{name}'; valid: {', '.join(available_strategies())} "
            "(or set strategy.target to an import path)"
        )
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy '{target or name}' is not a flwr.serverapp.strategy.Strategy")
    return cls


def build_strategy(spec: dict[str, Any], num_clients: int) -> Strategy:
    """Instantiate the strategy `spec` names with the rest of `spec` as keyword arguments.

    Refuses, with a one-line `ConfigError`, an unknown strategy, an argument its constructor
    does not take, or `min_*_nodes` settings that could never be met by `num_clients` clients.
    """
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "target")}
    cls = strategy_class(spec.get("name"), spec.get("target"))
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    label = spec.get("target") or spec.get("name")
    if missing:
        raise ConfigError(
            f"strategy '{label}' does not implement {', '.join(missing)} "
            "(every flwr Strategy method must be defined; subclass FedAvg to inherit them)"
        )
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = [name for name, p in parameters.items() if name != "self" and p.kind in plain]
    unknown = [k for k in kwargs if k not in valid]
    if unknown and not takes_any:
        raise ConfigError(
            f"strategy '{label}' takes no argument '{unknown[0]}'; valid: {', '.join(valid)}"
        )
    try:
        strategy = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy '{label}': {exc}") from None
    for attr in ("min_available_nodes", "min_train_nodes"):
        needed = getattr(strategy, attr, 0)
        if isinstance(needed, int) and needed > num_clients:
            raise ConfigError(
                f"strategy '{label}' needs {attr}={needed} but the run has {num_clients} clients"
            )
    return strategy
