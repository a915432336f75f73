"""``hessrank compare``, ``hessrank rank`` and ``hessrank plot``: the command-line interface.

``hessrank compare`` measures every estimator against the exact Hessian on a small model and real
data that ship with the package; ``hessrank rank`` prints one rank of one model, for scripts;
``hessrank plot`` draws a :class:`hessrank.Tracker` log (rank and top eigenvalue against step).

Every failure the user can act on is one line on stderr and a non-zero exit status: 2 for bad
input, 1 when every estimator failed, 130 for Ctrl-C (which keeps what was measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hessrank.cli.errors import CliError

if TYPE_CHECKING:
    from hessrank.cli.compare import Config

__all__ = ["main"]

RANK_DEFINITIONS = ("srank", "numerical", "entropy", "stable", "participation")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"hessrank: error: {message} (see {self.prog} --help)\n")


def _path(text: str) -> Path:
    """A path given on the command line, a leading ``~`` expanded: the shell expands none after
    ``--json=`` (a folder named ``~`` had been made; probe 162)."""
    return Path(text).expanduser()


def _output_file(example: str) -> Callable[[str], Path]:
    """The parser of a file to write (``-``: stdout), refusing a name that ends like a folder's
    (``--json out/`` had written a file named ``out``; probe 115); ``example`` names a file."""
    def parse(text: str) -> Path:
        if text != "-" and text.endswith(("/", os.sep)):
            raise argparse.ArgumentTypeError(f"{text} names a folder: name a file in it, e.g. "
                                             f"{text}{example}")
        return Path(text) if text == "-" else _path(text)
    return parse


def _number(text: str, kind: Callable[[str], Any] = float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        # (a whole number's option said "not a number: '12.5'"; probe 146)
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _threshold(text: str) -> float:
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return float(value)


def _rtol(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return float(value)


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return float(value)


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be an integer <= {maximum}, got {text}")
        return int(value)

    parse.__name__ = f"integer >= {minimum}"
    return parse


_positive = _integer(1)
#: Seeds the CLI takes: 32 bits (derived seeds, such as a task's labels', multiply them; a
#: 20-digit seed overflowed a generator's with a traceback).
MAX_SEED = 2**32 - 1
#: ``compare --json``'s in-progress file is written at most once in this many seconds, or this
#: fraction of the run's time so far, whichever is longer.
SAVE_EVERY = (2.0, 0.05)
_seed = _integer(0, MAX_SEED)


def available_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """``$OMP_NUM_THREADS`` where it is set (its first level's count), as torch reads it (the
    default below had overridden it; probe 204); else half the available cores, at least 1 and
    at most 4: torch's own default (every core) made dense eigen-solves several times slower on
    a machine shared with other jobs."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if value.isascii() and value.isdigit() and int(value) >= 1:  # ('²' is a digit; probe 206)
        return int(value)
    return max(1, min(4, available_cores() // 2))


def _add_estimator_options(group: argparse._ArgumentGroup) -> None:
    """One flag per estimator option (``hessrank.estimator_options()``): ``--backend``,
    ``--lanczos-steps``...; unset flags leave the library's defaults."""
    import hessrank

    for name, option in hessrank.estimator_options().items():
        default = option["default"]
        kind = _positive if isinstance(default, int) or default is None else str
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            choices=option["choices"],
            help=f"{'/'.join(option['methods'])}: {option['help']}"
            + ("" if default is None else f" (default {default})"),
        )


def _estimator_option_names() -> list[str]:
    import hessrank

    return list(hessrank.estimator_options())


def _library_default(name: str) -> Any:
    """The default of ``hessrank.effective_rank``'s argument ``name``."""
    import inspect

    import hessrank

    return inspect.signature(hessrank.effective_rank).parameters[name].default


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
    group.add_argument(
        "--activation",
        choices=tuple(presets.ACTIVATIONS),
        help="activation of the presets (default relu)",
    )
    group.add_argument(
        "--width",
        type=_positive,
        help="hidden units (mlp) or channels (cnn, resnet) (default: "
        + ", ".join(f"{k} {v}" for k, v in presets.DEFAULT_WIDTH.items())
        + ")",
    )
    group.add_argument(
        "--depth",
        type=_integer(0),
        help=", ".join(f"{unit}s ({name})" for name, unit in presets.DEPTH_UNITS.items())
        + " (default 2)",
    )
    group.add_argument("--weights", help="state_dict (.pt) to load into the model (default: none)")
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
        help=f"folder holding MNIST/raw/ (torchvision layout) (default ${presets.DATA_DIR_ENV})",
    )
    group.add_argument(
        "--image-size",
        type=_positive,
        help="resize images to this side length (default: 8, the digits' size)",
    )
    group.add_argument(
        "--samples", type=_integer(2), default=128, help="batch size n (default 128)"
    )
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default cpu)")
    group.add_argument(
        "--dtype", default="float32", choices=tuple(presets.DTYPES), help="(default float32)"
    )
    threads = default_threads()
    group.add_argument(
        "--threads",
        type=_positive,
        default=threads,
        help="CPU threads for torch (default: $OMP_NUM_THREADS where set, else half the "
        "cores this process may use, 1 to 4; torch's own default, every core, ran exact "
        "several times slower on a machine shared with other jobs)",
    )

    est = parser.add_argument_group("estimators")
    est.add_argument(
        "--threshold", type=_threshold,
        help=f"srank threshold (default {_library_default('threshold')})")
    est.add_argument(
        "--rtol",
        type=_rtol,
        help="numerical-rank tolerance relative to the top |eigenvalue|, in [0, 1) (default: "
        "matrix size times the dtype's epsilon, float32's at least for the Lanczos methods)",
    )
    _add_estimator_options(est)
    est.add_argument(
        "--max-memory",
        type=_positive_float,
        help="every method: refuse above this predicted memory, in GiB "
        f"(default {_library_default('max_memory') / 2**30:g})",
    )
    est.add_argument(
        "--max-seconds",
        type=_positive_float,
        help="refuse above this predicted time, in seconds (fisher and ggn predict their "
        "eigen-solves, not their passes over the model; default: no limit)",
    )


#: compare's options of its training between checkpoints (:class:`compare.Config` fields)
_TRAINING = ("epochs", "batch_size", "lr")


def _training_default(name: str) -> Any:
    """The default of the training option ``name``: :class:`compare.Config`'s."""
    from hessrank.cli.compare import Config

    return Config.__dataclass_fields__[name].default


def build_parser() -> argparse.ArgumentParser:
    """The ``hessrank`` argument parser with its ``compare``, ``rank`` and ``plot`` subcommands."""
    import hessrank
    from hessrank.cli.plot import RANK_KEYS
    from hessrank.estimators import ALL_METHODS

    parser = _Parser(
        prog="hessrank",
        description="Rank and effective rank of a network's Hessian and its approximations.",
    )
    parser.add_argument("--version", action="version", version=f"hessrank {hessrank.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{compare,rank,plot}")

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
        help="estimators, comma- or space-separated (default: all of hessrank.METHODS; also "
        "ggn_lanczos, fisher_lanczos)",
    )
    compare.add_argument(
        "--skip-exact", action="store_true", help="leave out exact (no errors against it)"
    )
    compare.add_argument("--no-pyhessian", action="store_true", help="skip the PyHessian check")
    compare.add_argument("--seed", type=_seed, default=0, help="first seed (default 0)")
    compare.add_argument(
        "--seeds", type=_positive, default=1, help="number of seeds, from --seed on (default 1)"
    )
    traj = compare.add_argument_group("trajectory (random-label tasks, Adam)")
    traj.add_argument(
        "--checkpoints",
        type=_integer(0),
        default=0,
        help="K: evaluate at the start of each of K random-label tasks (default 0: once, at "
        "initialisation, on the true labels)",
    )
    # (None: not given, so that they can be refused where nothing is trained)
    traj.add_argument("--epochs", type=_positive,
                      help=f"epochs per task (default {_training_default('epochs')})")
    traj.add_argument("--batch-size", type=_positive,
                      help=f"minibatch (default {_training_default('batch_size')})")
    traj.add_argument("--lr", type=_positive_float,
                      help=f"Adam learning rate (default {_training_default('lr'):g})")
    out = compare.add_argument_group("output")
    out.add_argument(
        "--json", type=_output_file("compare.json"),
        help="write every number (and the spectra) as JSON (default: none)"
    )
    out.add_argument(
        "--csv", type=_output_file("compare.csv"),
        help="write every number of the tables as CSV (default: none)"
    )
    out.add_argument(
        "--plot",
        type=_output_file("compare.png"),
        help="PNG: spectra overlaid, rank over checkpoints (needs matplotlib) (default: none)",
    )
    out.add_argument(
        "--quiet", action="store_true",
        help="no progress bars, no tables, no 'wrote' or 'will be replaced' lines"
    )
    compare.set_defaults(func=_compare)

    rank = sub.add_parser(
        "rank",
        help="one rank of one model with one estimator, for scripts",
        description="Print one rank (srank by default) of the model's curvature to stdout.",
    )
    _add_problem_options(rank)
    rank.add_argument(
        "--method",
        default="fisher",
        help=f"estimator: {', '.join(ALL_METHODS)} (default fisher)",
    )
    rank.add_argument(
        "--batch-size",
        type=_integer(1),
        default=None,
        help="pass the --samples as a data set in batches of this size (exact and the Lanczos "
        "methods then hold one batch's graph at a time; default: one batch)",
    )
    rank.add_argument(
        "--definition",
        default="srank",
        choices=RANK_DEFINITIONS,
        help="rank definition printed (default srank)",
    )
    rank.add_argument("--seed", type=_seed, default=0, help="seed (default 0)")
    rank.add_argument(
        "--json", type=_output_file("rank.json"),
        help="write the full result as JSON to this path ('-': stdout) (default: none)"
    )
    rank.add_argument("--quiet", action="store_true",
                      help="no progress bar, no 'wrote' or 'will be replaced' line")
    rank.set_defaults(func=_rank)

    plot = sub.add_parser(
        "plot",
        help="rank and top eigenvalue against step, from hessrank.Tracker logs",
        description="Draw the JSON lines written by hessrank.Tracker: rank and top eigenvalue "
        "against step, one line per method (and per file), per-layer panels with --layers.",
    )
    plot.add_argument(
        "logs", nargs="+", type=_path, metavar="LOG", help="JSON-lines file(s) of hessrank.Tracker"
    )
    plot.add_argument(
        "-o", "--output", type=_output_file("ranks.png"),
        help="image to write, its format by the suffix (.png, .pdf, .svg; default: the first "
        "LOG with .png)"
    )
    plot.add_argument(
        "--rank",
        default="rank",
        choices=RANK_KEYS,
        help="rank to draw (default rank: srank at the tracker's threshold)",
    )
    plot.add_argument(
        "--layers",
        action="store_true",
        help="one panel per layer (a log of Tracker(..., per_layer=True))",
    )
    plot.set_defaults(func=_plot)
    return parser


def _methods(requested: list[str] | None, skip_exact: bool, option: str = "--methods"
             ) -> tuple[str, ...]:
    import hessrank
    from hessrank.estimators import ALL_METHODS

    names = [m.strip() for item in requested or hessrank.METHODS for m in item.split(",")]
    names = [m for m in names if m]
    if not names:
        raise CliError(
            f"{option} {' '.join(requested or [])!r} names no estimator; choose from "
            f"{', '.join(ALL_METHODS)}"
        )
    for name in names:
        if name not in ALL_METHODS:
            raise CliError(f"unknown method '{name}'; choose from {', '.join(ALL_METHODS)}")
    if skip_exact and requested is not None and "exact" in names:
        raise CliError("--skip-exact leaves exact out, and --methods names it: drop one of them")
    return tuple(m for m in ALL_METHODS if m in names and not (skip_exact and m == "exact"))


def _config(
    args: argparse.Namespace, methods: tuple[str, ...], seeds: tuple[int, ...], **extra: Any
) -> Config:
    """The run configuration from the options both subcommands share, plus ``extra``."""
    import hessrank
    from hessrank.cli import presets
    from hessrank.cli.compare import Config

    # a flag nothing reads is refused (probe 67: --lanczos-steps with --methods fisher, --width
    # with a user's --model, were ignored without a word)
    for name, option in hessrank.estimator_options().items():
        takers = option["methods"]
        if getattr(args, name) is not None and not set(takers) & set(methods):
            raise CliError(f"--{name.replace('_', '-')} applies to {', '.join(takers)}, none of "
                           f"which is measured ({', '.join(methods)}): drop it, or measure one")
    if args.model not in presets.PRESETS:
        given = [f"--{flag}" for flag in ("activation", "width", "depth")
                 if getattr(args, flag) is not None]
        if given:
            verb = "shapes" if len(given) == 1 else "shape"
            raise CliError(f"{' '.join(given)} {verb} the presets ({', '.join(presets.PRESETS)}), "
                           f"not --model {args.model}: drop them, or give them to its factory")
    elif args.depth == 0:  # (probe 115: cnn's error had not said why; mlp's ignored the flags)
        if args.model != "mlp":
            raise CliError(f"--depth 0 makes no {args.model}: it needs at least one "
                           f"{presets.DEPTH_UNITS[args.model]}; pass --depth 1 or more")
        unused = [f"--{flag}" for flag in ("activation", "width") if getattr(args, flag)]
        if unused:
            raise CliError(f"--depth 0 makes the mlp one linear layer, with no hidden units or "
                           f"activation: drop {' '.join(unused)}, or pass --depth 1 or more")
    if args.data_dir and args.data not in ("auto", "mnist"):
        raise CliError(f"--data-dir is where MNIST is read from, and --data {args.data} reads "
                       "none: drop --data-dir, or pass --data mnist")
    environment = presets.default_data_dir()
    if args.data == "auto" and not args.data_dir and environment is not None and (
            not presets.has_mnist(environment)):
        # the help says auto falls back to the digits; a set variable that misses is a mistake
        print(f"hessrank: ${presets.DATA_DIR_ENV}={environment} holds no MNIST (MNIST/raw/ in "
              "torchvision's layout): measuring the shipped digits; point it at the folder "
              "that holds MNIST/, or pass --data digits", file=sys.stderr)
    return Config(
        model=args.model,
        activation=args.activation or "relu",
        width=args.width,
        depth=args.depth,
        weights=args.weights,
        # An explicit --data-dir with --data auto means MNIST: a wrong folder is an error.
        data="mnist" if args.data == "auto" and args.data_dir else args.data,
        data_dir=args.data_dir,
        image_size=args.image_size,
        samples=args.samples,
        methods=methods,
        threshold=_library_default("threshold") if args.threshold is None else args.threshold,
        rtol=args.rtol,
        seeds=seeds,
        device=args.device,
        dtype=args.dtype,
        estimator_options={name: getattr(args, name) for name in _estimator_option_names()
                           if getattr(args, name) is not None},
        max_memory_gib=args.max_memory,
        max_seconds=args.max_seconds,
        threads=args.threads,
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


class _Received(list[int]):
    """The signals received while Ctrl-C is held (:func:`_held_interrupt`)."""

    held = False

    def hold(self) -> None:
        """From now on, record Ctrl-C instead of raising."""
        self.held = True


@contextmanager
def _held_interrupt() -> Iterator[_Received]:
    """Ctrl-C raises ``KeyboardInterrupt`` in the block, as Python's own handler does, until
    the yielded list's ``hold()``; from then until the block ends it is held (so the final
    report is printed and written whole) and recorded in the list. One handler for the whole
    block: a Ctrl-C between the work and a hold installed after it had ended the command with
    the JSON still marked in progress and no tables (probe 153)."""
    received = _Received()

    def on_interrupt(number: int, frame: Any) -> None:
        if not received.held:
            raise KeyboardInterrupt
        received.append(number)

    try:
        previous = signal.signal(signal.SIGINT, on_interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


#: Columns of the tables when the output is not a terminal (rich would clip them at 80).
PIPED_WIDTH = 200


def _stdout_console() -> Any:
    """A rich ``Console`` on stdout (:data:`PIPED_WIDTH` wide when not a terminal) whose closed
    pipe raises ``BrokenPipeError``, which :func:`main` reports as 141 (rich's own handling
    exits with 1, the status of a failed comparison)."""
    from rich.console import Console

    class PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    console = PipeConsole()
    if not console.is_terminal:  # piped or to a file: no terminal width to clip to
        console = PipeConsole(width=PIPED_WIDTH)
    return console


def _wrote(paths: list[Path | None], quiet: bool) -> None:
    """Say where files were written."""
    if not quiet:
        for path in paths:
            if path is not None:
                print(f"hessrank: wrote {path.resolve()}", file=sys.stderr)


def _say_replaced(replaced: list[str]) -> None:
    """Print the lines of :func:`report.check_outputs` on the files to be replaced, once: the
    list is emptied."""
    while replaced:
        print(replaced.pop(0), file=sys.stderr)


def _checkpoint_measured(result: dict[str, Any], methods: tuple[str, ...]) -> bool:
    """Whether every method has measured a checkpoint of ``result``: from then on ``compare``
    keeps, writes and shows what it measured, whatever stops it; a refusal before (a budget
    the first checkpoint's prediction exceeds) writes nothing."""
    return any(set(methods) <= set(point["methods"])
               for run in result["runs"] for point in run["checkpoints"])


def _all_failed(result: dict[str, Any]) -> str | None:
    """The first error when every measurement of ``result`` failed, else None."""
    records = [
        record
        for run in result["runs"]
        for point in run["checkpoints"]
        for record in point["methods"].values()
    ]
    if records and all(record.get("error") for record in records):
        return str(records[0]["error"])
    return None


def _compare(args: argparse.Namespace) -> int:
    from hessrank.cli import compare, report

    for option, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        # (/dev/stdout had mixed a JSON per checkpoint with the tables; probe 115)
        if path is not None and (str(path) == "-" or _is_stdout(path)):
            raise CliError(f"{option} {path}: compare prints its tables on stdout, so its files "
                           f"need names; give {option} a file (hessrank rank --json - prints "
                           "JSON)")
    if args.quiet and args.json is None and args.csv is None and args.plot is None:
        # (it had run every measurement, then shown and written nothing; probe 177)
        raise CliError("--quiet prints no tables, and no --json, --csv or --plot names a file: "
                       "the results would go nowhere; drop --quiet, or name a file")
    if args.seed + args.seeds - 1 > MAX_SEED:
        raise CliError(f"--seed {args.seed} --seeds {args.seeds} runs seeds up to "
                       f"{args.seed + args.seeds - 1}, past {MAX_SEED}: lower --seed")
    methods = _methods(args.methods, args.skip_exact)
    training = {name: getattr(args, name) for name in _TRAINING
                if getattr(args, name) is not None}
    if training and args.checkpoints < 2:  # (they had been recorded, without effect; probe 115)
        flags = " ".join(f"--{name.replace('_', '-')}" for name in training)
        verb = "shapes" if len(training) == 1 else "shape"
        raise CliError(f"{flags} {verb} the training between checkpoints, and --checkpoints "
                       f"{args.checkpoints} trains none: drop them, or pass --checkpoints 2 or "
                       "more")
    cfg = _config(
        args,
        methods,
        tuple(range(args.seed, args.seed + args.seeds)),
        checkpoints=args.checkpoints,
        pyhessian=not args.no_pyhessian,
        **training,
    )
    compare.check_problem(cfg)
    # before any work, after every other check; a file is said to be replaced once the
    # command goes on: a checkpoint measured, or before what was measured is written (it had
    # been said, and the command refused: a budget, the model, an option; probes 204, 243)
    replaced = report.check_outputs({"--json": args.json, "--csv": args.csv,
                                     "--plot": args.plot}, args.quiet, reads=_read_files(args))
    result = compare.new_report(cfg)

    started, last_saved = time.perf_counter(), -math.inf  # (the first checkpoint's at once)

    def save_progress(current: dict[str, Any]) -> None:
        """The JSON after a measurement, marked in progress (a killed run's file had claimed
        to be complete; probe 115); not into a pipe, which reads one document (a FIFO reader
        had been handed the first checkpoint's, and the run hung on the next; probe 115). At
        most once in :data:`SAVE_EVERY` seconds or that fraction of the run so far, whichever
        is longer: rewritten after every measurement, the growing file had taken 41 % of a
        30-checkpoint run (probe 211). The run's end writes it whole either way. Not before a
        checkpoint is measured, where a refusal writes nothing (the first measurement's had
        replaced an earlier run's file, and the command then refused; probe 243)."""
        nonlocal last_saved
        if not _checkpoint_measured(current, cfg.methods):
            return
        _say_replaced(replaced)
        now = time.perf_counter()
        if now - last_saved < max(SAVE_EVERY[0], SAVE_EVERY[1] * (now - started)):
            return
        if args.json and not report.not_a_regular_file(args.json):
            report.write_json(dict(current, in_progress=True), args.json)
            last_saved = time.perf_counter()

    progress = _progress(args.quiet)
    status = 0
    stopped: CliError | None = None  # a refusal after checkpoints were measured
    with _held_interrupt() as received:
        try:
            with progress or nullcontext():
                compare.run_compare(cfg, result, progress, save_progress)
            received.hold()  # (a Ctrl-C between the work and the hold had left the JSON in
            # progress and no tables: probe 153)
        except KeyboardInterrupt:
            received.hold()
            result.update(interrupted=True, stopped_by="Ctrl-C")
            status = 130
        except CliError as error:
            received.hold()
            if not _checkpoint_measured(result, cfg.methods):
                raise  # before a checkpoint was measured: nothing to keep, no file touched
            # a method refused later (a budget its timings of a later seed exceed): what was
            # measured is kept, shown and written, marked as stopped (the JSON had been left
            # partial and marked complete, with no tables; probe 110)
            result.update(interrupted=True, stopped_by=str(error))
            stopped = error
        compare.summarize(result)
        # The files first, so that a reader of the tables who leaves (| head) costs none of
        # them; the tables even where a file fails (its error is raised after them).
        written: list[Path | None] = []
        failed: CliError | None = None
        # Interrupted before a first measurement, nothing is written: an earlier run's files
        # there are kept (they had been replaced by empty results; probes 91, 115).
        measured = report.anything_measured(result)
        try:
            if measured:
                _say_replaced(replaced)  # (a Ctrl-C within the first checkpoint: not yet said)
                if args.json:
                    report.write_json(result, args.json)
                    written.append(args.json)
                if args.csv:
                    report.write_csv(result, args.csv)
                    written.append(args.csv)
                if args.plot and report.write_plot(result, args.plot):
                    written.append(args.plot)
            for option, path in (("--json", args.json), ("--csv", args.csv),
                                 ("--plot", args.plot)):
                if path is not None and path not in written:
                    print(f"hessrank: {option} {path} not written: nothing was measured"
                          + (" (the file there is an earlier run's)" if path.exists() else ""),
                          file=sys.stderr)
        except CliError as error:
            failed = error
        try:
            if not args.quiet:
                saved = tuple(option for option, path in (("--json", args.json),
                                                          ("--csv", args.csv))
                              if path is not None and path in written)
                report.render(result, _stdout_console(), saved)
            elif status:
                print("hessrank: interrupted; kept what was measured", file=sys.stderr)
        finally:  # on stderr, also where the tables' reader left
            _wrote(written, args.quiet)
        if failed is not None:
            raise failed
    if received:
        return 130
    if stopped is not None:
        raise stopped
    failure = _all_failed(result)
    if failure is not None and not status:
        raise CliError(f"every estimator failed; the first: {failure}", code=1)
    return status


def _read_files(args: argparse.Namespace) -> dict[str, Path | None]:
    """The files a ``compare`` or ``rank`` command reads (option -> path), which no output may
    replace."""
    files = {"--weights": None if args.weights is None else _path(args.weights)}
    module, _, _ = args.model.partition(":")
    if module.endswith(".py"):  # path/file.py:factory (probe 115: --json could replace it)
        files["--model"] = Path(module)
    return files


def _rank(args: argparse.Namespace) -> int:
    from hessrank.cli import compare, report

    methods = _methods([args.method], False, "--method")
    if len(methods) != 1:
        raise CliError(f"--method {args.method!r} names {len(methods)} estimators: rank measures "
                       "one (hessrank compare --methods compares several)")
    # (the printed rank had ignored a tolerance its definition does not read; probe 168)
    unread = [(flag, rank) for flag, value, definition, rank in (
        ("--threshold", args.threshold, "srank", "srank"),
        ("--rtol", args.rtol, "numerical", "numerical rank"))
        if value is not None and args.definition != definition]
    if unread and not args.json:
        flags = " and ".join(flag for flag, _ in unread)
        ranks = " and ".join(rank for _, rank in unread)
        raise CliError(f"{flags} set{'s' if len(unread) == 1 else ''} the {ranks}, not the "
                       f"--definition {args.definition} printed: drop "
                       f"{'it' if len(unread) == 1 else 'them'}, or pass --json for every rank")
    cfg = _config(args, methods, (args.seed,))
    compare.check_problem(cfg)
    # before any work, after every other check; said once the file is written (probes 204, 243)
    replaced = report.check_outputs({"--json": args.json}, args.quiet, reads=_read_files(args))
    problem = compare.build_problem(cfg, args.seed)
    progress = _progress(args.quiet)
    tracker = compare.tracker(problem, cfg, args.seed, progress or False, on_error="record")
    inputs, targets = problem.data.inputs, problem.data.targets
    data = (inputs, targets) if args.batch_size is None else list(
        zip(inputs.split(args.batch_size), targets.split(args.batch_size)))
    with progress or nullcontext():
        (measurement,) = tracker.measure(data)
    compare.check_budget(measurement, problem, cfg, command="rank")
    res = measurement.result
    if res is None:
        error = compare.failed_record(measurement)["error"]
        raise CliError(f"{args.method} failed on --model {cfg.model}: {error}", code=1)
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
        del payload["runs"], payload["interrupted"], payload["stopped_by"], payload["in_progress"]
        for name in compare.TRAINING_ONLY:  # compare's training: no part of one rank
            del payload["config"][name]
        payload["config"]["batch_size"] = args.batch_size  # the batches measured (None: one)
        if str(args.json) == "-":
            print(json.dumps(payload))
            return 0
        _say_replaced(replaced)
        report.dump_json(payload, args.json)
        if _is_stdout(args.json):  # as with '-': stdout holds the JSON alone (probe 69)
            return 0
        _wrote([args.json], args.quiet)
    print(f"{value:.0f}" if float(value).is_integer() else f"{value:.3f}")
    return 0


def _is_stdout(path: Path) -> bool:
    """Whether ``path`` is this process's standard output (``/dev/stdout``, ``/dev/fd/1``)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no file behind stdout (captured)
        return False


def _plot(args: argparse.Namespace) -> int:
    from hessrank.cli import report
    from hessrank.cli.plot import plot, read_runs

    output = args.output or args.logs[0].with_suffix(".png")
    logs = [log.resolve() for log in args.logs]
    twice = next((log for log, path in zip(args.logs, logs) if logs.count(path) > 1), None)
    if twice is not None:  # (its lines came twice, under one legend entry each; probe 67)
        raise CliError(f"{twice} is named twice: give each log once")
    if output.resolve() in set(logs):
        raise CliError(f"the figure would replace the log {output}: name the figure with -o "
                       "(e.g. -o curvature.png)")
    runs = read_runs(args.logs, args.rank, args.layers)
    _say_replaced(report.check_outputs({"-o": output}))
    for what in plot(runs, args.logs, output, args.rank, args.layers):
        print(f"hessrank: left out {what}", file=sys.stderr)
    _wrote([output], quiet=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hessrank`` console script; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        # torch's forward-mode AD loads decompositions through the deprecated torch.jit.script.
        warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
        if getattr(args, "threads", None) is not None:
            import torch

            torch.set_num_threads(args.threads)
        return int(args.func(args))
    except CliError as err:
        print(f"hessrank: error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:  # compare handles its own, to keep what it measured
        print("hessrank: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (| head): nothing more to write
        # Python flushes stdout at exit, which would raise again: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a writer the pipe stopped
