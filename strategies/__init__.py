"""fedcl's strategy registry: stock Flower Message-API strategies and fedcl's own, by name.

A strategy is any `flwr.serverapp.strategy.Strategy`. Name one in a config with `strategy.name`
(a registered name) or `strategy.target` (an import path, which takes precedence); every other key
under `strategy` is passed to its constructor. Register your own with `register_strategy`, as a
decorator; a config's `imports` list names the modules to import first, so a strategy registered
in a user's module is found by name (and listed by `fedcl strategies --import MODULE`).
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from fedcl.config import NON_NEGATIVE, POSITIVE, UNIT, Bound
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

    Refuses, with a one-line `ConfigError` naming `strategy.<argument>` where it can: an unknown
    strategy, an argument its constructor does not take, one of the wrong type (by the
    constructor's annotations) or out of range (`ARGUMENT_RANGES`, for Flower's strategies and
    their subclasses), an argument the constructor itself refuses (TypeError, ValueError,
    AssertionError), and `min_*_nodes` settings that `num_clients` clients could never meet.
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
    _check_arguments(cls, kwargs)
    try:
        strategy = cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(_refusal(label, kwargs, exc)) from None
    for attr in ("min_available_nodes", "min_train_nodes"):
        needed = getattr(strategy, attr, 0)
        if isinstance(needed, int) and needed > num_clients:
            raise ConfigError(
                f"strategy '{label}' needs {attr}={needed} but the run has {num_clients} clients"
            )
    return strategy


# Flower's constructors check almost none of their arguments; a bad one fails rounds later, in
# the middle of a run. By the class that declares them, so subclasses inherit the ranges.
ARGUMENT_RANGES: dict[type, dict[str, Bound]] = {
    FedAvg: {
        "fraction_train": UNIT,
        "fraction_evaluate": UNIT,
        "min_train_nodes": NON_NEGATIVE,
        "min_evaluate_nodes": NON_NEGATIVE,
        "min_available_nodes": NON_NEGATIVE,
    },
    FedProx: {"proximal_mu": NON_NEGATIVE},
    FedAvgM: {"server_learning_rate": POSITIVE, "server_momentum": Bound(0, 1, high_open=True)},
    FedOpt: {
        "eta": POSITIVE,
        "eta_l": POSITIVE,
        "beta_1": Bound(0, 1, high_open=True),
        "beta_2": Bound(0, 1, high_open=True),
        "tau": POSITIVE,
    },
}


def _check_arguments(cls: type, kwargs: dict[str, Any]) -> None:
    """Each argument against the constructor's annotation, then against `ARGUMENT_RANGES`."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: the constructor alone decides
        hints = {}
    for key, value in kwargs.items():
        hint = hints.get(key)
        if hint is not None and _matches(value, hint) is False:
            raise ConfigError(f"strategy.{key} must be {_describe(hint)}, got {value!r}")
    ranges = {
        k: b
        for base, table in ARGUMENT_RANGES.items()
        if issubclass(cls, base)
        for k, b in table.items()
    }
    for key, value in kwargs.items():
        bound = ranges.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if bound is not None and number and not bound.holds(value):
            raise ConfigError(f"strategy.{key} must be {bound}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether a config value fits a type annotation; None where the annotation is beyond this
    simple reading (the constructor then decides)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        answers = [_matches(value, arg) for arg in typing.get_args(hint)]
        return True if True in answers else (None if None in answers else False)
    plain = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    if hint in plain:
        return plain[hint](value)
    kind = origin or hint
    if kind in (list, tuple, collections.abc.Sequence):
        return isinstance(value, list | tuple)
    if kind in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if kind is collections.abc.Callable:
        return callable(value)
    return None


def _describe(hint: Any) -> str:
    """An annotation in words: 'a number', 'an integer or null', ..."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        words = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    kind = typing.get_origin(hint) or hint
    if kind in (list, tuple, collections.abc.Sequence):
        return "a list"
    if kind in (dict, collections.abc.Mapping):
        return "a mapping"
    if kind is collections.abc.Callable:
        return "a function (which a config cannot give)"
    return str(hint)


def _refusal(label: str, kwargs: dict[str, Any], exc: BaseException) -> str:
    """One line for an exception of the strategy's constructor, naming the argument it names."""
    text = str(exc).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    named = [k for k in kwargs if re.search(rf"\b{re.escape(k)}\b", message)]
    if not named:
        return f"strategy '{label}' refused its arguments: {message}"
    key = named[0]
    if message.startswith(key):  # fedcl's strategies say "threshold must be ..."
        return f"strategy.{message}"
    return f"strategy.{key}: {message}"
