"""Per-sample factors from BackPACK (``BatchGrad`` for the Fisher, ``SqrtGGNExact`` for the GGN).

BackPACK works on a deep copy: an ``extend``ed module keeps BackPACK's hooks and breaks
``torch.func`` transforms, so the user's model is never extended. Only models whose every
parameterised module BackPACK supports are accepted (it would otherwise skip them silently), and
the GGN needs an ``nn.Sequential`` model and an unweighted cross-entropy or MSE loss module. The
factors are verified like every other path: the Fisher's against autograd's gradient of a randomly
weighted loss, the GGN's by a random quadratic form ``v^T GGN v = ||S^T J v||^2``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from hessrank.curvature.differences import (
    FIRST,
    check_custom_functions,
    loss_needs,
)
from hessrank.curvature.gram import GramAccumulator, GramResult, refuse_mixed_rule_samples
from hessrank.curvature.row_gram import row_gram
from hessrank.guard import warnings_ignored
from hessrank.problem import CurvatureProblem, agreement_tolerance, run_model

_GGN_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss)


def _supported(extension: Any) -> set[type]:
    return set(extension._BackpropExtension__module_extensions)  # BackPACK's own module map


def _check_supported(problem: CurvatureProblem, kind: str, extension: Any) -> None:
    supported = _supported(extension)
    groups = problem.modules_with_params()
    modules = dict(problem.model.named_modules())
    unsupported = sorted({f"{g} ({type(modules.get(g, problem.model)).__name__})"
                          for g in groups if type(modules.get(g, problem.model)) not in supported})
    if unsupported:
        raise ValueError(
            f"BackPACK does not support {', '.join(unsupported)} for {kind}: use backend='auto' "
            "(per-module rules plus torch.func), which handles any module"
        )
    if kind == "ggn":
        if not isinstance(problem.model, nn.Sequential):
            raise ValueError("BackPACK's GGN needs an nn.Sequential model: use backend='auto'")
        loss = problem.loss_fn
        if not isinstance(loss, _GGN_LOSSES) or getattr(loss, "weight", None) is not None or (
            isinstance(loss, nn.CrossEntropyLoss) and loss.label_smoothing != 0
        ):
            raise ValueError("BackPACK's GGN supports unweighted nn.CrossEntropyLoss and "
                             "nn.MSELoss only: use backend='auto'")
        leaves = [m for m in problem.model.modules() if not list(m.children())]
        missing = sorted({type(m).__name__ for m in leaves if type(m) not in supported})
        if missing:
            raise ValueError(f"BackPACK's GGN does not support {', '.join(missing)}: use "
                             "backend='auto'")


def jacobian_vector_product(outputs: Tensor, params: list[Tensor], vector: list[Tensor]) -> Tensor:
    """``J v`` (shape of ``outputs``) by the double-backward trick on the outputs' graph."""
    dummy = torch.zeros_like(outputs, requires_grad=True)
    pieces = torch.autograd.grad(outputs, params, grad_outputs=dummy, create_graph=True,
                                 allow_unused=True)
    used = [(g, v) for g, v in zip(pieces, vector) if g is not None]
    (product,) = torch.autograd.grad([g for g, _ in used], dummy,
                                     grad_outputs=[v for _, v in used], retain_graph=True)
    return product


def gram_backpack(
    problem: CurvatureProblem, kind: str, cotangents: Tensor, sample_weights: Tensor | None,
    keep_groups: bool, generator: torch.Generator,
) -> GramResult:
    """Gram of the factors of ``kind`` (``"fisher"`` or ``"ggn"``) computed by BackPACK, checked.

    Args:
        cotangents: hessrank's own ``[K, n, *out]`` output factors (for the check).
        sample_weights: ``[n]`` loss weights ``a_i`` (fisher), None for the GGN.

    Raises:
        ValueError: an unsupported model or loss, or BackPACK's factors fail the check.
    """
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, SqrtGGNExact

    extension = BatchGrad() if kind == "fisher" else SqrtGGNExact()
    _check_supported(problem, kind, extension)
    groups = problem.modules_with_params()
    # the copy starts from the state the call's first pass found (a counter that pass moved had
    # given BackPACK's factors another function, blamed on BackPACK; probe 203)
    problem.before_pass()
    n = problem.num_samples
    factors: dict[str, Tensor] = {}
    try:
        # (a copy of a model holding a tensor computed from its parameters, the old
        # weight_norm's weight as its first pass left it, cannot be made: BackPACK's failure)
        model = extend(copy.deepcopy(problem.model))
        loss_fn = extend(copy.deepcopy(problem.loss_fn)) if kind == "ggn" else problem.loss_fn
        copies = dict(model.named_parameters())
        # the forward too: BackPACK's hooks fail there on an in-place activation (ReLU(inplace=
        # True), in every torchvision model tried), with a bare RuntimeError
        loss = loss_fn(run_model(model, problem.args, problem.kwargs, problem.mode),
                       problem.targets)
        # The inputs need no gradient; torch warns that module hooks fire on outputs only.
        # BackPACK warns of a container whose parameters are its children's (a residual
        # block): every module holding a measured parameter is checked supported above, and
        # the factors are verified (the CLI's resnet had printed the warning; probe 243).
        with backpack(extension), warnings_ignored(
                "Full backward hook is firing|Extension saving to .* does not have an extension"):
            # into the copies only: a tensor the loss or the forward uses from outside the
            # model (a learnable temperature) got BackPACK's gradient in its .grad
            loss.backward(inputs=[p for p in copies.values() if p.requires_grad])
        for name in problem.names:
            param = copies[name]
            quantity = getattr(param, "grad_batch" if sample_weights is not None
                               else "sqrt_ggn_exact", None)
            rows = None if quantity is None else quantity.shape[
                0 if sample_weights is not None else 1]
            if rows is not None and rows != n:  # (reshaped, a bare einsum error in the check
                # had followed: a Linear on tokens flattened to [n T, d]; probe 222)
                raise ValueError(
                    f"BackPACK's per-sample {kind} quantities of {name!r} have {rows} rows for "
                    f"n = {n} samples: its module sees inputs whose first dimension is not the "
                    "sample (tokens flattened to [n x T, d]), which BackPACK takes for samples; "
                    "use backend='auto' (hessrank's verified rules and torch.func)")
            if sample_weights is not None:  # fisher
                # grad_batch holds a_i g_i; the Fisher's factor is sqrt(a_i) g_i.
                scale = torch.where(sample_weights > 0, sample_weights.clamp_min(
                    torch.finfo(sample_weights.dtype).tiny).rsqrt(), 0.0)
                factors[name] = (param.grad_batch.reshape(n, -1) * scale[:, None]).unsqueeze(0)
            else:
                factor = param.sqrt_ggn_exact  # [C, n, *shape], the reduction's scale included
                factors[name] = factor.reshape(factor.shape[0], n, -1)
    except (AttributeError, RuntimeError, NotImplementedError, AssertionError) as error:
        # BackPACK's own failures: a parameter its extension does not fill (weight_norm's
        # weight_g), a dtype its module extension does not handle (a float64 embedding), an
        # operation outside the modules its GGN cannot backpropagate through (an assertion:
        # it had reached the caller as BackPACK's bare AssertionError; probe 203)
        text = str(error)
        cause = (" (an in-place operation on a module's output, such as ReLU(inplace=True), "
                 "which BackPACK's hooks cannot take)" if "modified inplace" in text
                 else " (a module called more than once in the forward, which BackPACK does "
                 "not support)" if "has no attribute 'output'" in text
                 else " (an operation of the forward outside its modules, such as a product "
                 "after the last one, which BackPACK's GGN cannot backpropagate through)"
                 if "backpropagation quantity" in text else "")
        raise ValueError(
            f"BackPACK could not compute the {kind} factors of this model ({type(error).__name__}"
            f": {text}){cause}: use backend='auto' (hessrank's verified rules and torch.func), "
            "which covers every model BackPACK does") from error
    untested = _verify(problem, kind, factors, cotangents, generator)
    accumulator = GramAccumulator(keep_groups, problem)
    for group, names in groups.items():
        flat = torch.cat([factors[name] for name in names], dim=-1)
        flat = flat.reshape(-1, flat.shape[-1])
        accumulator.add(group, row_gram(flat))
    # BackPACK's C columns per sample beside hessrank's C' (the output Hessian's rank): the rank
    # bound, and the default tolerance sized by it, are the same whichever backend (a GGN's
    # numerical rank was 477 with BackPACK, 487 without, on one spectrum; probe 91)
    return GramResult(accumulator, dict.fromkeys(problem.names, "backpack"),
                      [] if untested is None else [untested],
                      columns=int(cotangents.shape[0]))


def _verify(problem: CurvatureProblem, kind: str, factors: dict[str, Tensor],
            cotangents: Tensor, generator: torch.Generator) -> str | None:
    """Check BackPACK's factors against autograd on the batch, the model's backward through
    custom Functions against finite differences
    (:func:`~hessrank.curvature.differences.check_custom_functions`), and its samples'
    independence (:func:`~hessrank.curvature.gram.refuse_mixed_rule_samples`: BackPACK's
    factors, like the rules', are each sample's gradient in the batch); returns the note of a
    model whose mixing could not be tested.

    Raises:
        ValueError: any of them fails.
    """
    outputs = problem.forward()
    check_custom_functions(problem, (FIRST,), loss_needs(kind), outputs)
    tolerance = agreement_tolerance(problem.dtype)
    worst = ""
    if kind == "fisher":
        weights = torch.randn(cotangents.shape[:2], generator=generator, dtype=torch.float64)
        weights = weights.to(device=problem.device, dtype=problem.dtype)
        combined = torch.einsum("kn,kn...->n...", weights, cotangents)
        true = torch.autograd.grad(outputs, problem.params, grad_outputs=combined,
                                   allow_unused=True)
        squares = {name: float(((torch.einsum("kn,knp->p", weights, factors[name])
                                 - (torch.zeros_like(p) if t is None else t).reshape(-1)) ** 2
                                ).sum())
                   for name, p, t in zip(problem.names, problem.params, true)}
        error = math.sqrt(sum(squares.values()))
        worst = f", most in '{max(squares, key=squares.__getitem__)}'"
        scale = math.sqrt(sum(float((weights[..., None] ** 2 * factors[name] ** 2).sum())
                              for name in problem.names))
    else:
        vector = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(
            device=p.device, dtype=p.dtype) for p in problem.params]
        projected = jacobian_vector_product(outputs, problem.params, vector)  # J v
        ours = float((torch.einsum("kn...,n...->kn", cotangents, projected) ** 2).sum())
        projection = torch.stack([torch.einsum("knp,p->kn", factors[name], v.reshape(-1))
                                  for name, v in zip(problem.names, vector)]).sum(0)  # F^T v
        theirs = float((projection**2).sum())
        error, scale = abs(ours - theirs), max(ours, theirs)
    if error > tolerance * max(scale, torch.finfo(torch.float64).tiny):
        # (a weight two modules share had been put down to convolutions' padding modes; probe
        # 196)
        ties = problem.tied_parameters()
        cause = (f"likely a parameter several modules use, whose parts BackPACK does not add up "
                 f"({', '.join(f'{alias!r} is {name!r}' for alias, name in ties)})" if ties
                 else "a module BackPACK does not handle correctly (as convolutions with "
                 "padding_mode other than 'zeros')")
        raise ValueError(
            f"BackPACK's {kind} factors disagree with autograd (relative error "
            f"{error / scale:.1e}{worst}): {cause}; use backend='auto'"
        )
    return refuse_mixed_rule_samples(problem, outputs.detach())
