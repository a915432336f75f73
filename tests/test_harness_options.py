"""Tests that every option of the loss-of-plasticity harness (examples/plasticity) is checked
before any work: a value out of its range is refused in one line, with exit status 2, before a
folder or file is created and before any training. No test here trains."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

PLASTICITY = Path(__file__).resolve().parents[1] / "examples" / "plasticity"
sys.path.insert(0, str(PLASTICITY.parent))  # the harness is the package `plasticity`

from plasticity import bench_batching, experiment, run, summarize  # noqa: E402
from plasticity.experiment import Config, run_experiment  # noqa: E402
from plasticity.problems import DATA_DIR_ENV, SetupError  # noqa: E402

# (options, fragment of the error line): each ran before, some to a traceback after config.json
# was written (which then refused the corrected command as another configuration), some to
# results of training that never happened (--epochs 0 recorded an online loss of 0.0).
CASES = [
    (["--epochs", "0"], "run run: --epochs 0: must be an integer >= 1"),
    (["--epochs", "-1"], "--epochs -1: must be an integer >= 1"),
    (["--eval-samples", "0"], "--eval-samples 0: must be an integer >= 1"),
    (["--tasks", "-2"], "--tasks -2: must be an integer >= 1"),
    (["--tasks", "0"], "--tasks 0: must be an integer >= 1"),
    (["--lr", "-1"], "--lr -1.0: must be a number > 0"),
    (["--lr", "0"], "--lr 0.0: must be a number > 0"),
    (["--lr", "nan"], "--lr nan: must be a number > 0"),
    (["--width", "0"], "--width 0: must be an integer >= 1"),
    (["--depth", "-1"], "--depth -1: must be an integer >= 1"),
    (["--depth", "0"], "--depth 0: must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--seeds", "0"], "--seeds 0: must be an integer >= 1"),
    (["--first-seed", "-1"], "seed -1: must be an integer in [0, "),
    (["--num-samples", "0"], "--num-samples 0: must be an integer >= 1"),
    (["--downsample", "0"], "--downsample 0: must be an integer >= 1"),
    (["--problem", "random_label_mnist", "--downsample", "29"],
     "--downsample 29: must be an integer in [1, 28] (random_label_mnist has 28x28 images)"),
    (["--subset-seed", "-1"], "--subset-seed -1: must be an integer in [0, "),
    (["--reg-strength", "-1"], "--reg-strength -1.0: must be a number >= 0"),
    (["--reg", "shrink_perturb", "--reg-strength", "1.5"],
     "--reg-strength 1.5: must be a number in [0, 1]"),
    (["--sp-noise", "-1"], "--sp-noise -1.0: must be a number >= 0"),
    (["--hess-threshold", "1.5"], "--hess-threshold 1.5: must be a number in (0, 1]"),
    (["--hess-threshold", "0"], "--hess-threshold 0.0: must be a number in (0, 1]"),
    (["--hess-samples", "0"], "--hess-samples 0: must be an integer >= 1"),
    (["--lanczos-steps", "1"], "--lanczos-steps 1: must be an integer >= 2"),
    (["--hess-max-memory", "0"], "--hess-max-memory 0.0: must be a number > 0"),
    (["--overlap-k", "0"], "--overlap-k 0: must be an integer >= 1"),
    (["--dormant-tau", "1"], "--dormant-tau 1.0: must be a number in [0, 1)"),
    (["--hess-methods", "fisher,fisher"], "--hess-methods names fisher more than once"),
    (["--hess-blocks", "all,all"], "--hess-blocks names all more than once"),
    (["--hess-blocks", ","], "--hess-blocks names no block: choose from all, last2"),
    (["--name", "a/b"], "--name 'a/b': must be a folder name"),
    (["--name", ".."], "--name '..': must be a folder name"),
    (["--threads", "0"], "error: --threads 0: must be an integer >= 1"),
    (["--runs", "nosuch"], "error: --runs names nosuch, not a run of --preset single"),
    (["--preset", "smoke", "--name", "x"], "error: --name x with --preset smoke: "),
    (["--preset", "smoke", "--epochs", "0"], "run act_relu: --epochs 0: must be"),
]


@pytest.mark.parametrize(("options", "fragment"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_bad_option_is_refused_in_one_line_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    options: list[str], fragment: str,
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "no-data-here"))
    out = tmp_path / "out"
    argv = ["--problem", "synthetic", "--out", str(out), "--no-progress", *options]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert fragment in err, err
    assert not out.exists()


BENCH_CASES = [(["--epochs", "0"], "error: --epochs 0: must be an integer >= 1"),
               (["--seeds", "3", "0"], "error: --seeds 0: must be an integer >= 1"),
               (["--threads", "0"], "error: --threads 0: must be an integer >= 1")]


@pytest.mark.parametrize(("options", "line"), BENCH_CASES,
                         ids=[" ".join(c[0]) for c in BENCH_CASES])
def test_bench_batching_refuses_a_bad_count_before_training(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, options: list[str],
    line: str,
) -> None:
    """(``--epochs 0`` had printed speed-ups of no training, ``--seeds 0`` crashed after the
    warm-up, ``--threads 0`` with torch's traceback.)"""
    monkeypatch.setattr(bench_batching, "train_seconds", _no_training)
    assert bench_batching.main(options) == 2
    assert capsys.readouterr().err.strip() == line


def _no_training(*args: object) -> float:
    raise AssertionError("trained before its options were checked")


def test_the_library_refuses_a_bad_config_before_anything_is_written(tmp_path: Path) -> None:
    cfg = Config(problem="synthetic", epochs=0, tasks=1, seeds=[0])
    with pytest.raises(SetupError, match="--epochs 0: must be an integer >= 1"):
        run_experiment(cfg, tmp_path / "run", "")
    assert not (tmp_path / "run").exists()


def _fake_run(run_dir: Path, tasks: int, numbers: list[int] | None = None) -> None:
    """A run folder with ``tasks`` task files (holding the tasks ``numbers``), as run.py writes
    them, without training."""
    (run_dir / "tasks").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"tasks": tasks}))
    for t, held in enumerate(numbers or range(tasks)):
        record = {"task": held, "seeds": [0], "metrics": {"acc_end": [0.5]}}
        (run_dir / "tasks" / f"{t:04d}.json").write_text(json.dumps(record))


def test_summarize_says_when_no_row_fits_the_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed the table's header alone and exited 0, where plot.py explains."""
    _fake_run(tmp_path / "mine", tasks=7)
    assert summarize.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no row of the table fits the runs under") and "\n" not in err
    assert "--metrics reports any run" in err
    assert summarize.main([str(tmp_path), "--metrics"]) == 0
    assert "| mine (1 seeds, 7 tasks) | acc_end |" in capsys.readouterr().out


def test_a_task_file_holding_another_task_counts_tasks_from_1(tmp_path: Path) -> None:
    """``0003.json holds task 4, not task 3`` counted from 0 where every other message counts
    from 1."""
    _fake_run(tmp_path, tasks=4, numbers=[0, 1, 2, 4])
    with pytest.raises(SetupError, match=r"0003\.json holds task 5, not task 4 \(task files "
                       r"count from 0000\.json, task 1\)"):
        experiment.load_task_results(tmp_path)
