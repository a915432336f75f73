"""Data-parallel training with DistributedDataParallel, measuring the curvature of the global batch.

Run it with torchrun (CPU: gloo; one GPU per process: NCCL)::

    torchrun --nproc_per_node=2 examples/ddp_rank.py

Each process trains on its shard of every batch (the shards are unequal when the batch does not
divide evenly); every few steps all processes call ``hessrank.effective_rank`` with
``process_group=dist.group.WORLD`` and get the rank of the curvature of the *global* batch, the
same number in every process. Data: the UCI handwritten digits shipped with hessrank.
"""

from __future__ import annotations

import importlib.resources
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import hessrank

BATCH = 300  # global batch: shards of 150 + 150 on 2 processes, 75 each on 4, 100 each on 3
STEPS = 60
EVERY = 20


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped digits as float inputs ``[1797, 64]`` in [0, 1] and labels ``[1797]``."""
    with importlib.resources.as_file(importlib.resources.files("hessrank") / "data"
                                     / "digits.npz") as path:
        data = np.load(path)
        images, labels = data["images"], data["labels"]
    inputs = torch.tensor(images.reshape(len(images), -1), dtype=torch.float32) / 16
    return inputs, torch.tensor(labels, dtype=torch.int64)


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts it)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    inputs, labels = digits()
    bounds = np.linspace(0, BATCH, world + 1).astype(int)  # this process's part of each batch
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(1))
    for step in range(STEPS + 1):
        picked = order[(step * BATCH + np.arange(BATCH)) % len(inputs)]
        mine = picked[bounds[rank]:bounds[rank + 1]]
        x, y = inputs[mine].to(device), labels[mine].to(device)
        if step % EVERY == 0:
            fisher = hessrank.effective_rank(ddp, loss_fn, (x, y), method="fisher",
                                             process_group=dist.group.WORLD)
            ggn = hessrank.effective_rank(ddp, loss_fn, (x, y), method="ggn",
                                          process_group=dist.group.WORLD)
            if rank == 0:
                print(f"step {step:3d}: n = {fisher.num_samples} over {world} processes, "
                      f"fisher srank {fisher.rank} (top {fisher.top_eigenvalue:.4f}), "
                      f"ggn srank {ggn.rank} (top {ggn.top_eigenvalue:.4f}), "
                      f"{fisher.seconds + ggn.seconds:.2f} s", flush=True)
        optimizer.zero_grad()
        loss_fn(ddp(x), y).backward()  # DDP averages the shards' gradients
        optimizer.step()
    if rank == 0:
        print(next(note for note in fisher.notes if note.startswith("data-parallel")))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
