"""``hessrank compare`` and ``hessrank rank``: the command-line interface.

``hessrank compare`` measures every estimator against the exact Hessian on a small model and real
data that ship with the package; ``hessrank rank`` prints one rank of one model, for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hessrank.api import BACKENDS
from hessrank.cli.errors import CliError

if TYPE_CHECKING:
    from hessrank.cli.compare import Config

__all__ = ["main"]

RANK_DEFINITIONS = ("srank", "numerical", "entropy", "stable", "participation")


def _threshold(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_problem_options(parser: argparse.ArgumentParser) -> None:
    from hessrank.cli import presets

    group = parser.add_argument_group("model and data")
    group.add_argument(
        "--model",
        default="mlp",
        help="preset (mlp, cnn, resnet) or package.module:factory / path/file.py:factory, "
        "a function returning an nn.Module that maps (N, 1, H, W) images to logits "
        "(default: mlp)",
    )
    group.add_argument("--activation", default="relu", choices=tuple(presets.ACTIVATIONS))
    group.add_argument(
        "--width", type=_positive, help="hidden units (mlp) or channels (cnn, resnet)"
    )
    group.add_argument(
        "--depth", type=int, help="hidden layers (mlp), conv layers (cnn), residual blocks (resnet)"
    )
    group.add_argument("--weights", help="state_dict (.pt) to load into the model")
    group.add_argument(
        "--data",
        default="auto",
        choices=presets.DATASETS,
        help="digits (shipped UCI 8x8 digits), mnist (from --data-dir, resized to --image-size, "
        "default 8), synthetic; auto (default): mnist with --data-dir or when "
        f"${presets.DATA_DIR_ENV} has it, else digits",
    )
    group.add_argument(
        "--data-dir",
        help=f"folder holding MNIST/raw/ (torchvision layout); default ${presets.DATA_DIR_ENV}",
    )
    group.add_argument("--image-size", type=_positive, help="resize images to this side length")
    group.add_argument("--samples", type=int, default=128, help="batch size n (default 128)")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default cpu)")
    group.add_argument("--dtype", default="float32", choices=tuple(presets.DTYPES))
    group.add_argument("--threads", type=_positive, help="CPU threads for torch (default: torch's)")

    est = parser.add_argument_group("estimators")
    est.add_argument(
        "--threshold", type=_threshold, default=0.99, help="srank threshold (default 0.99)"
    )
    est.add_argument(
        "--rtol", type=float, help="numerical-rank tolerance relative to the top |eigenvalue|"
    )
    est.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="fisher/ggn backend (default auto: Kronecker identity plus torch.func)",
    )
    est.add_argument("--lanczos-steps", type=_positive, help="Lanczos steps per probe")
    est.add_argument("--lanczos-probes", type=_positive, help="Lanczos probe vectors")
    est.add_argument(
        "--max-memory", type=float, help="exact: refuse above this predicted memory, in GiB"
    )
    est.add_argument(
        "--max-seconds", type=float, help="exact: refuse above this predicted time, in seconds"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``hessrank`` argument parser with its ``compare`` and ``rank`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="hessrank",
        description="Rank and effective rank of a network's Hessian and its approximations.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{compare,rank}")

    compare = sub.add_parser(
        "compare",
        help="every estimator against the exact Hessian: accuracy and cost",
        description="Measure each estimator (exact, lanczos, ggn, fisher) on one model and batch "
        "and report its rank, its error against exact, its cost, and PyHessian as an "
        "independent check. With --checkpoints K, along a sequence of random-label tasks.",
    )
    _add_problem_options(compare)
    compare.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help="estimators, comma- or space-separated (default: all of hessrank.METHODS)",
    )
    compare.add_argument(
        "--skip-exact", action="store_true", help="leave out exact (no errors against it)"
    )
    compare.add_argument("--no-pyhessian", action="store_true", help="skip the PyHessian check")
    compare.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    compare.add_argument(
        "--seeds", type=_positive, default=1, help="number of seeds, from --seed on (default 1)"
    )
    traj = compare.add_argument_group("trajectory (random-label tasks, Adam)")
    traj.add_argument(
        "--checkpoints",
        type=int,
        default=0,
        help="K: evaluate at the start of each of K random-label tasks (default 0: once, at "
        "initialisation, on the true labels)",
    )
    traj.add_argument("--epochs", type=_positive, default=20, help="epochs per task (default 20)")
    traj.add_argument("--batch-size", type=_positive, default=32, help="minibatch (default 32)")
    traj.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    out = compare.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write every number (and the spectra) as JSON")
    out.add_argument("--csv", type=Path, help="write every number of the tables as CSV")
    out.add_argument("--plot", type=Path, help="PNG: spectra overlaid, rank over checkpoints")
    out.add_argument("--quiet", action="store_true", help="no progress bars and no tables")
    compare.set_defaults(func=_compare)

    rank = sub.add_parser(
        "rank",
        help="one rank of one model with one estimator, for scripts",
        description="Print one rank (srank by default) of the model's curvature to stdout.",
    )
    _add_problem_options(rank)
    rank.add_argument("--method", default="fisher", help="exact, lanczos, ggn or fisher")
    rank.add_argument("--definition", default="srank", choices=RANK_DEFINITIONS)
    rank.add_argument("--seed", type=int, default=0)
    rank.add_argument("--json", help="write the full result as JSON to this path ('-': stdout)")
    rank.add_argument("--quiet", action="store_true", help="no progress bar")
    rank.set_defaults(func=_rank)
    return parser


def _methods(requested: list[str] | None, skip_exact: bool) -> tuple[str, ...]:
    import hessrank

    names = [m for item in requested or hessrank.METHODS for m in item.split(",") if m]
    for name in names:
        if name not in hessrank.METHODS:
            raise CliError(f"unknown method '{name}'; choose from {', '.join(hessrank.METHODS)}")
    chosen = [m for m in hessrank.METHODS if m in names and not (skip_exact and m == "exact")]
    if not chosen:
        raise CliError("no estimator left to run: --skip-exact removed the only one")
    return tuple(chosen)


def _config(
    args: argparse.Namespace, methods: tuple[str, ...], seeds: tuple[int, ...], **extra: Any
) -> Config:
    """The run configuration from the options both subcommands share, plus ``extra``."""
    from hessrank.cli.compare import Config

    return Config(
        model=args.model,
        activation=args.activation,
        width=args.width,
        depth=args.depth,
        weights=args.weights,
        # An explicit --data-dir with --data auto means MNIST: a wrong folder is an error.
        data="mnist" if args.data == "auto" and args.data_dir else args.data,
        data_dir=args.data_dir,
        image_size=args.image_size,
        samples=args.samples,
        methods=methods,
        threshold=args.threshold,
        rtol=args.rtol,
        seeds=seeds,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        lanczos_steps=args.lanczos_steps,
        lanczos_probes=args.lanczos_probes,
        max_memory_gib=args.max_memory,
        max_seconds=args.max_seconds,
        **extra,
    )


def _progress(quiet: bool) -> Any:
    """Progress bars on stderr, when it is a terminal and not ``--quiet``."""
    from rich.console import Console

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return None
    from hessrank import progress_bar

    return progress_bar(console=console, transient=True)


def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from hessrank.cli import compare, report

    if args.checkpoints < 0:
        raise CliError(f"--checkpoints must be 0 or more, got {args.checkpoints}")
    methods = _methods(args.methods, args.skip_exact)
    cfg = _config(
        args,
        methods,
        tuple(range(args.seed, args.seed + args.seeds)),
        checkpoints=args.checkpoints,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        pyhessian=not args.no_pyhessian,
    )
    result = compare.new_report(cfg)

    def save(current: dict[str, Any]) -> None:
        if args.json:
            report.write_json(current, args.json)

    progress = _progress(args.quiet)
    status = 0
    try:
        with progress or nullcontext():
            compare.run_compare(cfg, result, progress, save)
    except KeyboardInterrupt:
        result["interrupted"] = True
        status = 130
    compare.summarize(result)
    save(result)
    if args.csv:
        report.write_csv(result, args.csv)
    if args.plot:
        report.write_plot(result, args.plot)
    if not args.quiet:
        report.render(result, Console())
    elif status:
        print("hessrank: interrupted; kept what was measured", file=sys.stderr)
    return status


def _rank(args: argparse.Namespace) -> int:
    from hessrank.cli import compare, report

    cfg = _config(args, _methods([args.method], False), (args.seed,))
    problem = compare.build_problem(cfg, args.seed)
    progress = _progress(args.quiet)
    try:
        with progress or nullcontext():
            res = compare.measure(problem, cfg, args.method, args.seed, progress or False)
    except (ValueError, TypeError) as err:
        raise CliError(f"{args.method}: {err}") from err
    value = res.rank if args.definition == "srank" else res.ranks[args.definition]
    if args.json:
        payload = compare.new_report(cfg, command="rank")
        payload.update(
            model={"name": cfg.model, "num_params": problem.num_params},
            data={"name": problem.data.name, "num_samples": int(problem.data.inputs.shape[0])},
            definition=args.definition,
            value=float(value),
            result=res.to_dict(),
        )
        del payload["runs"], payload["interrupted"]
        if args.json == "-":
            print(json.dumps(payload))
            return 0
        report.dump_json(payload, Path(args.json))
    print(f"{value:.0f}" if float(value).is_integer() else f"{value:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hessrank`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    # torch's forward-mode AD loads decompositions through the deprecated torch.jit.script.
    warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except CliError as err:
        print(f"hessrank: error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:  # compare handles its own, to keep what it measured
        print("hessrank: interrupted", file=sys.stderr)
        return 130
