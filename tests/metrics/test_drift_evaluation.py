"""Evaluation follows drift: with a label swap on some clients, `acc_by_concept` holds the global
model's accuracy on the test labels as each concept sees them, computed here by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fedcl
from fedcl.models import build_model
from fedcl.scenario.datasets import load_dataset

CLIENTS, DRIFTED, HIDDEN = 4, 0, 16
OVERRIDES = [
    f"clients.num={CLIENTS}",
    "rounds=2",
    "train.epochs=3",
    "train.lr=0.2",
    "scenario.num_tasks=1",  # all ten classes: no forgetting hides the swap
    f"model.hidden=[{HIDDEN}]",
    "engine.num_actors=1",
    "log.progress=false",
    # one client of four sees 1 and 2, and 6 and 8, swapped from round 1 on
    f"events=[{{round: 1, kind: drift, clients: [{DRIFTED}], type: label_swap,"
    " pairs: [[1, 2], [6, 8]]}]",
]
SWAP = {1: 2, 2: 1, 6: 8, 8: 6}


@pytest.mark.usefixtures("ray_session")
def test_acc_by_concept_equals_accuracy_on_the_swapped_test_labels(tmp_path: Path) -> None:
    result = fedcl.run(None, *OVERRIDES, out=tmp_path / "run")
    digits = load_dataset("digits", seed=0)
    model = build_model("mlp", digits.input_shape, digits.num_classes, hidden=[HIDDEN])
    model.load_state_dict(result.arrays.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(digits.x_test)).argmax(dim=1).numpy()
    true = digits.y_test
    swapped = np.array([SWAP.get(int(label), int(label)) for label in true])
    expected = {}
    for concept, labels in (("original", true), ("swapped", swapped)):
        expected[concept] = {"0": float((predicted == labels).mean())}
    final = result.records[-1]
    by_concept = final["acc_by_concept"]
    (drifted,) = set(by_concept) - {"original"}  # named after the event and its severity
    assert drifted.endswith("@1.00")
    assert by_concept["original"] == pytest.approx(expected["original"], abs=1e-12)
    assert by_concept[drifted] == pytest.approx(expected["swapped"], abs=1e-12)
    # not vacuous: the swap changes the score
    assert abs(expected["original"]["0"] - expected["swapped"]["0"]) > 0.05
    # `acc` weights the concepts by how many clients hold them; each client is scored under its
    # own concept
    weighted = {
        "0": ((CLIENTS - 1) * expected["original"]["0"] + expected["swapped"]["0"]) / CLIENTS
    }
    assert final["acc"] == pytest.approx(weighted, abs=1e-12)
    assert final["client_acc"] == pytest.approx(
        {str(c): expected["swapped" if c == DRIFTED else "original"]["0"] for c in range(CLIENTS)},
        abs=1e-12,
    )
