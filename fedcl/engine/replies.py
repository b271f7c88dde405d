"""Screening client replies before a strategy sees them: NaN, infinities, wrong shapes."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Error, Message
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode

from fedcl.engine.flower_compat import decoded


def reply_problem(reply: Message, reference: ArrayRecord, model_key: str) -> str | None:
    """Why `reply` cannot be aggregated against the global `reference` arrays, or None if it can.

    The record under `model_key` must have the reference's names and shapes; every array and metric
    in the reply must be finite.
    """
    if reply.has_error():
        return None
    content = reply.content
    if model_key in content.array_records:
        record = content.array_records[model_key]
        if list(record.keys()) != list(reference.keys()):
            missing = sorted(set(reference.keys()) ^ set(record.keys()))
            return f"arrays '{model_key}' have other names than the global model ({missing[:3]})"
        for name in reference:
            got, want = tuple(record[name].shape), tuple(reference[name].shape)
            if got != want:
                return f"array '{name}' has shape {got}, the global model has {want}"
    for key, record in content.array_records.items():
        for name, array in list(record.items()):
            record[name] = array = decoded(array)  # decoded once, here and for the strategy
            values = array.numpy()
            if np.issubdtype(values.dtype, np.number) and not np.isfinite(values).all():
                return f"array '{key}/{name}' contains NaN or infinity"
    for key, metrics in content.metric_records.items():
        for name, value in metrics.items():
            if not np.isfinite(np.asarray(value, dtype=float)).all():
                return f"metric '{key}/{name}' is NaN or infinite"
    return None


def screen_replies(
    replies: list[Message], reference: ArrayRecord, model_key: str
) -> tuple[list[Message], list[tuple[int, str]]]:
    """Replace unusable replies by Flower error replies; return them and (node id, reason) pairs."""
    screened, problems = [], []
    for reply in replies:
        problem = reply_problem(reply, reference, model_key)
        if problem is None:
            screened.append(reply)
            if reply.has_error():
                reason = (reply.error.reason or "").strip().splitlines()
                problems.append((reply.metadata.src_node_id, reason[0] if reason else "error"))
            continue
        error = Error(
            code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"invalid reply: {problem}"
        )
        screened.append(make_message(reply.metadata, error=error))
        problems.append((reply.metadata.src_node_id, f"invalid reply: {problem}"))
    return screened, problems
