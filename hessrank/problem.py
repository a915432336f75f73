"""The curvature problem: a model, a loss and a batch, validated before any expensive work."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor | Sequence[Tensor], Tensor]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
_BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass
class CurvatureProblem:
    """A validated ``(model, loss_fn, batch)`` with the parameters under analysis.

    Attributes:
        model: the user's module (never modified).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        inputs: tuple of input tensors, ``model(*inputs)``, batch dimension first.
        targets: target tensor, batch dimension first.
        names: names of the analysed parameters, in ``model.named_parameters()`` order.
        params: the analysed parameters themselves (same order).
        excluded: names of frozen (``requires_grad=False``) parameters left out.
        mode: ``"eval"`` or ``"train"`` (see :func:`hessrank.effective_rank`).
    """

    model: nn.Module
    loss_fn: LossFn
    inputs: tuple[Tensor, ...]
    targets: Tensor
    names: list[str]
    params: list[Tensor]
    excluded: tuple[str, ...]
    mode: str

    @property
    def num_samples(self) -> int:
        return int(self.targets.shape[0])

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def forward(self) -> Tensor:
        """Model outputs on the batch (graph kept for differentiation)."""
        return self.model(*self.inputs)

    def loss(self, outputs: Tensor | None = None) -> Tensor:
        """The scalar loss, checked to be a finite scalar."""
        outputs = self.forward() if outputs is None else outputs
        value = self.loss_fn(outputs, self.targets)
        check_loss(value)
        return value

    def modules_with_params(self) -> dict[str, list[str]]:
        """Parameterised modules -> names of the analysed parameters they hold directly."""
        selected = set(self.names)
        groups: dict[str, list[str]] = {}
        seen: set[str] = set()
        for module_name, module in self.model.named_modules():
            for local, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{local}" if module_name else local
                if full in selected and full not in seen:
                    groups.setdefault(module_name or "(root)", []).append(full)
                    seen.add(full)
        return groups


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite, by one reduction.

    A NaN or Inf entry makes the sum non-finite; a sum that overflowed from finite entries alone is
    told apart by the entry-by-entry check.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def check_loss(value: object) -> None:
    """Raise if the loss is not a finite scalar tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"loss_fn returned {type(value).__name__}, expected a scalar tensor: return "
            "loss_fn(outputs, targets) as a torch.Tensor (e.g. nn.CrossEntropyLoss())."
        )
    if value.numel() != 1:
        raise ValueError(
            f"loss_fn returned a tensor of shape {tuple(value.shape)}, expected a scalar: use "
            "reduction='mean' (or 'sum'), not 'none'."
        )
    if not torch.isfinite(value.detach()).all():
        raise ValueError(
            f"the loss is {value.item()}: the curvature of a non-finite loss is undefined; check "
            "the model's outputs and the targets."
        )


def build_problem(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params: Iterable[Tensor | str] | None,
    mode: str,
) -> CurvatureProblem:
    """Validate every argument (types, shapes, finiteness, parameters) and build the problem."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, targets) -> scalar tensor")
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("batch must be a pair (inputs, targets); inputs may be a tuple of tensors")
    raw_inputs, targets = batch
    inputs = (raw_inputs,) if isinstance(raw_inputs, Tensor) else tuple(raw_inputs)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError("inputs must be a tensor or a non-empty tuple of tensors")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.dim() == 0:
        raise ValueError("targets must have a batch dimension first")
    n = targets.shape[0]
    if n == 0:
        raise ValueError("the batch is empty: pass at least one sample")
    for i, x in enumerate(inputs):
        if x.dim() == 0 or x.shape[0] != n:
            shape = tuple(x.shape)
            raise ValueError(
                f"mismatched batch sizes: inputs[{i}] has shape {shape} but targets has {n} "
                "samples; the batch dimension must come first in every tensor"
            )
    batch_tensors = [*((f"inputs[{i}]", x) for i, x in enumerate(inputs)), ("targets", targets)]
    for label, tensor in batch_tensors:
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ValueError(f"{label} contains NaN or Inf: clean the batch before analysing it")

    names, selected, excluded = _select_parameters(model, params)
    for name, p in zip(names, selected):
        if not all_finite(p.detach()):
            raise ValueError(f"parameter {name!r} contains NaN or Inf: the curvature is undefined")
    devices = {p.device for p in selected}
    if len(devices) > 1:
        raise ValueError(f"parameters live on several devices {devices}; move the model to one")
    dtypes = {p.dtype for p in selected}
    if len(dtypes) > 1:
        raise ValueError(f"parameters have mixed dtypes {dtypes}; cast the model to one dtype")
    device = next(iter(devices))
    for label, tensor in batch_tensors:
        if tensor.device != device:
            raise ValueError(
                f"{label} is on {tensor.device} but the model is on {device}: move the batch "
                f"with .to({str(device)!r})"
            )
    if mode == "train":
        active_dropout = [name for name, m in model.named_modules()
                          if isinstance(m, _DROPOUT) and m.training and m.p > 0]
        if active_dropout:
            raise ValueError(
                f"mode='train' with active dropout ({', '.join(active_dropout)}) makes the loss "
                "random and its curvature undefined: use mode='eval' (the default)"
            )
    return CurvatureProblem(model, loss_fn, inputs, targets, names, selected, excluded, mode)


def _select_parameters(
    model: nn.Module, params: Iterable[Tensor | str] | None
) -> tuple[list[str], list[Tensor], tuple[str, ...]]:
    """Names and tensors of the trainable parameters to analyse, and the frozen ones left out."""
    named = list(model.named_parameters())
    if params is None:
        wanted = None
    else:
        by_name = dict(named)
        by_id = {id(p): name for name, p in named}
        wanted = set()
        for item in params:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(
                        f"unknown parameter name {item!r}; valid names come from "
                        "model.named_parameters()"
                    )
                wanted.add(item)
            elif isinstance(item, Tensor):
                if id(item) not in by_id:
                    raise ValueError("params contains a tensor that is not a parameter of model")
                wanted.add(by_id[id(item)])
            else:
                raise TypeError("params must contain parameters or their names")
    names, selected, excluded = [], [], []
    for name, p in named:
        if wanted is not None and name not in wanted:
            continue
        if not p.requires_grad:
            excluded.append(name)
            continue
        names.append(name)
        selected.append(p)
    if not selected:
        raise ValueError(
            "no trainable parameters to analyse"
            + (f" (frozen and excluded: {', '.join(excluded)})" if excluded else "")
            + ": set requires_grad=True on the parameters of interest or pass params="
        )
    return names, selected, tuple(excluded)


def has_active_batchnorm(model: nn.Module) -> list[str]:
    """Names of BatchNorm modules that would use batch statistics (training flag set)."""
    return [name for name, m in model.named_modules() if isinstance(m, _BATCHNORM) and m.training]
