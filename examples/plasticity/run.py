"""Loss-of-plasticity experiments with hessrank: one entry point for every figure.

    python examples/plasticity/run.py --preset smoke   --out results/smoke    # seconds
    python examples/plasticity/run.py --preset default --out results/default  # figures, 5 seeds
    python examples/plasticity/run.py --preset paper   --out results/paper    # 30 seeds
    python examples/plasticity/run.py --activation tanh --reg l2 --reg-strength 1e-4 --out res/x

A preset is a list of named runs (see ``preset_runs``); any flag given on the command line
overrides that field in every run of the preset. Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from hessrank import progress_bar

if __package__ in (None, ""):  # run as a file: make examples/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plasticity.experiment import (
    COUNT,
    OPTIMIZERS,
    Config,
    check_config,
    prepare_run,
    run_experiment,
)
from plasticity.metrics import BLOCKS
from plasticity.model import ACTIVATIONS
from plasticity.problems import DATA_DIR_ENV, PROBLEMS, SetupError, data_dir_of
from plasticity.regularizers import REGULARIZERS

PRESETS = ("single", "smoke", "default", "paper")
ESTIMATORS = ["exact", "ggn", "fisher", "lanczos"]

# Regularizer strengths swept by the presets (ours, none tuned: one decade apart around the
# value v1 of this harness used; shrink_perturb: the per-step shrink p, noise sigma = 1e-3).
REG_SWEEP = {
    "l2": (1e-5, 1e-4, 1e-3),
    "l2_init": (1e-4, 1e-3, 1e-2),
    "shrink_perturb": (1e-5, 1e-4, 1e-3),
    "wasserstein": (1e-4, 1e-3, 1e-2),
}
REG_SWEEP_ACTIVATIONS = ("relu", "leaky_relu")
FEATURE_RANK_STRENGTH = 0.1
SMOKE_RUNS = ("act_relu", "act_leaky_relu", "act_tanh", "featrank_leaky_relu",
              "reg_wasserstein_0.001_relu", "exact_relu", "exact_leaky_relu", "permuted_relu")


def main_setting(**changes: object) -> Config:
    """Random-Label MNIST (subset): 300 images, MLP 2x128, Adam 1e-3, 30 epochs of batch 32 per
    task; EF rank on all 300 images, of the whole network and of the last two layers."""
    return dataclasses.replace(Config(hess_blocks=list(BLOCKS)), **changes)


def exact_setting(**changes: object) -> Config:
    """A model small enough for the exact Hessian (Figures 3 and 5 right).

    MNIST average-pooled 4x4 to 7x7 = 49 inputs, 64 images, MLP 2x16: 1,242 parameters (442 in
    the last two layers). Adam at lr 1e-2, 50 epochs of batch 16 per task, so that a task can be
    fitted (at lr 1e-3 or 128 images this model stays near 20-40% accuracy). All four
    estimators (Lanczos: the library's default budget) on both parameter blocks, and the task-start
    gradient overlap, are measured on all 64 images.
    """
    base = Config(
        num_samples=64, downsample=4, width=16, lr=1e-2, batch_size=16, epochs=50,
        hess_methods=list(ESTIMATORS), hess_blocks=list(BLOCKS), hess_samples=64, overlap=True,
    )
    return dataclasses.replace(base, **changes)


def permuted_setting(**changes: object) -> Config:
    """Permuted MNIST: 10,000 images with their true labels, a new pixel permutation per task,
    one pass per task (313 steps of batch 32); EF rank on 300 of the images."""
    base = Config(problem="permuted_mnist", num_samples=10_000, epochs=1, hess_blocks=list(BLOCKS))
    return dataclasses.replace(base, **changes)


def reg_run_name(reg: str, strength: float, activation: str) -> str:
    """``reg_l2_0.0001_relu``: the name of one run of the regularizer sweep."""
    return f"reg_{reg}_{strength:g}_{activation}"


def preset_runs(preset: str) -> list[Config]:
    """The named runs of a preset (before command-line overrides), most important first.

    ``default`` (5 seeds) fits 45 minutes on 2 CPU cores: the four activations over 30 tasks in
    the main setting, feature-rank regularization over 30 tasks, the exact-size setting over 10
    tasks, Permuted MNIST over 10 tasks, and the regularizer sweep (3 strengths x 4 regularizers
    x ReLU / leaky-ReLU) over 12 tasks at 3 seeds. ``paper``: every run 30 seeds and 30 tasks.
    """
    if preset == "single":
        return [Config()]
    runs = [main_setting(name=f"act_{act}", activation=act) for act in ACTIVATIONS]
    runs.append(main_setting(
        name="featrank_leaky_relu", activation="leaky_relu", reg="feature_rank",
        reg_strength=FEATURE_RANK_STRENGTH,
    ))
    runs += [exact_setting(name=f"exact_{act}", activation=act, tasks=10) for act in ACTIVATIONS]
    runs += [
        permuted_setting(name=f"permuted_{act}", activation=act, tasks=10) for act in ACTIVATIONS
    ]
    runs += [
        main_setting(
            name=reg_run_name(reg, strength, act), activation=act, reg=reg,
            reg_strength=strength, tasks=12, seeds=[0, 1, 2],
        )
        for act in REG_SWEEP_ACTIVATIONS
        for reg, strengths in REG_SWEEP.items()
        for strength in strengths
    ]
    if preset == "paper":
        runs = [dataclasses.replace(r, seeds=list(range(30)), tasks=30) for r in runs]
    if preset == "smoke":  # a few of the default runs, shrunk until they take a second each
        runs = [
            dataclasses.replace(
                r, problem="synthetic", num_samples=64, downsample=1, width=8, tasks=2,
                epochs=2, seeds=[0, 1], hess_samples=32, eval_samples=64, lanczos_steps=20,
            )
            for r in runs
            if r.name in SMOKE_RUNS
        ]
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--preset", choices=PRESETS, default="single", help="list of runs (default: single)")
    add("--out", type=Path, default=None,
        help="results directory (default: examples/plasticity/results/<preset>)")
    add("--runs", default=None, help="comma-separated run names of the preset to run (default all)")
    add("--threads", type=int, default=1,
        help="torch CPU threads (default 1: more threads slow down on a shared CPU)")
    add("--no-progress", action="store_true", help="no progress bar")
    # Overrides of Config fields; omitted flags keep the preset's value (shown: Config defaults).
    s = argparse.SUPPRESS
    add("--name", default=s, help=f"run name (single preset; default {d.name})")
    add("--problem", choices=PROBLEMS, default=s, help=f"default {d.problem}")
    add("--data-dir", dest="data_dir", type=Path, default=None,
        help=f"folder holding MNIST/raw (and CIFAR-10, ImageNet-32) (default ${DATA_DIR_ENV} or "
        "~/.cache/hessrank/data); not part of a run's configuration")
    add("--download", action="store_true",
        help="let torchvision download MNIST / CIFAR-10 into the data folder when missing")
    add("--num-samples", dest="num_samples", type=int, default=s,
        help=f"images in the fixed subset (default {d.num_samples})")
    add("--downsample", type=int, default=s, help=f"avg-pool factor (default {d.downsample})")
    add("--subset-seed", dest="subset_seed", type=int, default=s, help="seed of the image subset")
    add("--activation", choices=ACTIVATIONS, default=s, help=f"default {d.activation}")
    add("--width", type=int, default=s, help=f"hidden units per layer (default {d.width})")
    add("--depth", type=int, default=s, help=f"hidden layers (default {d.depth})")
    add("--optimizer", choices=OPTIMIZERS, default=s, help=f"default {d.optimizer}")
    add("--lr", type=float, default=s, help=f"learning rate (default {d.lr})")
    add("--batch-size", dest="batch_size", type=int, default=s, help=f"default {d.batch_size}")
    add("--epochs", type=int, default=s, help=f"passes over the data per task (default {d.epochs})")
    add("--tasks", type=int, default=s, help=f"number of tasks (default {d.tasks})")
    add("--seeds", type=int, default=s, help=f"number of seeds trained batched (default "
        f"{len(d.seeds)})")
    add("--first-seed", dest="first_seed", type=int, default=0, help="seeds are first..first+n-1")
    add("--reg", choices=REGULARIZERS, default=s, help=f"regularizer (default {d.reg})")
    add("--reg-strength", dest="reg_strength", type=float, default=s,
        help="penalty lambda; per-step shrink for shrink_perturb (needed by every --reg but "
        "none, refused with none)")
    add("--sp-noise", dest="sp_noise", type=float, default=s,
        help=f"Shrink & Perturb noise std (default {d.sp_noise})")
    add("--hess-methods", dest="hess_methods", default=s,
        help="comma-separated hessrank methods (default fisher)")
    add("--hess-blocks", dest="hess_blocks", default=s,
        help=f"comma-separated parameter blocks of the Hessian, of {BLOCKS} (default all)")
    add("--hess-max-memory", dest="hess_max_memory", type=float, default=s,
        help=f"memory budget of the exact Hessian in bytes (default {d.hess_max_memory:.3g})")
    add("--hess-samples", dest="hess_samples", type=int, default=s,
        help=f"samples the Hessian is measured on, at most --num-samples (default "
        f"{d.hess_samples})")
    add("--hess-threshold", dest="hess_threshold", type=float, default=s,
        help="srank threshold of every rank: the Hessian ranks, the feature rank and the "
        f"overlap's default k (default {d.hess_threshold})")
    add("--lanczos-steps", dest="lanczos_steps", type=int, default=s,
        help="Lanczos products (default: the library's, min(640, ceil(P/3)))")
    add("--overlap", action=argparse.BooleanOptionalAction, default=s,
        help="measure (or not: --no-overlap) the task-start gradient overlap with the top "
        "exact-Hessian subspace (default: the preset's; off in single)")
    add("--overlap-k", dest="overlap_k", type=int, default=s,
        help="top-k Hessian subspace of the overlap, at most the number of parameters "
        "(default: the Hessian's srank)")
    add("--eval-samples", dest="eval_samples", type=int, default=s,
        help=f"evaluation samples: the task's first ones, at most all of its images (default "
        f"{d.eval_samples})")
    add("--dormant-tau", dest="dormant_tau", type=float, default=s, help="dormant threshold tau")
    return p.parse_args(argv)


def configs_from_args(args: argparse.Namespace) -> list[Config]:
    """The preset's runs with the command-line overrides applied, each checked.

    Raises:
        SetupError: ``--name`` with a preset (its runs keep their names), a name ``--runs``
            does not find in the preset, or a value :func:`check_config` refuses.
    """
    fields = {f.name for f in dataclasses.fields(Config)}
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    if "name" in overrides and args.preset != "single":
        raise SetupError(f"--name {args.name} with --preset {args.preset}: --name names the run "
                         "of --preset single; a preset's runs keep their names (choose some with "
                         "--runs, and another folder with --out)")
    for listed in ("hess_methods", "hess_blocks"):
        if listed in overrides:
            overrides[listed] = [m for m in overrides[listed].split(",") if m]
    runs = preset_runs(args.preset)
    if args.runs:
        wanted = args.runs.split(",")
        unknown = set(wanted) - {r.name for r in runs}
        if unknown:
            raise SetupError(f"--runs names {', '.join(sorted(unknown))}, not a run of --preset "
                             f"{args.preset}: choose from {', '.join(r.name for r in runs)}")
        runs = [r for r in runs if r.name in wanted]
    configs = []
    for r in runs:  # --first-seed shifts the preset's seeds unless --seeds says how many
        count = overrides.get("seeds", len(r.seeds))
        seeds = list(range(args.first_seed, args.first_seed + count)) if (
            "seeds" in overrides or args.first_seed) else r.seeds
        configs.append(dataclasses.replace(r, **{**overrides, "seeds": seeds}))
    for cfg in configs:
        check_config(cfg)
    return configs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(__file__).resolve().parent / "results" / args.preset
    data_dir = data_dir_of(args.data_dir)
    try:  # every option, then every run directory, is checked before the first task is trained
        COUNT.check("--threads", args.threads)
        torch.set_num_threads(args.threads)
        configs = configs_from_args(args)
        states = {c.name: prepare_run(c, out / c.name, data_dir, args.download)[0]
                  for c in configs}
        done = {c.name: min(int((states[c.name] or {}).get("tasks_done", 0)), c.tasks)
                for c in configs}
        del states  # the checkpoints are loaded again by each run
        with progress_bar(disable=args.no_progress) as progress:
            overall = progress.add_task("all tasks", total=sum(c.tasks for c in configs),
                                        completed=sum(done.values()))
            for cfg in configs:
                run = progress.add_task(cfg.name, total=cfg.tasks, completed=done[cfg.name])

                def advance(_t: int, run: int = run) -> None:
                    progress.advance(run)
                    progress.advance(overall)

                run_experiment(cfg, out / cfg.name, data_dir, args.download, on_task_done=advance)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (a traceback before; each finished task is on disk already)
        print(f"interrupted: the tasks finished so far are in {out}; run the same command again "
              "to resume", file=sys.stderr)
        return 130
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
