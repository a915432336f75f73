"""One run: a configuration trained for all its seeds at once over a sequence of tasks.

Layout of a run directory::

    config.json          the configuration (a rerun with a different one is refused)
    tasks/0000.json      per-task metrics, one list entry per seed; written atomically
    checkpoint.pt        model, optimizer and initial weights after the last finished task

A run killed at any point resumes from ``checkpoint.pt``: finished tasks are not redone and a task
file is only ever replaced whole (temporary file + ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plasticity import metrics
from plasticity.model import BatchedMLP, per_seed_cross_entropy, per_seed_norm
from plasticity.problems import Problem, Task, default_data_dir, make_problem, task_generator
from plasticity.regularizers import (
    feature_rank_penalty,
    l2_init_penalty,
    l2_penalty,
    shrink_perturb_,
    wasserstein_penalty,
)

BATCH_ORDER_STREAM, NOISE_STREAM = 1, 2


@dataclass
class Config:
    """Everything a run depends on. Defaults are ours where paper.md says (ours)."""

    name: str = "run"
    problem: str = "random_label_mnist"
    data_dir: str = field(default_factory=default_data_dir)
    num_samples: int = 600  # images in the fixed subset (Random-Label MNIST: below 784)
    downsample: int = 1  # average-pool images by this factor (4: 7x7 MNIST)
    subset_seed: int = 0  # picks the fixed image subset, shared by all seeds
    activation: str = "relu"
    width: int = 128
    depth: int = 2
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 20  # passes over the task's data per task
    tasks: int = 30
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    reg: str = "none"
    reg_strength: float = 0.0  # lambda of the penalty; per-step shrink for shrink_perturb
    sp_noise: float = 1e-3  # Shrink & Perturb noise standard deviation
    hess_methods: list[str] = field(default_factory=lambda: ["fisher"])
    hess_samples: int = 600  # samples of the task the Hessian is measured on
    hess_threshold: float = 0.99
    lanczos_steps: int = 80
    lanczos_probes: int = 8
    overlap: bool = False  # task-start gradient overlap with the top exact-Hessian subspace
    overlap_k: int | None = None  # dimension of that subspace (None: the Hessian's srank)
    eval_samples: int = 1000  # samples for end-of-task accuracy and unit / feature statistics
    dormant_tau: float = 0.01
    download: bool = False  # let torchvision download CIFAR-10 when missing


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def finished_tasks(run_dir: Path) -> int:
    """How many tasks the checkpoint in ``run_dir`` covers (0 when none)."""
    ckpt = run_dir / "checkpoint.pt"
    return torch.load(ckpt, weights_only=False)["tasks_done"] if ckpt.exists() else 0


def load_task_results(run_dir: Path) -> list[dict]:
    """The per-task records of a run, in task order."""
    return [json.loads(p.read_text()) for p in sorted((run_dir / "tasks").glob("*.json"))]


class Trainer:
    """Trains ``cfg.seeds`` batched, measuring at the start and end of every task."""

    def __init__(self, cfg: Config, problem: Problem) -> None:
        self.cfg, self.problem = cfg, problem
        self.model = BatchedMLP(
            cfg.seeds, problem.input_dim, cfg.width, cfg.depth, problem.num_classes, cfg.activation
        )
        params = list(self.model.parameters())
        if cfg.optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, foreach=True)
        elif cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, foreach=True)
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose adam or sgd")
        self.init = [p.detach().clone() for p in params]
        self.init_sorted = [p.flatten(1).sort(dim=1).values for p in self.init]

    def state_dict(self, tasks_done: int) -> dict:
        return {
            "tasks_done": tasks_done,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "init": self.init,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.init = state["init"]
        self.init_sorted = [p.flatten(1).sort(dim=1).values for p in self.init]

    def penalty(self, features: torch.Tensor) -> torch.Tensor:
        """(S,) regularizer penalty; zero for none and for shrink_perturb."""
        cfg, params = self.cfg, list(self.model.parameters())
        if cfg.reg == "l2":
            return cfg.reg_strength * l2_penalty(params)
        if cfg.reg == "l2_init":
            return cfg.reg_strength * l2_init_penalty(params, self.init)
        if cfg.reg == "wasserstein":
            return cfg.reg_strength * wasserstein_penalty(params, self.init_sorted)
        if cfg.reg == "feature_rank":
            return cfg.reg_strength * feature_rank_penalty(features)
        if cfg.reg in ("none", "shrink_perturb"):
            return torch.zeros(self.model.num_seeds)
        raise ValueError(f"unknown regularizer {cfg.reg!r}")

    def measure(self, task: Task, when: str) -> dict[str, list]:
        """Accuracy, loss and curvature on ``task``; unit statistics too at the end of a task."""
        cfg, model = self.cfg, self.model
        x, y = task.first(cfg.eval_samples)
        with torch.no_grad():
            logits = model(x)
        out: dict[str, list] = {
            f"loss_{when}": per_seed_cross_entropy(logits, y).tolist(),
            f"acc_{when}": (logits.argmax(-1) == y).float().mean(1).tolist(),
            f"grad_norm_{when}": metrics.full_batch_gradient_norm(model, x, y),
        }
        xh, yh = task.first(cfg.hess_samples)
        ranks = metrics.hessian_ranks(
            model, xh, yh, cfg.hess_methods, cfg.hess_threshold, cfg.lanczos_steps,
            cfg.lanczos_probes,
        )
        out.update({f"{k}_{when}": v for k, v in ranks.items()})
        if cfg.overlap and when == "start":
            out[f"overlap_{when}"] = metrics.gradient_overlap(model, xh, yh, cfg.overlap_k)
        if when == "end":
            out.update(metrics.unit_stats(model, x, cfg.dormant_tau))
            out["feature_rank"] = metrics.feature_rank(model, x, cfg.hess_threshold)
            out["weight_norm"] = model.per_seed_sq_norm().sqrt().tolist()
            out["dist_init"] = model.per_seed_sq_norm(self.init).sqrt().tolist()
        return out

    def train_task(self, task: Task, t: int) -> dict[str, list]:
        """Train every seed on ``task`` for ``cfg.epochs`` passes; online (task-averaged) stats."""
        cfg, model = self.cfg, self.model
        params = list(model.parameters())
        order_gens = [task_generator(s, t, BATCH_ORDER_STREAM) for s in cfg.seeds]
        noise_gens = [task_generator(s, t, NOISE_STREAM) for s in cfg.seeds]
        n = task.num_samples
        keys = ("loss", "acc", "grad_norm", "update_norm")
        sums = {k: torch.zeros(model.num_seeds) for k in keys}
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.stack([torch.randperm(n, generator=g) for g in order_gens])
            for start in range(0, n, cfg.batch_size):
                xb, yb = task.batch(order[:, start : start + cfg.batch_size])
                logits, pre = model.forward_with_hidden(xb)
                loss = per_seed_cross_entropy(logits, yb)
                features = model.act(pre[-1]) if pre else xb
                total = (loss + self.penalty(features)).sum()
                self.opt.zero_grad(set_to_none=True)
                total.backward()
                before = torch._foreach_mul(params, 1.0)
                self.opt.step()
                if cfg.reg == "shrink_perturb":
                    shrink_perturb_(params, cfg.reg_strength, cfg.sp_noise, noise_gens)
                with torch.no_grad():
                    sums["loss"] += loss.detach()
                    sums["acc"] += (logits.argmax(-1) == yb).float().mean(1)
                    sums["grad_norm"] += per_seed_norm([p.grad for p in params])
                    sums["update_norm"] += per_seed_norm(torch._foreach_sub(params, before))
                steps += 1
        return {f"{k}_online": (v / max(steps, 1)).tolist() for k, v in sums.items()}


def run_experiment(
    cfg: Config,
    run_dir: Path,
    on_task_done: Callable[[int], None] | None = None,
    stop_after: int | None = None,
) -> list[dict]:
    """Run (or resume) ``cfg`` in ``run_dir``; return all task records.

    ``on_task_done(t)`` is called after each task is saved; ``stop_after`` ends the call after that
    many newly finished tasks (as an interruption would), leaving a resumable run.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "tasks").mkdir(exist_ok=True)
    cfg_path = run_dir / "config.json"
    cfg_dict = dataclasses.asdict(cfg)
    if cfg_path.exists():
        # fields added to Config after the run was saved count as having their default value
        saved = {**dataclasses.asdict(Config()), **json.loads(cfg_path.read_text())}
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(cfg_dict)):
            raise ValueError(
                f"{run_dir} holds results of a different configuration; "
                "pass another --out directory or delete it"
            )
    else:
        _atomic_write_text(cfg_path, json.dumps(cfg_dict, indent=1))
    torch.manual_seed(0)  # nothing should draw from the global RNG; this makes sure of it anyway
    problem = make_problem(
        cfg.problem, cfg.data_dir, cfg.num_samples, cfg.subset_seed, cfg.downsample, cfg.download
    )
    trainer = Trainer(cfg, problem)
    ckpt_path = run_dir / "checkpoint.pt"
    done = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        trainer.load_state_dict(state)
        done = state["tasks_done"]
    last = cfg.tasks if stop_after is None else min(cfg.tasks, done + stop_after)
    for t in range(done, last):
        began = time.perf_counter()
        task = problem.task(cfg.seeds, t)
        record = trainer.measure(task, "start")
        record.update(trainer.train_task(task, t))
        record.update(trainer.measure(task, "end"))
        result = {"task": t, "seeds": cfg.seeds, "seconds": time.perf_counter() - began}
        result["metrics"] = record
        _atomic_write_text(run_dir / "tasks" / f"{t:04d}.json", json.dumps(result))
        _atomic_torch_save(trainer.state_dict(t + 1), ckpt_path)
        if on_task_done is not None:
            on_task_done(t)
    return load_task_results(run_dir)
