"""Ranks against analytic cases, and the rank definitions on known spectra."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from reference import (
    classification_batch,
    double_backward_hessian,
    eigenvalues_by_magnitude,
    mlp,
    reference_fisher,
    reference_ggn,
    reference_hessian,
)
from torch import nn

import hessrank
from hessrank import ranks

CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("input_rank", [1, 3, 5])
def test_linear_mse_hessian_rank_is_input_rank(input_rank):
    # f = W x + b, L = mean ||f - y||^2: H = (2 / (nC)) (I_C kron X~^T X~), X~ = [x, 1].
    generator = torch.Generator().manual_seed(input_rank)
    d, outputs, n = 6, 2, 12
    basis = torch.randn(input_rank, d, generator=generator, dtype=torch.float64)
    x = torch.randn(n, input_rank, generator=generator, dtype=torch.float64) @ basis
    x = x - x.mean(dim=0)  # centred: the bias column adds one independent direction
    model = nn.Linear(d, outputs).double()
    y = torch.randn(n, outputs, generator=generator, dtype=torch.float64)
    result = hessrank.effective_rank(model, nn.MSELoss(), (x, y), method="exact")
    assert result.ranks["numerical"] == outputs * (input_rank + 1)
    ggn = hessrank.effective_rank(model, nn.MSELoss(), (x, y), method="ggn")
    np.testing.assert_allclose(ggn.eigenvalues[: outputs * (input_rank + 1)],
                               result.eigenvalues[: outputs * (input_rank + 1)], rtol=1e-10)


def test_cross_entropy_ggn_and_fisher_ranks_on_generic_mlp():
    model = mlp((8, 40, 30, 5), activation=nn.Tanh, seed=2)
    n, classes = 12, 5
    x, y = classification_batch(n, 8, classes)
    ggn = hessrank.effective_rank(model, CE, (x, y), method="ggn")
    fisher = hessrank.effective_rank(model, CE, (x, y), method="fisher")
    assert ggn.ranks["numerical"] == n * (classes - 1) == ggn.max_rank
    assert fisher.ranks["numerical"] == n == fisher.max_rank
    assert any("capped by n = 12" in note for note in fisher.notes)


def test_softmax_shift_makes_the_hessian_rank_deficient():
    # Logits z = W h + b: adding c to every logit leaves the loss unchanged, so for each input
    # coordinate u (W += 1 u^T) and for the bias (b += c 1) the Hessian has a null direction:
    # d + 1 null directions for a linear softmax classifier with d inputs.
    d, classes, n = 4, 3, 30
    x, y = classification_batch(n, d, classes)
    model = nn.Linear(d, classes).double()
    result = hessrank.effective_rank(model, CE, (x, y), method="exact")
    assert result.num_params == classes * (d + 1)
    assert result.ranks["numerical"] == classes * (d + 1) - (d + 1)
    # In an MLP the last layer alone contributes width + 1 such directions.
    mlp_model = mlp((d, 6, classes), seed=1)
    deep = hessrank.effective_rank(mlp_model, CE, (x, y), method="exact")
    assert deep.ranks["numerical"] <= deep.num_params - (6 + 1)



class _SharedShift(nn.Module):
    """An MLP whose ``shift`` module adds the same value to every logit: cross-entropy is
    invariant to it, so every curvature's block of ``shift`` is zero (in exact arithmetic; its
    products round on the rest of the model's scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.shift = nn.Linear(8, 1)

    def forward(self, x):
        features = torch.tanh(self.hidden(x))
        return self.head(features) + self.shift(features) * features.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed", [0, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["exact", "lanczos", "fisher", "ggn"])
def test_a_block_the_loss_cancels_is_zero_or_said_to_be_rounding(method, dtype, seed):
    """exact and lanczos had refused the block's rounding as a wrong second derivative, fisher
    and ggn had given it ranks of 5 from rounding alone, without a word (probe 132). A dense
    Hessian's block, and a float64 Lanczos one, are zero within the rounding their products
    measured; the others are ranked with a note that they may be rounding."""
    torch.manual_seed(seed)
    model = _SharedShift().to(dtype)
    x, y = torch.randn(16, 6, dtype=dtype), torch.randint(0, 3, (16,))
    result = hessrank.effective_rank(model, CE, (x, y), method=method, per_layer=True,
                                     seed=seed)
    shift = result.layers["shift"]
    noted = any("below the model's epsilon" in note and "a float64 copy" in note
                for note in shift.notes)
    if method == "exact" or (method == "lanczos" and dtype == torch.float64):
        assert shift.rank == 0 and shift.ranks["numerical"] == 0
    assert shift.rank == 0 or noted
    for other in ("head", "hidden"):
        assert result.layers[other].rank > 0
        assert not any("below the model's epsilon" in note for note in result.layers[other].notes)


@pytest.mark.parametrize("method", ["exact", "fisher", "ggn"])
def test_a_block_far_smaller_than_the_whole_keeps_its_ranks(method):
    """A deep sigmoid network's first layers have blocks 1e-8 of the whole curvature and below,
    computed on their own scale: a rounding floor from the whole's scale had zeroed them, ranks
    of 12 / 42 reported 0 / 0 (probe 135). Every block's ranks are those of the float64
    reference's block at the block's tolerance."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for width_in in (8, 10, 10, 10, 10, 10, 10, 10):
        layers += [nn.Linear(width_in, 10), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(10, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    result = hessrank.effective_rank(model, CE, (x, y), method=method, per_layer=True)
    wide = copy.deepcopy(model).double()
    reference = {"exact": lambda: double_backward_hessian(wide, CE, x.double(), y),
                 "fisher": lambda: reference_fisher(wide, CE, x.double(), y, 1 / 32),
                 "ggn": lambda: reference_ggn(wide, CE, x.double(), y, 1 / 32)}[method]()
    start, tiny = 0, 0
    for name, block in result.layers.items():
        size = sum(p.numel() for p in getattr(model, name).parameters())
        own = eigenvalues_by_magnitude(reference[start:start + size, start:start + size])
        start += size
        expected = hessrank.spectral_ranks(own, rtol=block.rtol)
        tiny += abs(own[0]) < 1e-7 * abs(result.top_eigenvalue)
        assert (block.rank, block.ranks["numerical"]) == (
            round(expected["srank"]), expected["numerical"]), name
    assert tiny  # a block below float32's epsilon of the whole was among them

def test_gradient_overlap_against_reference():
    model = mlp((4, 5, 3), seed=3)
    x, y = classification_batch(10, 4, 3)
    hessian = reference_hessian(model, CE, x, y)
    values, vectors = np.linalg.eigh(hessian)
    order = np.argsort(-np.abs(values), kind="stable")
    vectors = vectors[:, order]
    params = list(model.parameters())
    gradient = torch.autograd.grad(CE(model(x), y), params)
    g = torch.cat([t.reshape(-1) for t in gradient]).double().numpy()
    for k in (1, 5, 20):
        expected = float(np.sum((vectors[:, :k].T @ g) ** 2) / (g @ g))
        assert hessrank.gradient_overlap(model, CE, (x, y), k=k) == pytest.approx(expected,
                                                                                  rel=1e-6)
    assert hessrank.gradient_overlap(model, CE, (x, y), k=len(g)) == pytest.approx(1.0)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_overlap_refuses_k_inside_a_tie():
    """Least squares on features with equal, orthogonal columns: the Hessian is 2 I (4-fold).
    Any k in 1..3 splits the tie, where the overlap was any value (0.06 to 0.41 at k = 1 for
    inputs 1e-13 apart); k = 0 and k = 4 are at the gaps."""
    model = nn.Linear(4, 1, bias=False).double()
    inputs = torch.cat([torch.eye(4), -torch.eye(4)]).double()
    batch = (inputs, torch.randn(8, 1, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64))
    mse = nn.MSELoss(reduction="sum")
    for k in (1, 2, 3):
        with pytest.raises(hessrank.TiedEigenvaluesError,
                           match=f"k = {k} splits a cluster.*pass k at a gap, 0 or 4") as tie:
            hessrank.gradient_overlap(model, mse, batch, k=k)
        assert (tie.value.k, tie.value.gaps) == (k, (0, 4))
        assert isinstance(tie.value, ValueError)
    assert hessrank.gradient_overlap(model, mse, batch, k=0) == 0.0
    assert hessrank.gradient_overlap(model, mse, batch, k=4) == pytest.approx(1.0)
    # (k = 10000 gave 1.0, as if the Hessian had that many eigenvectors; probe 84)
    with pytest.raises(ValueError, match="k = 5 exceeds the P = 4 eigenvectors"):
        hessrank.gradient_overlap(model, mse, batch, k=5)


@pytest.mark.parametrize("within", [False, True], ids=["orthogonal to the tie", "within it"])
def test_gradient_overlap_inside_a_tie_the_gradient_is_orthogonal_to(within: bool):
    """Least squares on scaled, orthogonal columns: the Hessian is diag(16, 4, 4, 4). With the
    gradient along the first column alone, every basis of the 3-fold eigenspace gives the
    overlap 1 at k = 2 (it had been refused; probe 234); with a share in it, k = 2 is
    refused, naming the gaps 1 and 4."""
    model = nn.Linear(4, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    columns = torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    inputs = torch.cat([columns, -columns])
    targets = torch.tensor([1.0, 0.5, -0.3, 0.2, 0.0, 0.5, -0.3, 0.2],
                           dtype=torch.float64).unsqueeze(1)
    if within:
        targets[5] = 0.0  # the second column's residuals no longer cancel
    batch, mse = (inputs, targets), nn.MSELoss(reduction="sum")
    if within:
        with pytest.raises(hessrank.TiedEigenvaluesError, match="pass k at a gap, 1 or 4"):
            hessrank.gradient_overlap(model, mse, batch, k=2)
    else:
        for k in (1, 2, 3, 4):
            assert hessrank.gradient_overlap(model, mse, batch, k=k) == pytest.approx(1.0)


def test_gradient_overlap_in_float32_answers_inside_a_null_space():
    """A float32 linear softmax classifier with two equal input features: its Hessian (its
    GGN) has a 7-fold null space, and the gradient, a sum of J_i^T (p_i - y_i), lies in the
    Hessian's range, so its overlap with the top 9 is 1 whatever basis splits the null space.
    Its float32 rounding leaves a share of about 1e-15 there, which a float64 tolerance had
    refused as a tie the gradient has a share in (1 of 20 seeds; probe 237)."""
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Linear(4, 3)
        x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        x[:, 3] = x[:, 2]
        assert hessrank.gradient_overlap(model, CE, (x, y), k=9) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_overlap_takes_close_but_distinct_eigenvalues(seed):
    """float32 tanh MLPs whose srank falls between eigenvalues 4e-6 to 1e-4 of the top apart:
    a tie tolerance of P eps (1.8e-4) refused them, though the float32 Hessian's eigenvalues are
    within about 2e-8 of the top of float64's and the overlap agrees with a float64 reference."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 5))
    torch.manual_seed(100 + seed)
    batch = (torch.randn(64, 10), torch.randint(0, 5, (64,)))
    twin = copy.deepcopy(model).double()
    hessian = reference_hessian(twin, CE, batch[0].double(), batch[1])
    values, vectors = np.linalg.eigh(hessian)
    order = np.lexsort((-values, -np.abs(values)))
    values, vectors = values[order], vectors[:, order]
    k = int(hessrank.spectral_ranks(values)["srank"])
    params = list(twin.parameters())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        CE(twin(batch[0].double()), batch[1]), params)]).numpy()
    expected = float(np.sum((vectors[:, :k].T @ g) ** 2) / (g @ g))
    assert hessrank.gradient_overlap(model, CE, batch) == pytest.approx(expected, abs=1e-4)


def test_rank_definitions_on_known_spectra():
    flat = np.ones(10)
    assert ranks.srank(flat, 0.99) == 10
    assert ranks.srank(flat, 0.5) == 5
    assert ranks.entropy_rank(flat) == pytest.approx(10)
    assert ranks.stable_rank(flat) == pytest.approx(10)
    assert ranks.participation_ratio(flat) == pytest.approx(10)
    assert ranks.numerical_rank(np.array([1.0, 1e-3, 1e-9]), rtol=1e-6) == 2
    # the ratio to the largest underflowed past 1e308 below it: rtol = 0 counted one nonzero
    # eigenvalue of two (probe 163)
    assert ranks.numerical_rank(np.array([1e300, -1e-300, 0.0]), rtol=0.0) == 2
    assert ranks.numerical_rank(np.array([1e10, 1e-315, 0.0]), rtol=0.0) == 2
    # ... and rtol times a subnormal largest rounded up to it (probe 164)
    assert ranks.numerical_rank(np.array([5e-324]), rtol=0.6) == 1
    assert ranks.numerical_rank(np.array([2e-323, 1.5e-323]), rtol=0.7) == 2
    spiky = np.array([-100.0, 1.0, 0.5, 0.0])
    assert ranks.srank(spiky, 0.99) == 2  # |.| taken: 100 / 101.5 < 0.99 <= 101 / 101.5
    assert ranks.stable_rank(spiky) == pytest.approx((100**2 + 1 + 0.25) / 100**2)
    assert ranks.srank(np.zeros(3)) == 0
    # an empty spectrum has every rank 0 (the batched srank had raised numpy's argmax error;
    # probe 127)
    assert hessrank.spectral_ranks(np.array([])) == dict.fromkeys(ranks.RANK_NAMES, 0.0)


@pytest.mark.parametrize("form", ["requiring grad", "bfloat16", "float32 weights"])
def test_a_spectrum_given_as_a_tensor_has_the_ranks_of_its_values(form: str):
    """Any tensor: one still in a graph (``eigvalsh`` of a matrix that requires grad), a
    bfloat16 one, tensor weights (NumPy's and torch's bare errors had refused the first two;
    probe 234)."""
    spectrum = torch.tensor([4.0, -2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    weights = None
    if form == "requiring grad":
        spectrum = spectrum.clone().requires_grad_(True) * 1
    elif form == "bfloat16":
        spectrum = spectrum.bfloat16()  # (these values are exact in bfloat16)
    else:
        weights = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0])
    values = spectrum.detach().double().numpy()
    expected = hessrank.spectral_ranks(values, weights=None if weights is None
                                       else weights.double().numpy())
    assert hessrank.spectral_ranks(spectrum, weights=weights) == expected
    assert expected["numerical"] == (4.0 if weights is None else 5.0)


def test_rank_definitions_are_scale_invariant_and_weights_mean_multiplicity():
    rng = np.random.default_rng(0)
    spectrum = rng.standard_normal(50) ** 3
    base = hessrank.spectral_ranks(spectrum, rtol=1e-6)
    assert hessrank.spectral_ranks(7.5 * spectrum, rtol=1e-6) == pytest.approx(base)
    repeated = hessrank.spectral_ranks(np.repeat(spectrum, 3), rtol=1e-6)
    weighted = hessrank.spectral_ranks(spectrum, rtol=1e-6, weights=np.full(50, 3.0))
    assert weighted["srank"] == pytest.approx(repeated["srank"], abs=3)
    for name in ("numerical", "entropy", "stable", "participation"):
        assert weighted[name] == pytest.approx(repeated[name])
    # A node of weight zero stands for no eigenvalue, the largest included (it was taken as
    # the scale: [10, 1] with weights [0, 2] gave a stable rank of 0.02 for two equal values).
    spiked = hessrank.spectral_ranks(np.append(spectrum, 1e3 * np.abs(spectrum).max()),
                                     rtol=1e-6, weights=np.append(np.ones(50), 0.0))
    assert spiked == pytest.approx(base)


def _srank_of_the_expanded_spectrum(values: np.ndarray, counts: np.ndarray,
                                    threshold: float) -> int:
    """The srank by its definition, each ``|value|`` written out ``count`` times: the fewest
    of the largest whose sum reaches ``threshold`` of the total (a plain loop)."""
    expanded = sorted(np.repeat(np.abs(values), counts), reverse=True)
    total, running = sum(expanded), 0.0
    for k, value in enumerate(expanded, start=1):
        running += value
        if running >= threshold * total:
            return k
    return len(expanded)


@pytest.mark.parametrize("seed", range(4))
def test_srank_of_each_row_is_the_srank_of_its_multiplicities(seed):
    """``srank_per_row`` (every bootstrap draw of a Lanczos run at once, each at its own
    threshold) against the definition on the spectrum written out: whole weights, zero among
    them (a node that stands for no eigenvalue, the largest one included), and unit rows."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(12) ** 3
    counts = rng.integers(0, 5, size=(40, 12))
    counts[:5] = 1  # unit weights
    counts[5:10, np.argmax(np.abs(values))] = 0  # the largest stands for nothing
    thresholds = rng.uniform(0.05, 1.0, size=40)
    got = ranks.srank_per_row(values, thresholds, counts.astype(float))
    expected = [_srank_of_the_expanded_spectrum(values, row, t)
                for row, t in zip(counts, thresholds)]
    assert got.tolist() == expected
    assert [ranks.srank(values, t, row) for row, t in zip(counts, thresholds)] == expected
    with pytest.raises(ValueError, match="one per row"):
        ranks.srank_per_row(values, thresholds[:3], counts.astype(float))


@pytest.mark.parametrize("scale", [1e-170, 1e300], ids=["underflowing", "overflowing"])
def test_rank_definitions_hold_at_the_ends_of_float64(scale):
    """Squares below 1e-308 and sums above 1.8e308 used to give a NaN stable rank and a
    participation ratio of 0, or an srank of 2 for three equal eigenvalues."""
    spectrum = np.array([3.0, 1.0, 1.0, 0.5, 0.0])
    assert hessrank.spectral_ranks(scale * spectrum, rtol=1e-6) == pytest.approx(
        hessrank.spectral_ranks(spectrum, rtol=1e-6))


@pytest.mark.parametrize(("eigenvalues", "options", "match"), [
    ([1.0, np.nan, 0.5], {}, "NaN or infinite"),
    ([1.0, np.inf], {}, "NaN or infinite"),
    (np.eye(3), {}, "one-dimensional.*eigvalsh"),
    ([3.0, 0.0, 0.0], {"rtol": -0.5}, "rtol must lie in"),
    ([3.0, 0.0, 0.0], {"rtol": np.nan}, "rtol must be a number, got nan"),  # as effective_rank
    # (probe 56: accepted, numerical rank 0; effective_rank refuses it)
    ([3.0, 0.0, 0.0], {"rtol": 1.5}, r"rtol must lie in \[0, 1\), got 1.5"),
    ([1.0, 2.0], {"weights": np.array([1.0, -1.0])}, "non-negative"),
    ([1.0, 2.0], {"weights": np.array([1.0, np.nan])}, "finite"),
], ids=["nan", "inf", "matrix", "negative-rtol", "nan-rtol", "rtol-1.5", "negative-weight",
        "nan-weight"])
def test_rank_definitions_refuse_what_has_no_rank(eigenvalues, options, match):
    with pytest.raises(ValueError, match=match):
        hessrank.spectral_ranks(np.asarray(eigenvalues), **options)


def test_exact_trace_matches_reference():
    model = mlp((3, 4, 2), seed=5)
    x, y = classification_batch(6, 3, 2)
    reference = eigenvalues_by_magnitude(reference_hessian(model, CE, x, y))
    result = hessrank.effective_rank(model, CE, (x, y), method="exact")
    assert result.trace == pytest.approx(reference.sum(), abs=1e-9)


@pytest.mark.parametrize(("options", "message"), [
    ({"threshold": "0.9"}, "threshold must be a number, got '0.9'$"),
    ({"rtol": torch.tensor(0.5)},
     r"rtol must be a number, got tensor\(0.5000\): pass a Python number \(float\(t\)"),
    ({"threshold": torch.tensor(0.9)}, r"threshold must be a number, got tensor\(0.9000\): pass"),
    ({"rtol": 1.0}, r"rtol must lie in \[0, 1\), got 1.0: no eigenvalue exceeds"),
    ({"threshold": 0.0}, r"threshold must lie in \(0, 1\], got 0.0"),
], ids=["string threshold", "tensor rtol", "tensor threshold", "rtol of 1", "zero threshold"])
@pytest.mark.parametrize("api", ["spectral_ranks", "effective_rank"])
def test_rank_options_are_checked_alike_everywhere(api, options, message):
    """``spectral_ranks`` raised bare comparison errors for a string threshold or a tensor rtol,
    and took a tensor threshold that ``effective_rank`` refused without saying what to pass
    (probe 105): one check serves both, naming the argument and the fix."""
    model = mlp((3, 4, 2))
    x, y = classification_batch(6, 3, 2)
    with pytest.raises(ValueError, match=message):
        if api == "spectral_ranks":
            hessrank.spectral_ranks(np.array([3.0, 2.0, 1.0]), **options)
        else:
            hessrank.effective_rank(model, CE, (x, y), "fisher", **options)


def test_complex_eigenvalues_are_refused_not_cut_to_their_real_parts():
    """``[1+1j, 2]`` was ranked as ``[1, 2]``, NumPy's warning the only sign (probe 105)."""
    with pytest.raises(ValueError, match="eigenvalues are complex: a symmetric matrix's are real"):
        hessrank.spectral_ranks(np.array([1 + 1j, 2.0]))


def test_numpy_options_leave_the_result_serialisable():
    """``threshold=np.float32(0.9)`` or ``rtol=np.int64(0)`` passed the checks and reached
    the result as NumPy scalars: ``json.dumps(result.to_dict())`` failed (probe 105)."""
    model = mlp((3, 4, 2))
    x, y = classification_batch(6, 3, 2)
    result = hessrank.effective_rank(model, CE, (x, y), "exact", threshold=np.float32(0.5),
                                     rtol=np.int64(0), per_layer=True)
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["rtol"] == 0.0
    assert type(result.threshold) is float and type(result.rtol) is float
    assert all(type(layer.threshold) is float for layer in result.layers.values())
