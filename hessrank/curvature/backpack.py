"""Per-sample factors from BackPACK (``BatchGrad`` for the Fisher, ``SqrtGGNExact`` for the GGN).

BackPACK works on a deep copy: an ``extend``ed module keeps BackPACK's hooks and breaks
``torch.func`` transforms, so the user's model is never extended. Only models whose every
parameterised module BackPACK supports are accepted (it would otherwise skip them silently), and
the GGN needs an ``nn.Sequential`` model and a cross-entropy or MSE loss module.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from hessrank.curvature.gram import GramAccumulator
from hessrank.problem import CurvatureProblem

_GGN_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss)


def _supported(extension: object) -> set[type]:
    return set(extension._BackpropExtension__module_extensions)  # BackPACK's own module map


def gram_backpack(
    problem: CurvatureProblem, kind: str, scale: float, keep_groups: bool
) -> tuple[GramAccumulator, int]:
    """Gram of the factors of ``kind`` (``"fisher"`` or ``"ggn"``) computed by BackPACK.

    Returns the accumulator and ``K`` (factor columns per sample).
    """
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, SqrtGGNExact

    extension = BatchGrad() if kind == "fisher" else SqrtGGNExact()
    supported = _supported(extension)
    groups = problem.modules_with_params()
    modules = dict(problem.model.named_modules())
    unsupported = sorted({f"{g} ({type(modules.get(g, problem.model)).__name__})"
                          for g in groups if type(modules.get(g, problem.model)) not in supported})
    if unsupported:
        raise ValueError(
            f"BackPACK does not support {', '.join(unsupported)} for {kind}: use backend='auto' "
            "(Kronecker identity plus torch.func) which handles any module"
        )
    if kind == "ggn":
        if not isinstance(problem.model, nn.Sequential):
            raise ValueError("BackPACK's GGN needs an nn.Sequential model: use backend='auto'")
        if not isinstance(problem.loss_fn, _GGN_LOSSES):
            raise ValueError("BackPACK's GGN supports nn.CrossEntropyLoss and nn.MSELoss only: "
                             "use backend='auto'")
        leaves = [m for m in problem.model.modules() if not list(m.children())]
        missing = sorted({type(m).__name__ for m in leaves if type(m) not in supported})
        if missing:
            raise ValueError(f"BackPACK's GGN does not support {', '.join(missing)}: use "
                             "backend='auto'")

    model = extend(copy.deepcopy(problem.model))
    loss_fn = extend(copy.deepcopy(problem.loss_fn)) if kind == "ggn" else problem.loss_fn
    copies = dict(model.named_parameters())
    n = problem.num_samples
    loss = loss_fn(model(*problem.inputs), problem.targets)
    with backpack(extension), warnings.catch_warnings():
        # The inputs need no gradient; torch warns that module hooks fire on outputs only.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    columns = 1
    accumulator = GramAccumulator(keep_groups)
    for group, names in groups.items():
        blocks = []
        for name in names:
            param = copies[name]
            if kind == "fisher":
                # grad_batch holds c * g_i; the Fisher is c * sum g_i g_i^T.
                blocks.append((param.grad_batch / scale**0.5).reshape(n, -1))
            else:
                factor = param.sqrt_ggn_exact  # [C, n, *shape], scale included
                columns = factor.shape[0]
                blocks.append(factor.reshape(columns * n, -1))
        factors = torch.cat(blocks, dim=1)
        accumulator.add(group, factors @ factors.T)
    return accumulator, columns
