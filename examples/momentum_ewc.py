"""FedAvg with server momentum, and clients that train with an EWC penalty: a strategy written only
against fedcl's public API, in a module of its own (put this folder on PYTHONPATH).

Run it by import path or, once imported, by its registered name::

    PYTHONPATH=examples fedcl run examples/momentum_ewc.yaml
    PYTHONPATH=examples fedcl run simulations/quickstart.yaml imports=[momentum_ewc] \\
        strategy.name=momentum-ewc

Server half (`MomentumEWC`): FedAvg's average w̄ of the clients' models becomes a step of server
momentum, v ← β v + (w − w̄), w ← w − η v (Hsu et al., 2019).

Client half (`train_ewc`, answering ``train.ewc``): each client keeps, in its own `Context.state`,
a diagonal Fisher F and anchor θ* of the tasks it has finished; when its task changes, it adds the
Fisher of the received global model on the finished task's data and moves θ* there. It trains
with cross-entropy + λ/2 Σ F (θ − θ*)² (Kirkpatrick et al., 2017).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcl import ClientExtension, ContinualStrategy, register_strategy
from fedcl.client import client_of, current_runtime, single_record
from fedcl.protocol import NUM_EXAMPLES, SERVER_ROUND
from fedcl.seeding import derive_seed

TRAIN_EWC = "train.ewc"
EWC_LAMBDA = "ewc-lambda"  # train config: λ
STATE = "momentum-ewc"  # the client's Context.state records: "<STATE>/arrays", "<STATE>/task"


def _fisher(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: mean squared per-example gradient of the log-likelihood."""
    fisher = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(
            model(torch.from_numpy(x[i : i + 1])), torch.from_numpy(y[i : i + 1])
        ).backward()
        for name, p in model.named_parameters():
            fisher[name] += p.grad.detach() ** 2 / len(x)
    return fisher


def train_ewc(msg: Message, context: Context) -> Message:
    """Train the received model on this client's data of the round, with the EWC penalty."""
    runtime = current_runtime()
    config = single_record(msg.content.config_records, "ConfigRecord")
    client, server_round = client_of(context), int(config[SERVER_ROUND])
    model = runtime.load_model(single_record(msg.content.array_records, "ArrayRecord"))
    task = runtime.scenario.task_of(client, server_round)
    if f"{STATE}/task" not in context.state:
        context.state[f"{STATE}/task"] = ConfigRecord({"task": task})
    last = int(context.state[f"{STATE}/task"]["task"])
    if last != task:  # the client finished `last`: consolidate it at the received global model
        x_old, y_old = runtime.task_data(client, server_round, last)
        new = _fisher(model, x_old, y_old)
        old = context.state.get(f"{STATE}/arrays")
        fisher = {n: new[n].numpy() + (old[f"F/{n}"].numpy() if old else 0) for n in new}
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        context.state[f"{STATE}/arrays"] = ArrayRecord(
            {f"F/{n}": Array(np.asarray(f)) for n, f in fisher.items()}
            | {f"anchor/{n}": Array(a.numpy()) for n, a in anchor.items()}
        )
        context.state[f"{STATE}/task"] = ConfigRecord({"task": task})
    stored = context.state.get(f"{STATE}/arrays")
    penalty_terms = (
        [
            (
                p,
                torch.from_numpy(stored[f"F/{n}"].numpy()),
                torch.from_numpy(stored[f"anchor/{n}"].numpy()),
            )
            for n, p in model.named_parameters()
        ]
        if stored
        else []
    )
    lam = float(config.get(EWC_LAMBDA, 0.0))
    train = runtime.config["train"]
    x, y = runtime.task_data(client, server_round, task)
    optimizer = torch.optim.SGD(model.parameters(), lr=train["lr"])
    generator = torch.Generator().manual_seed(
        derive_seed(runtime.seed, "ewc", client, server_round)
    )
    model.train()
    penalty = torch.zeros(())
    for batch in torch.randperm(len(x), generator=generator).split(train["batch_size"]):
        penalty = sum(((f * (p - a) ** 2).sum() for p, f, a in penalty_terms), torch.zeros(()))
        loss = F.cross_entropy(
            model(torch.from_numpy(x[batch.numpy()])), torch.from_numpy(y[batch.numpy()])
        )
        optimizer.zero_grad()
        (loss + lam / 2 * penalty).backward()
        optimizer.step()
    metrics = MetricRecord({NUM_EXAMPLES: len(y), "ewc-penalty": float(penalty)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content, reply_to=msg)


@register_strategy("momentum-ewc")
class MomentumEWC(FedAvg, ContinualStrategy):
    """FedAvg with server momentum; clients train with an EWC penalty on their finished tasks.

    Parameters
    ----------
    server_lr : float (default: 1.0)
        η, the server's step along the momentum.
    server_momentum : float (default: 0.9)
        β; 0 gives plain FedAvg on the server.
    ewc_lambda : float (default: 100.0)
        λ of the clients' EWC penalty; 0 gives plain local SGD.
    **kwargs
        FedAvg's arguments (fraction_train, min_train_nodes, ...).
    """

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
        ewc_lambda: float = 100.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.server_lr, self.server_momentum, self.ewc_lambda = (
            server_lr,
            server_momentum,
            ewc_lambda,
        )
        self.velocity: dict[str, np.ndarray] = {}
        self.current: ArrayRecord | None = None

    def state_dict(self) -> RecordDict:
        """The server momentum v (the model sent in a round is set again by configure_train)."""
        return RecordDict(
            {"velocity": ArrayRecord({n: Array(np.asarray(v)) for n, v in self.velocity.items()})}
        )

    def load_state_dict(self, state: RecordDict) -> None:
        """Take back the state `state_dict` returned."""
        self.velocity = {n: a.numpy() for n, a in state["velocity"].items()}

    def client_extension(self) -> ClientExtension:
        """The client half: the EWC training step."""
        return ClientExtension(handlers={TRAIN_EWC: train_ewc})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """FedAvg's sampling and payload, sent as ``train.ewc`` with λ in the config."""
        self.current = arrays
        config[EWC_LAMBDA] = self.ewc_lambda
        messages = super().configure_train(server_round, arrays, config, grid)
        return [
            Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=TRAIN_EWC)
            for m in messages
        ]

    def aggregate_train(
        self, server_round: int, replies
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's average, taken as one step of server momentum from the current model."""
        average, metrics = super().aggregate_train(server_round, replies)
        if average is None or self.current is None:
            return average, metrics
        new = {}
        for name in average:
            w, w_avg = self.current[name].numpy(), average[name].numpy()
            v = self.server_momentum * self.velocity.get(name, 0.0) + (w - w_avg)
            self.velocity[name] = v
            new[name] = Array((w - self.server_lr * v).astype(w.dtype))
        return ArrayRecord(new), metrics
