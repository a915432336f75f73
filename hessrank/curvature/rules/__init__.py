"""Per-module Gram rules: fast, exact per-sample factors for the layers that allow them.

A rule claims a module type (:attr:`GramRule.module_types`), states its assumptions
(:meth:`GramRule.factors` returns None where the captured shapes do not fit them) and turns the
layer's captured input, output and backpropagated output gradients into :class:`LayerFactors`,
from which the layer's block of the Gram matrix follows without per-sample gradients. Every claim
is then *verified* on every call (:mod:`hessrank.curvature.gram`): the factors must reproduce
autograd's gradient of a randomly weighted sum of the per-sample losses. A module no rule claims,
or whose rule fails the check, goes through the general ``torch.func`` path.

Adding a rule is one file in this package that defines a :class:`GramRule` subclass (a
:class:`TensorRule` for a module that returns one tensor) decorated with :func:`register_rule`;
every module of the package is imported here.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from hessrank.curvature.rules.factors import (
    CHUNK_BYTES,
    Factors,
    LayerFactors,
    SampleGradients,
)

__all__ = ["RULES", "Call", "Factors", "GramRule", "LayerFactors", "SampleGradients", "TensorRule",
           "register_rule", "rule_for"]

#: A module call's positional and keyword arguments.
Call = tuple[tuple[Any, ...], dict[str, Any]]

#: The registered rules, in registration order.
RULES: list[GramRule] = []


class GramRule(ABC):
    """Per-sample factors of one kind of module's parameters."""

    #: Short name reported in results (``RankResult.paths``).
    name: ClassVar[str]
    #: Module types the rule claims (exact types; subclasses may override ``forward``).
    module_types: ClassVar[tuple[type[nn.Module], ...]]
    #: Child modules (local names) whose parameters the module uses without calling them, and
    #: whose factors the rule therefore computes too (``nn.MultiheadAttention``'s ``out_proj``).
    children: ClassVar[tuple[str, ...]] = ()

    def supports(self, module: nn.Module) -> bool:
        """Whether the module's configuration fits the rule (checked before any work)."""
        return type(module) in self.module_types

    @abstractmethod
    def factors(self, module: nn.Module, layer_input: Tensor | PackedSequence,
                layer_output: Tensor | tuple[Tensor, ...],
                output_grads: Tensor | tuple[Tensor, ...], num_samples: int,
                analysed: frozenset[str], call: Call = ((), {})
                ) -> Factors | dict[str, Factors] | None:
        """The layer's factors, or None when the captured shapes break the rule's assumptions;
        with :attr:`children`, ``{"": the module's own, child: the child's}``.

        Args:
            module: the layer.
            layer_input: its input in the one call of the forward pass, ``[n, ...]`` if the rule
                applies (a ``PackedSequence`` for a recurrent module given one).
            layer_output: its output in that call (detached; a tuple of tensors for a module
                that returns several, e.g. an RNN's output and final states; a packed
                sequence's data tensor stands for it). It shares storage
                with the forward pass's tensor, so a downstream in-place operation shows in it:
                a rule that uses it relies on the gradient check.
            output_grads: ``[K, *output.shape]``: gradients of the ``K`` cotangent products
                w.r.t. the layer's output (a tuple of them, one per tensor, for a module that
                returns a tuple, e.g. an RNN's output and final states).
            num_samples: ``n``.
            analysed: local names of the module's parameters under analysis (``"weight"``...;
                a child's as ``"out_proj.weight"``).
            call: the positional and keyword arguments of that call (masks, flags), as given.
        """

    def working_bytes(self, module: nn.Module, layer_output: Tensor | tuple[Tensor, ...],
                      num_cotangents: int, num_samples: int, num_params: int) -> int:
        """Bytes of the rule's largest working tensors for one layer, predicted from its output
        before its factors are formed (for the memory budget). Default: ``K n`` per-sample
        gradients of its parameters, at most :data:`~hessrank.curvature.rules.factors.CHUNK_BYTES`
        (the block size the rules work in)."""
        element = (layer_output if isinstance(layer_output, Tensor)
                   else layer_output[0]).element_size()
        return min(num_cotangents * num_samples * num_params * element, CHUNK_BYTES)


class TensorRule(GramRule):
    """A rule for a module that returns one tensor: its output gradients are one tensor; a
    module of a claimed type that returns a tuple is left to the general path."""

    def factors(self, module: nn.Module, layer_input: Tensor | PackedSequence,
                layer_output: Tensor | tuple[Tensor, ...],
                output_grads: Tensor | tuple[Tensor, ...], num_samples: int,
                analysed: frozenset[str], call: Call = ((), {})) -> Factors | None:
        if not isinstance(output_grads, Tensor) or not isinstance(layer_input, Tensor):
            return None
        return self.tensor_factors(module, layer_input, output_grads, num_samples, analysed)

    @abstractmethod
    def tensor_factors(self, module: nn.Module, layer_input: Tensor, output_grads: Tensor,
                       num_samples: int, analysed: frozenset[str]) -> Factors | None:
        """:meth:`GramRule.factors` with the output gradients ``[K, *output.shape]``."""


def register_rule(cls: type[GramRule]) -> type[GramRule]:
    """Class decorator: add an instance of the rule to :data:`RULES`.

    Raises:
        TypeError: the class declares no ``name`` or ``module_types`` (without a name, every
            call on its layer had failed on a bare ``AttributeError``; probe 136).
    """
    missing = [trait for trait in ("name", "module_types") if not hasattr(cls, trait)]
    if missing:
        raise TypeError(f"rule {cls.__name__} does not declare {', '.join(missing)}: a rule "
                        "declares its name (reported in RankResult.paths) and the module "
                        "types it claims")
    RULES.append(cls())
    return cls


def rule_for(module: nn.Module) -> GramRule | None:
    """The first registered rule that supports ``module``, or None."""
    for rule in RULES:
        if rule.supports(module):
            return rule
    return None


for _info in pkgutil.iter_modules(__path__):
    if _info.name != "factors":
        importlib.import_module(f"{__name__}.{_info.name}")
