"""Unlearning: what happens to the global model when data is deleted, measured against an oracle.

A `kind: delete` event removes data from every later view and replay buffer (`fedcl.scenario`).
The `unlearning` config section adds a method run at each round with delete events, after the
round's events and before it trains (`session.Unlearning`, called from the round loop):

* `none`: exclusion only (the default);
* `retrain`: roll back to the last state before the deleted data was first trained on and replay
  the rounds since with the data absent: exact (`retrain.py`, rollback states in `rollback.py`);
* `sharded`: one model per group of clients (SISA); a deletion retrains only the shards that
  held the data, from their last task boundary before it: exact (`sharded.py`);
* `native`: the strategy removes the contribution itself in its `on_delete` hook; only for a
  strategy that says it can (`exact_deletion = True`, e.g. prototype averaging);
* `finetune`, `ascent`: approximate (`methods.py`, the client half of ascent in `ascent.py`);
* `federaser`: approximate, whole clients only: calibration from the rollback state with fewer
  local epochs, each step scaled to the recorded update magnitude (`federaser.py`);
* a user's function by import path (`methods.UnlearningContext` is what it is given).

`unlearning.oracle: true` replays the run with the deleted data absent from the start
(`data_absent.py`, `replica.py`) and writes, per round of deletions, the measures of
`measures.py` to `unlearning.jsonl`, summarised in summary.json.
"""

from fedcl.unlearning.methods import UnlearningContext, UnlearningError
from fedcl.unlearning.session import Unlearning, check_unlearning, with_unlearning_handlers

__all__ = [
    "Unlearning",
    "UnlearningContext",
    "UnlearningError",
    "check_unlearning",
    "with_unlearning_handlers",
]
