"""The ``hessrank`` command line, run as a user runs it (a subprocess), on tiny presets."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import hessrank
from hessrank.cli import available_cores, compare, default_threads, main, presets, report
from hessrank.cli import build_parser as cli_parser
from hessrank.cli.errors import CliError
from hessrank.cli.pyhessian_check import pyhessian_check
from hessrank.cli.report import CSV_COLUMNS, _caveats, render

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--samples", "16", "--width", "4", "--depth", "1")
DATA_DIR = presets.default_data_dir()


def cli(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m hessrank.cli ARGS`` with the checkout importable."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120", OMP_NUM_THREADS="1")
    env.pop(presets.DATA_DIR_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "hessrank.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny problems run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_problem(seed: int = 0) -> tuple[torch.nn.Module, presets.Dataset]:
    """The model and data of TINY, built in-process."""
    data = presets.load_data("digits", samples=16, seed=seed)
    model = presets.build_model("mlp", input_shape=(1, 8, 8), width=4, depth=1, seed=seed)
    return model, data


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """One ``compare`` run with every method, output, two seeds and three checkpoints."""
    out = tmp_path_factory.mktemp("compare")
    args = ("--lanczos-steps", "12", "--seeds", "2")
    trajectory = ("--checkpoints", "3", "--epochs", "2")
    files = ("--json", "r.json", "--csv", "r.csv", "--plot", "r.png")
    proc = cli("compare", *TINY, *args, *trajectory, *files, cwd=out, check=True)
    return proc, out


def test_compare_prints_every_method_and_the_pyhessian_check(compared) -> None:
    proc, out = compared
    assert "Estimators vs exact at the start of task 3" in proc.stdout
    assert "hessrank compare: mlp (310 float32 parameters, relu) on digits" in proc.stdout
    assert "peak memory (CPU): growth of the process's resident set" in proc.stdout
    for method in hessrank.METHODS:
        assert f"\n{method} " in proc.stdout
    assert "PyHessian" in proc.stdout and "Spearman" in proc.stdout
    assert "2 seeds (mean±std, the sample standard deviation)" in " ".join(proc.stdout.split())
    assert "capped by n = 16" in proc.stdout
    assert "Traceback" not in proc.stderr
    wrote = [line for line in proc.stderr.splitlines() if line.startswith("hessrank: wrote ")]
    assert wrote == [f"hessrank: wrote {out / name}" for name in ("r.json", "r.csv", "r.png")]


def test_compare_json_schema(compared) -> None:
    _, out = compared
    report = json.loads((out / "r.json").read_text())
    assert report["schema_version"] == 1
    assert report["interrupted"] is False and report["stopped_by"] is None
    assert report["config"]["methods"] == list(hessrank.METHODS)
    # the budget the methods ran under, the library's default where none was given (null had
    # been recorded; probe 110)
    assert report["config"]["max_memory_gib"] == pytest.approx(4.0)
    assert report["model"] == {"name": "mlp", "num_params": 64 * 4 + 4 + 4 * 10 + 10}
    assert report["data"]["name"] == "digits" and report["data"]["num_samples"] == 16
    assert [run["seed"] for run in report["runs"]] == [0, 1]
    for run in report["runs"]:
        points = run["checkpoints"]
        assert [p["task"] for p in points] == [1, 2, 3]
        # 16 samples in minibatches of 32, two epochs per task: two optimizer steps per task.
        assert [p["step"] for p in points] == [0, 2, 4]
        assert all(p["labels"] == "random" for p in points)
        assert points[0]["previous_task_train_error"] is None
        assert 0.0 <= points[2]["previous_task_train_error"] <= 1.0
        assert set(run["spearman"]) == {"lanczos", "ggn", "fisher"}
        for point in points:
            for method in hessrank.METHODS:
                rec = point["methods"][method]
                assert rec["error"] is None
                for key in ("srank", "numerical_rank", "top_eigenvalue", "trace", "max_rank"):
                    assert isinstance(rec[key], int | float), (method, key)
                assert rec["backend"] and isinstance(rec["caveats"], list)
            exact, fisher = point["methods"]["exact"], point["methods"]["fisher"]
            assert exact["srank_rel_error"] is None
            assert fisher["srank_rel_error"] == pytest.approx(
                (fisher["srank"] - exact["srank"]) / exact["srank"]
            )
            # the numerical rank against exact's at the same tolerance (fisher's is n eps, not
            # exact's P eps): counted here from exact's eigenvalues, with numpy
            values = np.abs(np.asarray(exact["eigenvalues"]))
            at_fisher = int((values > fisher["rtol"] * values.max()).sum())
            assert fisher["rtol"] < exact["rtol"]
            assert fisher["numerical_rank_rel_error"] == pytest.approx(
                (fisher["numerical_rank"] - at_fisher) / at_fisher)
            assert fisher["exact_numerical_rank"] == at_fisher  # the error's reference
            lanczos = point["methods"]["lanczos"]
            assert lanczos["rank_interval"] is not None
            low, high = lanczos["trace_interval"]
            assert low <= lanczos["trace"] <= high
            low, high = lanczos["numerical_interval"]
            assert low <= lanczos["numerical_rank"] <= high
            check = point["pyhessian"]
            assert check["error"] is None and isinstance(check["trace_stopped_by_sign"], bool)
            assert check["exact_top_eigenvalue"] == exact["top_eigenvalue"]
            # Both differentiate the mean loss: power iteration lands on exact's top eigenvalue.
            assert check["top_eigenvalue"] == pytest.approx(exact["top_eigenvalue"], rel=0.05)
    summary = report["summary"]
    assert len(summary["checkpoints"]) == 3
    assert summary["checkpoints"][1]["methods"]["exact"]["srank"]["n"] == 2
    sranks = [run["checkpoints"][1]["methods"]["exact"]["srank"] for run in report["runs"]]
    assert summary["checkpoints"][1]["methods"]["exact"]["srank"]["std"] == pytest.approx(
        np.std(sranks, ddof=1))  # the sample standard deviation, not the population's
    # Training moved the weights: the exact spectrum differs between the first two tasks.
    first, second = (p["methods"]["exact"] for p in report["runs"][0]["checkpoints"][:2])
    assert first["eigenvalues"] != second["eigenvalues"]


def test_compare_numbers_equal_the_library(compared) -> None:
    _, out = compared
    point = json.loads((out / "r.json").read_text())["runs"][1]["checkpoints"][0]
    model, data = tiny_problem(seed=1)
    labels = compare.random_labels(data.targets, data.num_classes, seed=1, task=0)
    for method in ("exact", "ggn", "fisher"):
        res = hessrank.effective_rank(
            model, torch.nn.CrossEntropyLoss(), (data.inputs, labels), method=method, seed=1
        )
        rec = point["methods"][method]
        assert rec["srank"] == res.rank
        assert rec["numerical_rank"] == res.ranks["numerical"]
        assert rec["max_rank"] == res.max_rank
        np.testing.assert_allclose(rec["eigenvalues"], res.eigenvalues, rtol=1e-5, atol=1e-9)
        assert rec["trace"] == pytest.approx(res.trace, rel=1e-5)


def test_compare_csv_and_plot(compared) -> None:
    _, out = compared
    with (out / "r.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    first = [r["method"] for r in rows if r["seed"] == "0" and r["checkpoint"] == "0"]
    assert first == [*hessrank.METHODS, "pyhessian"]
    assert {r["seed"] for r in rows} == {"0", "1", "mean", "std"}
    report = json.loads((out / "r.json").read_text())
    fisher = report["runs"][0]["checkpoints"][0]["methods"]["fisher"]
    assert float(rows[3]["srank_rel_error"]) == pytest.approx(fisher["srank_rel_error"])
    rho = report["runs"][0]["spearman"]["fisher"]
    assert rows[3]["spearman_vs_exact"] == ("" if rho is None else str(rho))
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the mean and std rows carry the previous task's training error, as the table and the
    # JSON's summary do (they had left it empty; probe 211)
    summary = report["summary"]["checkpoints"][1]["previous_task_train_error"]
    for which in ("mean", "std"):
        carried = {r["previous_task_train_error"] for r in rows
                   if r["seed"] == which and r["checkpoint"] == "1"}
        assert carried == {str(summary[which])}


def test_compare_default_point_uses_true_labels(tmp_path: Path, capsys) -> None:
    status = main(["compare", *TINY, "--methods", "fisher", "--json", str(tmp_path / "r.json")])
    assert status == 0
    out = capsys.readouterr().out
    # no task in the title; no "vs exact" without exact (probe 133: it had said so)
    assert "\nEstimators " in out and "at the start of task" not in out
    assert "vs exact" not in out and "No exact reference (skipped)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    (point,) = report["runs"][0]["checkpoints"]
    assert point["labels"] == "true" and point["task"] is None
    model, data = tiny_problem()
    res = hessrank.effective_rank(
        model, torch.nn.CrossEntropyLoss(), (data.inputs, data.targets), method="fisher"
    )
    assert point["methods"]["fisher"]["srank"] == res.rank
    assert point["pyhessian"]["exact_trace"] is None and point["pyhessian"]["trace"] is not None


def test_rank_of_a_user_factory_equals_the_library(tmp_path: Path) -> None:
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
    )
    args = ("--model", "mymodel:make", "--samples", "16", "--seed", "2", "--quiet")
    proc = cli("rank", *args, "--json", "r.json", cwd=tmp_path, check=True)
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["command"] == "rank"
    assert payload["model"] == {"name": "mymodel:make", "num_params": 650}
    assert payload["result"]["method"] == "fisher"
    assert proc.stdout.strip() == str(payload["result"]["rank"])
    sys.path.insert(0, str(tmp_path))
    try:
        model = presets.build_model("mymodel:make", input_shape=(1, 8, 8), seed=2)
    finally:
        sys.path.remove(str(tmp_path))
    data = presets.load_data("digits", samples=16, seed=2)
    res = hessrank.effective_rank(
        model, torch.nn.CrossEntropyLoss(), (data.inputs, data.targets), method="fisher", seed=2
    )
    assert payload["result"]["rank"] == res.rank
    np.testing.assert_allclose(payload["result"]["eigenvalues"], res.eigenvalues, rtol=1e-5)


def _built_from_factory(tmp_path: Path, module: str, returned: str,
                        seeds: tuple[int, ...] = (0,)) -> list[torch.nn.Module]:
    """``presets.build_model`` at each of ``seeds`` of a factory ``module:make`` written in
    ``tmp_path``, returning the expression ``returned``."""
    (tmp_path / f"{module}.py").write_text(f"import torch\ndef make():\n    return {returned}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        return [presets.build_model(f"{module}:make", input_shape=(1, 8, 8), seed=seed)
                for seed in seeds]
    finally:
        sys.path.remove(str(tmp_path))


def test_a_factory_with_lazy_layers_is_initialised_under_the_seed(tmp_path: Path) -> None:
    """A factory of ``nn.LazyLinear`` layers: their values are drawn at the first forward,
    which ran outside the seeded block (``check_model``), from the global generator: each run
    of ``hessrank rank --seed 0`` measured another model (srank 184, 168, 164; probe 177)."""
    state = torch.get_rng_state()
    models = _built_from_factory(
        tmp_path, "lazymodel", "torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(12), "
        "torch.nn.ReLU(), torch.nn.LazyLinear(10))", seeds=(0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    first, again, other = ([p.detach() for p in model.parameters()] for model in models)
    assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == (12, 64)
    # the forward that initialises them runs in eval mode: a BatchNorm's statistics as built
    # (in the factory's training mode it had moved them, and the model measured was another;
    # probe 181)
    norm = _built_from_factory(
        tmp_path, "lazynorm", "torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(12), "
        "torch.nn.BatchNorm1d(12), torch.nn.Linear(12, 10))")[0][2]
    assert torch.equal(norm.running_mean, torch.zeros(12))
    assert torch.equal(norm.running_var, torch.ones(12))
    assert int(norm.num_batches_tracked) == 0


def test_a_factory_file_in_a_folder_named_with_a_colon_is_found(tmp_path: Path) -> None:
    """``--model 'a:b/nets.py:make'`` had been split at its first colon ("cannot import a")."""
    folder = tmp_path / "a:b"
    folder.mkdir()
    (folder / "nets.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
    )
    model = presets.build_model(f"{folder}/nets.py:make", input_shape=(1, 8, 8))
    assert presets.num_params(model) == 650


def test_training_a_task_follows_the_seed_not_the_global_generator() -> None:
    """A --model with dropout drew its masks from the global generator, which nothing seeded:
    one ``compare --checkpoints`` command gave other numbers on every run (probe 103). A task's
    training follows ``seed`` and ``task`` alone, and leaves the global generator as it was."""
    cfg = compare.Config(samples=32, epochs=2)
    data = presets.load_data("digits", samples=32, seed=0)
    trained = []
    for global_seed in (1, 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(),
                                    torch.nn.Dropout(0.5), torch.nn.Linear(16, 10))
        problem = compare.Problem(model, data, torch.nn.CrossEntropyLoss(), 1210)
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        compare.train_task(problem, data.targets, torch.optim.SGD(model.parameters(), lr=0.5),
                           cfg, seed=3, task=1, advance=lambda: None)
        assert torch.equal(torch.get_rng_state(), state)
        trained.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(*trained)


def test_the_rank_plot_keeps_every_checkpoint_of_an_interrupted_multi_seed_run(
        tmp_path: Path, monkeypatch) -> None:
    """Seed 1 stopped after its first task: the rank panel cut seed 0's three checkpoints to
    one point, while the tables showed all three (probe 103). Each checkpoint is the mean of
    the seeds that measured it."""
    pytest.importorskip("matplotlib")

    def checkpoint(index: int, srank: float) -> dict:
        return {"index": index, "task": index + 1,
                "methods": {"fisher": {"srank": srank, "eigenvalues": [2.0, 1.0]}}}

    run = {"config": {"methods": ["fisher"], "checkpoints": 3, "threshold": 0.99},
           "interrupted": True,
           "runs": [{"seed": 0, "checkpoints": [checkpoint(k, v) for k, v in
                                                enumerate((10.0, 20.0, 30.0))]},
                    {"seed": 1, "checkpoints": [checkpoint(0, 14.0)]}]}
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, what: figures.append(fig))
    assert report.write_plot(run, tmp_path / "r.png")
    (line,) = figures[0].axes[1].get_lines()
    assert list(line.get_xdata()) == [1, 2, 3]
    assert list(line.get_ydata()) == [12.0, 20.0, 30.0]


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hessrank: error: ")
    return lines[0]


def test_unknown_method_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(cli("compare", "--methods", "exact,hutch", cwd=tmp_path))
    assert "unknown method 'hutch'" in line and "fisher" in line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["compare", "--model", "nosuchpackage.models:make"], "cannot import nosuchpackage"),
        (["compare", "--model", "transformer"], "unknown model 'transformer'"),
        (["rank", "--model", "json:nosuchfactory"], "json has no callable 'nosuchfactory'"),
        (["rank", "--model", "torch.nn:Identity", "--samples", "4"], "expected logits"),
        # a factory that takes arguments is told how to bind them (probe 187)
        (["rank", "--model", "torch.nn:Bilinear"],
         "; a --model factory is called with no arguments: bind them first"),
        (["rank", "--data", "mnist", "--data-dir", "{tmp}"], "no MNIST in"),
        (["rank", "--data-dir", "{tmp}"], "no MNIST in"),
        (["rank", "--data", "digits", "--data-dir", "{tmp}"],
         "--data-dir is where MNIST is read from, and --data digits reads none"),
        (["rank", "--samples", "5000"], "more than the 1797 images"),
        (["rank", "--method", "hutch"], "unknown method 'hutch'"),
        (
            ["compare", *TINY, "--max-memory", "1e-6"],
            "(310 parameters, n = 16) needs at least ~3.0 MiB and ~",
        ),
        (["compare", *TINY, "--max-memory", "1e-6"], "pass --skip-exact"),
        # which budget (probe 67: "over the budget of --max-memory / --max-seconds")
        (["compare", *TINY, "--max-memory", "1e-6"], "over --max-memory 1e-06 GiB;"),
        (["rank", *TINY, "--method", "exact", "--max-seconds", "1e-9"],
         "over --max-seconds 1e-09;"),
        # another method's budget is its own, not exact's (before: "exact Hessian ... needs")
        (["compare", *TINY, "--methods", "fisher", "--max-memory", "1e-7"],
         "leave the method out of --methods"),
        (["compare", *TINY, "--methods", "fisher", "--max-memory", "1e-7"],
         "error: fisher on mlp ("),
        (["rank", "--method", "lanczos", "--max-memory", "1e-7"],
         "choose another --method"),
        # outputs are checked before the work, not after it
        (["compare", *TINY, "--json", "{tmp}/out", "--csv", "{tmp}/out"],
         "--json and --csv name the same file"),
        (["compare", *TINY, "--plot", "{tmp}/figure.txt"], "matplotlib writes no '.txt' figure"),
        (["compare", *TINY, "--plot", "{tmp}/figure"],
         "writes figures by their name's ending, which this one lacks; end the name in .png"),
        (["compare", *TINY, "--csv", "{tmp}"], "it is a folder: name a file in it"),
        (["compare", *TINY, "--plot", "{tmp}"], "--plot {tmp}: it is a folder: name a file in it"),
        # an output that is a file the command reads (probe 85: the weights were replaced)
        (["compare", *TINY, "--weights", "{tmp}/w.pt", "--json", "{tmp}/w.pt"],
         "--json {tmp}/w.pt is the --weights file the command reads"),
        (["rank", *TINY, "--weights", "{tmp}/w.pt", "--json", "{tmp}/w.pt"],
         "is the --weights file the command reads: writing it would replace it"),
        # or the model's source (probe 115: --json replaced the factory's file)
        (["rank", "--model", "{tmp}/nets.py:make", "--json", "{tmp}/nets.py"],
         "--json {tmp}/nets.py is the --model file the command reads"),
        (["compare", "--model", "{tmp}/nets.py:make", "--csv", "{tmp}/nets.py"],
         "--csv {tmp}/nets.py is the --model file the command reads"),
    ],
)
def test_user_errors_in_process(argv, expected, tmp_path: Path, capsys) -> None:
    for name in ("w.pt", "nets.py"):  # read files there (a missing one is refused first)
        (tmp_path / name).touch()
    status = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith("hessrank: error: ") and err.count("\n") == 1, err
    assert expected.replace("{tmp}", str(tmp_path)) in err, err


def test_a_model_for_other_inputs_is_told_what_sets_them(tmp_path: Path, capsys) -> None:
    """A factory for 28 x 28 inputs given the digits' 8 x 8 had been told torch's shape error
    alone, the shape written (N, (1, 8, 8)) (probe 187)."""
    (tmp_path / "wide.py").write_text(
        "from torch import nn\n\ndef make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    status = main(["rank", "--model", f"{tmp_path}/wide.py:make", "--data", "digits"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert ("fails on the data's inputs, of shape (N, 1, 8, 8): mat1 and mat2 shapes cannot be "
            "multiplied") in err, err
    assert err.rstrip().endswith("choose the data the model takes (--data, and --image-size for "
                                 "MNIST's side), or a model for these inputs"), err


def test_ctrl_c_keeps_what_was_measured(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [*TINY, "--methods", "fisher", "--checkpoints", "500", "--epochs", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hessrank.cli", "compare", *args, "--no-pyhessian"]
        + ["--json", "r.json", "--csv", "r.csv"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "r.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "Stopped by Ctrl-C: showing what was measured" in out and "\nfisher " in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["interrupted"] is True
    measured = report["runs"][0]["checkpoints"]
    assert 1 <= len(measured) < 500
    assert (tmp_path / "r.csv").read_text().count("fisher") >= 1


def test_auto_data_is_digits_without_mnist(tmp_path: Path) -> None:
    assert presets.resolve_data_name("auto", None) == "digits"
    assert presets.resolve_data_name("auto", tmp_path) == "digits"
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in presets.MNIST_FILES:
        (raw / name).touch()
    assert presets.resolve_data_name("auto", tmp_path) == "mnist"


def test_a_leading_tilde_in_the_data_dir_is_the_home_folder(tmp_path: Path,
                                                             monkeypatch) -> None:
    """``--data-dir=~/data`` (the shell expands no ``~`` after ``=``) and a quoted
    ``HESSRANK_DATA_DIR='~/data'`` were read as a folder named ``~``, where the examples read
    the home folder's (probe 160); ``--json=~/r.json`` made a folder named ``~`` (probe 162)."""
    import hessrank.cli as cli_module

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    status = main(["rank", "--data", "digits", "--method", "fisher", "--quiet",
                   "--json=~/r.json"])
    assert status == 0 and json.loads((tmp_path / "r.json").read_text())["command"] == "rank"
    assert not (tmp_path / "cwd" / "~").exists()
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in presets.MNIST_FILES:
        (raw / name).touch()
    for argv, variable in ((["rank", "--data-dir=~/data"], None), (["rank"], "~/data")):
        if variable is None:
            monkeypatch.delenv(presets.DATA_DIR_ENV, raising=False)
        else:
            monkeypatch.setenv(presets.DATA_DIR_ENV, variable)
        config = cli_module._config(cli_parser().parse_args(argv), ["fisher"], (0,))
        assert config.data_path() == tmp_path / "data"
        assert presets.resolve_data_name(config.data, config.data_path()) == "mnist"


def test_a_data_dir_variable_without_mnist_is_named(tmp_path: Path, monkeypatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``--data auto`` falls back to the digits, but a ``$HESSRANK_DATA_DIR`` that is set and
    holds no MNIST is a mistake worth a line on stderr (a script reading ``rank``'s output had
    got the digits' rank without a word; probe 97)."""
    import hessrank.cli as cli_module

    args = cli_parser().parse_args(["rank"])
    monkeypatch.setenv(presets.DATA_DIR_ENV, str(tmp_path))
    cli_module._config(args, ["fisher"], (0,))
    assert f"${presets.DATA_DIR_ENV}={tmp_path} holds no MNIST" in capsys.readouterr().err
    monkeypatch.delenv(presets.DATA_DIR_ENV)
    cli_module._config(args, ["fisher"], (0,))
    assert capsys.readouterr().err == ""


def test_multi_seed_notes_name_the_seeds_they_belong_to() -> None:
    """A note of one seed's record (an interval) says which seed; one every seed has, once
    (probe 97: a two-seed table listed each seed's intervals unlabelled)."""
    seeded = [(0, {"caveats": ["capped", "srank in [1, 2]", "srank in [1, 2]"]}),
              (3, {"caveats": ["capped", "srank in [2, 4]"]})]
    assert _caveats(seeded) == ["capped", "(seed 0) srank in [1, 2]", "(seed 3) srank in [2, 4]"]
    assert _caveats(seeded[:1]) == ["capped", "srank in [1, 2]"]


def test_presets_are_seeded_and_small() -> None:
    for name in presets.PRESETS:
        a = presets.build_model(name, input_shape=(1, 8, 8), seed=3)
        b = presets.build_model(name, input_shape=(1, 8, 8), seed=3)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
        assert presets.num_params(a) < 3000
        assert not a.training
    data = presets.load_data("synthetic", samples=32, seed=1)
    assert data.inputs.shape == (32, 1, 8, 8) and data.targets.max() < 10


@pytest.mark.skipif(
    not presets.has_mnist(DATA_DIR),
    reason=f"no MNIST: set ${presets.DATA_DIR_ENV} to a folder holding MNIST/raw/ "
    f"(now {DATA_DIR or 'unset'})",
)
def test_mnist_from_data_dir() -> None:
    data = presets.load_data("mnist", samples=32, seed=0, data_dir=DATA_DIR)
    assert data.inputs.shape == (32, 1, 8, 8)
    assert data.name == "mnist"
    full = presets.load_data("mnist", samples=8, seed=0, data_dir=DATA_DIR, image_size=28)
    assert full.inputs.shape == (8, 1, 28, 28)


def test_pyhessian_failure_is_reported_not_raised() -> None:
    model, data = tiny_problem()

    def broken(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("torch.eig was removed")

    check = pyhessian_check(model, broken, (data.inputs, data.targets), seed=0, exact=None)
    assert check["error"] == "RuntimeError: torch.eig was removed"
    assert check["top_eigenvalue"] is None and check["trace"] is None
    # (exact among the methods: PyHessian's table, which checks it, is not shown without it)
    result = compare.new_report(compare.Config(methods=("exact", "fisher")))
    point = {"index": 0, "task": None, "methods": {}, "pyhessian": check}
    result["runs"].append({"seed": 0, "checkpoints": [point], "spearman": {}})
    point["previous_task_train_error"] = None
    console = Console(file=io.StringIO(), width=100)
    render(result, console)
    assert "pyhessian failed: RuntimeError: torch.eig was removed" in console.file.getvalue()


def test_pyhessian_check_runs_through_attention() -> None:
    """A transformer layer (``scaled_dot_product_attention``): PyHessian's double backward failed
    on CPU flash attention's backward ("derivative ... not implemented"); the check now runs
    attention through the math kernel, as hessrank's own Hessian does, and agrees with exact."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=True)
    model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(18, 3)).eval()
    x, y = torch.randn(8, 3, 6), torch.randint(0, 3, (8,))
    exact = hessrank.effective_rank(model, torch.nn.CrossEntropyLoss(), (x, y), method="exact")
    top = float(np.max(np.abs(exact.eigenvalues)))
    check = pyhessian_check(model, torch.nn.CrossEntropyLoss(), (x, y), seed=0,
                            exact={"top_eigenvalue": top, "trace": exact.trace})
    assert check["error"] is None
    assert check["top_eigenvalue"] == pytest.approx(top, rel=1e-2)


def test_weights_are_loaded(tmp_path: Path) -> None:
    trained = presets.build_model("cnn", input_shape=(1, 8, 8), seed=5)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    loaded = presets.build_model("cnn", input_shape=(1, 8, 8), seed=0, weights=tmp_path / "w.pt")
    assert all(
        torch.equal(p, q) for p, q in zip(trained.parameters(), loaded.parameters(), strict=True)
    )
    with pytest.raises(CliError, match="(?s)--weights .*Missing key.*Unexpected key.*the same "
                                       "parameter names and shapes"):
        presets.build_model("mlp", input_shape=(1, 8, 8), weights=tmp_path / "w.pt")
    # a whole pickled model: torch's advice, weights_only=False, is no option of the CLI
    torch.save(trained, tmp_path / "whole.pt")
    with pytest.raises(CliError, match=r"holds more than tensors .* torch.save\(model."
                                       r"state_dict\(\), path\)$"):
        presets.build_model("cnn", input_shape=(1, 8, 8), weights=tmp_path / "whole.pt")
    # text, not a checkpoint: it was said to hold "more than tensors" (probe 67)
    (tmp_path / "text.pt").write_text("not a pickle")
    with pytest.raises(CliError, match=r"text\.pt is not a file torch\.save wrote"):
        presets.build_model("cnn", input_shape=(1, 8, 8), weights=tmp_path / "text.pt")
    # no such file: the hint about the state_dict's names did not apply (probe 97)
    with pytest.raises(CliError, match=r"missing\.pt: No such file or directory$"):
        presets.build_model("cnn", input_shape=(1, 8, 8), weights=tmp_path / "missing.pt")


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` in-process: exit status (argparse's SystemExit included), stdout, stderr."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["compare", "--lr", "-1"], "argument --lr: must be positive, got -1"),
        (["compare", "--max-memory", "inf"], "--max-memory: must be a finite number, got inf"),
        (["compare", "--max-seconds", "nan"], "--max-seconds: must be a finite number, got nan"),
        (["compare", "--rtol", "nan"], "--rtol: must be a finite number, got nan"),
        (["rank", "--rtol", "1.5"], "--rtol: must lie in [0, 1), got 1.5"),
        (["rank", "--threshold", "nan"], "--threshold: must be a finite number, got nan"),
        (["rank", "--samples", "1"], "--samples: must be an integer >= 2, got 1"),
        (["compare", "--checkpoints", "-1"], "--checkpoints: must be an integer >= 0, got -1"),
        (["compare", "--epochs", "two"], "--epochs: not a whole number: 'two'"),
        (["rank", "--samples", "12.5"], "--samples: not a whole number: '12.5'"),
        (["compare", "--methods", ","], "--methods ',' names no estimator; choose from exact"),
        (["compare", "--device", "meta"], "--device meta: hessrank measures on cpu or cuda"),
        (["rank", "--device", "meta"], "--device meta: hessrank measures on cpu or cuda"),
        (["plot", "{tmp}/none.jsonl"], "cannot read"),
        (["plot", "{tmp}/a.jsonl", "{tmp}/./a.jsonl"],
         "a.jsonl is named twice: give each log once"),
        # the library's bound (>= 2), before any method runs (before, lanczos failed after the
        # others had run)
        (["compare", *TINY, "--lanczos-steps", "1"],
         "lanczos: --lanczos-steps 1 gives a quadrature of one node"),
        (["rank", *TINY, "--method", "lanczos", "--lanczos-steps", "1"], "use at least 2"),
        # (probe 56: a traceback after both methods had run; '--methods' named for --method)
        (["rank", "--method", "lanczos,fisher"], "names 2 estimators: rank measures one"),
        (["rank", "--method", ","], "--method ',' names no estimator"),
        # (probe 56: a file named '-', and exact dropped without a word)
        (["compare", "--csv", "-"], "--csv -: compare prints its tables on stdout"),
        (["compare", "--plot", "-"], "--plot -: compare prints its tables on stdout"),
        (["compare", "--skip-exact", "--methods", "exact,fisher"],
         "--skip-exact leaves exact out, and --methods names it"),
        # flags nothing reads (probe 67: ignored without a word)
        (["rank", "--method", "fisher", "--lanczos-steps", "50"],
         "--lanczos-steps applies to lanczos, ggn_lanczos, fisher_lanczos, none of which is "
         "measured (fisher)"),
        (["rank", "--model", "torch.nn:Identity", "--width", "3", "--depth", "1"],
         "--width --depth shape the presets (mlp, cnn, resnet), not --model torch.nn:Identity"),
        # (probe 67: a traceback from a generator's seed, exit status 1)
        (["rank", "--seed", "99999999999999999999"], "--seed: must be an integer <= 4294967295"),
        (["compare", "--seed", "4294967295", "--seeds", "2"], "lower --seed"),
        # (probe 115: training flags recorded without effect where nothing is trained)
        (["compare", "--epochs", "3"], "--epochs shapes the training between checkpoints, and "
                                       "--checkpoints 0 trains none: drop them"),
        (["compare", "--checkpoints", "1", "--lr", "0.5", "--batch-size", "4"],
         "--batch-size --lr shape the training between checkpoints, and --checkpoints 1"),
        # (probe 115: --depth 0 ignored --width; a cnn's refusal did not say why)
        (["rank", "--depth", "0", "--width", "5"],
         "--depth 0 makes the mlp one linear layer, with no hidden units or activation: drop "
         "--width"),
        (["rank", "--model", "cnn", "--depth", "0"],
         "--depth 0 makes no cnn: it needs at least one conv layer"),
        # (probe 115: a name ending like a folder's was written as a file of the folder's name)
        (["compare", "--csv", "{tmp}/out/"],
         "argument --csv: {tmp}/out/ names a folder: name a file in it, e.g. "
         "{tmp}/out/compare.csv"),
        (["plot", "{tmp}/a.jsonl", "-o", "{tmp}/out/"], "{tmp}/out/ names a folder"),
    ],
)
def test_bad_options_are_one_line_before_any_work(argv, expected, tmp_path: Path, capsys) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] != "plot":
        argv += ["--json", str(tmp_path / "r.json")]
    status, out, err = run_main(argv, capsys)
    assert status == 2 and out == ""
    expected = expected.replace("{tmp}", str(tmp_path))
    assert err.startswith("hessrank: error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "r.json").exists()  # nothing was measured
    assert not (tmp_path / "out").exists()


def test_the_library_s_advice_names_the_flags(tmp_path: Path, capsys) -> None:
    """The library's advice in its own spelling, "use backend='auto'", had reached the command
    line, whose flag is ``--backend auto`` (probe 243): in an error, and in compare's records
    of a method that failed."""
    cnn = [*TINY, "--model", "cnn", "--backend", "backpack"]
    status, out, err = run_main(["rank", *cnn, "--method", "ggn"], capsys)
    assert status == 1 and out == ""
    assert err == ("hessrank: error: ggn failed on --model cnn: ValueError: BackPACK's GGN does "
                   "not support AdaptiveAvgPool2d: use --backend auto\n"), err
    written = tmp_path / "r.json"
    status, _, err = run_main(["compare", *cnn, "--methods", "ggn,fisher", "--no-pyhessian",
                               "--quiet", "--json", str(written)], capsys)
    assert status == 0, err
    (point,) = json.loads(written.read_text())["runs"][0]["checkpoints"]
    assert point["methods"]["ggn"]["error"].endswith("use --backend auto")


def test_backpack_s_warning_of_a_residual_block_is_not_printed(capsys) -> None:
    """BackPACK warned on stderr that it has no extension for the resnet preset's residual
    block "although the module has parameters": its children's, which it handles (probe 243).
    The rank is ``--backend auto``'s."""
    printed = {}
    for backend in ("backpack", "auto"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status, out, err = run_main(["rank", *TINY, "--model", "resnet", "--method", "fisher",
                                         "--backend", backend], capsys)
        assert status == 0 and err == "" and not caught, [str(w.message) for w in caught]
        printed[backend] = out
    assert printed["backpack"] == printed["auto"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--definition", "entropy", "--threshold", "0.5"],
     "--threshold sets the srank, not the --definition entropy printed: drop it, or pass "
     "--json for every rank"),
    (["--rtol", "0.5", "--threshold", "0.9", "--definition", "stable"],
     "--threshold and --rtol set the srank and numerical rank, not the --definition stable "
     "printed: drop them"),
])
def test_rank_refuses_a_tolerance_its_printed_definition_does_not_read(
        argv: list[str], expected: str, tmp_path: Path, capsys) -> None:
    """``rank`` prints one definition: ``--threshold`` (srank) or ``--rtol`` (numerical rank)
    beside another had been ignored without a word (probe 168). With ``--json`` they set the
    result's ranks, and are read."""
    command = ["rank", *TINY, "--method", "fisher", *argv]
    status, out, err = run_main(command, capsys)
    assert status == 2 and out == "" and expected in err, err
    written = tmp_path / "r.json"
    assert run_main([*command, "--json", str(written)], capsys)[0] == 0
    result = json.loads(written.read_text())["result"]
    assert result["threshold"] == float(argv[argv.index("--threshold") + 1])


def test_version_and_help_name_every_default(capsys, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # (it sets --threads' default)
    status, out, _ = run_main(["--version"], capsys)
    assert status == 0 and out.strip() == f"hessrank {hessrank.__version__}"
    parser = cli_parser()
    subparsers = next(a for a in parser._actions if a.choices and "rank" in a.choices).choices
    assert set(subparsers) == {"compare", "rank", "plot"}
    for name, sub in subparsers.items():
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0:
                continue  # positionals, --help and on/off flags
            assert "default" in (action.help or ""), (name, action.option_strings)
    threads = subparsers["rank"].parse_args([]).threads
    assert threads == default_threads() and 1 <= threads <= min(4, available_cores())
    # the help (and docs/cli.md, built from it) does not depend on the machine it runs on
    assert ("default: $OMP_NUM_THREADS where set, else half the cores this process may use, "
            "1 to 4") in " ".join(
        subparsers["rank"].format_help().split())


@pytest.mark.parametrize("module", ["hessrank", "hessrank.cli"])
def test_python_dash_m_runs_the_command(module: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", module, "--version"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"hessrank {hessrank.__version__}"


def test_plot_without_matplotlib_fails_before_measuring(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    argv = ["compare", *TINY, "--methods", "fisher", "--json", str(tmp_path / "r.json")]
    status, out, err = run_main([*argv, "--plot", str(tmp_path / "r.png")], capsys)
    assert status == 2 and out == ""
    assert err == "hessrank: error: --plot needs matplotlib: pip install 'hessrank[plot]'\n"
    assert not (tmp_path / "r.json").exists()


def test_tables_are_printed_when_writing_a_file_fails(tmp_path: Path, capsys,
                                                       monkeypatch) -> None:
    """An output that cannot be written is refused before the work; one that fails after it
    (the folder gone meanwhile: here the check is skipped) still leaves the tables printed."""
    (tmp_path / "file").write_text("")
    argv = ["compare", *TINY, "--methods", "fisher", "--no-pyhessian", "--csv",
            str(tmp_path / "file" / "r.csv")]
    # The problem is named (before: "File exists", mkdir's words for it).
    expected = (f"hessrank: error: cannot write --csv {tmp_path / 'file' / 'r.csv'}: "
                f"{tmp_path / 'file'} is a file, not a folder: choose a path in a folder\n")
    status, out, err = run_main(argv, capsys)
    assert status == 2 and out == ""
    assert err == expected
    monkeypatch.setattr(report, "check_outputs", lambda outputs, quiet=False, reads=None: [])
    status, out, err = run_main(argv, capsys)
    assert status == 2
    assert "\nEstimators " in out and "\nfisher " in out
    assert err == expected


BROKEN_MODEL = """
import torch

class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x):
        if torch.is_grad_enabled():  # the shape check runs without gradients; hessrank with
            raise KeyError("my model broke")
        return self.linear(x.flatten(1))

def make():
    return Broken()
"""


def test_a_user_model_error_of_any_type_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "broken.py").write_text(BROKEN_MODEL)
    model = ["--model", f"{tmp_path / 'broken.py'}:make", "--samples", "8"]
    status, out, err = run_main(["rank", *model], capsys)
    assert status == 1 and out == ""  # its one estimator failed, as compare's every one below
    assert err == (f"hessrank: error: fisher failed on --model {tmp_path / 'broken.py'}:make: "
                   "KeyError: 'my model broke'\n")
    argv = ["compare", *model, "--methods", "fisher,ggn", "--no-pyhessian"]
    status, out, err = run_main(argv, capsys)
    assert status == 1  # every estimator failed: not a success, and the table says why
    assert "fisher: failed: KeyError: 'my model broke'" in out
    # No preset's activation in the title of a user's model (the console wraps long lines).
    assert "broken.py:make (650 float32 parameters) on digits" in " ".join(out.split())
    assert err == "hessrank: error: every estimator failed; the first: KeyError: 'my model broke'\n"


def test_ctrl_c_during_the_final_report_keeps_the_table(tmp_path: Path, capsys, monkeypatch):
    from hessrank.cli import report

    original = report.render

    def interrupted_render(result, console, *args) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the tables are being printed
        original(result, console, *args)

    monkeypatch.setattr(report, "render", interrupted_render)
    argv = ["compare", *TINY, "--methods", "fisher", "--no-pyhessian"]
    status, out, _ = run_main([*argv, "--json", str(tmp_path / "r.json")], capsys)
    assert status == 130
    assert "\nEstimators " in out and "\nfisher " in out
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["checkpoints"]


def test_ctrl_c_as_the_work_ends_keeps_and_writes_what_was_measured(tmp_path: Path, capsys):
    """A Ctrl-C on the first line after the comparison's work, before the final report held
    Ctrl-C back: the command ended at once, its JSON still marked in progress, no table
    printed, the CSV an earlier run's (probe 153). One handler now holds Ctrl-C from the work's
    end: it reports what was measured, marked interrupted."""
    import hessrank.cli as cli

    returned: list[bool] = []

    lines = Path(cli.__file__).read_text().splitlines()

    def tracer(frame, event, arg):  # Ctrl-C as the hold of the final report begins
        if frame.f_code.co_name == "run_compare" and event == "return":
            returned.append(True)
        elif (frame.f_code.co_name == "_compare" and frame.f_code.co_filename == cli.__file__
              and event == "line" and returned
              and re.search(r"_held_interrupt\(\)|\.hold\(\)", lines[frame.f_lineno - 1])):
            sys.settrace(None)
            frame.f_trace = None
            signal.raise_signal(signal.SIGINT)
        return tracer

    (tmp_path / "r.csv").write_text("an earlier run\n")
    argv = ["compare", *TINY, "--methods", "fisher", "--no-pyhessian",
            "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]
    sys.settrace(tracer)
    try:
        status, out, _ = run_main(argv, capsys)
    finally:
        sys.settrace(None)
    assert returned and status == 130
    written = json.loads((tmp_path / "r.json").read_text())
    assert not written.get("in_progress") and written["interrupted"]
    assert "\nfisher " in out
    assert (tmp_path / "r.csv").read_text() != "an earlier run\n"


def tracker_log(path: Path, per_layer: bool = True) -> list[dict]:
    """A tracker's log of the tiny model trained for 6 steps, fisher and ggn every 2 steps."""
    model, data = tiny_problem()
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with hessrank.Tracker(model, loss_fn, ("fisher", "ggn"), every=2, log=path,
                          per_layer=per_layer) as tracker:
        for _ in range(6):
            optimizer.zero_grad()
            loss_fn(model(data.inputs), data.targets).backward()
            optimizer.step()
            tracker.step((data.inputs, data.targets))
    return tracker.records


def test_plot_draws_each_method_against_step(tmp_path: Path, capsys) -> None:
    from hessrank.cli.plot import build_figure, read_run

    records = tracker_log(tmp_path / "curvature.jsonl")
    status, out, err = run_main(["plot", str(tmp_path / "curvature.jsonl"), "--layers"], capsys)
    assert status == 0 and err == f"hessrank: wrote {tmp_path / 'curvature.png'}\n"
    assert (tmp_path / "curvature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = build_figure([read_run(tmp_path / "curvature.jsonl")], "numerical", layers=True)
    rank_axes, top_axes, *layer_axes = fig.axes
    assert [a.get_title() for a in layer_axes] == ["layer 1", "layer 3"]
    for axes, key in ((rank_axes, "numerical"), (top_axes, "top_eigenvalue")):
        lines = {line.get_label(): line for line in axes.get_lines()}
        assert set(lines) == {"fisher", "ggn"}
        for method, line in lines.items():
            mine = [r for r in records if r["method"] == method]
            assert list(line.get_xdata()) == [0, 2, 4]
            assert list(line.get_ydata()) == [r[key] for r in mine]
    (fisher, _) = layer_axes[1].get_lines()
    assert list(fisher.get_ydata()) == [r["layers"]["3"]["numerical"] for r in records
                                        if r["method"] == "fisher"]


@pytest.mark.parametrize(("rank", "interval"), [("rank", "rank_interval"),
                                                ("numerical", "numerical_interval")])
def test_plot_shades_each_layer_s_lanczos_interval(tmp_path: Path, rank: str,
                                                   interval: str) -> None:
    """The per-layer panels drew Lanczos's srank line without its interval, which the log
    holds (probe 67: a layer's line read 519 for an exact 268); the numerical rank's line had
    none anywhere (probe 85: 1209 -> 167, its interval about [69, 1210])."""
    from matplotlib.collections import PolyCollection

    from hessrank.cli.plot import build_figure, read_run

    model, data = tiny_problem()
    with hessrank.Tracker(model, torch.nn.CrossEntropyLoss(), ("lanczos",), every=1,
                          log=tmp_path / "c.jsonl", per_layer=True,
                          lanczos_steps=8) as tracker:
        for _ in range(2):
            tracker.step((data.inputs, data.targets))
    records = tracker.records
    fig = build_figure([read_run(tmp_path / "c.jsonl")], rank, layers=True)
    whole, _, *layer_axes = fig.axes
    assert layer_axes
    panels = [(whole, [r[interval] for r in records])] + [
        (axes, [r["layers"][name][interval] for r in records])
        for axes, name in zip(layer_axes, sorted(records[0]["layers"]))]
    for axes, intervals in panels:
        (band,) = [c for c in axes.collections if isinstance(c, PolyCollection)]
        assert band.get_label() == "lanczos interval"
        low = min(low for low, _ in intervals)
        assert band.get_paths()[0].vertices[:, 1].min() == pytest.approx(low)


def test_plot_errors_and_failed_measurements(tmp_path: Path, capsys) -> None:
    log = tmp_path / "c.jsonl"
    tracker_log(log, per_layer=False)
    status, _, err = run_main(["plot", str(log), "--layers"], capsys)
    assert status == 2 and "--layers: the log has no per-layer ranks" in err
    # a folder, its name with an ending or without (-o /tmp had been told that its name "lacks
    # an ending"; probe 243)
    for folder in (tmp_path, tmp_path / "figures.png"):
        folder.mkdir(exist_ok=True)
        status, _, err = run_main(["plot", str(log), "-o", str(folder)], capsys)
        assert status == 2 and err == (f"hessrank: error: cannot write -o {folder}: it is a "
                                       "folder: name a file in it\n"), err
    failure = {"step": 6, "method": "exact", "error": "BudgetError: too big"}
    log.write_text(log.read_text() + json.dumps(failure) + "\n")
    status, _, err = run_main(["plot", str(log), "-o", str(tmp_path / "p.png")], capsys)
    assert status == 0 and err.splitlines() == [
        "hessrank: left out 1 failed measurement(s), the first: c: exact at step 6: "
        "BudgetError: too big",
        f"hessrank: wrote {tmp_path / 'p.png'}",
    ]
    log.write_text(log.read_text() + "not json\n")
    status, _, err = run_main(["plot", str(log)], capsys)
    assert status == 2 and f"{log}:8 is not JSON" in err
    log.write_text(json.dumps(failure) + "\n")
    status, _, err = run_main(["plot", str(log)], capsys)
    assert status == 2 and err == f"hessrank: error: {log} holds no measurement (1 failed ones)\n"


def test_plot_never_replaces_a_log_with_its_figure(tmp_path: Path, capsys) -> None:
    """A log named ``*.png``: the default figure, the log's name with .png, was the log itself,
    and its records were replaced by the figure (probe 56)."""
    log = tmp_path / "run.png"
    tracker_log(log, per_layer=False)
    before = log.read_bytes()
    for argv in (["plot", str(log)], ["plot", str(tmp_path / "other.jsonl"), str(log), "-o",
                                      str(log)]):
        status, _, err = run_main(argv, capsys)
        assert status == 2 and f"the figure would replace the log {log}" in err, err
        assert log.read_bytes() == before
    status, _, err = run_main(["plot", str(log), "-o", str(tmp_path / "fig.png")], capsys)
    assert status == 0 and "exists" not in err
    status, _, err = run_main(["plot", str(log), "-o", str(tmp_path / "fig.png")], capsys)
    assert status == 0 and f"-o {tmp_path / 'fig.png'} exists; it will be replaced" in err


def test_plot_tells_logs_of_one_name_and_thresholds_apart(tmp_path: Path) -> None:
    """Two runs' ``relu/curvature.jsonl`` and ``tanh/curvature.jsonl`` were both drawn as
    "curvature: fisher" in one style, and the y label named the first record's threshold for
    every line."""
    from hessrank.cli.plot import build_figure, read_run, run_names

    records = {"relu": 3, "tanh": 5}
    paths = []
    for folder, rank in records.items():
        path = tmp_path / folder / "curvature.jsonl"
        path.parent.mkdir()
        threshold = 0.99 if folder == "relu" else 0.5
        path.write_text("".join(json.dumps({"step": step, "method": "fisher", "rank": rank,
                                            "threshold": threshold}) + "\n"
                                for step in range(2)))
        paths.append(path)
    names = run_names(paths)
    assert names == ["relu/curvature", "tanh/curvature"]
    axes = build_figure([read_run(p, n) for p, n in zip(paths, names)]).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {"relu/curvature: fisher at 0.99", "tanh/curvature: fisher at 0.5"}
    assert axes.get_ylabel() == "srank"
    assert len({lines[label].get_linestyle() for label in lines}) == 2
    assert run_names([tmp_path / "a.jsonl", tmp_path / "b.jsonl"]) == ["a", "b"]
    # logs of one stem: their suffixes tell them apart (both had been "run"; probe 211)
    assert run_names([tmp_path / "run.jsonl", tmp_path / "run.log"]) == ["run.jsonl", "run.log"]


@pytest.mark.parametrize(("record", "problem"), [
    ({"step": None, "method": "fisher", "rank": 3},
     r"its step None is not an integer >= -1 \(-1: the model before any update\)"),
    ({"step": 0, "method": "fisher", "rank": "x"}, "its rank 'x' is not a number"),
    ({"step": 0, "method": ["fisher"], "rank": 3}, r"its method \['fisher'\] is not a name"),
    ({"step": 0, "method": "fisher", "rank": 3, "rank_interval": [1]},
     r"its rank_interval \[1\] is not \[low, high\]"),
    ({"step": 0, "method": "fisher", "rank": 3, "layers": {"0": {"rank": [2]}}},
     r"layer '0': its rank \[2\] is not a number"),
])
def test_plot_names_a_malformed_record(tmp_path: Path, capsys, record, problem) -> None:
    """Records with a step and a method but values the plot cannot read gave tracebacks."""
    log = tmp_path / "c.jsonl"
    log.write_text(json.dumps(record) + "\n")
    status, _, err = run_main(["plot", str(log)], capsys)
    assert status == 2 and "Traceback" not in err
    assert re.fullmatch(f"hessrank: error: {re.escape(str(log))}:1: {problem}: not a tracker "
                        "record\n", err), err


def test_plot_leaves_out_a_last_line_cut_by_a_crash(tmp_path: Path, capsys) -> None:
    """A crash mid-write leaves a last line without its newline: the plot leaves it out and
    says so (before, it refused the whole log as 'not JSON ... not a tracker log')."""
    from hessrank.cli.plot import read_run

    log = tmp_path / "c.jsonl"
    records = tracker_log(log, per_layer=False)
    whole = log.read_text()
    log.write_text(whole + whole.splitlines()[0][:50])
    status, _, err = run_main(["plot", str(log), "-o", str(tmp_path / "p.png")], capsys)
    assert status == 0 and err.splitlines() == [
        f"hessrank: left out {log}:7, the last line, which a crash cut mid-write",
        f"hessrank: wrote {tmp_path / 'p.png'}",
    ]
    assert read_run(log).records == records
    log.write_text(whole + whole.splitlines()[0][:50] + "\n")  # a whole line: not a cut one
    status, _, err = run_main(["plot", str(log)], capsys)
    assert status == 2 and f"{log}:7 is not JSON" in err


def test_rank_json_records_the_batches_it_measured(tmp_path: Path, capsys) -> None:
    """``config.batch_size`` held compare's training minibatch (32), whatever --batch-size, and
    the config listed compare's training settings (epochs, lr, ...), which rank has none of."""
    path = tmp_path / "r.json"
    for extra, batch_size in (([], None), (["--batch-size", "5"], 5)):
        status, _, _ = run_main(["rank", *TINY, "--quiet", "--json", str(path), *extra], capsys)
        assert status == 0
        config = json.loads(path.read_text())["config"]
        assert config["batch_size"] == batch_size
        assert not set(config) & {"checkpoints", "epochs", "lr", "pyhessian"}


def test_spearman_cells_share_one_format_with_the_sample_spread() -> None:
    """One table held 0.9±0.1, 0.422±0.5 and 0.8684, the ± a population std over 2 seeds."""
    assert report.stats([0.5])["std"] is None  # no spread from one value
    assert report.stats([0.8, 1.0])["std"] == pytest.approx(np.std([0.8, 1.0], ddof=1))
    cells = [report.cell(report.stats(values), "spearman")
             for values in ([0.8, 1.0], [0.422], [0.0, 0.844], [0.8684])]
    assert cells == ["0.90±0.14", "0.42", "0.42±0.60", "0.87"]


def test_ctrl_c_while_the_cli_loads_is_one_line(capsys, monkeypatch) -> None:
    """The CLI imports its modules lazily inside main(): a Ctrl-C there is handled too."""
    import hessrank.cli as cli_module

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "build_parser", interrupted)
    status, out, err = run_main(["compare"], capsys)
    assert (status, out, err) == (130, "", "hessrank: interrupted\n")


def test_the_console_script_loads_torch_inside_main() -> None:
    """``import hessrank`` (what the console script does before main) does not load torch, so a
    Ctrl-C while torch loads lands inside main's handler."""
    import subprocess
    import sys

    code = "import sys, hessrank, hessrank.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_rank_in_batches_equals_one_batch(method, capsys) -> None:
    argv = ["rank", *TINY, "--method", method, "--definition", "numerical", "--quiet"]
    status, whole, _ = run_main(argv, capsys)
    status_batched, batched, _ = run_main([*argv, "--batch-size", "5"], capsys)
    assert status == status_batched == 0
    assert float(batched) == pytest.approx(float(whole), rel=1e-6)


def test_compare_whose_reader_leaves_still_writes_its_files(tmp_path) -> None:
    """``hessrank compare --csv --plot ... | head``: rich turned the closed pipe into exit
    status 1 (a failed comparison's) before the CSV and the plot were written; now the files
    are written first and the status is 141."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    files = {"--json": tmp_path / "r.json", "--csv": tmp_path / "r.csv",
             "--plot": tmp_path / "r.png"}
    command = [sys.executable, "-m", "hessrank.cli", "compare", *TINY, "--methods", "fisher",
               "--no-pyhessian", *[str(part) for pair in files.items() for part in pair]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader leaves before the tables
    error = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, error
    assert "Traceback" not in error
    for path in files.values():
        assert path.stat().st_size > 0 and f"wrote {path}" in error


def test_a_reader_that_leaves_the_pipe_gets_no_traceback():
    """``hessrank rank --json - | true``: the write to the closed pipe raised BrokenPipeError
    with a traceback; now exit status 141 (128 + SIGPIPE) and nothing on stderr."""
    command = [sys.executable, "-m", "hessrank.cli", "rank", *TINY, "--method", "fisher",
               "--json", "-"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader leaves before the first byte
    error = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, error
    assert "Traceback" not in error


def test_quiet_says_nothing_of_files_it_replaces(tmp_path: Path, capsys) -> None:
    """``--quiet`` printed 'exists; it will be replaced' (probe 58); without it, the line is
    there, before the file is written."""
    out = tmp_path / "r.json"
    out.write_text("{}")
    argv = ["rank", *TINY, "--method", "fisher", "--json", str(out)]
    status, _, err = run_main([*argv, "--quiet"], capsys)
    assert status == 0 and err == ""
    status, _, err = run_main(argv, capsys)
    assert status == 0 and err.startswith(f"hessrank: --json {out} exists; it will be replaced")


def test_a_refused_command_makes_no_folder(tmp_path: Path, capsys) -> None:
    """The output's folder was made while the outputs were checked, before the methods were:
    an unknown method left ``new/a/`` behind (probe 67)."""
    status, _, err = run_main(["compare", "--methods", "foo", "--json",
                               str(tmp_path / "new" / "a" / "r.json")], capsys)
    assert status == 2 and "unknown method 'foo'" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
@pytest.mark.parametrize(("command", "option", "name"), [
    ("compare", "--json", "r.json"), ("compare", "--csv", "r.csv"),
    ("compare", "--plot", "r.png"), ("rank", "--json", "r.json")])
def test_an_output_no_folder_can_be_made_for_is_refused_before_any_work(
        command: str, option: str, name: str, capsys, monkeypatch) -> None:
    """A folder that ``os.access`` calls writable may make no folder (root's ``/sys``): ``--json
    /sys/x/r.json`` had passed the check and been refused after the work, at its first write;
    the folders made to try it are removed."""
    def no_work(*_: object) -> None:
        raise AssertionError("the work started")

    monkeypatch.setattr(compare, "build_problem", no_work)
    path = Path("/sys/hessrank-test") / name
    status, out, err = run_main([command, *TINY, option, str(path)], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"hessrank: error: cannot write {option} {path}: "), err
    assert err.endswith(": choose another path\n") and err.count("\n") == 1, err
    assert not path.parent.exists()


@pytest.mark.parametrize(("first", "second"), [("out/a.json", "out"), ("x.csv/a.json", "x.csv")])
def test_a_file_and_a_folder_of_it_are_refused_before_any_work(
        first: str, second: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """``--json out/a.json --csv out``: each path had been tried alone, the JSON written after the
    work and the CSV then refused as a folder (probe 148)."""
    def no_work(*_: object) -> None:
        raise AssertionError("the work started")

    monkeypatch.setattr(compare, "build_problem", no_work)
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main(["compare", *TINY, "--json", first, "--csv", second], capsys)
    assert status == 2 and out == ""
    assert err == (f"hessrank: error: --csv {second} is a folder of --json {first}: one path "
                   "cannot be a file and the other's folder; give each its own file\n"), err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("option", "name"), [("--csv", "r.csv"), ("--plot", "r.png")])
def test_a_file_through_a_dangling_link_s_folder_is_written(
        option: str, name: str, tmp_path: Path, capsys) -> None:
    """A link to a folder not yet made (``out -> missing/dir``): ``--csv out/r.csv`` passed the
    check, which made the folder through the link, and was refused after the work, which made
    it at the link's own path (probe 148). Both now go through the link."""
    pytest.importorskip("matplotlib")
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing" / "dir")
    status, _, err = run_main(["compare", *TINY, "--methods", "fisher", "--no-pyhessian",
                               "--quiet", option, str(link / name)], capsys)
    assert status == 0, err
    assert (tmp_path / "missing" / "dir" / name).stat().st_size > 0 and link.is_symlink()


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="needs /dev/fd")
@pytest.mark.parametrize("option", ["--csv", "--json"])
def test_a_process_substitution_gets_the_file(option: str, capsys) -> None:
    """``--csv >(...)`` names ``/dev/fd/N``, a pipe whose target is no path: writing the CSV at
    its resolved path had failed after the work ("No such file or directory")."""
    read, write = os.pipe()
    try:
        status, _, err = run_main(["compare", *TINY, "--methods", "fisher", "--no-pyhessian",
                                   "--quiet", option, f"/dev/fd/{write}"], capsys)
        os.close(write)
        with os.fdopen(read) as pipe:
            written = pipe.read()
    finally:
        for fd in (read, write):
            with contextlib.suppress(OSError):
                os.close(fd)
    assert status == 0, err
    assert written.startswith("seed,checkpoint" if option == "--csv" else "{"), written[:80]


def test_compare_a_training_failure_keeps_what_was_measured(tmp_path: Path, capsys) -> None:
    """A BatchNorm model whose epoch ends in a minibatch of one sample fails to train: the
    command had ended in a traceback (exit 1), no tables, the CSV unwritten and the JSON left in
    progress (probe 211). Now one line naming the task, the first checkpoint kept and written,
    marked as stopped by the failure."""
    model = tmp_path / "normed.py"
    model.write_text("from torch import nn\n\n\ndef make():\n    return nn.Sequential("
                     "nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU(), "
                     "nn.Linear(6, 10))\n")
    json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    status, out, err = run_main(["compare", "--model", f"{model}:make", "--samples", "8",
                                 "--methods", "fisher", "--no-pyhessian", "--checkpoints", "3",
                                 "--epochs", "1", "--batch-size", "7", "--json", str(json_path),
                                 "--csv", str(csv_path)], capsys)
    assert status == 2, err
    assert "Traceback" not in err
    assert ("training task 1 (seed 0, task 1/3) failed: ValueError: Expected more than 1 value "
            "per channel when training") in err
    document = json.loads(json_path.read_text())
    assert document["interrupted"] and not document["in_progress"]
    assert "training task 1" in document["stopped_by"]
    assert len(document["runs"][0]["checkpoints"]) == 1
    assert "fisher" in csv_path.read_text() and "fisher" in out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_json_is_written_through_links_and_pipes(tmp_path: Path, capsys) -> None:
    """``--json`` on a symbolic link wrote a regular file in the link's place (its target kept
    the old content), and on a named pipe replaced the pipe (its reader got nothing; probe 67).
    The link's target and the pipe's reader get the JSON now."""
    target = tmp_path / "real" / "r.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    argv = ["rank", *TINY, "--method", "fisher", "--quiet", "--json"]
    status, _, err = run_main([*argv, str(link)], capsys)
    assert status == 0, err
    assert link.is_symlink() and json.loads(target.read_text())["command"] == "rank"
    dangling = tmp_path / "dangling.json"  # its target made, the link kept (probe 69)
    dangling.symlink_to(tmp_path / "real" / "new.json")
    status, _, err = run_main([*argv, str(dangling)], capsys)
    assert status == 0, err
    assert dangling.is_symlink()
    assert json.loads((tmp_path / "real" / "new.json").read_text())["command"] == "rank"
    pipe = tmp_path / "p.fifo"
    os.mkfifo(pipe)
    reader = subprocess.Popen(["cat", str(pipe)], stdout=subprocess.PIPE, text=True)
    status, _, err = run_main([*argv, str(pipe)], capsys)
    received, _ = reader.communicate(timeout=60)
    assert status == 0, err
    assert json.loads(received)["command"] == "rank"
    assert pipe.exists() and not pipe.is_file()


class _InterruptedTracker:
    """A tracker whose every measurement is stopped by Ctrl-C."""

    def measure(self, *args, **kwargs) -> None:
        raise KeyboardInterrupt


@pytest.mark.parametrize("when", ["before the first checkpoint", "in its first method"])
def test_an_interrupted_compare_does_not_claim_a_figure_it_did_not_draw(when, tmp_path: Path,
                                                                         capsys,
                                                                         monkeypatch) -> None:
    """Ctrl-C before anything was measured: ``--plot`` said it wrote a figure that was an earlier
    run's (probe 67), and the JSON and CSV there were replaced by results of no checkpoint
    (probe 91; probe 115 in the first checkpoint's first method): none of the three is written,
    each says so."""
    from hessrank.cli import compare as compare_module

    def interrupted(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    if when == "before the first checkpoint":
        monkeypatch.setattr(compare_module, "run_compare", interrupted)
    else:
        monkeypatch.setattr(compare_module, "tracker", lambda *args, **kwargs:
                            _InterruptedTracker())
    outputs = {"--plot": tmp_path / "r.png", "--json": tmp_path / "r.json",
               "--csv": tmp_path / "r.csv"}
    for option, path in outputs.items():
        path.write_bytes(f"an earlier {option}".encode())
    status, _, err = run_main(["compare", *TINY, "--methods", "fisher",
                               *(item for option, path in outputs.items()
                                 for item in (option, str(path)))], capsys)
    assert status == 130
    for option, path in outputs.items():
        assert f"{option} {path} not written: nothing was measured" in err
        assert f"wrote {path.resolve()}" not in err
        assert path.read_bytes() == f"an earlier {option}".encode()


@pytest.mark.parametrize("every", [(0.0, 0.0), (3600.0, 0.05)])
def test_compare_json_files_in_progress_say_so(tmp_path: Path, capsys, monkeypatch,
                                               every: tuple[float, float]) -> None:
    """The JSON rewritten after a measurement is marked in progress, the last one not (a
    killed run's file had claimed to be complete; probe 115); the first measurement's at once,
    the others at most once in ``SAVE_EVERY`` (rewritten after each, the growing file had
    taken 41 % of a long run; probe 211)."""
    written: list[bool] = []
    write_json = report.write_json

    def recording(payload, path) -> None:
        written.append(payload["in_progress"])
        write_json(payload, path)

    monkeypatch.setattr(report, "write_json", recording)
    monkeypatch.setattr(hessrank.cli, "SAVE_EVERY", every)
    path = tmp_path / "r.json"
    status, _, err = run_main(["compare", *TINY, "--methods", "fisher", "--no-pyhessian",
                               "--checkpoints", "2", "--epochs", "1", "--quiet", "--json",
                               str(path)], capsys)
    assert status == 0, err
    if every[0]:  # the first measurement's, then the finished report
        assert written == [True, False]
    else:  # after each checkpoint's fisher and the seed's summary, then the finished report
        assert len(written) >= 3 and all(written[:-1]) and written[-1] is False
    assert json.loads(path.read_text())["in_progress"] is False


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_compare_json_into_a_pipe_is_one_document(tmp_path: Path) -> None:
    """A named pipe gets the finished report once (it had been handed the first checkpoint's,
    and compare hung reopening it for the next; probe 115); stdout, which holds the tables, is
    refused as ``-`` is (it had mixed a JSON per checkpoint with them)."""
    pipe = tmp_path / "p.fifo"
    os.mkfifo(pipe)
    reader = subprocess.Popen(["cat", str(pipe)], stdout=subprocess.PIPE, text=True)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hessrank.cli", "compare", *TINY, "--methods", "fisher",
             "--no-pyhessian", "--checkpoints", "2", "--epochs", "1", "--quiet", "--json",
             str(pipe)], env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
            capture_output=True, text=True, timeout=120)
        received, _ = reader.communicate(timeout=60)
    finally:
        reader.kill()
    assert proc.returncode == 0, proc.stderr
    document = json.loads(received)
    assert len(document["runs"][0]["checkpoints"]) == 2 and not document["in_progress"]
    proc = cli("compare", *TINY, "--json", "/dev/stdout", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--json /dev/stdout: compare prints its tables on stdout" in proc.stderr


def test_a_refused_flag_gets_no_python_api_hint(capsys) -> None:
    """The tracker's refusal of a shared option that other methods take ends with a hint about
    ``method_options``, which the CLI has no flag for (probe 91); the option is named by its
    flag (probe 243)."""
    status, _, err = run_main(["compare", *TINY, "--lanczos-steps", "1"], capsys)
    assert status == 2
    assert "--lanczos-steps 1" in err and "method_options" not in err


def test_a_refusal_after_measured_seeds_keeps_and_shows_them(tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    """A method refused in a later seed (its timings there exceed --max-seconds) stops the run
    as Ctrl-C does: the seeds measured are shown, written and marked as stopped, and the
    refusal is the error (the JSON had been left partial and marked complete, with no tables;
    probe 110)."""
    from hessrank.cli import compare
    from hessrank.cli.errors import CliError

    original, calls = compare.check_budget, []

    def counted(*args, **kwargs) -> None:
        calls.append(None)
        if refuse_after is not None and len(calls) > refuse_after:
            raise CliError("method='fisher' would take about 9 s, over max_seconds = 1 s")
        original(*args, **kwargs)

    monkeypatch.setattr(compare, "check_budget", counted)
    argv = ["compare", *TINY, "--methods", "fisher", "--no-pyhessian", "--json"]
    refuse_after = None
    assert run_main([*argv, str(tmp_path / "one.json")], capsys)[0] == 0
    refuse_after, seed_calls = len(calls), len(calls)  # the second seed's first is refused
    calls.clear()
    status, out, err = run_main([*argv, str(tmp_path / "r.json"), "--seeds", "2"], capsys)
    assert status == 2 and len(calls) == seed_calls + 1
    assert err.endswith("hessrank: error: method='fisher' would take about 9 s, over "
                        "max_seconds = 1 s\n")
    shown = " ".join(out.split())
    assert "Stopped by method='fisher' would take about 9 s" in shown and "\nfisher " in out
    assert "1 of 2 seeds" in shown
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["interrupted"] is True and written["stopped_by"].startswith("method='fisher'")
    alone = json.loads((tmp_path / "one.json").read_text())

    def sranks(report: dict) -> list[float]:
        return [c["methods"]["fisher"]["srank"] for c in report["runs"][0]["checkpoints"]]

    assert sranks(written) == sranks(alone)
    assert all("fisher" not in c["methods"] for c in written["runs"][1]["checkpoints"])
    assert written["summary"]["checkpoints"][0]["seeds"] == 1


def test_the_summary_averages_the_seeds_every_method_finished() -> None:
    """Ctrl-C in a run's last seed, after exact: exact had been averaged over 3 seeds and the
    others over 2, under a title of 3 seeds, and exact's trace differed between two tables of
    one output (probe 110)."""
    from hessrank.cli import report

    def run(seed: int, methods: dict[str, float]) -> dict:
        return {"seed": seed, "checkpoints": [{"index": 0, "task": None,
                                               "previous_task_train_error": None,
                                               "pyhessian": None, "methods": {
            name: {"srank": value, "trace": value} for name, value in methods.items()}}]}

    result = {"config": {"methods": ["exact", "fisher"], "seeds": [0, 1, 2], "model": "m",
                         "threshold": 0.99},
              "runs": [run(0, {"exact": 10.0, "fisher": 9.0}), run(1, {"exact": 12.0,
                                                                        "fisher": 11.0}),
                       run(2, {"exact": 50.0})],
              "model": None, "data": None, "interrupted": True, "stopped_by": "Ctrl-C"}
    point = report.summary(result)["checkpoints"][0]
    assert point["seeds"] == 2
    assert point["methods"]["exact"]["srank"]["mean"] == 11.0
    assert point["methods"]["fisher"]["srank"]["mean"] == 10.0


def test_the_title_counts_the_seeds_of_each_checkpoint_where_they_differ() -> None:
    """Seed 1 stopped after its first checkpoint: that column averaged 2 seeds under a title of
    "1 of 2 seeds" (probe 160)."""
    from hessrank.cli import report

    def point(index: int) -> dict:
        return {"index": index, "task": index + 1, "previous_task_train_error": None,
                "pyhessian": None, "methods": {"fisher": {"srank": 5.0, "trace": 1.0}}}

    result = {"config": {"methods": ["fisher"], "seeds": [0, 1], "model": "mlp",
                         "threshold": 0.99, "activation": "relu", "weights": None,
                         "dtype": "float32"},
              "runs": [{"seed": 0, "checkpoints": [point(0), point(1), point(2)]},
                       {"seed": 1, "checkpoints": [point(0)]}],
              "model": {"name": "mlp", "num_params": 10},
              "data": {"name": "digits", "num_samples": 8, "num_classes": 3},
              "interrupted": True, "stopped_by": "Ctrl-C"}
    assert "1 of 2 seeds at the last checkpoint (2, 1, 1 per checkpoint)" in report.title(result)
    result["runs"][1]["checkpoints"] = [point(0), point(1), point(2)]
    assert report.title(result).endswith("2 seeds (mean±std, the sample standard deviation)")


def test_plot_breaks_lines_at_another_configuration_and_marks_failures(tmp_path: Path) -> None:
    """A layer frozen (num_params) or a failed measurement between two records had been drawn
    as one line, whose jump read as the curvature's, and a batch of another size
    (num_samples) as any point; a signed top eigenvalue had switched the panel to a linear
    axis, flat under one large value (probe 137). Now the line breaks, the failure is a dotted
    line at its step, the points on other samples are hollow, and the axis symmetric-log."""
    from hessrank.cli.plot import build_figure, read_run

    def record(step: int, rank: int, top: float, params: int = 40, samples: int = 8) -> dict:
        return {"step": step, "method": "fisher", "rank": rank, "top_eigenvalue": top,
                "num_params": params, "num_samples": samples, "threshold": 0.99}

    log = tmp_path / "c.jsonl"
    lines = [record(0, 5, 2.0), record(2, 6, -0.5), {"step": 3, "method": "fisher",
                                                      "error": "ValueError: no"},
             record(4, 6, 1e6), record(6, 3, 3.0, params=20),
             record(8, 7, 2.0, params=20, samples=16),
             record(10, 7, 2.0, params=20, samples=16)]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    fig = build_figure([read_run(log)])
    rank_axes, top_axes = fig.axes
    (line, failed, other) = rank_axes.get_lines()
    assert list(line.get_xdata()) == [0, 2, 3, 4, 5, 6, 8, 10]
    values = list(line.get_ydata())
    assert [i for i, v in enumerate(values) if np.isnan(v)] == [2, 4]
    assert [v for v in values if not np.isnan(v)] == [5, 6, 6, 3, 7, 7]
    assert failed.get_label() == "fisher failed" and list(failed.get_xdata()) == [3, 3]
    assert other.get_label() == "fisher on other than 8 samples"
    assert (list(other.get_xdata()), list(other.get_ydata())) == ([8, 10], [7, 7])
    assert top_axes.get_yscale() == "symlog"


def test_plot_breaks_the_numerical_rank_where_its_tolerance_changes(tmp_path: Path) -> None:
    """A model cast to float64 mid-run: its default rtol fell from 5.4e-5 to 1e-13 and the
    numerical rank jumped from 343 to 385 on one line (probe 243). That line breaks there, a
    layer's at its own rtol; the srank's does not, nor does the numerical rank's at a batch of
    another size (whose rtol moves with n, drawn hollow)."""
    from hessrank.cli.plot import build_figure, read_run

    def record(step: int, rtol: float, samples: int = 40) -> dict:
        return {"step": step, "method": "exact", "rank": 253, "numerical": 343 + step,
                "rtol": rtol, "top_eigenvalue": 0.5, "num_params": 452,
                "num_samples": samples, "layers": {"0": {"numerical": step, "rtol": rtol}}}

    log = tmp_path / "c.jsonl"
    lines = [record(0, 5.4e-5), record(1, 5.4e-5), record(2, 1e-13), record(3, 1e-13),
             record(4, 5e-14, samples=20), record(5, 1e-13)]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for key, layers, gaps in (("numerical", False, [1.5]), ("numerical", True, [1.5]),
                              ("rank", False, [])):
        axes = build_figure([read_run(log)], key, layers).axes
        line = (axes[2] if layers else axes[0]).get_lines()[0]
        steps, values = list(line.get_xdata()), list(line.get_ydata())
        assert [s for s, v in zip(steps, values) if np.isnan(v)] == gaps, (key, layers)
        assert [s for s, v in zip(steps, values) if not np.isnan(v)] == list(range(6))


def test_unreadable_mnist_files_are_one_line(tmp_path: Path, capsys) -> None:
    """MNIST files that exist but are not idx files (a truncated download) had ended in
    torchvision's bare ``AssertionError`` and a traceback (probe 146)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in presets.MNIST_FILES:
        (raw / name).write_bytes(b"junk\n")
    status, out, err = run_main(["rank", "--data-dir", str(tmp_path)], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"hessrank: error: MNIST in {raw} could not be read") and (
        err.count("\n") == 1), err
    assert "download them again, or use --data digits" in err


def test_a_preset_too_large_to_allocate_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                    capsys) -> None:
    """A preset whose parameters cannot be allocated (``--width 100000``: 40 GB) had ended in
    the allocator's traceback (probe 146); the allocation is stood in for, not made."""
    def refused(*_: object) -> torch.nn.Module:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "40000000000 bytes")

    monkeypatch.setattr(presets, "_preset", refused)
    status, out, err = run_main(["rank", "--width", "100000", "--method", "fisher"], capsys)
    assert status == 2 and out == ""
    assert err == ("hessrank: error: --model mlp at --width 100000 --depth 2 does not fit in "
                   "memory (its parameters could not be allocated): choose a smaller --width "
                   "or --depth\n"), err


@pytest.mark.parametrize("command", ["compare", "rank"])
def test_plot_names_a_report_it_is_given(command: str, tmp_path: Path, capsys) -> None:
    """A ``--json`` report passed to ``hessrank plot`` had been refused as "not JSON" (it is one
    indented document, not a log of lines; probe 146): the error says what it is, and only it
    (a figure there had first been said to be replaced; probe 160)."""
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"schema_version": 1, "command": command, "runs": []},
                                 indent=1))
    (tmp_path / "r.png").write_bytes(b"a figure")
    status, out, err = run_main(["plot", str(report)], capsys)
    assert (tmp_path / "r.png").read_bytes() == b"a figure"
    assert status == 2 and out == ""
    assert err == (f"hessrank: error: {report} is a hessrank {command} report (--json), not a "
                   "tracker log: hessrank plot draws the logs a Tracker writes (a comparison's "
                   "figure comes from hessrank compare --plot FILE.png)\n"), err


def test_plot_of_a_log_without_the_rank_is_one_line(tmp_path: Path, capsys) -> None:
    """A log whose records hold no rank had drawn an empty figure under matplotlib's "No artists
    with labels" warning and exited 0 (probe 146)."""
    log = tmp_path / "bare.jsonl"
    log.write_text('{"step": 0, "method": "fisher"}\n')
    status, out, err = run_main(["plot", str(log)], capsys)
    assert status == 2 and out == ""
    assert err == (f"hessrank: error: no record of {log} holds a 'rank' value: nothing to plot "
                   "(a Tracker writes one per measurement; --rank names the rank to draw)\n"), err
    assert not (tmp_path / "bare.png").exists()


def test_a_figure_suffix_refusal_names_each_format_once(tmp_path: Path, capsys) -> None:
    """.png, .pdf and .svg had been listed twice, first and again among the others (probe
    146)."""
    status, _, err = run_main(["compare", *TINY, "--plot", str(tmp_path / "figure.txt")], capsys)
    assert status == 2
    formats = re.findall(r"\.[a-z0-9]+\b", err.split("figure;", 1)[1])
    assert formats[:3] == [".png", ".pdf", ".svg"] and len(formats) == len(set(formats)), err


def test_pyhessian_s_check_of_exact_is_not_shown_without_exact(tmp_path: Path, capsys) -> None:
    """PyHessian's table sets its top eigenvalue and trace beside exact's: with --skip-exact it
    had been shown with every exact and difference cell empty ('—'); a line says why it is not,
    and where its numbers are (the file written alone: before, "--json and --csv" with --json
    alone; probe 204)."""
    argv = ["compare", *TINY, "--skip-exact", "--methods", "fisher", "--json",
            str(tmp_path / "r.json")]
    status, out, _ = run_main(argv, capsys)
    assert status == 0 and "\nfisher " in out
    assert "PyHessian (defaults)" not in out and "hessrank exact" not in out
    assert ("No exact reference (skipped): errors against exact are not computed, and "
            "PyHessian's check of exact is not shown (its numbers are in --json).\n"
            ) in out
    (point,) = json.loads((tmp_path / "r.json").read_text())["runs"][0]["checkpoints"]
    assert point["pyhessian"]["trace"] is not None


def test_the_title_names_the_dtype_and_the_weights(tmp_path: Path, capsys) -> None:
    """A saved table had not said ``--dtype float64`` or ``--weights``, both of which change its
    numbers; the dtype is named always, as the threshold is, the weights where given."""
    weights = tmp_path / "w.pt"
    torch.save(tiny_problem(seed=3)[0].state_dict(), weights)
    argv = ["compare", *TINY, "--data", "digits", "--methods", "fisher", "--no-pyhessian"]
    status, out, _ = run_main([*argv, "--dtype", "float64", "--weights", str(weights)], capsys)
    assert status == 0
    assert " ".join(out.split()).startswith(
        f"hessrank compare: mlp (310 float64 parameters from {weights}, relu) on digits "
        "(n = 16, C = 10), srank threshold 0.99, seed 0 "), out
    status, out, _ = run_main(argv, capsys)
    assert status == 0 and out.startswith("hessrank compare: mlp (310 float32 parameters, relu) "
                                          "on digits"), out


def test_a_refusal_before_the_work_keeps_its_cost_a_least(capsys) -> None:
    """The library's refusal before the work gives its predicted cost as a least ("11.5 KiB or
    more": the work adds what its first pass holds); the CLI's line had made it the whole cost
    ("needs ~11.5 KiB")."""
    model, data = tiny_problem()
    with pytest.raises(hessrank.BudgetError,
                       match=r"needs about 11\.5 KiB or more for P") as refused:
        hessrank.effective_rank(model, torch.nn.CrossEntropyLoss(), (data.inputs, data.targets),
                                method="fisher", max_memory=100)
    assert refused.value.at_least
    argv = ["rank", *TINY, "--method", "fisher", "--max-memory", "1e-7"]
    status, out, err = run_main(argv, capsys)
    assert status == 2 and out == ""
    assert err == ("hessrank: error: fisher on mlp (310 parameters, n = 16) needs at least "
                   "~11.5 KiB, over --max-memory 1e-07 GiB; raise the budget, or choose another "
                   "--method\n"), err


def test_compare_quiet_with_no_file_is_refused_before_any_work(capsys) -> None:
    """``compare --quiet`` with no ``--json``, ``--csv`` or ``--plot`` had run every
    measurement, then shown and written nothing, and exited 0 (probe 177)."""
    status, out, err = run_main(["compare", *TINY, "--methods", "fisher", "--quiet"], capsys)
    assert status == 2 and out == ""
    assert "--quiet prints no tables, and no --json, --csv or --plot names a file" in err, err


def test_a_prediction_under_a_tenth_of_a_second_keeps_its_digits() -> None:
    """A small model's refusal had read "needs ~3.0 MiB and ~0.0 s"."""
    assert [report.human_seconds(value) for value in (0.0312, 0.1, 3.24, 600.0)] == [
        "0.031 s", "0.1 s", "3.2 s", "10 min"]


def test_ctrl_c_inside_the_first_method_shows_no_empty_table(capsys, monkeypatch) -> None:
    """A Ctrl-C inside the first method (its eigen-solve, which cannot be interrupted, ends
    first) left a checkpoint with nothing measured, and an empty table was shown (probe 146)."""
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "check_budget", interrupted)
    status, out, err = run_main(["compare", *TINY, "--methods", "fisher", "--no-pyhessian"],
                                capsys)
    assert status == 130, err
    assert "Stopped by Ctrl-C before the first measurement ended: nothing to show." in out
    assert "Estimators vs exact" not in out


def test_a_model_file_imports_as_python_runs_it(tmp_path: Path, monkeypatch) -> None:
    """``--model path/file.py:factory`` of a file that runs as a script: a ``@dataclass`` under
    ``from __future__ import annotations`` had failed ("'NoneType' object has no attribute
    '__dict__'"), and a module beside it had not been found unless the command ran in its
    folder (probe 204). The folder is first on ``sys.path`` during the import and the factory's
    call, and taken off after; a file that fails leaves no module behind."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "probe204_blocks.py").write_text(
        "from torch import nn\n\ndef block(i, o):\n    return nn.Sequential(nn.Linear(i, o), "
        "nn.Tanh())\n")
    (project / "probe204_head.py").write_text("from torch import nn\nHEAD = nn.Linear\n")
    (project / "nets.py").write_text(
        "from __future__ import annotations\n\nfrom dataclasses import dataclass\n\n"
        "from torch import nn\n\nfrom probe204_blocks import block\n\n\n"
        "@dataclass\nclass Config:\n    hidden: int = 5\n\n\n"
        "def make():\n    from probe204_head import HEAD  # imported when called\n\n"
        "    return nn.Sequential(nn.Flatten(), block(64, Config().hidden), "
        "HEAD(Config().hidden, 10))\n")
    (project / "broken.py").write_text("raise ImportError('broken on purpose')\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    path, modules = list(sys.path), set(sys.modules)
    try:
        model = presets.build_model(f"{project}/nets.py:make", input_shape=(1, 8, 8))
        assert presets.num_params(model) == 64 * 5 + 5 + 5 * 10 + 10
        assert sys.path == path
        with pytest.raises(CliError, match="cannot import .*broken.py: broken on purpose"):
            presets.build_model(f"{project}/broken.py:make", input_shape=(1, 8, 8))
        assert sys.path == path
        assert not any(getattr(sys.modules.get(name), "__file__", None) == str(
            project / "broken.py") for name in set(sys.modules) - modules)
    finally:
        for name in ("probe204_blocks", "probe204_head"):
            sys.modules.pop(name, None)


def test_model_files_in_two_folders_each_import_their_own_siblings(tmp_path: Path) -> None:
    """Two folders, each a ``model.py`` beside its own ``helpers.py`` and package: after the
    first folder's model the second's had been built with the first's cached helpers,
    silently (probe 206; the package, probe 208)."""
    for folder, width in (("a", 5), ("b", 9)):
        (tmp_path / folder / "probe208_package").mkdir(parents=True)
        (tmp_path / folder / "probe206_helpers.py").write_text(f"WIDTH = {width}\n")
        (tmp_path / folder / "probe208_package" / "__init__.py").write_text(f"EXTRA = {width}\n")
        (tmp_path / folder / "model.py").write_text(
            "from torch import nn\n\nfrom probe206_helpers import WIDTH\n"
            "from probe208_package import EXTRA\n\n\ndef make():\n"
            "    return nn.Sequential(nn.Flatten(), nn.Linear(64, WIDTH + EXTRA))\n")
    try:
        for folder, width in (("a", 10), ("b", 18), ("a", 10)):
            model = presets.build_model(f"{tmp_path / folder}/model.py:make",
                                        input_shape=(1, 8, 8))
            assert presets.num_params(model) == 64 * width + width, folder
    finally:
        sys.modules.pop("probe206_helpers", None)
        sys.modules.pop("probe208_package", None)


def _idx(data: np.ndarray) -> bytes:
    """``data`` (unsigned bytes) as an idx file."""
    return bytes((0, 0, 8, data.ndim)) + np.asarray(data.shape, ">u4").tobytes() + data.tobytes()


def test_mnist_s_train_files_alone_or_gzipped_are_read(tmp_path: Path, capsys) -> None:
    """A folder with MNIST's train files alone, or its gzipped files alone, passed the check of
    a folder that holds MNIST (``has_mnist``) and was then refused by torchvision's reader as
    "not valid idx files (a truncated download?)" (probe 204): the train files are read,
    as they are or gzipped, as torchvision reads them; a missing one is named."""
    import gzip

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 20, dtype=np.uint8)
    files = {"train-images-idx3-ubyte": _idx(images), "train-labels-idx1-ubyte": _idx(labels)}
    for layout in ("train alone", "gzipped alone"):
        raw = tmp_path / layout / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name, data in files.items():
            if layout == "train alone":
                (raw / name).write_bytes(data)
            else:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        assert presets.has_mnist(tmp_path / layout)
        data = presets.load_data("mnist", samples=8, seed=0, data_dir=tmp_path / layout,
                                 image_size=28)
        index = torch.randperm(20, generator=torch.Generator().manual_seed(0))[:8].numpy()
        expected = torch.from_numpy(images[index].astype(np.float32) / 255.0).unsqueeze(1)
        expected = (expected - expected.mean()) / expected.std()
        torch.testing.assert_close(data.inputs, expected)
        assert data.targets.tolist() == labels[index].tolist()
        status, out, err = run_main(["rank", "--data-dir", str(tmp_path / layout), *TINY],
                                    capsys)
        assert status == 0 and out.strip().isdigit(), err
    torchvision = pytest.importorskip("torchvision")
    raw = tmp_path / "train alone" / "MNIST" / "raw"
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # what torchvision needs
        (raw / name).write_bytes(files[name.replace("t10k", "train")])
    theirs = torchvision.datasets.MNIST(str(tmp_path / "train alone"), train=True)
    ours = presets._mnist(tmp_path / "train alone")
    assert torch.equal(ours[0], theirs.data.float() / 255) and torch.equal(ours[1], theirs.targets)
    (tmp_path / "gzipped alone" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").unlink()
    status, _, err = run_main(["rank", "--data-dir", str(tmp_path / "gzipped alone")], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "lacks train-labels-idx1-ubyte (or .gz)" in err, err


@pytest.mark.parametrize(("argv", "patched"), [
    (["--image-size", "100000"], "adaptive_avg_pool2d"),
    (["--data", "synthetic", "--samples", "100000000"], "randn")])
def test_data_too_large_to_allocate_is_one_line(argv: list[str], patched: str, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs that cannot be allocated (``--image-size 100000``: 5 TB) had ended in the
    allocator's traceback and exit 1 (probe 204), as a preset's parameters had (probe 146);
    the allocation is stood in for, not made."""
    def refused(*_: object, **__: object) -> torch.Tensor:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "5120000000000 bytes")

    monkeypatch.setattr(torch.nn.functional if patched == "adaptive_avg_pool2d" else torch,
                        patched, refused)
    status, out, err = run_main(["rank", *argv], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("hessrank: error: --data ") and (
        "does not fit in memory" in err), err
    assert err.endswith("could not be allocated): choose a smaller --image-size or --samples\n")


@pytest.mark.parametrize(("argv", "expected"), [
    (["compare", "--methods", "foo"], "unknown method 'foo'"),
    (["compare", "--data", "mnist"], "--data mnist needs a data directory"),
    (["compare", "--epochs", "3"], "--epochs shapes the training between checkpoints"),
    (["compare", "--model", "{tmp}/nope.py:make"], "no file {tmp}/nope.py"),
    (["compare", "--weights", "{tmp}/nope.pt"], "--weights {tmp}/nope.pt: No such file"),
    (["rank", "--method", "exact,fisher"], "names 2 estimators: rank measures one"),
    (["rank", "--data", "mnist", "--data-dir", "{tmp}"], "no MNIST in {tmp}"),
    (["plot", "{tmp}/log.jsonl", "-o", "{tmp}/old.json", "--layers"],
     "--layers: the log has no per-layer ranks"),
    # refused once the work began (probe 243): a budget, the model's outputs, an option's value
    (["rank", *TINY, "--max-memory", "1e-9"], "over --max-memory 1e-09 GiB"),
    (["compare", *TINY, "--max-seconds", "1e-9"], "over --max-seconds 1e-09"),
    (["compare", "--model", "{tmp}/five.py:five"], "returns (2, 5), expected logits of shape"),
    (["compare", *TINY, "--methods", "lanczos", "--lanczos-steps", "1"],
     "gives a quadrature of one node")])
def test_a_refused_command_does_not_say_it_will_replace_a_file(argv: list[str], expected: str,
                                                               tmp_path: Path, capsys) -> None:
    """A file there had been said to be replaced ("exists; it will be replaced") and the
    command then refused (probe 204): every other check comes first, and a refusal of the work
    itself comes before the line too (probe 243)."""
    old = tmp_path / "old.json"
    old.write_text("an earlier run\n")
    (tmp_path / "log.jsonl").write_text('{"step": 0, "method": "fisher", "rank": 3}\n')
    (tmp_path / "five.py").write_text(
        "from torch import nn\n\n\ndef five():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] != "plot":
        argv += ["--json", str(old)]
    status, out, err = run_main(argv, capsys)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert expected.replace("{tmp}", str(tmp_path)) in err, err
    assert old.read_text() == "an earlier run\n"


def test_a_refusal_within_the_first_checkpoint_leaves_the_json(tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    """exact measured, then fisher refused by its budget: the JSON had been rewritten with
    exact's record, marked in progress, and the command refused with nothing kept (probe
    243). Until a checkpoint is measured whole, a refusal writes nothing and nothing is said to
    be replaced. (Stood in for: a budget one method of the first checkpoint exceeds.)"""
    import functools

    original = hessrank.effective_rank

    @functools.wraps(original)
    def fisher_over_budget(model, loss_fn, batch, method="fisher", **kwargs):
        if method == "fisher":
            raise hessrank.BudgetError("fisher needs 1 TiB", 2**40, None)
        return original(model, loss_fn, batch, method=method, **kwargs)

    monkeypatch.setattr(hessrank, "effective_rank", fisher_over_budget)
    old = tmp_path / "old.json"
    old.write_text("an earlier run\n")
    status, out, err = run_main(["compare", *TINY, "--methods", "exact,fisher", "--no-pyhessian",
                                 "--json", str(old)], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("hessrank: error: fisher on mlp") and "over --max-memory" in err
    assert old.read_text() == "an earlier run\n"


def test_threads_default_to_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--threads``' default (half the cores, 1 to 4) had overridden a user's
    ``OMP_NUM_THREADS=1`` on a machine of 4 cores or more (probe 204); it is the default where
    set, the first count of a nested list, a value that is no count ignored."""
    import hessrank.cli as cli_module

    monkeypatch.setattr(cli_module, "available_cores", lambda: 16)
    for value, threads in (("1", 1), ("6", 6), ("2,1", 2), ("", 4), ("abc", 4), ("0", 4),
                            ("²", 4)):  # (a digit to str.isdigit, not to int(); probe 206)
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert cli_parser().parse_args(["rank"]).threads == threads, value
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cli_parser().parse_args(["rank"]).threads == 4


def test_a_stopped_seed_s_pyhessian_check_is_counted(tmp_path: Path, capsys, monkeypatch) -> None:
    """Ctrl-C in the last seed's PyHessian check: the CSV's mean and std rows of PyHessian were
    one seed's, beside the methods' rows of two, with no count, and the table did not say
    (probe 204). Mean/std rows carry the seeds they average (``n``), as the JSON's summary
    does, and the table says "1 of 2 seeds"."""
    original, calls = compare.pyhessian_check, []

    def second_interrupted(*args, **kwargs) -> dict:
        calls.append(None)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(compare, "pyhessian_check", second_interrupted)
    status, out, err = run_main(["compare", *TINY, "--methods", "exact,fisher", "--seeds", "2",
                                 "--json", str(tmp_path / "r.json"), "--csv",
                                 str(tmp_path / "r.csv")], capsys)
    assert status == 130, err
    with (tmp_path / "r.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    counts = {(r["seed"], r["method"]): r["n"] for r in rows if r["seed"] in ("mean", "std")}
    assert counts == {(which, method): "1" if method == "pyhessian" else "2"
                      for which in ("mean", "std") for method in ("exact", "fisher", "pyhessian")}
    assert {r["n"] for r in rows if r["seed"] in ("0", "1")} == {""}
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]["checkpoints"][0]
    assert summary["pyhessian"]["trace"]["n"] == 1 and summary["seeds"] == 2
    assert "1 of 2 seeds: the run stopped before PyHessian checked the others" in " ".join(
        out.split())


def test_the_skip_exact_note_names_only_files_written(tmp_path: Path, capsys) -> None:
    """With --skip-exact, the note that PyHessian's check is not shown had said its numbers are
    "in --json and --csv" where neither was written (probe 204)."""
    argv = ["compare", *TINY, "--skip-exact", "--methods", "fisher"]
    status, out, _ = run_main(argv, capsys)
    assert status == 0
    assert ("PyHessian's check of exact is not shown (--json or --csv keeps its numbers; "
            "--no-pyhessian skips it).\n") in out
    status, out, _ = run_main([*argv, "--csv", str(tmp_path / "r.csv")], capsys)
    assert status == 0 and "(its numbers are in --csv).\n" in out
