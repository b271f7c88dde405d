"""Calling a strategy's methods from the round loop: failures and wrong return types become one
`StrategyError` naming the strategy, the method and the round."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.exception import InconsistentMessageReplies

from fedcl.engine.summation import ArraySum, SumPlan, combine
from fedcl.errors import StrategyError
from fedcl.strategies.base import ClientExtension, ContinualStrategy


def strategy_name(strategy: Any) -> str:
    """The strategy's class name, as messages show it."""
    return type(strategy).__name__


def call_strategy(strategy: Any, method: str, server_round: int, *args: Any) -> Any:
    """`strategy.<method>(*args)`; any exception becomes a one-line `StrategyError`."""
    try:
        return getattr(strategy, method)(*args)
    except Exception as exc:  # a user's strategy may raise anything; we name where it happened
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StrategyError(
            f"strategy {strategy_name(strategy)} failed in {method} at round {server_round}: "
            f"{type(exc).__name__}{': ' + detail if detail else ''}"
        ) from exc


def _wrong(strategy: Any, method: str, server_round: int, wanted: str, got: Any) -> StrategyError:
    return StrategyError(
        f"strategy {strategy_name(strategy)}.{method} at round {server_round} returned "
        f"{type(got).__name__}, expected {wanted}"
    )


def configure_train(strategy: Any, server_round: int, *args: Any) -> list[Message]:
    """`strategy.configure_train(...)` as a list, checked to hold only Flower Messages."""
    result = call_strategy(strategy, "configure_train", server_round, server_round, *args)
    try:
        messages = list(result)
    except TypeError:
        wanted = "an iterable of Message"
        raise _wrong(strategy, "configure_train", server_round, wanted, result) from None
    for message in messages:
        if not isinstance(message, Message):
            raise _wrong(strategy, "configure_train", server_round, "Message items", message)
    return messages


def combine_sums(
    strategy: Any,
    server_round: int,
    replies: list[Message],
    sums: list[ArraySum],
    plan: SumPlan,
) -> list[Message]:
    """The replies the strategy aggregates, its actors' sums folded in (`summation.combine`); a
    failure is reported as the strategy's own aggregation would report it."""
    try:
        return combine(replies, sums, plan)
    except InconsistentMessageReplies as exc:
        raise StrategyError(
            f"strategy {strategy_name(strategy)} failed in aggregate_train at round "
            f"{server_round}: {type(exc).__name__}: {exc}"
        ) from exc


def aggregate_train(
    strategy: Any, server_round: int, replies: list[Message]
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """`strategy.aggregate_train(...)`, checked to be (ArrayRecord | None, MetricRecord | None)."""
    result = call_strategy(strategy, "aggregate_train", server_round, server_round, replies)
    wanted = "(ArrayRecord | None, MetricRecord | None)"
    if not (isinstance(result, tuple) and len(result) == 2):
        raise _wrong(strategy, "aggregate_train", server_round, wanted, result)
    arrays, metrics = result
    if not (arrays is None or isinstance(arrays, ArrayRecord)):
        raise _wrong(strategy, "aggregate_train", server_round, wanted, arrays)
    if not (metrics is None or isinstance(metrics, MetricRecord)):
        raise _wrong(strategy, "aggregate_train", server_round, wanted, metrics)
    return arrays, metrics


def arrays_hook(
    strategy: Any, hook: str, server_round: int, arrays: ArrayRecord, *args: Any
) -> ArrayRecord:
    """Run a hook that may return new global arrays; return them, or `arrays` if it returned
    None."""
    result = call_strategy(strategy, hook, server_round, *args)
    if result is None:
        return arrays
    if not isinstance(result, ArrayRecord):
        raise _wrong(strategy, hook, server_round, "ArrayRecord or None", result)
    return result


def notify(strategy: Any, hook: str, server_round: int, *args: Any) -> None:
    """Run a hook that returns nothing."""
    call_strategy(strategy, hook, server_round, *args)


def client_extension(strategy: Any) -> ClientExtension | None:
    """The strategy's client half (`ContinualStrategy.client_extension`), checked to be a
    `ClientExtension` or None; None for a strategy without continual hooks."""
    if not isinstance(strategy, ContinualStrategy):
        return None
    extension = call_strategy(strategy, "client_extension", 0)
    if not (extension is None or isinstance(extension, ClientExtension)):
        raise _wrong(strategy, "client_extension", 0, "ClientExtension or None", extension)
    return extension
