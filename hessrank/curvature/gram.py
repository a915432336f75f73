"""Gram matrices of curvature factors, accumulated parameter group by parameter group.

The empirical Fisher and the GGN are ``F F^T`` with ``m`` factor columns ``J_i^T s_ik`` (see
:mod:`hessrank.curvature.cotangents`); their nonzero eigenvalues are those of the ``m x m`` Gram
matrix ``F^T F``, which is a sum over parameter groups of ``F_g^T F_g``. Three sources fill it:

- ``kron``: ``nn.Linear`` and ``nn.Conv1d``/``nn.Conv2d`` layers, from the layer input ``a_i`` and
  the backpropagated output gradient ``d_ik`` captured by hooks in one forward and ``K`` backward
  passes. A weight's per-sample gradient is ``sum_t d_ikt a_it^T`` (``t`` over positions), so
  ``<G_ik, G_jl> = sum_{t,u} (a_it . a_ju)(d_ikt . d_jlu)``; with one position (a plain linear
  layer) that is ``(a_i . a_j)(d_ik . d_jl)`` and no ``n x P`` tensor is formed. With many
  positions the layer's per-sample gradients are formed instead when that is cheaper.
- ``func``: any other parameter (LayerNorm, custom ``nn.Parameter``, shared or reused weights), by
  per-sample vector-Jacobian products with ``torch.func``, a bounded group of parameters at a time.
- ``backpack``: BackPACK's ``BatchGrad`` / ``SqrtGGNExact`` on a deep copy of the model.

Groups are parameterised modules; per-group Grams give the per-layer (diagonal-block) spectra.
Cotangents carry the reduction scale, so the Gram is exactly that of the curvature of the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from hessrank.problem import CurvatureProblem

#: Bytes of per-sample factors one ``func`` pass may hold at once.
FUNC_CHUNK_BYTES = 512 * 2**20


@dataclass
class GramAccumulator:
    """Sum of per-group Gram matrices ``[m, m]``; per-group copies when ``keep_groups``.

    The sum is kept in the dtype of the first group's Gram (the model's): its entries come from
    products in that dtype, so summing in it adds no error of a larger order, and the eigen-solve
    widens the total to float64 once.
    """

    keep_groups: bool
    total: Tensor | None = None
    groups: dict[str, Tensor] = field(default_factory=dict)

    def add(self, group: str, gram: Tensor) -> None:
        if self.total is None:
            self.total = gram.clone() if self.keep_groups else gram
        else:
            self.total += gram.to(self.total.dtype)
        if self.keep_groups:
            self.groups[group] = self.groups[group] + gram if group in self.groups else gram


# ----------------------------------------------------------------------------------------------
# kron: Linear and Conv layers from hooks
# ----------------------------------------------------------------------------------------------

def _kron_eligible(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (module.groups == 1 and module.padding_mode == "zeros"
                and not isinstance(module.padding, str))
    return False


def _unfold_input(module: nn.Module, x: Tensor) -> Tensor:
    """Layer input as ``[n, T, d_in]`` rows whose product with the weight gives the output."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, dilation = (1, module.kernel_size[0]), (1, module.dilation[0])
        padding, stride = (0, module.padding[0]), (1, module.stride[0])
    else:
        kernel, dilation = module.kernel_size, module.dilation
        padding, stride = module.padding, module.stride
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2)


def _output_rows(module: nn.Module, grad: Tensor) -> Tensor:
    """Output gradient ``[K, n, ...]`` as ``[K, n, T, d_out]`` matching :func:`_unfold_input`."""
    k, n = grad.shape[:2]
    if isinstance(module, nn.Linear):
        return grad.reshape(k, n, -1, grad.shape[-1])
    return grad.reshape(k, n, grad.shape[2], -1).transpose(2, 3)


def _layer_gram(
    activations: Tensor, output_grads: Tensor, with_weight: bool, with_bias: bool
) -> Tensor:
    """Gram ``[K n, K n]`` of one layer's per-sample (weight, bias) gradients, in the layer dtype.

    ``activations``: ``[n, T, d_in]``; ``output_grads``: ``[K, n, T, d_out]``; row order ``(k, i)``.
    With one position the bias gradient is ``d_ik`` itself, so weight and bias share one
    ``D D^T``: the Gram is ``(D D^T) * (A A^T + 1)``.
    """
    k, n, positions, d_out = output_grads.shape
    d_in = activations.shape[-1]
    rows = output_grads.reshape(k * n, positions, d_out)
    if positions == 1:
        output_gram = rows[:, 0] @ rows[:, 0].T
        if not with_weight:
            return output_gram
        activation_gram = activations[:, 0] @ activations[:, 0].T
        if with_bias:
            activation_gram += 1.0
        # Entry ((k, i), (l, j)) takes (a_i . a_j): broadcast over k and l, no K n x K n copy.
        output_gram.view(k, n, k, n).mul_(activation_gram[None, :, None, :])
        return output_gram
    gram = rows.sum(dim=1) @ rows.sum(dim=1).T if with_bias else 0.0
    if not with_weight:
        return gram
    kron_cost = (k * n) ** 2 * positions**2 * (d_in + d_out)
    dense_cost = k * n * positions * d_in * d_out + (k * n) ** 2 * d_in * d_out
    if kron_cost < dense_cost:
        inner_a = torch.einsum("ntd,msd->nmts", activations, activations)
        inner_a = inner_a.repeat(k, k, 1, 1)
        inner_d = torch.einsum("ptd,qsd->pqts", rows, rows)
        return gram + (inner_a * inner_d).sum(dim=(2, 3))
    per_sample = torch.einsum("ptd,ptf->pdf", rows, activations.repeat(k, 1, 1))
    flat = per_sample.reshape(k * n, -1)
    return gram + flat @ flat.T


class _Capture:
    """Forward hooks that record each eligible layer's input and keep its output differentiable."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(modules, 0)
        self.handles = [module.register_forward_hook(self._hook(name))
                        for name, module in modules.items()]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            self.calls[name] += 1
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output
            # Downstream in-place operations (ReLU(inplace=True)) act on a copy, so the captured
            # output stays the tensor whose gradient is the layer's output gradient.
            return output.clone()
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _func_gram(
    problem: CurvatureProblem,
    names_by_group: dict[str, list[str]],
    cotangents: Tensor,
    accumulator: GramAccumulator,
) -> None:
    """Per-sample VJPs with ``torch.func`` for the given parameter groups, in bounded passes."""
    k, n = cotangents.shape[:2]
    named = dict(zip(problem.names, problem.params))
    element = problem.params[0].element_size()
    bins: list[list[tuple[str, list[str]]]] = [[]]
    bin_size = 0
    for group, names in names_by_group.items():
        size = sum(named[name].numel() for name in names)
        if bins[-1] and (bin_size + size) * k * n * element > FUNC_CHUNK_BYTES:
            bins.append([])
            bin_size = 0
        bins[-1].append((group, names))
        bin_size += size
    model, inputs = problem.model, problem.inputs

    for groups in bins:
        subset = {name: named[name].detach() for _, names in groups for name in names}
        numel = sum(t.numel() for t in subset.values())
        sample_chunk = max(1, FUNC_CHUNK_BYTES // max(1, k * numel * element))

        def sample_vjps(params: dict[str, Tensor], cotangent: Tensor, *sample: Tensor):
            def outputs_of(p: dict[str, Tensor]) -> Tensor:
                return functional_call(model, p, tuple(x.unsqueeze(0) for x in sample))[0]

            _, pullback = vjp(outputs_of, params)
            return vmap(pullback)(cotangent)[0]

        pieces: dict[str, list[Tensor]] = {name: [] for name in subset}
        with torch.no_grad():
            for start in range(0, n, sample_chunk):
                stop = min(start + sample_chunk, n)
                chunk = vmap(sample_vjps, in_dims=(None, 1, *[0] * len(inputs)))(
                    subset, cotangents[:, start:stop], *(x[start:stop] for x in inputs)
                )
                for name, value in chunk.items():  # [n_chunk, K, *shape]
                    pieces[name].append(value.transpose(0, 1).reshape(k, stop - start, -1))
        for group, names in groups:
            factors = torch.cat([torch.cat(pieces[name], dim=1) for name in names], dim=-1)
            flat = factors.reshape(k * n, -1)
            accumulator.add(group, flat @ flat.T)


def gram_kron(
    problem: CurvatureProblem,
    cotangents_of: Callable[[Tensor], Tensor],
    keep_groups: bool,
    use_kron: bool = True,
) -> tuple[GramAccumulator, Tensor, str]:
    """Gram of the factors with hooks for Linear/Conv layers and ``torch.func`` for the rest.

    ``cotangents_of(outputs)`` returns the ``[K, n, *out]`` cotangents; ``keep_groups`` keeps
    per-group Grams. Returns the accumulator, the cotangents and the backend label.
    """
    groups = problem.modules_with_params()
    module_by_name = dict(problem.model.named_modules())
    module_by_name["(root)"] = problem.model
    param_owners: dict[int, int] = {}
    for module in problem.model.modules():
        for p in module.parameters(recurse=False):
            param_owners[id(p)] = param_owners.get(id(p), 0) + 1
    named = dict(zip(problem.names, problem.params))
    kron_modules = {}
    if use_kron:
        for group, names in groups.items():
            module = module_by_name[group]
            if _kron_eligible(module) and all(param_owners[id(named[nm])] == 1 for nm in names):
                kron_modules[group] = module

    capture = _Capture(kron_modules)
    try:
        outputs = problem.forward()
    finally:
        capture.remove()
    for name, calls in capture.calls.items():
        if calls != 1:  # reused layer: its gradient sums several calls, leave it to torch.func
            kron_modules.pop(name)
    cotangents = cotangents_of(outputs)
    k, n = cotangents.shape[:2]
    accumulator = GramAccumulator(keep_groups)
    if kron_modules:
        layer_outputs = [capture.outputs[name] for name in kron_modules]
        output_grads = _backward_batched(outputs, layer_outputs, cotangents)
        for (group, module), grads in zip(kron_modules.items(), output_grads):
            local = {nm.rsplit(".", 1)[-1] for nm in groups[group]}
            activations = _unfold_input(module, capture.inputs[group])
            accumulator.add(group, _layer_gram(
                activations, _output_rows(module, grads), "weight" in local, "bias" in local
            ))
    del outputs, capture
    remaining = {g: names for g, names in groups.items() if g not in kron_modules}
    if remaining:
        _func_gram(problem, remaining, cotangents, accumulator)
    backend = "+".join(name for name, used in (("kron", kron_modules), ("func", remaining))
                       if used)
    return accumulator, cotangents, backend


def _backward_batched(outputs: Tensor, targets: list[Tensor], cotangents: Tensor) -> list[Tensor]:
    """Gradients ``[K, *target.shape]`` of ``<outputs, cotangent_k>`` w.r.t. each target tensor."""
    k = cotangents.shape[0]
    if k > 1:
        try:
            grads = torch.autograd.grad(outputs, targets, grad_outputs=cotangents,
                                        retain_graph=True, is_grads_batched=True,
                                        allow_unused=True)
            return [g if g is not None else torch.zeros(k, *t.shape, dtype=t.dtype,
                                                        device=t.device)
                    for g, t in zip(grads, targets)]
        except RuntimeError:
            pass
    per_k = [torch.autograd.grad(outputs, targets, grad_outputs=cotangents[i],
                                 retain_graph=i < k - 1, allow_unused=True)
             for i in range(k)]
    return [torch.stack([grads[j] if grads[j] is not None else torch.zeros_like(targets[j])
                         for grads in per_k]) for j in range(len(targets))]
