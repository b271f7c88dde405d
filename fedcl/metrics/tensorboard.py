"""Optional TensorBoard logging (`log.tensorboard: true`): a round observer that writes each
round's scalars to the run folder's `tensorboard/` with `torch.utils.tensorboard`.

The `tensorboard` package is optional (`pip install 'fedcl[tensorboard]'`); `require_tensorboard`
says so in one line, and is only called when the user asked for TensorBoard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcl.errors import FedclError

FOLDER = "tensorboard"
INSTALL = (
    "log.tensorboard needs the tensorboard package: pip install 'fedcl[tensorboard]' "
    "(or set log.tensorboard=false)"
)


def require_tensorboard() -> None:
    """Raise a one-line `FedclError` saying how to install TensorBoard when it is absent."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise FedclError(INSTALL) from None


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one metrics.jsonl record, by TensorBoard tag: ``acc/avg``, ``acc/task_j``,
    ``val_acc/avg``, ``val_acc/task_j``, ``system/...`` (bytes, peak RSS, seconds), ``clients/...``
    (online, sampled, replies, failures) and ``train/<metric>`` (the strategy's numeric train
    metrics). Rounds not evaluated have no ``acc`` tags; non-finite values are left out."""
    out: dict[str, float] = {}
    if "avg_acc" in record:
        out["acc/avg"] = record["avg_acc"]
    for task, value in (record.get("acc") or {}).items():
        out[f"acc/task_{task}"] = value
    if record.get("val_acc"):
        values = list(record["val_acc"].values())
        out["val_acc/avg"] = sum(values) / len(values)
        for task, value in record["val_acc"].items():
            out[f"val_acc/task_{task}"] = value
    for key in ("bytes_sent", "bytes_received", "peak_rss_driver_mb", "train_s", "round_s"):
        if key in record:
            out[f"system/{key}"] = record[key]
    actors = record.get("peak_rss_actors_mb") or []
    if actors:
        out["system/peak_rss_actor_mb"] = max(actors)
    for key in ("online", "sampled", "replies"):
        if key in record:
            out[f"clients/{key}"] = record[key]
    if "failures" in record:
        out["clients/failures"] = len(record["failures"])
    for key, value in (record.get("train") or {}).items():
        out[f"train/{key}"] = value
    return {
        tag: float(value)
        for tag, value in out.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    }


class TensorBoardObserver:
    """Writes every finished round's `round_scalars` at step = round into `out_dir/tensorboard`.
    Raises `FedclError` (one line) if TensorBoard is not installed."""

    def __init__(self, out_dir: str | Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / FOLDER))

    def on_loop_start(self, first_round: int, init_acc: dict[str, float], audit: Any) -> None:
        return None

    def on_events(self, server_round: int, entries: list[dict[str, Any]]) -> None:
        return None

    def on_round_end(self, record: dict[str, Any], arrays: Any, strategy: Any) -> None:
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=int(record["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
