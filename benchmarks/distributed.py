"""Data-parallel benchmark: time and communication volume against the number of processes, and
``fisher`` at large ``n``.

``scaling``: for each process count, spawns that many gloo processes on 127.0.0.1 (CPU), each
with its shard of one seeded batch, and times ``hessrank.effective_rank(...,
process_group=dist.group.WORLD)`` per method (the slowest process; the first call of each method
in a process is a warm-up). The volume is the payload of the tensor collectives, from the
result's data-parallel note (the same in every process). Threads: ``--threads`` in total, split
over the processes (at least one each), so the processes compete for the same cores.

``large``: ``fisher`` on the MLP 784-512-512-10 (670k parameters) at large ``n`` in one process:
time, peak memory, and how much of the spectrum the srank needs (the share of the eigenvalues
that hold ``threshold`` of the trace), which decides whether a partial eigen-solve could pay.

    python benchmarks/distributed.py scaling --processes 1 2 4
    python benchmarks/distributed.py large --n 16384
    HESSRANK_DATA_DIR=~/data python benchmarks/distributed.py large --n 4096 --data mnist
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hessrank
from hessrank.distributed import DataParallel

#: (name, MLP widths, n, method, options): the scaling cases.
CASES = [
    ("fisher, MLP 784-512-512-10, n = 2048", (784, 512, 512, 10), 2048, "fisher", {}),
    ("ggn, MLP 784-128-10, n = 256", (784, 128, 10), 256, "ggn", {}),
    ("fisher_lanczos, MLP 784-512-512-10, n = 2048", (784, 512, 512, 10), 2048,
     "fisher_lanczos", {"lanczos_steps": 100}),
    ("exact, MLP 32-32-10, n = 2048", (32, 32, 10), 2048, "exact", {}),
    ("lanczos, MLP 784-512-512-10, n = 2048", (784, 512, 512, 10), 2048, "lanczos",
     {"lanczos_steps": 100}),
]
#: 4-byte all-reduces timed for the failure flag's price.
FLAG_REPEATS = 2000
VOLUME = re.compile(r"moved ([0-9.e+]+) MiB per process")


def mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """ReLU MLP, seeded (the same in every process)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batch(n: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded synthetic batch, as in ``run.py``."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, features, generator=generator), torch.randint(0, 10, (n,),
                                                                         generator=generator)


def mnist(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` MNIST training images (normalised) and labels, read from the raw IDX files
    under ``$HESSRANK_DATA_DIR/MNIST/raw``."""
    raw = Path(os.environ.get("HESSRANK_DATA_DIR", "data")) / "MNIST" / "raw"
    images = np.frombuffer((raw / "train-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    labels = np.frombuffer((raw / "train-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    inputs = torch.tensor(images[: n * 784].reshape(n, 784), dtype=torch.float32) / 255
    return (inputs - 0.1307) / 0.3081, torch.tensor(labels[:n], dtype=torch.int64)


def worker(rank: int, world: int, port: int, threads: int, repeats: int,
           queue: Any) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    exchanges = [0]
    proceed = DataParallel._proceed

    def counted(self: DataParallel) -> None:  # every exchange starts with the failure flag
        exchanges[0] += 1
        proceed(self)

    DataParallel._proceed = counted  # type: ignore[method-assign]
    rows = []
    for name, widths, n, method, options in CASES:
        model = mlp(widths)
        x, y = batch(n, widths[0])
        bounds = np.linspace(0, n, world + 1).astype(int)
        shard = (x[bounds[rank]:bounds[rank + 1]], y[bounds[rank]:bounds[rank + 1]])
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            exchanges[0] = 0
            start = time.perf_counter()
            result = hessrank.effective_rank(model, nn.CrossEntropyLoss(), shard, method=method,
                                             process_group=dist.group.WORLD, **options)
            times.append(time.perf_counter() - start)
        note = next(note for note in result.notes if "data-parallel" in note)
        match = VOLUME.search(note)
        rows.append({"case": name, "method": method, "processes": world,
                     "seconds": statistics.median(times[1:]),
                     "mib": float(match.group(1)) if match else None,
                     "srank": result.rank, "n": result.num_samples,
                     "exchanges": exchanges[0]})
    # The price of an exchange's failure flag (README, "Checks, costs and limits"): one
    # 4-byte all-reduce, timed alone.
    flag = torch.ones(1, dtype=torch.int32)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(FLAG_REPEATS):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    for row in rows:
        row["flag_seconds"] = (time.perf_counter() - start) / FLAG_REPEATS
    queue.put((rank, rows))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    context = mp.get_context("spawn")
    for world in args.processes:
        queue = context.Queue()
        threads = max(1, args.threads // world)
        processes = [context.Process(target=worker,
                                     args=(rank, world, port, threads, args.repeats, queue))
                     for port in [free_port()] for rank in range(world)]
        for process in processes:
            process.start()
        reports = dict(queue.get() for _ in processes)
        for process in processes:
            process.join()
        for i, row in enumerate(reports[0]):
            row["seconds"] = max(reports[rank][i]["seconds"] for rank in reports)
            row["threads_per_process"] = threads
            results.append(row)
            print(f"{row['processes']} x {threads} thread(s)  {row['case']:<45} "
                  f"{row['seconds']:8.2f} s  {row['mib'] or 0:9.2f} MiB  srank {row['srank']}  "
                  f"{row['exchanges']} exchanges, flags "
                  f"{row['exchanges'] * row['flag_seconds']:.4f} s",
                  flush=True)
    return results


def large(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    model = mlp((784, 512, 512, 10))
    results = []
    for n in args.n:
        x, y = mnist(n) if args.data == "mnist" else batch(n, 784)
        start = time.perf_counter()
        result = hessrank.effective_rank(model, nn.CrossEntropyLoss(), (x, y), method="fisher",
                                         max_memory=args.max_memory_gib * 2**30,
                                         measure_memory=True)
        seconds = time.perf_counter() - start
        values = np.sort(np.abs(result.eigenvalues))[::-1]
        share = {str(q): int(np.searchsorted(np.cumsum(values) / values.sum(), q)) + 1
                 for q in (0.5, 0.9, 0.99)}
        row = {"n": n, "data": args.data, "seconds": seconds,
               "peak_memory_gib": (result.peak_memory or 0) / 2**30,
               "srank": result.rank, "eigenvalues_for_share_of_trace": share,
               "notes": list(result.notes)}
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    scale = sub.add_parser("scaling", help="time and volume against the number of processes")
    scale.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    scale.add_argument("--threads", type=int, default=2, help="threads in total")
    scale.add_argument("--repeats", type=int, default=2, help="timed calls after a warm-up")
    big = sub.add_parser("large", help="fisher at large n in one process")
    big.add_argument("--n", type=int, nargs="+", default=[16384])
    big.add_argument("--threads", type=int, default=2)
    big.add_argument("--max-memory-gib", type=float, default=8.0)
    big.add_argument("--data", choices=("synthetic", "mnist"), default="synthetic",
                     help="mnist: from $HESSRANK_DATA_DIR/MNIST/raw")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    rows = scaling(args) if args.command == "scaling" else large(args)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
