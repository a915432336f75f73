"""Tests of the loss-of-plasticity harness in examples/plasticity (no data needed, except one
smoke test on MNIST that runs only when a copy is found)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch

PLASTICITY = Path(__file__).resolve().parents[1] / "examples" / "plasticity"
sys.path.insert(0, str(PLASTICITY.parent))  # the harness is the package `plasticity`

from plasticity import experiment, metrics, plot, run, summarize  # noqa: E402
from plasticity.experiment import Config, run_experiment  # noqa: E402
from plasticity.model import BatchedMLP  # noqa: E402
from plasticity.problems import make_problem  # noqa: E402
from plasticity.regularizers import feature_rank_penalty, wasserstein_penalty  # noqa: E402


def mnist_dir() -> Path | None:
    """``$HESSRANK_TEST_DATA`` or the shared copy next to the checkout, if it holds MNIST."""
    candidates = [os.environ.get("HESSRANK_TEST_DATA"), PLASTICITY.parents[2] / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(c)
    return None


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
    argv = ["--preset", "smoke", "--problem", "synthetic", "--out", str(out), "--no-progress",
            "--threads", "1"]
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


def test_plot_draws_pngs(smoke_results: Path, tmp_path: Path) -> None:
    written = plot.draw_all(smoke_results, tmp_path)
    names = {p.name for p in written}
    assert {"all_runs.png", "fig1_explanations.png", "fig3_estimators.png"} <= names
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_has_a_row_per_run_and_metric(smoke_results: Path) -> None:
    lines = summarize.summary_lines(smoke_results, window=1)
    rows = [line for line in lines[2:] if "| acc_end |" in line]
    assert len(rows) == len(run.preset_runs("smoke"))
    assert any("| hess_rank_exact_start |" in line for line in lines)


def test_resume_finishes_without_redoing_tasks(tmp_path: Path) -> None:
    cfg = tiny_config()
    full = run_experiment(cfg, tmp_path / "full")
    part_dir = tmp_path / "part"
    run_experiment(cfg, part_dir, stop_after=1)
    assert experiment.finished_tasks(part_dir) == 1
    first = part_dir / "tasks" / "0000.json"
    first_bytes, first_mtime = first.read_bytes(), first.stat().st_mtime_ns
    # a kill in the middle of a write leaves only a temporary file behind
    (part_dir / "tasks" / "0001.json.tmp").write_text("{trunc")
    resumed = run_experiment(cfg, part_dir)
    assert first.read_bytes() == first_bytes and first.stat().st_mtime_ns == first_mtime
    assert strip_times(resumed) == strip_times(full)
    assert experiment.finished_tasks(part_dir) == cfg.tasks


def test_rerun_with_other_config_is_refused(tmp_path: Path) -> None:
    run_experiment(tiny_config(tasks=1), tmp_path)
    with pytest.raises(ValueError, match="different configuration"):
        run_experiment(tiny_config(tasks=1, lr=0.5), tmp_path)
    # a field added to Config after the run was saved, at its default, is the same configuration
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["overlap_k"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert len(run_experiment(tiny_config(tasks=1), tmp_path)) == 1


@pytest.mark.parametrize("reg", ["none", "shrink_perturb", "wasserstein"])
def test_batched_seeds_equal_sequential(tmp_path: Path, reg: str) -> None:
    cfg = tiny_config(tasks=2, reg=reg, reg_strength=1e-2, hess_methods=[])
    batched = run_experiment(cfg, tmp_path / "batched")
    alone = run_experiment(dataclasses.replace(cfg, seeds=[1]), tmp_path / "alone")
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
    one = metrics.gradient_overlap(model, x, y, 1)
    every = metrics.gradient_overlap(model, x, y, num_params)
    assert all(0.0 <= a <= b + 1e-9 for a, b in zip(one, every, strict=True))
    assert every == pytest.approx([1.0, 1.0], abs=1e-6)


def test_missing_cifar10_fails_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        make_problem("random_label_cifar10", str(tmp_path), 100)
    with pytest.raises(FileNotFoundError, match="ImageNet not found"):
        make_problem("continual_imagenet32", str(tmp_path), 100)


MNIST_PROBLEMS = ["random_label_mnist", "permuted_mnist", "label_shuffled_mnist"]


@pytest.mark.skipif(mnist_dir() is None, reason="no MNIST copy found (set HESSRANK_TEST_DATA)")
@pytest.mark.parametrize("problem", MNIST_PROBLEMS)
def test_mnist_smoke(tmp_path: Path, problem: str) -> None:
    cfg = Config(
        problem=problem, data_dir=str(mnist_dir()), num_samples=64, downsample=4, width=8,
        tasks=2, epochs=1, seeds=[0], hess_samples=16, eval_samples=64,
    )
    records = run_experiment(cfg, tmp_path)
    assert [r["task"] for r in records] == [0, 1]
    assert all(0.0 <= r["metrics"]["acc_end"][0] <= 1.0 for r in records)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["problem"] == problem and saved["num_samples"] == 64


@pytest.mark.skipif(mnist_dir() is None, reason="no MNIST copy found (set HESSRANK_TEST_DATA)")
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
