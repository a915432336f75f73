"""The tracker tutorial's run: an MLP trained with Adam on the shipped digits, its curvature
measured by every method every 25 steps on a fixed evaluation batch.

    python docs/track_digits.py                  # writes runs/curvature.jsonl (under a minute)
    hessrank plot runs/curvature.jsonl --layers -o docs/img/curvature.png
"""

from __future__ import annotations

import importlib.resources

import numpy as np
import torch
from torch import nn

import hessrank


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The UCI handwritten digits shipped with hessrank: (1797, 64) standardised, (1797,)."""
    path = importlib.resources.files("hessrank") / "data" / "digits.npz"
    with path.open("rb") as handle, np.load(handle) as archive:
        images = torch.from_numpy(archive["images"].astype(np.float32)).flatten(1)
        labels = torch.from_numpy(archive["labels"].astype(np.int64))
    return (images - images.mean()) / images.std(), labels


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    inputs, targets = digits()
    train_x, train_y = inputs[:512], targets[:512]
    eval_batch = (inputs[1024:1152], targets[1024:1152])  # 128 held-out digits, always the same
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = hessrank.Tracker(
        model, loss_fn, hessrank.METHODS, every=25, eval_batch=eval_batch, per_layer=True,
        log="runs/curvature.jsonl", method_options={"lanczos": {"lanczos_steps": 30}},
    )
    with tracker:
        for _epoch in range(20):
            for start in range(0, len(train_x), 64):
                x, y = train_x[start:start + 64], train_y[start:start + 64]
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
                tracker.step()
    print(f"{len(tracker.records)} records in runs/curvature.jsonl; "
          f"{100 * tracker.overhead:.0f}% of the loop's time went to measuring")


if __name__ == "__main__":
    main()
