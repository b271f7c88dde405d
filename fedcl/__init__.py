"""fedcl: a Ray-distributed simulator for federated continual learning on Flower strategies.

The public API (everything else is private by convention):

- `run(config, *overrides, out=None, progress=None, **values)` runs one experiment and returns a
  `RunResult` (summary, per-round records, final global arrays, run folder, strategy);
  `run(resume=RUN_DIR)` continues an interrupted run from its latest good checkpoint.
- `run_seeds(config, *overrides, seeds=[0, 1, 2], out=None, **values)` runs once per seed into
  `out/seed_<s>/` and writes `out/summary.json` (mean, std, n of every scalar metric).
- `ContinualStrategy`: the hooks a Flower strategy may add (task start/end per client and global,
  drift, deletion, run start), with `ScenarioInfo`, `DriftEvent` and `DeletionRequest`.
- `ClientExtension`: a strategy's client half (query handlers, train extras), installed on every
  actor; `query_nodes` asks clients a query from a hook.
- `register_strategy(name)`: a decorator making a strategy selectable as ``strategy.name``.
- `fedcl.client`: what a client half reads (runtime, query input); `fedcl.protocol`: the shared
  message keys; `fedcl.testing.InProcessGrid`: test a strategy without Ray.
- Errors: `FedclError` and its kinds `ConfigError`, `DatasetError`, `StrategyError`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedcl.errors import ConfigError, DatasetError, FedclError, StrategyError

if TYPE_CHECKING:
    from fedcl.api import run
    from fedcl.engine.loop import RunResult
    from fedcl.reports.seeds import run_seeds
    from fedcl.strategies import register_strategy
    from fedcl.strategies.base import (
        ClientExtension,
        ContinualStrategy,
        DeletionRequest,
        DriftEvent,
        ScenarioInfo,
        query_nodes,
    )

__version__ = "0.1.0"

# Imported on first use: ray, torch and flwr take seconds to import, and `fedcl --help` should not.
_LAZY = {
    "run": "fedcl.api",
    "RunResult": "fedcl.engine.loop",
    "run_seeds": "fedcl.reports.seeds",
    "register_strategy": "fedcl.strategies",
    "ClientExtension": "fedcl.strategies.base",
    "ContinualStrategy": "fedcl.strategies.base",
    "DeletionRequest": "fedcl.strategies.base",
    "DriftEvent": "fedcl.strategies.base",
    "ScenarioInfo": "fedcl.strategies.base",
    "query_nodes": "fedcl.strategies.base",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedcl' has no attribute {name!r}")


__all__ = [
    "ClientExtension",
    "ConfigError",
    "ContinualStrategy",
    "DatasetError",
    "DeletionRequest",
    "DriftEvent",
    "FedclError",
    "RunResult",
    "ScenarioInfo",
    "StrategyError",
    "__version__",
    "query_nodes",
    "register_strategy",
    "run",
    "run_seeds",
]
