"""The benchmark's own helpers compute what they claim (tiny models, no timing asserts)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hessrank

pytest.importorskip("backpack")
pytest.importorskip("vivit")
pytest.importorskip("curvlinops")


def _load(name: str, path: Path):
    """Import a benchmarks/ file under a name no other test module can shadow."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run = _load("hessrank_bench_run", Path(__file__).resolve().parents[1] / "benchmarks" / "run.py")
peers = run.peers


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = run.mlp((12, 16, 8, 10)).double()
    x = torch.randn(20, 12, dtype=torch.float64)
    y = torch.randint(0, 10, (20,))
    return model, x, y


def exact_hessian_eigvals(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Reference: the dense Hessian of the mean loss from ``torch.func.hessian``."""
    from torch.func import functional_call, hessian

    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(t: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            params[k] = t[i:i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return peers.sort_desc(torch.linalg.eigvalsh(hessian(loss)(theta)))


def test_fisher_grams_agree(tiny) -> None:
    model, x, y = tiny
    em, el = peers.extended(model)
    a = peers.backpack_batchgrad_gram(em, el, x, y)
    b = peers.vmap_grad_gram(model, x, y)
    g = torch.func.vmap(torch.func.grad(
        lambda p, xi, yi: nn.functional.cross_entropy(
            torch.func.functional_call(model, p, (xi[None],)), yi[None])),
        in_dims=(None, 0, 0))(dict(model.named_parameters()), x, y)
    flat = torch.cat([v.flatten(1) for v in g.values()], 1).detach()
    ef = flat.T @ flat / len(x)  # (1/n) sum_i g_i g_i^T, P x P
    ref = peers.sort_desc(torch.linalg.eigvalsh(ef))[: len(x)]
    np.testing.assert_allclose(a, ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(b, ref, rtol=1e-8, atol=1e-12)


def test_ggn_grams_agree(tiny) -> None:
    model, x, y = tiny
    em, el = peers.extended(model)
    a = peers.backpack_sqrtggn_gram(em, el, x, y)
    b = peers.vivit_ggn_eigvals(em, el, x, y, mc_samples=0)
    k = len(x) * 9  # rank n(C-1) for cross-entropy
    np.testing.assert_allclose(a[:k], b[:k], rtol=1e-7, atol=1e-12)
    assert np.all(np.abs(a[k:]) < 1e-10 * a[0])


def test_curvlinops_dense_is_the_hessian(tiny) -> None:
    model, x, y = tiny
    np.testing.assert_allclose(peers.curvlinops_dense_eigvalsh(model, x, y),
                               exact_hessian_eigvals(model, x, y), rtol=1e-8, atol=1e-12)
    top, nmv = peers.curvlinops_eigsh(model, x, y, k=3)
    np.testing.assert_allclose(top, exact_hessian_eigvals(model, x, y)[:3], rtol=1e-6)
    assert nmv > 0


def test_pyhessian_leaves_the_model_alone(tiny) -> None:
    model, x, y = tiny
    model.train()
    ph = peers.PyHessianHVP(model, x, y)
    ph.setup()
    hv = ph.hvp(ph.random_vector())
    assert [h.shape for h in hv] == [p.shape for p in model.parameters()]
    assert model.training and all(p.grad is None for p in model.parameters())


def test_hessrank_matches_dense_references(tiny) -> None:
    model, x, y = tiny
    loss = nn.CrossEntropyLoss()
    em, el = peers.extended(model)
    n = len(x)
    fisher = hessrank.effective_rank(model, loss, (x, y), method="fisher").eigenvalues
    np.testing.assert_allclose(fisher[:n], peers.backpack_batchgrad_gram(em, el, x, y)[:n],
                               rtol=1e-6, atol=1e-12)
    ggn = hessrank.effective_rank(model, loss, (x, y), method="ggn").eigenvalues
    k = n * 9
    np.testing.assert_allclose(ggn[:k], peers.backpack_sqrtggn_gram(em, el, x, y)[:k],
                               rtol=1e-6, atol=1e-12)
    exact = hessrank.effective_rank(model, loss, (x, y), method="exact").eigenvalues
    np.testing.assert_allclose(exact, peers.curvlinops_dense_eigvalsh(model, x, y),
                               rtol=1e-6, atol=1e-10)


def test_sweep_widths_hit_their_parameter_counts() -> None:
    for target in run.SWEEP_PS:
        widths = run.mlp_for_params(target)
        assert abs(run.num_params(run.mlp(widths)) - target) / target < 0.05


def test_targets_table_flags_pass_and_fail() -> None:
    def case(times: list[float], **extra: object) -> dict[str, object]:
        return {"times": times, "seconds": float(np.median(times)), "group": "g", **extra}

    results = {
        "fwd_bwd": case([0.01, 0.02], num_params=100),
        "hessrank_fisher": case([0.03, 0.06], ratio=3.0),
        "backpack_batchgrad": case([1.0, 2.0]),
        "vivit_mc1": case([0.02, 0.04]),
    }
    rows = {r["target"]: r["status"] for r in run.targets(results)}
    assert rows["fisher time / fwd+bwd"] == "PASS"
    assert rows["fisher time / ViViT 1-MC GGN eigvals time"] == "FAIL"
    assert rows["BackPACK BatchGrad+Gram time / fisher time"] == "FAIL"
    assert rows["ggn time / ViViT exact GGN eigvals time"] == "n/a"


def test_eigensolve_script_and_its_certificate() -> None:
    """``benchmarks/eigensolve.py`` times both float64 routes, and its float32 certificate (a
    theorem's bound) is no smaller than the float32 error it bounds."""
    pytest.importorskip("threadpoolctl")
    eigensolve = _load("hessrank_bench_eigensolve",
                       Path(__file__).resolve().parents[1] / "benchmarks" / "eigensolve.py")
    sizes = eigensolve.solver_sizes([8], rounds=1)
    assert set(sizes[8]) == {"torch_1t", "scipy_evd_1t"}
    factor = torch.randn(40, 20, generator=torch.Generator().manual_seed(0))
    study = eigensolve.float32_study(factor @ factor.T, rounds=1)
    assert 0 < study["f32_eigh_error"] <= study["certificate"] < 1e-3


def test_lanczos_limits_reads_the_intervals_the_notes_state() -> None:
    """``benchmarks/lanczos_limits.py`` reads the trace and numerical-rank intervals from the
    notes: a change of their wording must fail here, not in the README's figures."""
    limits = _load("hessrank_bench_limits",
                   Path(__file__).resolve().parents[1] / "benchmarks" / "lanczos_limits.py")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    batch = (torch.randn(16, 5), torch.randint(0, 3, (16,)))
    result = hessrank.effective_rank(model, nn.CrossEntropyLoss(), batch, method="lanczos")
    low, high = limits._interval(result.notes, "trace")
    assert low <= result.trace <= high and low < high
    low, high = limits._interval(result.notes, "numerical rank")
    assert low <= result.ranks["numerical"] <= high
    assert limits.zero_init_ggn() == "srank 3 in [3, 3] for 3"


@pytest.mark.parametrize("script", sorted(
    path.name for path in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")))
def test_every_benchmark_script_imports(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each script's imports resolve as ``python benchmarks/<script>`` runs it (its folder
    first on the path): what it takes from tests/ and from its neighbours (``peak_memory.py``
    had imported a helper of ``tests/fresh.py`` that was gone, and no test ran it)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    monkeypatch.syspath_prepend(str(path.parent))
    assert _load(f"hessrank_bench_{path.stem}", path).__doc__
