"""Tests of the loss-of-plasticity harness in examples/plasticity (no data needed, except the
MNIST tests, which run when ``$HESSRANK_DATA_DIR`` holds MNIST/raw and are skipped, saying so,
otherwise)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hessrank

PLASTICITY = Path(__file__).resolve().parents[1] / "examples" / "plasticity"
sys.path.insert(0, str(PLASTICITY.parent))  # the harness is the package `plasticity`

from plasticity import (  # noqa: E402
    analysis,
    experiment,
    metrics,
    plot,
    problems,
    run,
    summarize,
)
from plasticity.experiment import Config, run_experiment  # noqa: E402
from plasticity.model import BatchedMLP  # noqa: E402
from plasticity.problems import (  # noqa: E402
    DATA_DIR_ENV,
    MNIST_TRAIN_IMAGES,
    SetupError,
    make_problem,
)
from plasticity.regularizers import feature_rank_penalty, wasserstein_penalty  # noqa: E402


def mnist_dir() -> Path | None:
    """``$HESSRANK_DATA_DIR`` if it holds MNIST/raw, else None."""
    folder = os.environ.get(DATA_DIR_ENV)
    return Path(folder) if folder and (Path(folder) / MNIST_TRAIN_IMAGES).exists() else None


NEEDS_MNIST = pytest.mark.skipif(
    mnist_dir() is None,
    reason=f"MNIST not found: set {DATA_DIR_ENV} to a folder holding MNIST/raw to run this test",
)


def tiny_config(**changes: object) -> Config:
    """A synthetic-data run that takes well under a second per task."""
    base = Config(
        name="tiny", problem="synthetic", num_samples=48, width=12, depth=2, epochs=2,
        batch_size=16, tasks=3, seeds=[0, 1, 2], hess_methods=["fisher"], hess_samples=24,
        eval_samples=48,
    )
    return dataclasses.replace(base, **changes)


def strip_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    # the README's smoke command as written: no --problem, no data, no network
    argv = ["--preset", "smoke", "--out", str(out), "--no-progress", "--threads", "1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DATA_DIR_ENV, str(out / "no-data-here"))
        assert run.main(argv) == 0
    return out


def test_smoke_preset_writes_every_task_of_every_run(smoke_results: Path) -> None:
    names = {c.name for c in run.preset_runs("smoke")}
    assert {p.name for p in smoke_results.iterdir()} == names
    for name in names:
        records = experiment.load_task_results(smoke_results / name)
        assert [r["task"] for r in records] == [0, 1]
        m = records[-1]["metrics"]
        for key in ("acc_end", "acc_online", "hess_rank_fisher_start", "dead_frac",
                    "feature_rank", "update_norm_online", "dist_init"):
            assert len(m[key]) == 2, key
        assert all(0.0 <= a <= 1.0 for a in m["acc_end"])
        assert all(r >= 1 for r in m["hess_rank_fisher_start"])
    exact = experiment.load_task_results(smoke_results / "exact_relu")[0]["metrics"]
    for method in ("exact", "ggn", "fisher", "lanczos"):
        assert len(exact[f"hess_rank_{method}_start"]) == 2
    assert all(0.0 <= o <= 1.0 + 1e-9 for o in exact["overlap_start"])
    for method in ("exact", "ggn", "fisher", "lanczos"):  # both parameter blocks, within caps
        for block in ("", "_last2"):
            ranks = exact[f"hess_rank_{method}{block}_start"]
            caps = exact[f"hess_cap_{method}{block}_start"]
            assert all(1 <= r <= c for r, c in zip(ranks, caps, strict=True)), (method, block)


def test_results_record_no_path_of_the_machine(smoke_results: Path) -> None:
    for path in smoke_results.rglob("*.json"):
        text = path.read_text()
        assert str(smoke_results) not in text and "no-data-here" not in text, path


def test_plot_draws_pngs(smoke_results: Path, tmp_path: Path) -> None:
    written = plot.draw_all(smoke_results, tmp_path)
    names = {p.name for p in written}
    assert {"fig1_explanations.png", "fig3_estimators.png", "fig4_curvature.png",
            "fig5_update_norm.png", "permuted_mnist.png", "regularizers.png"} <= names
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reproduction_table_has_a_row_per_target(tmp_path: Path) -> None:
    # 7 tasks: enough for the windows (tasks 2-4 and the last 3) not to overlap
    out = tmp_path / "res"
    argv = ["--preset", "smoke", "--out", str(out), "--no-progress", "--tasks", "7"]
    assert run.main(argv) == 0
    runs = analysis.load_runs(out)
    table = summarize.reproduction_table(runs)[2:]
    rows = [line.split(" | ")[0] for line in table]
    assert rows == ["| 1 (v4 reading)", "| 1 (v1 reading)", "| 2 (v3/v4 reading)",
                    "| 2 (v1 reading)", "| 3", "| 4", "| 5", "| 6", "| 7"]
    # the EF's cap is the runs' own sample count (it said 64, the default preset's, for 32), and
    # no verdict rests on a correlation of too few settings (one printed a Spearman of nan)
    samples = next(iter(runs.values())).config["hess_samples"]
    assert f"EF being capped by n = {samples} samples" in table[4]
    assert "nan" not in table[8]
    lines = summarize.metric_lines(runs)
    assert sum("| acc_end |" in line for line in lines) == len(runs)


def test_resume_finishes_without_redoing_tasks(tmp_path: Path) -> None:
    cfg = tiny_config()
    full = run_experiment(cfg, tmp_path / "full", "")
    part_dir = tmp_path / "part"
    run_experiment(cfg, part_dir, "", stop_after=1)
    assert experiment.finished_tasks(part_dir) == 1
    first = part_dir / "tasks" / "0000.json"
    first_bytes, first_mtime = first.read_bytes(), first.stat().st_mtime_ns
    # a kill in the middle of a write leaves only a temporary file behind
    (part_dir / "tasks" / "0001.json.tmp").write_text("{trunc")
    resumed = run_experiment(cfg, part_dir, "")
    assert first.read_bytes() == first_bytes and first.stat().st_mtime_ns == first_mtime
    assert strip_times(resumed) == strip_times(full)
    assert experiment.finished_tasks(part_dir) == cfg.tasks


def test_rerun_with_other_config_is_refused_naming_the_field(tmp_path: Path) -> None:
    run_experiment(tiny_config(tasks=1), tmp_path, "")
    with pytest.raises(SetupError, match=r"another configuration: lr \(saved 0.001, now 0.5\)"):
        run_experiment(tiny_config(tasks=1, lr=0.5), tmp_path, "")
    # a field added to Config after the run was saved, at its default, is the same configuration
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["overlap_k"]
    # a field removed since (the committed results' lanczos_probes), and lanczos_steps where
    # no Lanczos is measured, configure nothing: the committed results could not be resumed
    saved.update(lanczos_probes=8, lanczos_steps=80)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert "lanczos" not in saved["hess_methods"]
    assert len(run_experiment(tiny_config(tasks=1), tmp_path, "")) == 1


def test_weights_that_diverge_stop_the_run_in_one_line(tmp_path: Path) -> None:
    """SGD at a learning rate of 1e9 sends the weights to NaN in the first task: the library's
    refusal of them had ended the run in a 33-line traceback naming no run or task (probe
    177)."""
    with pytest.raises(SetupError, match=r"^run tiny, task 1: the weights diverged to NaN or "
                                         r"Inf in training.*lower --lr \(1e\+09\)$"):
        run_experiment(tiny_config(tasks=2, optimizer="sgd", lr=1e9), tmp_path, "")
    assert experiment.finished_tasks(tmp_path) == 0


def test_weights_too_large_to_measure_stop_the_run_in_one_line(tmp_path: Path) -> None:
    """Adam at a learning rate of 1e8 sends the weights far out but finite: the library refuses
    their curvature (below float32's range), which had ended the run in a traceback (probe
    181)."""
    cfg = tiny_config(tasks=2, optimizer="adam", lr=1e8, hess_methods=["exact"],
                      activation="relu", reg="wasserstein", reg_strength=1e-3, width=8,
                      num_samples=64, seeds=[0, 1], hess_samples=32, eval_samples=64)
    with pytest.raises(SetupError, match=r"^run tiny, task 2: the curvature after training "
                                         r"cannot be measured \(where the training diverged, "
                                         r"lower --lr, 1e\+08\): the hessian matrix's"):
        run_experiment(cfg, tmp_path, "")


def test_first_seed_shifts_the_presets_seeds() -> None:
    """``--first-seed 7`` without ``--seeds`` was ignored (the run recorded seeds [0, 1])."""
    (cfg,) = run.configs_from_args(run.parse_args(["--preset", "smoke", "--runs", "act_relu",
                                                   "--first-seed", "7"]))
    (default,) = run.configs_from_args(run.parse_args(["--preset", "smoke", "--runs",
                                                       "act_relu"]))
    assert cfg.seeds == [7 + i for i in range(len(default.seeds))]
    (counted,) = run.configs_from_args(run.parse_args(["--preset", "smoke", "--runs", "act_relu",
                                                       "--first-seed", "3", "--seeds", "2"]))
    assert counted.seeds == [3, 4]


@pytest.mark.parametrize(("option", "value"), [("--hess-methods", "fisherr"),
                                                ("--hess-blocks", "last3")])
def test_a_typo_in_the_curvature_options_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str) -> None:
    """It raised a traceback after config.json was written, which then refused the corrected
    command as another configuration."""
    argv = ["--preset", "smoke", "--runs", "act_relu", "--out", str(tmp_path), "--no-progress",
            option, value]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run act_relu: ") and f"names {value}: choose from" in err
    assert not any(tmp_path.rglob("*.json"))


def _damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    else:  # truncated, as a full disk or a copy interrupted half-way would leave it
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (file, damage): every way a finished run's folder was found broken; each is detected before
# any work, in one line naming the file, and nothing in the folder changes.
DAMAGE_CASES = [
    ("tasks/0000.json", "deleted"),
    ("tasks/0001.json", "deleted"),  # the last one the checkpoint covers: no gap shows it
    ("tasks/0001.json", "truncated"),
    ("config.json", "truncated"),
    ("config.json", "deleted"),
    ("checkpoint.pt", "truncated"),
]


@pytest.mark.parametrize(("name", "how"), DAMAGE_CASES)
def test_damaged_run_folder_is_reported_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, how: str
) -> None:
    cfg = tiny_config(tasks=3)
    run_dir = tmp_path / cfg.name
    run_experiment(cfg, run_dir, "", stop_after=2)
    _damage(run_dir / name, how)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(SetupError, match=str(run_dir / name).replace(".", r"\.")):
        run_experiment(cfg, run_dir, "")
    with pytest.raises(SetupError):  # plotting and summarizing refuse a gap too
        analysis.load_runs(tmp_path) if name.startswith("tasks") else experiment.resume_state(
            cfg, run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # the command line says it in one line and exits 2
    argv = ["--problem", "synthetic", "--name", cfg.name, "--out", str(tmp_path), "--no-progress",
            "--num-samples", "48", "--width", "12", "--epochs", "2", "--batch-size", "16",
            "--tasks", "3", "--seeds", "3", "--hess-samples", "24", "--eval-samples", "48"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and name.split("/")[-1] in err


def test_deleted_checkpoint_redoes_the_run_to_the_same_numbers(tmp_path: Path) -> None:
    cfg = tiny_config(tasks=2)
    first = run_experiment(cfg, tmp_path, "")
    (tmp_path / "checkpoint.pt").unlink()
    assert strip_times(run_experiment(cfg, tmp_path, "")) == strip_times(first)


def test_exact_over_budget_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    cfg = tiny_config(hess_methods=["fisher", "exact"], hess_max_memory=1e3)
    with pytest.raises(SetupError, match="exact Hessian of block 'all' needs about"):
        run_experiment(cfg, tmp_path / "run", "")
    assert not (tmp_path / "run").exists()
    # the last-two-layers block is smaller: a budget between the two sizes admits only it
    ok = tiny_config(hess_methods=["exact"], hess_blocks=["last2"], hess_max_memory=8e6, tasks=1)
    assert len(run_experiment(ok, tmp_path / "last2", "")) == 1


def test_last2_block_is_the_last_two_linear_layers() -> None:
    model = BatchedMLP([3], 5, 4, 2, 3, "tanh")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 10, 5, generator=g), torch.randint(3, (1, 10), generator=g)
    measured = metrics.hessian_ranks(model, x, y, ["exact"], ["last2"], 0.99, 20, 2**30)
    assert measured["hess_cap_exact_last2"] == [4 * 4 + 4 + 4 * 3 + 3]
    # reference: the same network with its first layer frozen, analysed on all trainable params
    net = model.to_module(0)
    for p in net[0].parameters():
        p.requires_grad_(False)
    import hessrank

    ref = hessrank.effective_rank(net, torch.nn.CrossEntropyLoss(), (x[0], y[0]), method="exact")
    assert measured["hess_rank_exact_last2"] == [ref.rank]
    assert measured["hess_top_exact_last2"] == [pytest.approx(ref.top_eigenvalue, rel=1e-6)]


def test_missing_mnist_gives_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SetupError, match="MNIST not found"):
        make_problem("random_label_mnist", str(tmp_path), 100)
    argv = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress",
            "--tasks", "1"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: MNIST not found") and "\n" not in err
    assert not (tmp_path / "out" / "run").exists()


def test_presets_cover_the_paper_settings() -> None:
    default = {r.name: r for r in run.preset_runs("default")}
    for act in ("relu", "leaky_relu", "tanh", "identity"):
        assert default[f"act_{act}"].tasks == 30
        assert default[f"act_{act}"].hess_blocks == ["all", "last2"]
        assert default[f"permuted_{act}"].problem == "permuted_mnist"
        assert "exact" in default[f"exact_{act}"].hess_methods
    for act in run.REG_SWEEP_ACTIVATIONS:
        for reg in ("l2", "l2_init", "shrink_perturb", "wasserstein"):
            swept = {r.reg_strength for r in default.values()
                     if r.reg == reg and r.activation == act}
            assert len(swept) >= 3, (reg, act)
    paper = run.preset_runs("paper")
    assert len(paper) == len(default)
    assert all(len(r.seeds) == 30 and r.tasks == 30 for r in paper)


@pytest.mark.parametrize(
    ("series", "expected"),
    [
        # falls from 10 (task 2) to 0 (last 3): half the fall is reached at task 4
        ([12.0, 10, 8, 5, 2, 0, 0, 0], 4.0),
        ([12.0, 10, 10, 10, 10, 1, 0, 0], 6.0),
        ([1.0, 2, 3, 4, 5, 6, 7, 8], float("nan")),  # rises: no fall
    ],
)
def test_half_fall_task(series: list[float], expected: float) -> None:
    got = analysis.half_fall_task(torch.tensor(series).numpy())
    assert got == pytest.approx(expected, nan_ok=True)


def test_lead_is_positive_when_the_rank_falls_first() -> None:
    tasks = torch.arange(10.0).numpy()
    accuracy = 1.0 / (1.0 + (tasks / 6.0) ** 6)  # falls around task 7
    rank = 1.0 / (1.0 + (tasks / 3.0) ** 6)  # falls around task 4
    both = lambda c: torch.tensor(c).repeat(3, 1).T.numpy()  # noqa: E731 (3 identical seeds)
    mean, _, seeds = analysis.lead(both(rank), both(accuracy))
    assert mean > 0 and seeds == 3
    assert analysis.lead(both(accuracy), both(rank))[0] == -mean


def test_windows_leave_out_task_1() -> None:
    values = torch.tensor([[100.0], [1.0], [1.0], [1.0], [5.0], [2.0], [2.0], [2.0]]).numpy()
    change = analysis.early_late(values)
    assert (change.early, change.late) == (1.0, 2.0)


@pytest.mark.parametrize("reg", ["none", "shrink_perturb", "wasserstein"])
def test_batched_seeds_equal_sequential(tmp_path: Path, reg: str) -> None:
    cfg = tiny_config(tasks=2, reg=reg, reg_strength=0.0 if reg == "none" else 1e-2,
                      hess_methods=[])
    batched = run_experiment(cfg, tmp_path / "batched", "")
    alone = run_experiment(dataclasses.replace(cfg, seeds=[1]), tmp_path / "alone", "")
    for rb, ra in zip(batched, alone, strict=True):
        for key, values in ra["metrics"].items():
            assert rb["metrics"][key][1] == pytest.approx(values[0], rel=1e-4, abs=1e-5), key
    wb = torch.load(tmp_path / "batched" / "checkpoint.pt")["model"]
    wa = torch.load(tmp_path / "alone" / "checkpoint.pt")["model"]
    for key, value in wa.items():
        torch.testing.assert_close(wb[key][1:2], value, rtol=1e-4, atol=1e-5)


def test_seeds_differ_and_fix_the_task_sequence() -> None:
    problem = make_problem("synthetic", "", 32)
    a, b = problem.task([0, 1], 0), problem.task([1], 0)
    assert torch.equal(a.y[1], b.y[0])
    assert not torch.equal(a.y[0], a.y[1])
    assert not torch.equal(problem.task([0], 1).y[0], a.y[0])


def test_wasserstein_zero_at_init_positive_after_perturbation_permutation_invariant() -> None:
    model = BatchedMLP([0, 1], 6, 5, 2, 3, "relu")
    init = [p.detach().clone() for p in model.parameters()]
    init_sorted = [p.flatten(1).sort(dim=1).values for p in init]
    params = list(model.parameters())
    assert torch.equal(wasserstein_penalty(params, init_sorted), torch.zeros(2))
    g = torch.Generator().manual_seed(0)
    permuted = [p[:, torch.randperm(p[0].numel(), generator=g)] for p in
                (q.detach().flatten(1) for q in params)]
    assert torch.allclose(wasserstein_penalty(permuted, init_sorted), torch.zeros(2))
    perturbed = [p.detach() + 0.1 * torch.randn(p.shape, generator=g) for p in params]
    value = wasserstein_penalty(perturbed, init_sorted)
    assert (value > 0).all()
    shuffled = [p.flatten(1)[:, torch.randperm(p[0].numel(), generator=g)] for p in perturbed]
    torch.testing.assert_close(wasserstein_penalty(shuffled, init_sorted), value)
    # it is not L2-Init: a permutation moves the weights far but costs nothing
    assert sum((p - q.flatten(1)).pow(2).sum() for p, q in zip(permuted, init, strict=True)) > 1


def test_wasserstein_matches_differentiating_through_sort() -> None:
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(2, 5, 4, generator=g), torch.randn(2, 1, 4, generator=g)]
    init_sorted = [p.flatten(1).sort(dim=1).values for p in init]
    params = [(p + torch.randn(p.shape, generator=g)).requires_grad_() for p in init]
    value = wasserstein_penalty(params, init_sorted)
    grads = torch.autograd.grad(value.sum(), params)
    reference = sum(
        (p.flatten(1).sort(dim=1).values - q).pow(2).sum(1)
        for p, q in zip(params, init_sorted, strict=True)
    )
    torch.testing.assert_close(value, reference)
    for grad, ref in zip(grads, torch.autograd.grad(reference.sum(), params), strict=True):
        torch.testing.assert_close(grad, ref)


def test_feature_rank_penalty_prefers_spread_features() -> None:
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(1, 32, 8, generator=g)
    collapsed = torch.randn(1, 32, 1, generator=g) * torch.randn(1, 1, 8, generator=g)
    assert feature_rank_penalty(spread) < feature_rank_penalty(collapsed)


def test_gradient_overlap_grows_with_the_subspace() -> None:
    model = BatchedMLP([0, 1], 5, 4, 1, 3, "tanh")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 12, 5, generator=g), torch.randint(3, (2, 12), generator=g)
    num_params = sum(p[0].numel() for p in model.parameters())
    one, ones = metrics.gradient_overlap(model, x, y, 1, 0.99, 2**30)
    every, everys = metrics.gradient_overlap(model, x, y, num_params, 0.99, 2**30)
    assert all(0.0 <= a <= b + 1e-9 for a, b in zip(one, every, strict=True))
    assert every == pytest.approx([1.0, 1.0], abs=1e-6)
    assert (ones, everys) == ([1, 1], [num_params, num_params])  # the k given is the k used


def test_gradient_overlap_takes_the_runs_srank_threshold() -> None:
    """Without ``--overlap-k`` the subspace is the srank at ``--hess-threshold`` (it was always
    the library's 0.99): the overlap equals the library's at that threshold, per seed."""
    model = BatchedMLP([0, 1], 5, 4, 1, 3, "tanh")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 12, 5, generator=g), torch.randint(3, (2, 12), generator=g)
    for threshold in (0.5, 0.99):
        expected = [hessrank.gradient_overlap(model.to_module(s), nn.CrossEntropyLoss(),
                                              (x[s], y[s]), threshold=threshold) for s in (0, 1)]
        sranks = [hessrank.effective_rank(model.to_module(s), nn.CrossEntropyLoss(),
                                          (x[s], y[s]), method="exact", threshold=threshold).rank
                  for s in (0, 1)]
        assert metrics.gradient_overlap(model, x, y, None, threshold, 2**30) == (expected, sranks)
    low = metrics.gradient_overlap(model, x, y, None, 0.5, 2**30)
    assert low != metrics.gradient_overlap(model, x, y, None, 0.99, 2**30)


def zero_model() -> tuple[BatchedMLP, torch.Tensor, torch.Tensor]:
    """A tanh MLP 5-3-4 with every parameter 0 and a batch: its exact Hessian's |eigenvalues|
    come in clusters (each hidden unit's block of the first and last layers' cross term is the
    same, and gives +s/-s pairs: clusters of 6; the output bias's C-1 = 3 at 1/C): 0.37 (x6),
    0.33 (x6), 0.25 (x3), 0.16 (x6), then zeros."""
    model = BatchedMLP([0], 5, 3, 1, 4, "tanh")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(1, 12, 5, generator=g), torch.randint(4, (1, 12), generator=g)


def _tied_between(monkeypatch: pytest.MonkeyPatch, gaps: tuple[int, int]
                  ) -> Callable[..., float]:
    """``hessrank.gradient_overlap`` refusing every ``k`` strictly between ``gaps``, as for a
    tie the gradient has a share in (the library answers ties the gradient is orthogonal to,
    as this model's are: its parameters' symmetry keeps the gradient out of them); the real
    one returned."""
    real = hessrank.gradient_overlap

    def tied(net: nn.Module, loss_fn: object, batch: object, k: int | None = None,
             **options: object) -> float:
        if k is not None and gaps[0] < k < gaps[1]:
            raise hessrank.TiedEigenvaluesError("tied", k, gaps)
        return real(net, loss_fn, batch, k=k, **options)

    monkeypatch.setattr(hessrank, "gradient_overlap", tied)
    return real


@pytest.mark.parametrize(("threshold", "srank", "gaps", "used"), [
    (0.3, 5, (0, 6), 6),  # the nearer gap
    (0.5, 9, (6, 12), 6),  # two as near: the lower one
])
def test_gradient_overlap_moves_an_srank_inside_a_tie_to_the_nearest_gap(
        threshold: float, srank: int, gaps: tuple[int, int], used: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The library refuses a k that splits a cluster of equal |eigenvalues| the gradient has a
    share in (TiedEigenvaluesError): the default preset died at exact_leaky_relu's task 8
    (k = 261), and every rerun there. The srank is moved to the nearest gap, and the k used is
    returned to be recorded."""
    model, x, y = zero_model()
    net, batch, loss_fn = model.to_module(0), (x[0], y[0]), nn.CrossEntropyLoss()
    assert hessrank.effective_rank(net, loss_fn, batch, method="exact",
                                   threshold=threshold).rank == srank
    real = _tied_between(monkeypatch, gaps)
    expected = real(net, loss_fn, batch, k=used)
    assert metrics.gradient_overlap(model, x, y, None, threshold, 2**30) == ([expected], [used])


def test_an_overlap_k_inside_a_tie_is_refused_in_one_line_naming_the_gaps(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An explicit --overlap-k is the user's: not moved, refused with the gaps to pass instead
    (not hessrank's traceback), naming the run and the task."""
    model, x, y = zero_model()
    _tied_between(monkeypatch, (6, 12))
    with pytest.raises(SetupError, match=r"--overlap-k 9 splits a cluster of equal \|eigenvalues\| "
                       r"of seed 0's exact Hessian.*the nearest k at a gap are 6 and 12"):
        metrics.gradient_overlap(model, x, y, 9, 0.99, 2**30)

    def tied(*args: object, k: int | None = None, **kwargs: object) -> float:
        raise hessrank.TiedEigenvaluesError("tied", k or 0, (3, 7))

    monkeypatch.setattr(hessrank, "gradient_overlap", tied)  # as a tie at task 1 would be
    argv = ["--preset", "smoke", "--runs", "exact_relu", "--overlap-k", "5", "--out",
            str(tmp_path), "--no-progress"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run exact_relu, task 1: --overlap-k 5 splits a cluster") and \
        "\n" not in err and "the nearest k at a gap are 3 and 7" in err


def test_the_overlap_records_the_k_it_used(tmp_path: Path) -> None:
    """overlap_k_start holds the k of each seed; summarize names its range over tasks 2-T, and
    reads results of before it was recorded (without it) as before."""
    cfg = tiny_config(hess_methods=["exact"], overlap=True, tasks=1, seeds=[0, 1])
    (record,) = run_experiment(cfg, tmp_path / "run", "")
    m = record["metrics"]
    assert m["overlap_k_start"] == m["hess_rank_exact_start"]  # the srank, where not tied
    assert len(m["overlap_start"]) == 2
    ks = np.array([[50, 60], [7, 8], [9, 4]])
    new = analysis.RunData("exact_relu", [0, 1], {"overlap_k_start": ks})
    old = analysis.RunData("exact_leaky_relu", [0, 1], {"overlap_start": ks / 100})
    assert summarize._overlap_ks(new, new) == "; k (overlap_k_start) 4-9 eigenvectors"
    assert summarize._overlap_ks(new, old) == ""


def test_missing_cifar10_fails_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="CIFAR-10 not found"):
        make_problem("random_label_cifar10", str(tmp_path), 100)
    with pytest.raises(SetupError, match="ImageNet not found"):
        make_problem("continual_imagenet32", str(tmp_path), 100)


MNIST_PROBLEMS = ["random_label_mnist", "permuted_mnist", "label_shuffled_mnist"]


@NEEDS_MNIST
@pytest.mark.parametrize("problem", MNIST_PROBLEMS)
def test_mnist_smoke(tmp_path: Path, problem: str) -> None:
    cfg = Config(
        problem=problem, num_samples=64, downsample=4, width=8,
        tasks=2, epochs=1, seeds=[0], hess_samples=16, eval_samples=64,
    )
    records = run_experiment(cfg, tmp_path, str(mnist_dir()), stop_after=1)
    # the same data folder spelled with a trailing slash is the same configuration: resumes
    records = run_experiment(cfg, tmp_path, str(mnist_dir()) + "/")
    assert [r["task"] for r in records] == [0, 1]
    assert all(0.0 <= r["metrics"]["acc_end"][0] <= 1.0 for r in records)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["problem"] == problem and saved["num_samples"] == 64
    assert str(mnist_dir()) not in (tmp_path / "config.json").read_text()


@NEEDS_MNIST
def test_mnist_task_kinds_change_what_they_should() -> None:
    data = str(mnist_dir())
    shuffled = make_problem("label_shuffled_mnist", data, 200, downsample=4)
    a, b = shuffled.task([0], 0), shuffled.task([0], 1)
    assert torch.equal(a.x, b.x)
    # a fixed relabelling of the classes: equal true labels keep equal task labels
    same = shuffled.pool.labels[:, None] == shuffled.pool.labels[None, :]
    assert torch.equal(same, a.y[0][:, None] == a.y[0][None, :])
    permuted = make_problem("permuted_mnist", data, 200, downsample=4)
    xa, ya = permuted.task([0], 0).first(200)
    xb, yb = permuted.task([0], 1).first(200)
    assert torch.equal(ya, yb) and not torch.equal(xa, xb)
    torch.testing.assert_close(xa.sort(dim=2).values, xb.sort(dim=2).values)


def _refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], fragment: str
) -> None:
    """``run.py`` with ``options`` exits 2 with one ``error:`` line holding ``fragment``, having
    made no folder."""
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DATA_DIR_ENV, str(tmp_path / "no-data-here"))
        assert run.main(["--out", str(out), "--no-progress", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not out.exists()


@pytest.mark.parametrize(("options", "fragment"), [
    (["--reg", "l2"], "--reg l2 with --reg-strength 0 (the default) adds no penalty"),
    (["--reg", "wasserstein"], "pass its lambda with --reg-strength"),
    (["--reg", "shrink_perturb"], "--reg shrink_perturb with --reg-strength 0 (the default) "
                                  "shrinks nothing"),
    (["--reg-strength", "0.5"], "--reg-strength 0.5 with --reg none: no regularizer uses it"),
    # (probe 168: recorded in config.json, every number the default's)
    (["--reg", "l2", "--reg-strength", "0.01", "--sp-noise", "0.5"],
     "--sp-noise 0.5 with --reg l2: only shrink_perturb perturbs the weights"),
    (["--downsample", "4"], "--downsample 4 with --problem synthetic, which has no images"),
    # (probe 227: one singular value, whose entropy is 0 whatever the weights)
    (["--reg", "feature_rank", "--reg-strength", "1", "--batch-size", "1"],
     "--reg feature_rank with --batch-size 1 and --width 128: features of one row"),
])
def test_a_setting_that_would_not_act_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], fragment: str
) -> None:
    """``--reg l2`` without ``--reg-strength`` trained with a strength of 0 (every number equal
    to --reg none's, config.json saying l2), and ``--reg-strength`` with ``--reg none`` was
    ignored, as were ``--sp-noise`` without shrink_perturb and ``--downsample`` of a problem
    without images."""
    _refused_before_anything_is_written(
        tmp_path, capsys, ["--problem", "synthetic", *options], fragment)


def test_more_images_than_the_data_set_holds_are_refused() -> None:
    """``--num-samples 100000`` of MNIST's 60,000 had been cut to 60,000 without a word, while
    config.json and every title said 100,000 (and the subset seed did nothing; probe 227)."""
    with pytest.raises(SetupError, match=r"--num-samples 101 is more than the data set's 100 "
                                         r"training images: pass --num-samples 100 or fewer"):
        problems._subset(100, 101, 0)
    assert torch.equal(problems._subset(100, 100, 7), torch.arange(100))


@NEEDS_MNIST
def test_a_subset_without_the_last_class_keeps_the_data_set_s_classes() -> None:
    """32 MNIST images without a 9 (subset seed 2) had made a 9-class problem: its models 9
    outputs, its random labels 0-8 (probe 227)."""
    problem = make_problem("random_label_mnist", str(mnist_dir()), 32, subset_seed=2)
    assert int(problem.pool.labels.max()) < 9 and problem.pool.num_classes == 10


@pytest.mark.parametrize(("options", "fragment"), [
    (["--problem", "synthetic", "--num-samples", "32", "--hess-samples", "64"],
     "--hess-samples 64 exceeds --num-samples 32 (the Hessian is measured on the task's first "
     "--hess-samples images): pass --hess-samples 32 or fewer"),
    # a preset's own --hess-samples (smoke: 32) with a smaller --num-samples: says what to pass
    (["--preset", "smoke", "--num-samples", "16"], "pass --hess-samples 16 or fewer"),
])
def test_hess_samples_above_num_samples_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], fragment: str
) -> None:
    """The Hessian was measured on the num_samples images there are while config.json and
    target 3 ("EF capped by n = 64") reported the larger count."""
    _refused_before_anything_is_written(tmp_path, capsys, options, fragment)


def test_overlap_k_above_the_parameter_count_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It passed the checks, wrote config.json and crashed with hessrank's traceback in task 1."""
    model = BatchedMLP([0], 64, 8, 2, 10, "relu")  # the smoke preset's exact_relu, synthetic
    num_params = sum(p[0].numel() for p in model.parameters())
    _refused_before_anything_is_written(
        tmp_path, capsys, ["--preset", "smoke", "--runs", "exact_relu", "--overlap-k", "100000"],
        f"--overlap-k 100000 exceeds the network's {num_params:,} parameters (the dimension of "
        f"the Hessian): pass --overlap-k {num_params} or fewer")


def test_the_threshold_option_says_it_sets_the_feature_rank_too(
    capsys: pytest.CaptureFixture[str]
) -> None:
    """The feature rank is measured at ``--hess-threshold`` (metrics.feature_rank); the help
    called it the Hessian's srank threshold only."""
    with pytest.raises(SystemExit):
        run.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert ("--hess-threshold HESS_THRESHOLD srank threshold of every rank: the Hessian ranks, "
            "the feature rank") in help_text
    g = torch.Generator().manual_seed(0)
    model = BatchedMLP([0], 5, 16, 1, 3, "tanh")
    x = torch.randn(1, 40, 5, generator=g)
    assert metrics.feature_rank(model, x, 0.5) < metrics.feature_rank(model, x, 0.999)


def fake_results(out: Path, runs: dict[str, dict]) -> Path:
    """Run folders as run.py writes them, without training: ``name -> Config changes`` (of
    :func:`tiny_config`, with enough tasks for the windows); each task records ``acc_end``."""
    for name, changes in runs.items():
        cfg = tiny_config(name=name, **{"tasks": analysis.MIN_TASKS, **changes})
        (out / name / "tasks").mkdir(parents=True)
        (out / name / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        for t in range(cfg.tasks):
            record = {"task": t, "seeds": cfg.seeds,
                      "metrics": {"acc_end": [0.5 + 0.01 * s for s in cfg.seeds]}}
            (out / name / "tasks" / f"{t:04d}.json").write_text(json.dumps(record))
    return out


L2 = {"reg": "l2", "reg_strength": 1e-3}
MISMATCHED = [
    # a baseline of other epochs: target 7 credited the regularizer with the epochs' effect
    ({"act_relu": {}, "reg_l2_0.001_relu": {**L2, "epochs": 5}},
     "act_relu and reg_l2_0.001_relu differ in epochs (2 vs 5), but reg_l2_0.001_relu is "
     "compared with act_relu as the same run without its regularizer"),
    ({"act_leaky_relu": {"activation": "leaky_relu"},
      "featrank_leaky_relu": {"activation": "leaky_relu", "reg": "feature_rank",
                              "reg_strength": 0.1, "num_samples": 64}},
     "differ in num_samples (48 vs 64)"),
    ({"act_relu": {}, "act_tanh": {"activation": "tanh", "lr": 0.01, "width": 8}},
     "act_relu and act_tanh differ in width (12 vs 8); lr (0.001 vs 0.01), but the "
     "act_<activation> runs are compared with each other as one setting"),
    ({"reg_l2_0.001_relu": L2, "reg_l2_0.0001_relu": {**L2, "reg_strength": 1e-4, "tasks": 8}},
     "differ in tasks (8 vs 7), but the reg_<regularizer>_<strength>_<activation> runs"),
    # target 6 subtracted these column by column: seed 0 minus seed 3 (or a broadcast error)
    ({"exact_relu": {"seeds": [0, 1]}, "exact_leaky_relu": {"activation": "leaky_relu",
                                                             "seeds": [3, 4]}},
     "exact_relu and exact_leaky_relu differ in seeds ([0, 1] vs [3, 4])"),
    # a baseline with fewer seeds: ValueError: 2 is not in list
    ({"act_relu": {"seeds": [0, 1]}, "reg_l2_0.001_relu": {**L2, "seeds": [0, 1, 2]}},
     "reg_l2_0.001_relu has seeds [0, 1, 2] but act_relu lacks seed(s) [2]"),
]


@pytest.mark.parametrize(("runs", "fragment"), MISMATCHED, ids=lambda v: (
    ",".join(v) if isinstance(v, dict) else None))
def test_summarize_and_plot_refuse_to_compare_runs_of_other_configurations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], runs: dict[str, dict], fragment: str
) -> None:
    """Runs were paired by name only (and target 6 by column position), so a baseline of
    another configuration was used silently."""
    results = fake_results(tmp_path / "res", runs)
    assert summarize.main([str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert "another results folder (run.py --out)" in err or "lacks seed" in err
    assert plot.main([str(results), "--out", str(tmp_path / "figures")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "figures").exists()
    assert summarize.main([str(results), "--metrics"]) == 0  # no comparison: every run


@pytest.mark.parametrize("metrics", [False, True])
def test_summarize_names_the_tasks_a_run_needs(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               metrics: bool) -> None:
    """Runs too short to compare early and late tasks (the smoke preset's) had been refused
    with no word of what to run, with --metrics too (probe 187)."""
    results = fake_results(tmp_path / "res", {"act_relu": {"tasks": analysis.MIN_TASKS - 1}})
    assert summarize.main([str(results), *(["--metrics"] if metrics else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"run.py --tasks {analysis.MIN_TASKS} or more"), err


def test_runs_may_differ_in_what_their_comparison_varies(tmp_path: Path) -> None:
    """Activation across a setting; regularizer, tasks and seeds against the baseline (paired on
    the baseline's seeds of the regularized run); which curvature is measured everywhere."""
    results = fake_results(tmp_path, {
        "act_relu": {"seeds": [0, 1, 2, 3], "tasks": 9},
        "act_tanh": {"activation": "tanh", "seeds": [0, 1, 2, 3], "tasks": 9,
                     "hess_methods": ["ggn"], "hess_max_memory": 1e9},
        "reg_l2_0.001_relu": {**L2, "seeds": [2, 3]},
        "reg_shrink_perturb_0.01_relu": {"reg": "shrink_perturb", "reg_strength": 0.01,
                                         "sp_noise": 0.1, "seeds": [2, 3]},
    })
    runs = analysis.load_runs(results)
    analysis.check_comparable(runs)
    reg, base = analysis.paired(runs["reg_l2_0.001_relu"], runs["act_relu"])
    assert base.seeds == [2, 3] and base["acc_end"][0].tolist() == [0.52, 0.53]
    assert reg.num_tasks == base.num_tasks == analysis.MIN_TASKS


@pytest.fixture(scope="module")
def ggn_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ReLU run, a regularized one and an exact-size one, measuring the GGN only: no EF and
    no exact rank (the smoke preset, 7 tasks)."""
    out = tmp_path_factory.mktemp("ggn")
    argv = ["--preset", "smoke", "--runs", "act_relu,reg_wasserstein_0.001_relu,exact_relu",
            "--hess-methods", "ggn", "--tasks", "7", "--out", str(out), "--no-progress"]
    assert run.main(argv) == 0
    return out


def test_summarize_and_plot_leave_out_what_was_not_measured(
    ggn_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--hess-methods ggn`` (a documented override) crashed both with KeyError
    'hess_rank_fisher_start', and exact runs without exact with 'hess_rank_exact_start'."""
    assert summarize.main([str(ggn_results)]) == 0
    rows = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert ("whole network, EF: not tested (act_relu did not measure hess_rank_fisher_start"
            in rows["| 2 (v3/v4 reading)"])
    assert "exact-size model, exact: not tested (exact_relu did not measure" in rows[
        "| 2 (v3/v4 reading)"]
    assert "| 3 | EF rank tracks exact rank closely in the first tasks (Figure 3) | not tested (" \
           "no exact_<activation> run measured both exact and fisher" in rows["| 3"]
    assert "wasserstein 0.001 relu: accuracy" in rows["| 7"]
    assert "EF rank not measured" in rows["| 7"] and "nan" not in rows["| 7"]
    written = {p.name for p in plot.draw_all(ggn_results, tmp_path)}
    assert {"overview.png", "regularizers.png", "regularizers_by_strength.png"} <= written
    # Figure 2 is the feature-rank regularizer's: no such run, no figure titled after it
    assert "fig2_feature_rank_reg.png" not in written


def test_a_target_whose_runs_are_missing_is_not_tested(
    ggn_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Target 1 was "held" over the activations present (act_tanh alone), and a sweep without
    its unregularized runs got "most consistent: none (no setting helps)"."""
    assert summarize.main([str(ggn_results)]) == 0
    rows = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines()}
    for row in ("| 1 (v4 reading)", "| 4"):
        assert " | not tested (no act_leaky_relu, act_tanh, act_identity run) (rule: " in rows[row]
    sweep_only = tmp_path / "sweep"
    sweep_only.mkdir()
    (sweep_only / "reg_wasserstein_0.001_relu").symlink_to(
        ggn_results / "reg_wasserstein_0.001_relu")
    assert summarize.main([str(sweep_only)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 7")]
    assert " | not tested (no act_relu run to compare with) (" in row
    assert "most consistent:" not in row
    assert "not compared, no act_<activation> run without a regularizer: " \
           "reg_wasserstein_0.001_relu" in row


def test_summarize_reproduces_the_committed_table() -> None:
    """The committed results (written before overlap_k_start, without checkpoints) pass every
    check (names, configurations, task files) and give the README's table, pasted unedited."""
    results = PLASTICITY / "default_results"
    table = summarize.reproduction_table(analysis.comparable(analysis.load_runs(results))[0])
    readme = (PLASTICITY.parent / "README.md").read_text().splitlines()
    start = readme.index(summarize.TABLE_HEADER[0])
    assert readme[start:start + len(table)] == table


def test_a_run_redone_from_task_1_never_mixes_in_old_task_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder without checkpoint.pt (as the committed results) was redone from task 1 over its
    old task files; interrupted after task 11, summarize read tasks 1-11 new and 12-30 old."""
    cfg = tiny_config(tasks=3)
    run_dir = tmp_path / cfg.name
    run_experiment(cfg, run_dir, "")
    (run_dir / "checkpoint.pt").unlink()
    capsys.readouterr()
    run_experiment(cfg, run_dir, "", stop_after=1)  # redone, and interrupted after task 1
    err = capsys.readouterr().err
    assert ("note: run tiny: it has no checkpoint.pt, so it is redone from task 1; the files of "
            "tasks 1-3 there (3) were from an earlier or interrupted run and are removed") in err
    assert [p.name for p in experiment._task_files(run_dir)] == ["0000.json"]
    assert analysis.load_runs(tmp_path)[cfg.name].num_tasks == 1
    # a task file beyond the checkpoint (written by a run killed before its checkpoint was) is
    # not read, and is replaced when the run goes on
    record = json.loads((run_dir / "tasks" / "0000.json").read_text())
    (run_dir / "tasks" / "0001.json").write_text(json.dumps({**record, "task": 1}))
    (run_dir / "tasks" / "0002.json").write_text(json.dumps({**record, "task": 2}))
    assert analysis.load_runs(tmp_path)[cfg.name].num_tasks == 1
    assert len(experiment.load_task_results(run_dir, expected=1)) == 1
    resumed = run_experiment(cfg, run_dir, "")
    assert "the files of tasks 2-3 there (2)" in capsys.readouterr().err
    assert resumed[1]["metrics"] != record["metrics"]


NAMED_WRONG = [
    # --name act_tanh without --activation tanh: a "tanh" row of a ReLU run
    ({"act_tanh": {}}, "act_tanh: its config.json holds activation 'relu' where its name says "
                       "'tanh'"),
    ({"reg_l2_0.001_relu": {"reg": "wasserstein", "reg_strength": 1e-2}},
     "reg_l2_0.001_relu: its config.json holds reg 'wasserstein' where its name says 'l2'; "
     "reg_strength 0.01 where its name says 0.001"),
    ({"act_tanh": {"activation": "tanh", "reg": "l2", "reg_strength": 1e-3}},
     "act_tanh: its config.json holds reg 'l2' where its name says 'none'"),
    # a user's reg_ names crashed summarize (ValueError in _sweep_parts / _sweep_order)
    ({"reg_mine": L2}, "reg_mine: a run named reg_... is read as one of the regularizer sweep"),
    ({"reg_test_relu": L2}, "reg_test_relu: a run named reg_... is read as one of the"),
    ({"reg_l2_strong_relu": L2}, "reg_l2_strong_relu: a run named reg_... is read as one"),
]


@pytest.mark.parametrize(("runs", "fragment"), NAMED_WRONG, ids=lambda v: (
    ",".join(v) if isinstance(v, dict) else None))
def test_a_run_whose_configuration_is_not_what_its_name_says_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], runs: dict[str, dict], fragment: str
) -> None:
    """The table and the figures label runs by name, which was never checked against
    config.json; a reg_ name of another form crashed summarize."""
    results = fake_results(tmp_path / "res", {"act_relu": {}, **runs})
    assert summarize.main([str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert plot.main([str(results), "--out", str(tmp_path / "figures")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "figures").exists()
    assert summarize.main([str(results), "--metrics"]) == 0  # no labels: every run


def test_a_missing_config_is_refused_by_summarize_and_plot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """summarize crashed with KeyError 'hess_samples' where run.py refuses it."""
    results = fake_results(tmp_path / "res", {"exact_relu": {}})
    (results / "exact_relu" / "config.json").unlink()
    for command in (summarize.main, plot.main):
        assert command([str(results)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {results / 'exact_relu' / 'config.json'} is missing but the "
                       f"folder holds results; {experiment._REDO_HINT}")


@pytest.mark.parametrize(("content", "fragment"), [
    ("[]", "is damaged (it holds a JSON list, not an object)"),
    ('{"task": 1}', "is damaged: it holds no list of seeds (seeds: None)"),
    ('{"task": 1, "seeds": [0, 1, 2], "metrics": {"acc_end": [0.5]}}',
     "is damaged: it holds metric 'acc_end' without one number per seed ([0.5])"),
    ('{"task": 1, "seeds": [4, 5, 6], "metrics": {"acc_end": [0.5, 0.5, 0.5]}}',
     "is damaged: it holds seeds [4, 5, 6] where task 1 holds [0, 1, 2]"),
])
def test_a_task_file_of_another_structure_is_refused_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, fragment: str) -> None:
    """``[]`` crashed run.py and summarize (AttributeError); ``{"task": 3}`` passed run.py's
    check and crashed summarize (KeyError 'metrics')."""
    cfg = tiny_config(tasks=2)
    run_dir = tmp_path / cfg.name
    run_experiment(cfg, run_dir, "")
    path = run_dir / "tasks" / "0001.json"
    path.write_text(content)
    argv = ["--problem", "synthetic", "--name", cfg.name, "--out", str(tmp_path), "--no-progress",
            "--num-samples", "48", "--width", "12", "--epochs", "2", "--batch-size", "16",
            "--tasks", "2", "--seeds", "3", "--hess-samples", "24", "--eval-samples", "48"]
    for command, options in ((run.main, argv), (summarize.main, [str(tmp_path)])):
        assert command(options) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path} {fragment}") and "\n" not in err, err


def test_every_boolean_setting_can_be_switched_both_ways() -> None:
    """A preset's --overlap could not be switched off (store_true), while a budget refusal
    advised dropping it."""
    booleans = [f.name for f in dataclasses.fields(Config) if f.type in (bool, "bool")]
    assert booleans == ["overlap"]
    for name in booleans:
        option = "--" + name.replace("_", "-")
        for flag, value in ((option, True), ("--no-" + option[2:], False)):
            (cfg,) = run.configs_from_args(run.parse_args(
                ["--preset", "smoke", "--runs", "exact_relu", flag]))
            assert getattr(cfg, name) is value
    (preset,) = run.configs_from_args(run.parse_args(["--preset", "smoke", "--runs",
                                                      "exact_relu"]))
    assert preset.overlap  # omitted: the preset's


def _exact_bytes(block: str) -> float:
    """The exact Hessian of the smoke preset's exact_relu on ``block``, as the run predicts it."""
    model = BatchedMLP([0], 64, 8, 2, 10, "relu")
    net = model.to_module(0)
    x, y = make_problem("synthetic", "", 64).task([0], 0).first(32)
    return hessrank.predict_exact_cost(net, nn.CrossEntropyLoss(), (x[0], y[0]),
                                       params=metrics.block_params(net, block))[0]


NO_OVERLAP = ("pass --no-overlap (the overlap needs the whole network's exact Hessian, whatever "
              "--hess-blocks says); or raise --hess-max-memory")


@pytest.mark.parametrize(("options", "advice"), [
    ([], "; drop exact from --hess-methods (fisher, ggn and lanczos have no such cost) or "
         f"measure it on --hess-blocks last2 only, and {NO_OVERLAP}"),
    (["--hess-methods", "fisher"], f"MiB; {NO_OVERLAP}"),
    # the ranks on the last two layers only: the overlap still takes the whole network's (it was
    # not checked, and hessrank refused it in task 1)
    (["--hess-blocks", "last2"], f"MiB; {NO_OVERLAP}"),
])
def test_the_budget_refusal_names_what_suffices(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str],
        advice: str) -> None:
    """Its advice was "drop --overlap", which no option did, and named dropping exact or using
    last2 as if either sufficed where the overlap needs the whole network's Hessian too."""
    budget = f"{(_exact_bytes('last2') * _exact_bytes('all')) ** 0.5:.0f}"  # between the two
    smoke = ["--preset", "smoke", "--runs", "exact_relu", "--hess-max-memory", budget]
    _refused_before_anything_is_written(tmp_path, capsys, [*smoke, *options], advice)
    assert run.main(["--out", str(tmp_path / "out"), *smoke, *options]) == 2
    assert "run exact_relu: the exact Hessian of block 'all' needs about " in \
        capsys.readouterr().err
    (cfg,) = run.configs_from_args(run.parse_args([*smoke, "--hess-blocks", "last2",
                                                   "--no-overlap"]))
    experiment.prepare_run(cfg, tmp_path / "fits", "")  # what the advice says suffices


def test_a_batch_larger_than_the_task_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--batch-size 1000 --num-samples 32 trained byte for byte as --batch-size 32, recorded as
    another configuration."""
    _refused_before_anything_is_written(
        tmp_path, capsys, ["--problem", "synthetic", "--num-samples", "32", "--hess-samples", "32",
                           "--batch-size", "1000"],
        "--batch-size 1000 exceeds --num-samples 32 (a minibatch holds at most the task's "
        "images, so every step would train on all 32, as --batch-size 32 does): pass "
        "--batch-size 32 or fewer")


def test_a_failed_download_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """torchvision's offline error spans lines (one per mirror): the error was 6 lines."""
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, "
                           "got:\n<urlopen error>\nTried http://b/, got:\n<urlopen error>\n")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(SetupError) as err:
        make_problem("random_label_mnist", str(tmp_path), 100, download=True)
    assert "\n" not in str(err.value)
    assert "(Error downloading train-images-idx3-ubyte.gz: Tried https://a/, got: <urlopen " \
           "error> Tried http://b/, got: <urlopen error>)" in str(err.value)


@pytest.mark.parametrize("where", ["--data-dir", DATA_DIR_ENV])
def test_a_data_folder_under_home_may_be_written_with_a_tilde(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        where: str) -> None:
    """``~/data`` (quoted, or in $HESSRANK_DATA_DIR) was looked up as a folder named ``~``."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(DATA_DIR_ENV, "~/data")
    options = ["--data-dir", "~/data"] if where == "--data-dir" else []
    assert run.main(["--out", str(tmp_path / "out"), "--no-progress", "--tasks", "1",
                     *options]) == 2
    assert f"MNIST not found: no {tmp_path / 'data' / MNIST_TRAIN_IMAGES};" in \
        capsys.readouterr().err


def test_figure_titles_name_the_runs_setting(
        smoke_results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Titles said "Random-Label MNIST (main)", "Permuted MNIST" and "(main setting)" over the
    smoke preset's synthetic runs."""
    titles: list[str] = []

    def keep(fig: plot.plt.Figure, path: Path, title: str) -> None:
        titles.extend([title, *(ax.get_title() for ax in fig.axes)])
        plot.plt.close(fig)

    monkeypatch.setattr(plot, "_save", keep)
    plot.draw_all(smoke_results, tmp_path)
    text = "\n".join(titles)
    assert "MNIST" not in text and "main setting" not in text and "exact-size" not in text
    assert "act_*: synthetic, 64 images, MLP width 8 x depth 2" in text
    assert "permuted_*: synthetic, 64 images" in text


def test_confidence_bands_of_fractions_stay_within_0_and_1() -> None:
    """The smoke overview's accuracy band reached -0.4 (only its top was capped, at 1.02)."""
    fig, ax = plot.plt.subplots()
    spread = np.array([[0.0, 1.0, 0.05], [0.9, 1.0, 1.0], [0.5, 0.5, 0.5]])
    plot.band(ax, spread, "relu", "k", metric="acc_end")
    plot.band(ax, spread * 100, "rank", "k", metric="hess_rank_fisher_start")
    accuracy, rank = (c.get_paths()[0].vertices[:, 1] for c in ax.collections)
    plot.plt.close(fig)
    assert accuracy.min() == 0.0 and accuracy.max() == 1.0
    assert rank.min() < 0 and rank.max() > 100  # not a fraction: not clipped


def test_an_imagenet_pool_too_small_for_a_class_pair_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It was refused at the task that lacks images, after config.json was written (which then
    refused the corrected command as another configuration)."""
    folder = tmp_path / "Imagenet32_train_npz"
    folder.mkdir()
    labels = np.array([1] * 9 + [10])  # (1-based) classes 0 and 9 of 10: most pairs lack one
    np.savez(folder / "train_data_batch_1.npz", data=np.zeros((10, 3072), np.uint8),
             labels=labels)
    out = tmp_path / "out"
    argv = ["--problem", "continual_imagenet32", "--data-dir", str(tmp_path), "--num-samples",
            "10", "--hess-samples", "4", "--batch-size", "4", "--tasks", "5", "--out", str(out),
            "--no-progress"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run run: task ") and "\n" not in err
    assert "the pool of 10 images holds" in err and "of the class pair" in err
    assert not out.exists()
