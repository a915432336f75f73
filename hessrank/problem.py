"""The curvature problem: a model, a loss and a batch, validated before any expensive work.

Every check here is cheap (no backward pass; at most one forward pass without a graph) and runs
before an estimator starts, so bad input fails fast, with a message naming the problem and the fix,
and changes nothing.
"""

from __future__ import annotations

import dis
import functools
import inspect
import math
import numbers
import re
import sys
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from typing import Any, NoReturn, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map
from torch.utils.checkpoint import CheckpointFunction

from hessrank.guard import (
    CALLER_FAST_PATH,
    STATE_COPIES,
    GlobalGenerators,
    ModuleGenerators,
    OwnMode,
    PassState,
    attention_fast_path,
    autocast_turned_off,
    each_once,
    evaluation_mode,
    held_tensors,
    is_compile_wrapper,
    preserved_state,
    raise_if_signalled,
    saved_tensor_hooks_off,
    state_bytes,
)
from hessrank.host import host_floats

LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``(inputs, targets)``. ``inputs``: a tensor (``model(x)``), a tuple of tensors
#: (``model(*inputs)``) or a mapping of names to tensors (``model(**inputs)``, HuggingFace style).
Batch = tuple[Tensor | Sequence[Tensor] | Mapping[str, Tensor], Tensor]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)


def _drops_out(module: nn.Module) -> bool:
    """Whether ``module`` drops out entries in training mode: a dropout layer of ``p > 0``, or
    a layer with dropout of its own (``nn.MultiheadAttention(dropout=...)``, a stacked
    ``nn.LSTM``/``nn.GRU``/``nn.RNN(dropout=...)``, which drops between its layers); the
    latter had gone unnamed in the note of what ``mode='eval'`` switches off (probe 169)."""
    if isinstance(module, _DROPOUT):
        return module.p > 0
    if isinstance(module, nn.RNNBase):
        return module.dropout > 0 and module.num_layers > 1
    return isinstance(module, nn.MultiheadAttention) and module.dropout > 0


#: Methods that set the mode rather than read it.
_MODE_SETTERS = frozenset({"__init__", "train", "eval", "__setstate__"})


def _reads_training(module: nn.Module) -> bool:
    """Whether ``module`` is of a class outside torch one of whose methods defined in its own
    package (``forward``, or a helper it calls: fastai's ``WeightDropout._setweights``, probe
    220; not a framework's base class's) reads an attribute named ``training``
    (``self.training``): it may compute otherwise in training mode."""
    package = type(module).__module__.split(".")[0]
    return package != "torch" and any(
        "training" in method.__code__.co_names
        for klass in type(module).__mro__ if klass.__module__.split(".")[0] == package
        for name, method in vars(klass).items()
        if name not in _MODE_SETTERS and hasattr(method, "__code__"))


def _power_iterated(module: nn.Module) -> list[str]:
    """The tensors of ``module`` under a spectral norm that takes a power-iteration step in
    training mode and uses its stored singular vectors in evaluation (the parametrisation's,
    ``torch.nn.utils.parametrizations.spectral_norm``, and the older hook's); such a layer
    left in training mode had been measured as evaluated with no word (probe 186)."""
    tensors = [name for name, parametrisations in getattr(module, "parametrizations", {}).items()
               if any(isinstance(p, _SpectralNorm)
                      and p.training and p.n_power_iterations > 0 for p in parametrisations)]
    return tensors + [hook.name for hook in module._forward_pre_hooks.values()
                      if isinstance(hook, SpectralNorm)
                      and module.training and hook.n_power_iterations > 0]


_BATCHNORM = nn.modules.batchnorm._BatchNorm
#: Normalisation layers that may hold running statistics (BatchNorm, InstanceNorm).
_NORM_WITH_STATISTICS = nn.modules.batchnorm._NormBase
#: Parameter dtypes the curvature is computed in; half precision loses too many digits for
#: second derivatives, and complex parameters have no real Hessian.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


@dataclass
class CurvatureProblem:
    """A validated ``(model, loss_fn, batch)`` with the parameters under analysis.

    Attributes:
        model: the user's module (never modified; a ``torch.compile`` wrapper is unwrapped to the
            module it compiles, which holds the same parameters).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        args: positional input tensors, batch dimension first (detached from any graph).
        kwargs: keyword input tensors, batch dimension first (``model(*args, **kwargs)``).
        targets: target tensor, batch dimension first (detached).
        names: names of the analysed parameters, in ``model.named_parameters()`` order.
        params: the analysed parameters themselves (same order).
        excluded: names of frozen (``requires_grad=False``) parameters left out.
        mode: ``"eval"`` or ``"train"`` (see :func:`hessrank.effective_rank`).
        notes: facts about the problem worth reporting (e.g. an unwrapped compiled model).
        passes: the model's state put back before every forward pass (shared by the problems
            derived from this one: a shard, a data set's batches, a subset of parameters).
        loss_widening: how the Hessian's loss runs (``hessian._widened_loss``), decided once per
            call for each set of analysed parameters and dtypes (shared like ``passes``).
        whole_scale: for a block of the parameters (``per_layer``), the largest ``|eigenvalue|``
            of the whole problem's curvature, 0 otherwise: the block's products run through
            the whole model's backward pass and round on its scale (:meth:`restricted`).
    """

    model: nn.Module
    loss_fn: LossFn
    args: tuple[Tensor, ...]
    kwargs: dict[str, Tensor]
    targets: Tensor
    names: list[str]
    params: list[Tensor]
    excluded: tuple[str, ...]
    mode: str
    notes: list[str] = field(default_factory=list)
    #: whether :meth:`loss` has read the outputs and targets for a broadcast (once a call)
    _broadcast_read: bool = field(default=False, init=False, repr=False, compare=False)
    passes: PassState | None = None
    loss_widening: dict[tuple[Any, ...], tuple[LossFn | None, str | None]] = field(
        default_factory=dict, repr=False)
    whole_scale: float = 0.0
    #: bytes of the batch's tensors the call copied (:func:`_usable_batch`)
    batch_copy_bytes: int = 0
    #: bytes of one copy of the model's buffers and tensor attributes, and of the tensors in
    #: its containers (:func:`~hessrank.guard.state_bytes`)
    state_bytes: tuple[int, int] = (0, 0)
    #: bytes of the copies a call holds of a loss module's state: its guard's, made before the
    #: work, and a float64 twin's (:func:`loss_copy_bytes`)
    loss_state_bytes: tuple[int, int] = (0, 0)
    #: each input (targets last) by its label, and its version counter when the problem was
    #: made (they are the call's own copies)
    _input_versions: list[tuple[str, Tensor, int]] = field(init=False, repr=False,
                                                           default_factory=list)
    #: whether the caller's inputs required grad (the call's copies do not), so that a
    #: reentrant checkpoint on them is in the training's graph (:meth:`forward`)
    inputs_require_grad: bool = False
    #: whether a forward pass's graph was read for custom autograd.Functions
    _graph_read: bool = field(init=False, repr=False, default=False)
    #: the custom autograd.Functions found in the graph (:func:`custom_functions_in`), each
    #: with which of its tensor arguments autograd differentiates, and the derivatives through
    #: them checked by finite differences in this call
    #: (:mod:`hessrank.curvature.differences`); shared like ``passes``
    custom_functions: dict[type[torch.autograd.Function], list[bool]] = field(
        default_factory=dict, repr=False, compare=False)
    differences_checked: set[tuple[type, str]] = field(default_factory=set, repr=False,
                                                       compare=False)
    #: whether a loss graph was read for the loss's own custom Functions (once a call), and
    #: those found there (:mod:`hessrank.curvature.differences`); shared like ``passes``
    loss_graph_read: list[bool] = field(default_factory=lambda: [False], repr=False,
                                        compare=False)
    loss_functions: set[type] = field(default_factory=set, repr=False, compare=False)
    #: whether a forward pass on inputs that require grad was read (``inputs_require_grad``),
    #: once for the problems derived from this one (shared like ``passes``)
    inputs_checked: list[bool] = field(default_factory=lambda: [False], repr=False,
                                       compare=False)
    #: whether the forward takes torch.func transforms, which refuse saved-tensor hooks: its
    #: passes then run without them (:func:`run_model`), once known (shared like ``passes``)
    refuses_saved_hooks: list[bool] = field(default_factory=lambda: [False], repr=False,
                                            compare=False)
    #: what to forget of a pass that restarts without the hooks (records of its first part, a
    #: capture's), entered by those who record it, for its time (:meth:`restarts_forget`)
    _forgotten_on_restart: list[Callable[[], None]] = field(default_factory=list, repr=False,
                                                            compare=False)
    #: the first pass's outputs in brief (:class:`OutputsPrint`), which every later pass over
    #: this batch must reproduce
    _first_print: OutputsPrint | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.passes is None:
            self.passes = PassState(self.model)
        self._input_versions = [
            (label, x, x._version)
            for label, x in [*labelled_inputs(self.args, self.kwargs), ("targets", self.targets)]]

    def before_pass(self) -> None:
        """Call before every forward pass of the model on this problem's batch: the model's
        state as the call's first pass found it (:class:`~hessrank.guard.PassState`), and the
        inputs as they were given.

        Raises:
            ValueError: a forward pass modified an input in place.
        """
        assert self.passes is not None, "set in __post_init__"
        changed = [label for label, x, version in self._input_versions if x._version != version]
        if changed:
            raise batch_modified_error(changed[0])
        self.passes.before_pass()

    def copied_bytes(self, made: bool = False) -> int:
        """Bytes of the call's copies of the batch, of the model's state and of a loss
        module's, which every prediction of its memory counts; with ``made``, of those made so
        far (the state's copy as the first pass found it, :class:`~hessrank.guard.PassState`,
        is that pass's, and a loss's float64 twin is made by the work: counted twice by a
        measure begun before them)."""
        state, contained = self.state_bytes
        recorded = self.passes is not None and self.passes.recorded
        copies = STATE_COPIES - 1 if made and not recorded else STATE_COPIES
        return (self.batch_copy_bytes + copies * state + contained
                + self.loss_state_bytes[0] + (0 if made else self.loss_state_bytes[1]))

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
        """Model outputs on the batch (graph kept for differentiation).

        Raises:
            ValueError: the forward pass drew random numbers (:func:`run_model`), computed
                other outputs than the call's first pass over the batch
                (:meth:`OutputsPrint.refuse_other`), or an earlier one modified an input in
                place (:meth:`before_pass`).
        """
        self.before_pass()
        if self.inputs_require_grad and not self.inputs_checked[0] and torch.is_grad_enabled():
            # The caller's graph passes a reentrant checkpoint on the inputs, which
            # torch.autograd.grad does not go into, where the call's copies leave it out: its
            # parameters' curvature had been silently zero (probe 149). One forward on inputs
            # that require grad, as the caller's do, shows it (custom_functions_in raises);
            # not leaves, since a forward may write its input in place, as the caller's allows.
            self.inputs_checked[0] = True

            def requiring(x: Tensor) -> Tensor:
                return x.detach().requires_grad_(True).clone() if x.is_floating_point() else x

            custom_functions_in(run_model(
                self.model, tuple(requiring(x) for x in self.args),
                {key: requiring(x) for key, x in self.kwargs.items()}, self.mode), self.params)
            self.before_pass()
        if self.refuses_saved_hooks[0]:  # (no part run twice, its hooks' records doubled)
            with saved_tensor_hooks_off():
                outputs = run_model(self.model, self.args, self.kwargs, self.mode, self.notes)
        else:
            outputs = run_model(self.model, self.args, self.kwargs, self.mode, self.notes,
                                on_restart=self._restarted)
        if isinstance(outputs, Tensor) and outputs.is_floating_point():
            brief = OutputsPrint.of(outputs)
            if self._first_print is None:
                self._first_print = brief
            else:
                self._first_print.refuse_other(brief)
        if not self._graph_read and isinstance(outputs, Tensor) and outputs.grad_fn is not None:
            self._graph_read = True
            self.add_custom_functions(outputs)
            self._embedding_uses(outputs)
        return outputs

    def _embedding_uses(self, outputs: Tensor) -> None:
        """The padding-row note (:func:`_embedding_notes`) without the embeddings whose weight
        the graph of ``outputs`` uses otherwise too."""
        analysed = {id(p) for p in self.params}
        noted = _embedding_notes(self.model, analysed)
        if noted and noted[0] in self.notes:
            kept = _embedding_notes(self.model, analysed,
                                    weights_used_otherwise(outputs, self.model))
            index = self.notes.index(noted[0])
            self.notes[index:index + 1] = kept

    def _restarted(self) -> None:
        """A pass restarted without saved-tensor hooks (:func:`run_model`): later ones start
        so, and what its first part recorded is forgotten."""
        self.refuses_saved_hooks[0] = True
        for forget in self._forgotten_on_restart:
            forget()

    @contextmanager
    def restarts_forget(self, forget: Callable[[], None]) -> Iterator[None]:
        """Inside the block, ``forget()`` where a pass restarts without saved-tensor hooks: the
        records its first part left (a capture's layers called twice had lost their rules, its
        sums' lengths doubled; probe 197)."""
        self._forgotten_on_restart.append(forget)
        try:
            yield
        finally:
            self._forgotten_on_restart.remove(forget)

    def add_custom_functions(self, value: Tensor) -> dict[type[torch.autograd.Function],
                                                          list[bool]]:
        """Add the custom autograd.Functions in the graph of ``value`` (the model's outputs, or
        a loss on them) to :attr:`custom_functions`, and the note naming them; returns those
        found (:func:`custom_functions_in`, whose errors it raises)."""
        found = custom_functions_in(value, self.params)
        for cls, differentiated in found.items():
            self.custom_functions[cls] = _either(self.custom_functions.get(cls, []),
                                                 differentiated)
        if found and custom_functions_note(self.custom_functions) not in self.notes:
            self.notes[:] = [note for note in self.notes if not note.startswith(_CUSTOM_FUNCTIONS)]
            self.notes.append(custom_functions_note(self.custom_functions))
        return found

    def labelled_batch(self) -> list[tuple[str, Tensor]]:
        """The inputs and the targets by the labels errors give them (``inputs[0]``,
        ``targets``)."""
        return [*labelled_inputs(self.args, self.kwargs), ("targets", self.targets)]

    def loss(self, outputs: object = None, loss_fn: LossFn | None = None) -> Tensor:
        """The scalar loss on ``outputs`` (default: a forward pass), checked; ``loss_fn``: the
        problem's own loss function in another form (a float64 copy), default itself.

        Raises:
            TypeError: the model's outputs are not a tensor.
            TypeError, ValueError, RuntimeError, IndexError: the loss cannot be evaluated on the
                outputs and the targets (the error's own type, its message extended with the
                shapes and dtypes involved), or it is not a finite scalar.
        """
        outputs = self.forward() if outputs is None else outputs
        value = evaluate_loss(loss_fn or self.loss_fn, outputs, self.targets,
                              batch=self.labelled_batch())
        if not self._broadcast_read:
            self._broadcast_read = True
            hint = broadcast_hint(tensor_outputs(outputs), self.targets, loss_fn or self.loss_fn,
                                  value)
            note = hint and f"{hint}; the curvature measured is that of the loss as written"
            if note and note not in self.notes:  # (a block's problem shares the notes)
                self.notes.append(note)
        return value

    def core_fields(self) -> dict[str, object]:
        """The fields a plain :class:`CurvatureProblem` has, by name: builds a specialised problem
        from a plain one, or strips a specialised one (a shard, a data set) to its batch."""
        return {f.name: getattr(self, f.name) for f in fields(CurvatureProblem) if f.init}

    def sample_slice(self, start: int, stop: int) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
        """Inputs of samples ``start:stop`` as ``(args, kwargs)``."""
        return (tuple(x[start:stop] for x in self.args),
                {k: x[start:stop] for k, x in self.kwargs.items()})

    def restricted(self, names: Sequence[str], whole_scale: float = 0.0) -> CurvatureProblem:
        """The same problem on a subset of its parameters (``names`` in model order), a block
        of the whole's curvature, whose largest ``|eigenvalue|`` is ``whole_scale`` (0: not
        known)."""
        named = dict(zip(self.names, self.params))
        return replace(self, names=list(names), params=[named[n] for n in names],
                       whole_scale=whole_scale)

    def modules_with_params(self) -> dict[str, list[str]]:
        """Parameterised modules -> names of the analysed parameters they hold directly.

        A parameter registered in several modules (weight tying) belongs to the first module that
        registers it, as in ``model.named_parameters()``; modules come in ``named_modules()`` order.
        """
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

    def layers(self) -> dict[str, list[str]]:
        """``per_layer``'s blocks: :meth:`modules_with_params`, with a parametrization's
        originals (``weight_norm``'s ``0.parametrizations.weight.original0`` and ``original1``)
        joined to the module it parametrizes (``0``), whose other parameters (its bias) they
        follow, as in ``model.named_parameters()``: one layer, not two blocks neither of which
        is its curvature."""
        layers: dict[str, list[str]] = {}
        for group, names in self.modules_with_params().items():
            layers.setdefault(self.layer_of(group), []).extend(names)
        # in named_modules() order of the layers' modules (a parametrization registered after a
        # child had put its module's block after the child's; probe 122)
        order = {name or "(root)": index
                 for index, (name, _) in enumerate(self.model.named_modules())}
        return dict(sorted(layers.items(), key=lambda item: order[item[0]]))

    def tied_parameters(self) -> list[tuple[str, str]]:
        """``(alias, name)`` for each analysed parameter that a module registers under another
        name than the first (``head.weight`` after ``head.weight = embedding.weight``:
        ``("head.weight", "embedding.weight")``), in ``named_modules()`` order."""
        names = {id(p): name for name, p in zip(self.names, self.params)}
        ties = []
        for module_name, module in self.model.named_modules():
            for local, parameter in module.named_parameters(recurse=False):
                full = f"{module_name}.{local}" if module_name else local
                name = names.get(id(parameter))
                if name is not None and name != full:
                    ties.append((full, name))
        return ties

    def tied_layers_note(self) -> str | None:
        """``per_layer``'s note on analysed parameters that several modules register (weight
        tying, ``head.weight = embedding.weight``): each is in the block of the module that
        registers it first (:meth:`modules_with_params`), and the blocks of the others lack it
        (a head whose parameters are all tied has none), which nothing had said (probe 123);
        None where no parameter is tied."""
        block = {name: layer for layer, members in self.layers().items() for name in members}
        ties = [f"{alias!r} is {name!r}, in block {block[name]!r}"
                for alias, name in self.tied_parameters()]
        if not ties:
            return None
        return ("per_layer: a tied parameter is in the block of the first module that registers "
                f"it, not in the others' ({'; '.join(ties)}): their blocks are those of their "
                "other parameters, and a module whose parameters are all tied has none")

    def layer_of(self, group: str) -> str:
        """The :meth:`layers` block a :meth:`modules_with_params` group belongs to: the module
        a parametrization acts on, for the parametrization's originals and for parameters of
        its own (a learned scale inside a ``register_parametrization`` module), found by
        the outermost ``ParametrizationList`` (``<module>.parametrizations.<tensor>``) in the
        group's path; the group itself otherwise."""
        if group == "(root)":
            return group
        parts = group.split(".")
        for end in range(2, len(parts) + 1):
            if parts[end - 2] == "parametrizations" and isinstance(
                    self.model.get_submodule(".".join(parts[:end])),
                    nn.utils.parametrize.ParametrizationList):
                return ".".join(parts[:end - 2]) or "(root)"
        return group


#: What autograd says when a forward differentiates a tensor that has no graph.
_GRAPHLESS = "does not require grad and does not have a grad_fn"
#: What torch.func's transforms say under saved-tensor hooks.
_REFUSES_SAVED_HOOKS = "don't yet support saved tensor hooks"
#: The note of a forward run without the hooks that measure its graph.
_UNCOUNTED_GRAPH = ("the forward takes torch.func transforms (grad, vjp, jacrev), which refuse "
                    "saved-tensor hooks: its passes with a graph ran without hessrank's, which "
                    "measure the graph, so the memory budget's refined checks did not count "
                    "their graphs")


#: Torch's error for a transformer layer given ``is_causal=True`` without a mask, on the
#: standard path (the fast path ignores the hint).
_CAUSAL_HINT = "Need attn_mask if specifying the is_causal hint"


def run_model(model: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Tensor], mode: str,
              notes: list[str] | None = None,
              on_restart: Callable[[], None] | None = None) -> Tensor:
    """``model(*args, **kwargs)``, refused if the forward pass drew from a global random
    generator: the loss is then a random function (dropout inside a layer, MC dropout, noise
    injection), every pass of the call would see other draws, and its curvature is undefined.
    Comparing the generators' states before and after each pass costs about 0.2 ms. The
    generators the submodules hold (:func:`~hessrank.guard.held_generators`) are set back after
    each pass, so that every pass draws what the model's next forward would: the curvature is
    the loss's at that draw (a note in ``notes`` says so), and the generators are left as they
    were.

    A forward that takes torch.func transforms, which refuse saved-tensor hooks (the graph's
    measure, :class:`GraphBytes`), runs again without them, ``on_restart()`` called first.

    Raises:
        ValueError: the pass drew random numbers, with the likely causes and the fix; or it
            returned half-precision outputs.
        RuntimeError: the model's own error; a dtype error with integer inputs names them and
            the cast to make.
    """
    before = GlobalGenerators.read()
    private = ModuleGenerators.read(model)
    try:
        try:
            outputs = model(*args, **kwargs)
        except RuntimeError as error:
            if _REFUSES_SAVED_HOOKS in str(error):
                # torch.func's transforms inside the forward (a force field's grad of its
                # energy) refuse any saved-tensor hooks, the graph's measure among them (every
                # method had failed with torch's message; probe 194): the pass again without
                # them, from the same draws (autograd checks its saved tensors' versions
                # itself then)
                before.restore()
                private.restore()
                if on_restart is not None:
                    on_restart()
                with saved_tensor_hooks_off():
                    outputs = model(*args, **kwargs)
                if notes is not None and _UNCOUNTED_GRAPH not in notes:
                    notes.append(_UNCOUNTED_GRAPH)
            elif torch.is_grad_enabled() or _GRAPHLESS not in str(error):
                raise
            else:
                # A forward that differentiates (a force field's -dE/dx, a gradient penalty)
                # needs a graph where the caller's pass wants none (a check's, under
                # torch.no_grad()): run again from the same draws with one, its outputs
                # detached.
                before.restore()
                private.restore()
                with torch.enable_grad():
                    outputs = tree_map(lambda leaf: leaf.detach() if isinstance(leaf, Tensor)
                                       else leaf, model(*args, **kwargs))
    except RuntimeError as error:
        raise_if_signalled(error)
        labelled = labelled_inputs(args, kwargs)
        integer = [label for label, tensor in labelled if not tensor.is_floating_point()]
        if integer and any(phrase in str(error) for phrase in (
                "dtype", "scalar type", "Input type")):  # the last: convolutions
            raise type(error)(
                f"{str(error).rstrip('. ')}. The model received integer inputs "
                f"({', '.join(integer)}): features must be floating point, cast them with "
                ".float() (or .to() the model's dtype); token ids for an nn.Embedding stay "
                "integer") from error
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        other = [(label, tensor.dtype) for label, tensor in labelled
                 if tensor.is_floating_point() and tensor.dtype not in dtypes]
        of_dtypes = any(phrase in str(error) for phrase in ("dtype", "scalar type", "Input type"))
        if of_dtypes and (turned_off := autocast_turned_off()):
            # a model that runs only under the caller's autocast (a half-precision layer fed
            # float32): torch's message had not said the call turned it off (probe 212)
            # (inputs of another dtype than the parameters' are what to cast: a float32
            # copy of a float32 model changes nothing; probe 241)
            fix = (f"pass {other[0][0]} in the parameters' {dtype_name(next(iter(dtypes)))}"
                   f" (it is {dtype_name(other[0][1])}), or cast inside forward"
                   if other and len(dtypes) == 1
                   else "cast inside forward (x.to(layer.weight.dtype)), or analyse a float32 "
                        "copy (copy.deepcopy(model).float())")
            raise ValueError(
                f"{str(error).rstrip('. ')}. The call turned off the caller's torch.autocast "
                f"({', '.join(turned_off)}): the curvature is measured in the "
                f"parameters' own dtypes, and this forward runs only under autocast's casts: "
                f"{fix}") from error
        if len(dtypes) == 1 and other and of_dtypes:
            (dtype,), (label, found) = dtypes, other[0]
            refit = ("" if found in (torch.float16, torch.bfloat16)
                     else f" (or the model with .to({found}))")
            raise ValueError(
                f"{str(error).rstrip('. ')}. {label} is {found} but the model's parameters are "
                f"{dtype}: cast the batch with .to({dtype}){refit}, or cast inside "
                "forward") from error
        if _CAUSAL_HINT in str(error):
            # torch's fast path, which the caller's forward may take and a call turns off,
            # ignores the hint (probe 233)
            raise ValueError(
                f"{str(error).rstrip('. ')}. A transformer layer was given is_causal=True "
                "without a mask: torch's attention fast path, which a forward in eval mode "
                "without gradients (or of a frozen layer) takes, ignores the hint, so that "
                "forward attends to every position; hessrank runs the standard path, which "
                "needs the mask. Pass mask=nn.Transformer.generate_square_subsequent_mask(T) "
                "beside is_causal=True (the causal model), or drop the hint (the model your "
                "forward ran)") from error
        if type(error) is RuntimeError and any(  # torch's own, not its subclasses (OOM)
                phrase in str(error) for phrase in ("shape", "size", "dimension", "channels")):
            # torch names the operation's operands, not the batch (probe 57)
            shapes = ", ".join(f"{label} of shape {tuple(tensor.shape)}"
                               for label, tensor in labelled)
            raise RuntimeError(
                f"{str(error).rstrip('. ')}. The model's forward failed on the batch's "
                f"inputs ({shapes}): if their sizes past the batch dimension are not what the "
                "model's layers expect, that is the cause") from error
        raise
    finally:
        drawn = private.moved()
        private.restore()
    if drawn and notes is not None:
        note = (f"the forward pass draws from the model's own random generator ("
                f"{', '.join(drawn)}): every pass of the call drew what the model's next forward "
                "will, so the curvature is the loss's at that one draw, and the generator is left "
                "as it was")
        if note not in notes:
            notes.append(note)
    if isinstance(outputs, Tensor) and outputs.dtype in (torch.float16, torch.bfloat16):
        raise half_precision_error(
            f"the model returns {outputs.dtype} outputs (a cast at the end of forward, or "
            "torch.autocast inside it)", "Return the outputs in the parameters' dtype: remove "
            "the cast, or run the forward without autocast for the call")
    if not before.same_as(GlobalGenerators.read()):
        if mode == "train":
            cause = ("in mode='train' that is usually dropout inside a layer "
                     "(nn.MultiheadAttention(dropout=...), nn.LSTM/nn.GRU(dropout=...), "
                     "F.dropout(..., training=self.training), scaled_dot_product_attention("
                     "dropout_p=...)) or stochastic depth: use mode='eval' (the default), or set "
                     "those probabilities to 0 for the call")
        else:
            cause = ("even in evaluation mode (F.dropout(..., training=True) as in MC dropout, "
                     "noise added to activations, a random initial state): make the forward "
                     "deterministic for the call (a fixed mask or noise tensor), or draw from a "
                     "torch.Generator the module holds (self.generator = torch.Generator(); "
                     "every pass of the call then sees the draws the model's next forward "
                     "would, and the generator is left as it was)")
        raise ValueError(
            "the model's forward pass draws random numbers from a global generator (torch's, "
            "Python's or NumPy's), so the loss is random and its curvature undefined; " + cause)
    return outputs


def graph_nodes(roots: Iterable[Any]) -> Iterator[Any]:
    """Every node of the autograd graph reached from ``roots`` (``grad_fn``s; None ones
    skipped), each once."""
    return each_once(roots, lambda node: (child for child, _ in node.next_functions))


def custom_functions_in(outputs: Tensor, params: Sequence[Tensor]
                        ) -> dict[type[torch.autograd.Function], list[bool]]:
    """The custom ``torch.autograd.Function`` classes in the graph of ``outputs``, by name
    (aside torch's own and hessrank's, such as the log-softmax that
    :mod:`hessrank.curvature.saturation` puts in its place), each with which of its tensor
    arguments autograd differentiates in some call (their edges in the graph): hessrank
    differentiates through their backward as written (:func:`custom_functions_note`).

    Raises:
        ValueError: a block under ``torch.utils.checkpoint(use_reentrant=True)`` is in the graph
            and some of ``params`` (the analysed parameters) are not reached outside it
            (:func:`reentrant_checkpoint_error`): ``torch.autograd.grad`` does not go into it,
            so their curvature would be silently zero (on inputs that require grad; probe 149),
            or torch would refuse. Parameters outside it alone (``params=`` the head) are
            differentiated as they are (probe 150).
    """
    found: dict[type[torch.autograd.Function], list[bool]] = {}
    reached: set[int] = set()  # the leaves (parameters) the walk reaches
    checkpointed = False
    for node in graph_nodes([outputs.grad_fn]):
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            reached.add(id(leaf))
        function = getattr(node, "_forward_cls", None)
        checkpointed = checkpointed or function is CheckpointFunction
        if function is not None and not function.__module__.startswith(("torch.", "hessrank.")):
            found[function] = _either(found.get(function, []),
                                      [child is not None for child, _ in node.next_functions])
    if checkpointed and any(id(param) not in reached for param in params):
        raise reentrant_checkpoint_error()
    return dict(sorted(found.items(), key=lambda item: item[0].__qualname__))


def _either(first: Sequence[bool], second: Sequence[bool]) -> list[bool]:
    """Entry by entry, whether either flag is set (the shorter padded with False)."""
    length = max(len(first), len(second))
    return [bool(i < len(first) and first[i]) or bool(i < len(second) and second[i])
            for i in range(length)]


#: How the note of custom autograd.Functions opens (:func:`custom_functions_note`).
_CUSTOM_FUNCTIONS = "the model computes through custom autograd.Function(s)"


def custom_functions_note(classes: Iterable[type[torch.autograd.Function]]) -> str:
    """The note on the custom ``autograd.Function`` ``classes`` in the model's graph: a wrong
    backward gives a wrong curvature, and for second derivatives one that is not itself
    differentiable does too, which finite differences of each Function alone at its inputs
    check (:mod:`hessrank.curvature.differences`)."""
    return (f"{_CUSTOM_FUNCTIONS} ({', '.join(cls.__qualname__ for cls in classes)}): their "
            "backward is used as written, each checked alone against finite differences at "
            "the inputs the model gives it (the derivatives the method takes through it); "
            "torch.autograd.gradcheck and gradgradcheck check them everywhere")


def reentrant_checkpoint_error() -> ValueError:
    """The refusal of a model under ``torch.utils.checkpoint(use_reentrant=True)``, which only
    ``.backward()`` goes through: ``torch.autograd.grad`` raises inside it, or, with respect to
    the parameters alone, passes it by."""
    return ValueError(
        "the model uses torch.utils.checkpoint with use_reentrant=True, which hessrank's "
        "backward passes (torch.autograd.grad) cannot go through: pass use_reentrant=False, "
        "torch's recommended setting, with the same memory saving (or leave the parameters "
        "inside it out with params=)")


def tensor_outputs(outputs: object) -> Tensor:
    """``outputs``, which the model must return as a tensor.

    Raises:
        TypeError: the model returned something else (a dict, a tuple), naming the fix.
    """
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"the model returned {type(outputs).__name__}; hessrank needs a tensor of outputs "
            "(wrap the model so that forward returns the tensor the loss takes, e.g. logits)"
        )
    return outputs


class UnrepeatableLoss(ValueError):
    """``loss_fn`` is not a function of the outputs and targets alone within a call: it drew
    random numbers, or returned different values on the same outputs and targets."""


@dataclass
class _LossCheck:
    """Whether the running call has checked its loss yet (:func:`call_loss`)."""

    done: bool = False


#: The running call's loss check (:func:`loss_evaluations`); None outside a call.
_LOSS_CHECK: ContextVar[_LossCheck | None] = ContextVar("hessrank_loss_check", default=None)


@contextmanager
def loss_evaluations(loss_fn: object) -> Iterator[None]:
    """A call's frame for ``loss_fn``: its first evaluation is checked (:func:`call_loss`), and
    a loss module's state (buffers, plain attributes, the ``training`` flag: a running average
    it updates) is put back on exit, as the model's is
    (:func:`hessrank.guard.preserved_state`; a loss module that holds the model too, its own
    parts included, and its parameters left to it: a learned temperature it clamps in place is
    no write of the model's)."""
    token = _LOSS_CHECK.set(_LossCheck())
    try:
        with (preserved_state(loss_fn, refuse_writes=False) if isinstance(loss_fn, nn.Module)
              else nullcontext()):
            yield
    finally:
        _LOSS_CHECK.reset(token)


def call_loss(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """``loss_fn(outputs, targets)``, as every evaluation of the loss in a call runs it.

    A call evaluates the loss several times (``ggn`` four times, ``fisher`` three, a data set's
    batches at every product), so it must be one function of the outputs and the targets for
    the call. The call's first evaluation (:func:`loss_evaluations`) checks it: the loss must not
    draw from a global random generator (reading them costs about 80 us, twice), and a second
    evaluation on the same outputs and targets, without a graph, must return the same value (a
    fraction of a percent of a call: GPT's per-token cross-entropy, one of four log-softmax
    passes the call makes anyway). A loss that changes with each call (a temperature schedule,
    a counter or a running average it updates and reads) fails it.

    Raises:
        UnrepeatableLoss: the loss drew random numbers from a global generator, or returned
            another value on the same outputs and targets.
    """
    if isinstance(outputs, Tensor) and outputs.is_leaf and outputs.requires_grad:
        # an alias: a hook on a loss module's inputs (torch's ModuleTracker, which
        # FlopCounterMode installs) makes autograd.grad refuse a leaf, a raw error (probe 229)
        outputs = outputs.view_as(outputs)
    check = _LOSS_CHECK.get()
    if check is None or check.done:
        return loss_fn(outputs, targets)
    # the repeat's own copy: a loss that changes its outputs in place (f /= 2) is one function
    pristine = outputs.detach().clone()
    generators = GlobalGenerators.read()
    value = loss_fn(outputs, targets)
    if not generators.same_as(GlobalGenerators.read()):
        raise UnrepeatableLoss(
            "loss_fn draws random numbers from a global generator (torch's, Python's or "
            "NumPy's), so the loss is random and its curvature undefined: make it deterministic "
            "for the call (a fixed noise tensor, label smoothing in place of random labels)")
    if not isinstance(value, Tensor) or value.numel() != 1 or value.is_complex():
        return value  # the caller's checks name what is wrong (a complex value has no float())
    with torch.no_grad():
        again = loss_fn(pristine, targets)
    first = float(value.detach())
    later = float(again.detach()) if isinstance(again, Tensor) and again.numel() == 1 else math.nan
    if not _same_value(first, later, value.dtype):
        raise UnrepeatableLoss(
            f"loss_fn returned {first:.9g}, then {later:.9g} on the same outputs and targets: "
            "its value depends on more than (outputs, targets), on state that each call "
            "updates (a running average or a step counter it reads, a schedule, a temperature) "
            "or on draws from a random generator of its own (each evaluation draws anew; a "
            "generator a loss module holds is set back after the call), and a call evaluates "
            "it several times. Pass a loss with that state fixed for the call (for the "
            "curvature at the current state: lambda f, y: F.cross_entropy(f / "
            "current_temperature, y), or a loss module with its update switched off); a loss "
            "module's state is set back after the call")
    check.done = True
    return value


def _same_value(first: float, later: float, dtype: torch.dtype) -> bool:
    """Whether two values of the loss agree to rounding (NaN agrees with NaN)."""
    if first == later or (math.isnan(first) and math.isnan(later)):
        return True
    return abs(first - later) <= agreement_tolerance(dtype) * max(abs(first), abs(later))


def evaluate_loss(loss_fn: LossFn, outputs: object, targets: Tensor, finite: bool = True,
                  batch: Sequence[tuple[str, Tensor]] | None = None) -> Tensor:
    """``loss_fn(outputs, targets)``, checked to be a scalar (and finite, unless ``finite`` is
    False), with errors that help; ``batch``: the inputs and targets by label, whose first NaN
    or infinite entry a non-finite loss's error names (default: the targets').

    Raises:
        TypeError: the model's outputs are not a tensor.
        TypeError, ValueError, RuntimeError, IndexError: the loss cannot be evaluated on the
            outputs and the targets (the error's own type, its message extended with the shapes
            and dtypes involved), or it is not a finite scalar, or it has no graph to outputs
            that have one.
    """
    outputs = tensor_outputs(outputs)
    graphed = torch.is_grad_enabled()
    value = _loss_with_advice(loss_fn, outputs, targets)
    if torch.is_grad_enabled() != graphed:  # (read by its graph, a loss that turned gradients
        # off had been refused for it only where the call's outputs had one; probe 197)
        torch.set_grad_enabled(graphed)
        raise ValueError(
            f"loss_fn turned gradient computation {'off' if graphed else 'on'} and left it so "
            "(torch.set_grad_enabled outside a with block): the loss's graph, and every "
            "computation after it, depend on it. Switch it within a with block "
            "(with torch.no_grad(): ...), or not at all in the loss")
    if finite and isinstance(value, Tensor) and value.numel() == 1:
        _refuse_all_ignored(loss_fn, value, targets)
        if batch is not None and not all_finite(value.detach()) and all_finite(outputs):
            # finite outputs: no input entry made the loss so (a model that replaces missing
            # inputs had every underflowing loss blamed on their NaN; probe 225)
            batch = [("targets", targets)]
            if nonfinite_entry(batch) is None:
                raise ValueError(
                    f"the loss is {value.item()} at finite outputs and targets: loss_fn makes it "
                    "so (a log of zero, a division by zero, an overflow: a hand-written "
                    "-log(softmax(f)) underflows where F.cross_entropy does not); check loss_fn "
                    "at these outputs")
    check_loss(value, finite, targets, batch)
    # (under no_grad the loss has no graph whatever it is: outputs that have one, a forward
    # taking a gradient inside enable_grad, had ggn told its plain MSELoss was detached;
    # probe 194)
    if outputs.requires_grad and graphed and not value.requires_grad:
        raise ValueError(
            "loss_fn returned a value without a graph to the outputs (detached, computed under "
            "torch.no_grad(), through .item() or NumPy, or a constant such as "
            "outputs.new_zeros(()) for a batch whose targets are all ignored): there is nothing "
            "to differentiate. Return the loss as a tensor computed from the outputs with torch "
            "operations (e.g. nn.functional.cross_entropy(outputs, targets))")
    return value


def _loss_tensors(loss_fn: object, bound: object = None) -> list[tuple[str, Tensor]]:
    """The tensors ``loss_fn`` holds besides its inputs, by name: a module's parameters and
    buffers; the variables a Python function captures or the module-level names it reads, and
    their attributes (``cfg.weight``, and ``self.weight`` of a method or a callable object,
    ``bound`` its ``self``); a ``functools.partial``'s arguments; a ``functools.wraps``
    wrapper's function's (a float64 class weight captured by a lambda on a float32 model had
    failed with advice about the targets). Attributes are read without running properties or
    ``__getattr__``."""
    if isinstance(loss_fn, nn.Module):
        return [*loss_fn.named_parameters(), *loss_fn.named_buffers()]
    if isinstance(loss_fn, functools.partial):
        held = {**{f"positional argument {i}": value for i, value in enumerate(loss_fn.args)},
                **loss_fn.keywords}
        return [*((name, value) for name, value in held.items() if isinstance(value, Tensor)),
                *_loss_tensors(loss_fn.func)]
    if isinstance(loss_fn, types.MethodType):
        return _loss_tensors(loss_fn.__func__, bound=loss_fn.__self__)
    if not isinstance(loss_fn, types.FunctionType):
        call = inspect.getattr_static(type(loss_fn), "__call__", None)  # a callable object's
        return (_loss_tensors(call, bound=loss_fn) if isinstance(call, types.FunctionType)
                else [])
    wrapped = loss_fn.__dict__.get("__wrapped__")  # (functools.wraps)
    code, names = loss_fn.__code__, loss_fn.__globals__
    owner = code.co_varnames[0] if bound is not None and code.co_argcount else None
    cells: dict[str, object] = {}
    for name, cell in zip(code.co_freevars, loss_fn.__closure__ or ()):
        with suppress(ValueError):  # (a cell not yet assigned is empty)
            cells[name] = cell.cell_contents
    found: dict[str, Tensor] = {}
    instructions = list(dis.get_instructions(code))
    for index, instruction in enumerate(instructions):
        name = instruction.argval
        if instruction.opname == "LOAD_DEREF" and name in cells:
            value = cells[name]
        elif instruction.opname == "LOAD_FAST" and name == owner:  # self
            value = bound
        elif instruction.opname == "LOAD_GLOBAL" and name in names:
            value = names[name]
        else:
            continue
        path = str(name)
        for attribute in instructions[index + 1:]:
            if isinstance(value, Tensor):
                found[path] = value
            if attribute.opname not in ("LOAD_ATTR", "LOAD_METHOD"):
                break
            try:
                value = inspect.getattr_static(value, attribute.argval)
            except AttributeError:
                break
            path = f"{path}.{attribute.argval}"
    return [*found.items(), *(_loss_tensors(wrapped) if wrapped is not None else [])]


def _loss_with_advice(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """:func:`call_loss`, its errors extended with the shapes and dtypes involved and the fix.

    Raises:
        TypeError, ValueError, RuntimeError, IndexError: the loss cannot be evaluated on the
            outputs and the targets (the error's own type).
    """
    try:
        return call_loss(loss_fn, outputs, targets)
    except UnrepeatableLoss:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise_if_signalled(error)
        module = isinstance(loss_fn, nn.Module)
        own = [(name, tensor.dtype) for name, tensor in _loss_tensors(loss_fn)
               if tensor.is_floating_point() and tensor.dtype != outputs.dtype]
        message = str(error).lower()
        if own and "target" not in message and (module or "dtype" in message
                                                or "scalar type" in message):
            named = own[0][0]
            example = (f"nn.CrossEntropyLoss(weight=w.to({outputs.dtype}))" if module else
                       f"{named}.to({outputs.dtype})" if named.replace(".", "").isidentifier()
                       else f"tensor.to({outputs.dtype})")
            advice = (f"The loss's own tensors are not in the outputs' dtype "
                      f"({', '.join(f'{name} ({dtype})' for name, dtype in own)}): cast them to "
                      f"{outputs.dtype} (e.g. {example})")
        elif "leaf Variable that requires grad is being used in an in-place" in str(error):
            advice = ("loss_fn modifies the outputs in place (f /= T, f.relu_(), "
                      "f.masked_fill_(...)), which the call's leaf copies of them cannot take: "
                      "make those operations out of place (f = f / T, f.masked_fill(...))")
        elif isinstance(error, TypeError) and "required positional argument" in str(error):
            # (nn.GaussianNLLLoss passed as it is had been told to check its targets; probe 116)
            advice = ("hessrank calls loss_fn(outputs, targets): a loss with more inputs goes in "
                      "a function that makes them from the outputs, e.g. for nn.GaussianNLLLoss "
                      "lambda f, y: nn.GaussianNLLLoss()(f[:, :k], y, f[:, k:].exp())")
        elif _other_target_dtype(outputs, targets) and "dtype" in str(error):
            advice = _TARGET_DTYPE_FIX.format(dtype=outputs.dtype)
        elif not targets.is_floating_point() and "can't be cast" in str(error):
            advice = ("This loss takes floating-point targets (nn.BCEWithLogitsLoss's 0/1 labels, "
                      "regression values): cast them with targets.float(), or to "
                      f"{outputs.dtype}")
        else:
            advice = f"Check the targets' shape, dtype and values ({_targets_example(loss_fn)})"
        where = (f"loss_fn(outputs, targets) failed on outputs of shape "
                 f"{tuple(outputs.shape)} ({outputs.dtype}) and targets of shape "
                 f"{tuple(targets.shape)} ({targets.dtype})")
        raise_extended(error, f"{where}: {str(error).rstrip('. ')}. {advice}",
                       f"{where}. {advice}")


#: The exception types whose message :func:`raise_extended` rewrites: Python's own (torch
#: raises these too), whose constructor takes the message alone.
_OWN_TYPES = (TypeError, ValueError, RuntimeError, IndexError)


def raise_extended(error: Exception, message: str, note: str) -> NoReturn:
    """Raise ``error`` with more said: as the same type with ``message`` where it is one of
    Python's own, else as it is with ``note`` added (Python 3.11's ``add_note``). A type of a
    user's own may take other constructor arguments and hold attributes of its own, which a
    rebuild had corrupted (a code of 42 replaced by the message; probe 134).

    Raises:
        Exception: ``error``, extended.
    """
    if type(error) in _OWN_TYPES:
        raise type(error)(message) from error
    if hasattr(error, "add_note"):
        error.add_note(note)
    raise error


def _targets_example(loss_fn: LossFn) -> str:
    """What targets ``loss_fn`` takes, by example, for the advice on a loss that failed on
    them (every loss had been given cross-entropy's; probe 133)."""
    function = getattr(loss_fn, "func", loss_fn)  # a functools.partial's
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) or function in (
            F.cross_entropy, F.nll_loss):
        return "e.g. class indices in [0, C) as int64 of shape [n] for nn.CrossEntropyLoss"
    if isinstance(loss_fn, (nn.BCELoss, nn.BCEWithLogitsLoss)) or function in (
            F.binary_cross_entropy, F.binary_cross_entropy_with_logits):
        return "floating 0/1 labels of the outputs' shape, as outputs.dtype"
    if isinstance(loss_fn, (nn.MSELoss, nn.L1Loss, nn.HuberLoss, nn.SmoothL1Loss)) or function in (
            F.mse_loss, F.l1_loss, F.huber_loss, F.smooth_l1_loss):
        return "floating values of the outputs' shape, as outputs.dtype"
    return "and that loss_fn takes (outputs, targets), in that order"


def _refuse_all_ignored(loss_fn: LossFn, value: Tensor, targets: Tensor) -> None:
    """Raise where the loss is not finite because every target is the loss's ``ignore_index``
    (torch's default -100 for a function): a mean over no targets is 0 / 0.

    Raises:
        ValueError: naming the cause and the fix.
    """
    if targets.is_floating_point() or bool(torch.isfinite(value.detach()).all()):
        return
    keywords = getattr(loss_fn, "keywords", None)  # a functools.partial's
    ignored = getattr(loss_fn, "ignore_index",  # a module's
                      keywords.get("ignore_index", -100) if isinstance(keywords, dict) else -100)
    if isinstance(ignored, int) and targets.numel() and bool((targets == ignored).all()):
        raise ValueError(
            f"the loss is {value.item()}: every target is {ignored}, the loss's ignore_index, "
            "so a mean over the targets that count divides by zero and the batch has no "
            "curvature; pass a batch with targets that count (in a data set, such a batch is "
            "weighed 0 and allowed)")
    weight = getattr(loss_fn, "weight", None)  # a class-weighted mean's normaliser (probe 230)
    counted = targets[targets != ignored] if isinstance(ignored, int) else targets.reshape(-1)
    if (isinstance(weight, Tensor) and weight.dim() == 1 and counted.numel()
            and bool((counted >= 0).all()) and bool((counted < weight.numel()).all())
            and float(weight[counted].sum()) == 0.0):
        raise ValueError(
            f"the loss is {value.item()}: the class weights of every target sum to zero (the "
            "targets' classes weigh 0), so the weighted mean divides by zero and the batch has "
            "no curvature; pass a batch with targets of weighted classes (in a data set, such a "
            "batch is weighed 0 and allowed)")


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite, by one reduction (:func:`each_all_finite`)."""
    return each_all_finite([tensor])[0]


def each_all_finite(tensors: Sequence[Tensor]) -> list[bool]:
    """Whether every entry of each tensor is finite, by one reduction a tensor, read together
    (:func:`~hessrank.host.host_floats`).

    A NaN or Inf entry makes the sum non-finite; a sum that overflowed from finite entries alone is
    told apart by the entry-by-entry check.
    """
    sums_finite = host_floats([torch.isfinite(tensor.sum()) for tensor in tensors])
    return [bool(finite) or bool(torch.isfinite(tensor).all())
            for finite, tensor in zip(sums_finite, tensors)]


def broadcast_hint(outputs: Tensor, targets: Tensor, loss_fn: LossFn | None = None,
                   value: Tensor | None = None) -> str | None:
    """The likely cause where the outputs and floating targets of as many entries broadcast to
    a larger shape (``[n, 1]`` against ``[n]`` gives ``[n, n]``: an elementwise loss then pairs
    every output with every target), else None. With ``loss_fn`` and its ``value`` at them,
    only where the loss shows it: its value differs from its values with the targets in the
    outputs' shape and with the outputs in the targets' (a loss that squeezes the outputs
    itself pairs them rightly, and had been told it did not; probe 139). Two evaluations of the
    loss without a graph, where the shapes differ so.
    """
    if (not targets.is_floating_point() or targets.shape == outputs.shape
            or targets.numel() != outputs.numel()):
        return None
    try:
        joint = torch.broadcast_shapes(outputs.shape, targets.shape)
    except RuntimeError as error:
        raise_if_signalled(error)
        return None
    if joint == outputs.shape:
        return None
    if loss_fn is not None and value is not None and value.numel() == 1:
        detached = outputs.detach()
        for pair in ((detached, targets.view_as(outputs)), (detached.view_as(targets), targets)):
            try:
                with torch.no_grad():
                    aligned = loss_fn(*pair)
            except Exception as error:  # noqa: BLE001 - the loss does not take these shapes
                raise_if_signalled(error)
                continue
            if (isinstance(aligned, Tensor) and aligned.numel() == 1 and _same_value(
                    float(value.detach().real), float(aligned.real), value.dtype)):
                return None
    return (f"The outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} broadcast "
            f"to {tuple(joint)}: an elementwise loss pairs every output with every target; give "
            "them one shape (targets.view_as(outputs))")


def half_precision_error(what: str, fix: str) -> ValueError:
    """The refusal of ``what`` computed in float16 or bfloat16, with its ``fix``."""
    return ValueError(f"{what}: half precision keeps about 3 digits, so the curvature would "
                      f"carry errors of 1e-4 to 1e-2 of its largest eigenvalue. {fix}")


def check_loss(value: object, finite: bool = True, targets: Tensor | None = None,
               batch: Sequence[tuple[str, Tensor]] | None = None) -> None:
    """Raise if the loss is not a scalar tensor in single or double precision, or (``finite``)
    not a finite one; ``targets``, where given, for the cause of a half-precision loss, and
    with ``batch`` (the inputs and targets by label, default the targets) of a non-finite
    one."""
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
    if value.is_complex():
        raise ValueError(
            f"loss_fn returned a {value.dtype} loss: a Hessian needs a real loss to minimise; "
            "return a real one, such as the squared modulus loss.abs() ** 2 or loss.real")
    if value.dtype in (torch.float16, torch.bfloat16):
        # (each method had named another cause: asymmetric products, samples that interact;
        # probe 72)
        if targets is not None and targets.dtype == value.dtype:  # (a cast was blamed; probe 116)
            raise half_precision_error(
                f"loss_fn returned a {value.dtype} loss, the dtype of the targets, to which the "
                "loss promotes its result (nn.BCEWithLogitsLoss with half-precision 0/1 labels)",
                "Pass the targets in the outputs' dtype: targets.float()")
        raise half_precision_error(
            f"loss_fn returned a {value.dtype} loss (a cast inside it, such as "
            "F.cross_entropy(outputs.bfloat16(), targets), or torch.autocast inside it)",
            "Compute the loss in the outputs' dtype: remove the cast, or the autocast")
    if finite and not torch.isfinite(value.detach()).all():
        cause = nonfinite_entry(batch if batch is not None
                                else [] if targets is None else [("targets", targets)])
        raise ValueError(
            f"the loss is {value.item()}: the curvature of a non-finite loss is undefined; "
            + ("check the model's outputs, the targets and the inputs for NaN or infinite "
               "entries" if cause is None else f"{cause}, likely the cause")
            + " (a NaN or infinite entry the model or the loss replaces or masks is fine: "
            "torch.where(x.isnan(), fill, x), an additive mask's -inf before a softmax)."
        )


def check_number(name: str, value: object, *, low: float = 0.0, high: float = math.inf,
                 allow_none: bool = False, inclusive_low: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a real number in range.

    Args:
        name: the argument's name, as the caller wrote it.
        value: what was passed.
        low, high: the open interval ``(low, high]`` (``[low, high]`` with ``inclusive_low``).
        allow_none: whether ``None`` is accepted.

    Raises:
        ValueError: for NaN, a non-number, or a value out of range.
    """
    if value is None and allow_none:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or math.isnan(float(value))):  # NumPy's floats and integers are numbers.Real too
        fix = (": pass a Python number (float(t) of a one-element tensor or array)"
               if hasattr(value, "item") else "")
        raise ValueError(f"{name} must be a number, got {value!r}{fix}")
    number = float(value)
    below = number < low if inclusive_low else number <= low
    if below or number > high:
        bracket = "[" if inclusive_low else "("
        raise ValueError(f"{name} must lie in {bracket}{low:g}, {high:g}], got {value!r}")


def check_count(name: str, value: object, what: str = "a count", hint: str = "") -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an integer >= 0 (a Python or NumPy
    integer, not a bool); ``what`` and ``hint`` complete the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be {what} >= 0{hint}, got {value!r}")


def _wrapper_layers(model: nn.Module) -> Iterator[tuple[nn.Module, nn.Module, str]]:
    """``(wrapper, the module it wraps, the prefix it puts before that module's parameter
    names)`` for each wrapper :func:`unwrap_model` looks through, outermost first, in any order:
    ``torch.compile``'s, ``DistributedDataParallel``'s and ``nn.DataParallel``'s."""
    while True:
        if is_compile_wrapper(model):
            inner, prefix = cast(nn.Module, model._orig_mod), "_orig_mod."  # (dynamo is not
            # imported to type it)
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            inner, prefix = model.module, "module."
        else:
            return
        yield model, inner, prefix
        model = inner


def unwrap_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module whose parameters the analysis differentiates, and what was unwrapped.

    ``torch.compile(model)`` returns a wrapper around ``model`` (same parameters): the curvature is
    that of the original function, analysed eagerly (hooks and ``torch.func`` need the eager
    module). ``DistributedDataParallel`` wraps its ``.module`` likewise; analysing it directly
    keeps DDP's gradient all-reduce and its state out of the call. ``nn.DataParallel`` too: the
    function of the whole batch is the same, without the per-call replicas.
    """
    notes = []
    for wrapper, inner, _ in _wrapper_layers(model):
        _refuse_wrapper_hooks(wrapper)
        if is_compile_wrapper(wrapper):
            notes.append("torch.compile wrapper: the original module was analysed eagerly "
                         "(same parameters, same function)")
        elif isinstance(wrapper, nn.parallel.DistributedDataParallel):
            notes.append("DistributedDataParallel wrapper: its .module was analysed")
        else:
            # Its forward replicates the module on every GPU and splits the batch: each replica
            # would run the capture hooks, and torch.func cannot follow the scatter.
            notes.append("nn.DataParallel wrapper: its .module was analysed on one device (the "
                         "curvature of the whole batch, as the wrapper computes it)")
        model = inner
    return model, notes


def ddp_among_wrappers(model: nn.Module
                       ) -> tuple[nn.parallel.DistributedDataParallel | None, frozenset[str]]:
    """The ``DistributedDataParallel`` among the wrappers :func:`unwrap_model` removes, in any
    order with ``torch.compile`` and ``nn.DataParallel``, and the names of what it leaves
    alone (its ``parameters_to_ignore``) relative to the module analysed. (Only an outermost
    DDP had been seen, and its names kept a compile wrapper's ``_orig_mod.`` prefix, so that
    a buffer it ignores was broadcast all the same; probe 208.)"""
    ddp, ignored = None, frozenset[str]()
    for wrapper, _, prefix in _wrapper_layers(model):
        if isinstance(wrapper, nn.parallel.DistributedDataParallel):
            if ddp is None:  # (its names are its module's already)
                ddp, ignored = wrapper, frozenset(getattr(wrapper, "parameters_to_ignore", ()))
        else:
            ignored = frozenset(name.removeprefix(prefix) for name in ignored)
    return ddp, ignored


def _refuse_wrapper_hooks(wrapper: nn.Module) -> None:
    """Raise where forward hooks or pre-hooks sit on a wrapper :func:`unwrap_model` looks
    through: ``wrapper(x)`` runs them, the wrapped module alone would not (a hook scaling the
    output had given a top eigenvalue 10 times too small, with a note saying "same function";
    probe 149).

    Raises:
        ValueError: the wrapper has forward hooks or forward pre-hooks.
    """
    hooks = len(wrapper._forward_hooks) + len(wrapper._forward_pre_hooks)
    if hooks:
        inner = "_orig_mod" if is_compile_wrapper(wrapper) else "module"
        raise ValueError(
            f"the model's {type(wrapper).__name__} wrapper has {hooks} forward hook(s) or "
            f"pre-hook(s) of its own: hessrank analyses the wrapped module (model.{inner}), "
            "which they would not reach, so its function would not be the one you train; "
            f"register them on model.{inner} instead (the wrapper's call runs them there too)")


def _batch_tensors(
    raw_inputs: object,
) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """Split ``inputs`` into positional and keyword tensors, or raise naming the form expected."""
    if isinstance(raw_inputs, Tensor):
        return (raw_inputs,), {}
    if isinstance(raw_inputs, Mapping):
        bad = [k for k, v in raw_inputs.items() if not isinstance(k, str) or
               not isinstance(v, Tensor)]
        if bad or not raw_inputs:
            raise TypeError("inputs given as a mapping must map argument names (str) to tensors, "
                            f"for model(**inputs); offending keys: {bad or 'none (empty)'}"
                            + (_CONSTANTS_ADVICE if bad else ""))
        return (), dict(raw_inputs)
    if isinstance(raw_inputs, (tuple, list)) and raw_inputs and all(
        isinstance(x, Tensor) for x in raw_inputs
    ):
        return tuple(raw_inputs), {}
    positions = ([i for i, x in enumerate(raw_inputs) if not isinstance(x, Tensor)]
                 if isinstance(raw_inputs, (tuple, list)) else [])
    raise TypeError(
        f"inputs must be a tensor, a non-empty tuple of tensors (model(*inputs)) or a dict of "
        f"tensors (model(**inputs)), got {type(raw_inputs).__name__}"
        + (f" with non-tensors at positions {positions}{_CONSTANTS_ADVICE}" if positions else "")
    )


#: The fix for arguments that are not batch data (flags, scales, ``None``).
_CONSTANTS_ADVICE = (
    ". Every input is batch data, sliced per sample; pass constant arguments (flags, scales, "
    "None) from a wrapper module instead, e.g. one holding self.inner = model whose "
    "forward(self, x) returns self.inner(x, scale=2.0)"
)


def labelled_inputs(args: Sequence[Tensor], kwargs: Mapping[str, Tensor]
                    ) -> list[tuple[str, Tensor]]:
    """The inputs by the names errors give them: ``inputs[0]``, ``inputs['mask']``."""
    return [*((f"inputs[{i}]", x) for i, x in enumerate(args)),
            *((f"inputs[{key!r}]", x) for key, x in kwargs.items())]


def _usable(tensor: Tensor, copy: bool) -> Tensor:
    """A caller's batch tensor as the analysis uses it: detached, a normal (non-inference)
    tensor, so that a call made under ``torch.inference_mode()`` can still differentiate (a
    clone made inside the call, which runs outside inference mode, is one), and (``copy``) the
    call's own copy, so that a forward that modifies its input in place leaves the caller's
    batch alone."""
    if copy or tensor.is_inference():
        return tensor.detach().clone()
    return tensor.detach()


def check_call(model: object, loss_fn: object, mode: object) -> None:
    """The checks that must pass before anything else runs: the model, the loss and the mode.

    Raises:
        TypeError, ValueError: naming the argument and the fix.
    """
    check_model(model)
    check_loss_and_mode(loss_fn, mode)


def check_model(model: object) -> None:
    """The model: a module with initialised parameters that autograd can differentiate.

    Raises:
        TypeError, ValueError: naming the problem and the fix.
    """
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise TypeError(f"model is the class {model.__name__}, not a module: pass an instance "
                        f"of it, {model.__name__}(...)")
    if isinstance(model, nn.modules.loss._Loss) and not any(True for _ in model.parameters()):
        raise TypeError(f"model is a loss, {type(model).__name__}: the arguments are "
                        "effective_rank(model, loss_fn, batch), the network first")
    if not isinstance(model, nn.Module):
        kind = "a function" if callable(model) else type(model).__name__
        raise TypeError(
            f"model must be a torch.nn.Module, got {kind}: wrap a function in a module whose "
            "forward calls it and whose parameters are nn.Parameters"
        )
    _check_not_scripted(model, "the model")
    _refuse_sharded_parameters(model)
    lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(
            f"the model has uninitialised lazy parameters ({', '.join(lazy[:4])}"
            f"{', ...' if len(lazy) > 4 else ''}): run one forward pass on a batch first "
            "(model(inputs)), which gives them their shapes"
        )
    _refuse_inference_tensors(model, "the model")


def _refuse_sharded_parameters(model: nn.Module) -> None:
    """Refuse a model whose parameters are shards: wrapped in ``FullyShardedDataParallel`` (its
    flat parameters) or ``fully_shard`` / tensor parallelism (``DTensor`` parameters). Each
    process holds a piece of every weight, where the Hessian needs them whole (FSDP2's had
    failed in the call's snapshot with torch's bare "Cannot flatten unevenly sharded tensor",
    FSDP1's had been blamed on parameters differing between the processes; probe 242). Read
    only where torch's modules for them are loaded: a model cannot hold them otherwise.

    Raises:
        ValueError: naming the wrapper and the fix, a full copy in a plain module.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    dtensor = sys.modules.get("torch.distributed.tensor")
    wrapper = None if fsdp is None else next(
        (module for module in model.modules()
         if isinstance(module, fsdp.FullyShardedDataParallel)), None)
    sharded = [] if dtensor is None else [name for name, parameter in model.named_parameters()
                                          if isinstance(parameter, dtensor.DTensor)]
    if wrapper is None and not sharded:
        return
    kind = ("wrapped in FullyShardedDataParallel" if wrapper is not None else
            f"sharded across processes (DTensor parameters: {', '.join(sharded[:3])}"
            f"{', ...' if len(sharded) > 3 else ''}; fully_shard or tensor parallelism)")
    raise ValueError(
        f"the model is {kind}: each process holds a piece of its weights, and the curvature "
        "needs them whole. Give hessrank a full copy in a plain module: state = "
        "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
        "options=StateDictOptions(full_state_dict=True)); plain = YourModel(); "
        "plain.load_state_dict(state); then effective_rank(plain, ..., "
        "process_group=torch.distributed.group.WORLD) with each process's shard of the batch")


def _refuse_inference_tensors(module: nn.Module, what: str) -> None:
    """Refuse ``module`` (``what`` names it) where its parameters or buffers are inference
    tensors: the call cannot differentiate through them nor snapshot them (a loss module's
    class weight made under ``inference_mode`` had failed with torch's bare "Inference tensors
    do not track version counter"; probe 212).

    Raises:
        ValueError: naming the tensors and the fix.
    """
    frozen = [name for name, tensor in (*module.named_parameters(), *module.named_buffers())
              if tensor.is_inference()]
    if frozen:
        raise ValueError(
            f"{what} holds inference tensors ({', '.join(frozen[:3])}"
            f"{', ...' if len(frozen) > 3 else ''}): it was built or loaded under "
            "torch.inference_mode(), and autograd cannot differentiate through such tensors. "
            "Build it outside inference_mode, or replace them by clones (outside it): for each "
            "module, setattr(module, name, nn.Parameter(p.clone())) for its parameters and "
            "setattr(module, name, b.clone()) for its buffers"
        )


def _check_not_scripted(module: nn.Module, what: str) -> None:
    """Refuse a TorchScript module in ``module`` (``what`` names it): its parameter and buffer
    tables are C++ objects that the call's restore cannot put back (a scripted loss's class
    weight had been left another tensor after a failed call, and every method failed; probe
    116).

    Raises:
        TypeError: naming the scripted module and the fix.
    """
    scripted = [name or "itself" for name, sub in module.named_modules()
                if isinstance(sub, torch.jit.ScriptModule)]
    if scripted:
        where = "" if scripted[0] == "itself" else f" (its submodule {scripted[0]!r})"
        raise TypeError(
            f"{what}{where} is a TorchScript module (torch.jit.script or torch.jit.trace), "
            "which hessrank does not take: its parameter and buffer tables are C++ objects "
            "that the call can neither swap nor put back; pass the nn.Module it was made from "
            "(a torch.compile'd module works)")


def check_loss_and_mode(loss_fn: object, mode: object) -> None:
    """A callable loss and a mode of :func:`hessrank.effective_rank`.

    Raises:
        TypeError, ValueError: naming the argument and the fix.
    """
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, targets) -> scalar tensor")
    if isinstance(loss_fn, type) and issubclass(loss_fn, nn.Module):
        raise TypeError(f"loss_fn is the class {loss_fn.__name__}, not a loss: pass an instance "
                        f"of it, {loss_fn.__name__}()")
    if isinstance(loss_fn, nn.Module):
        _check_not_scripted(loss_fn, "loss_fn")
        _refuse_inference_tensors(loss_fn, "loss_fn")
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")


def build_problem(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params: Iterable[Tensor | str] | None,
    mode: str,
) -> CurvatureProblem:
    """Validate every argument (types, shapes, dtypes, finiteness, parameters); build the problem.

    Raises:
        TypeError, ValueError: naming the argument at fault and the fix.
    """
    check_call(model, loss_fn, mode)
    model, notes = unwrap_model(model)
    args, kwargs, targets, labelled = _read_batch(batch)
    _check_inputs_fit(model, args, kwargs)
    names, selected, excluded = _select_parameters(model, params)
    if params is not None and excluded:  # asked for by name or tensor, and left out
        notes.append(f"params= names frozen parameters ({listed_names(list(excluded))}): left "
                     "out (requires_grad=False); set requires_grad=True to analyse them")
    dtypes = {p.dtype for p in selected}
    if len(dtypes) > 1:
        by_dtype = {str(dtype): [name for name, p in zip(names, selected) if p.dtype == dtype]
                    for dtype in dtypes}
        raise ValueError(
            "the analysed parameters have mixed dtypes ("
            + "; ".join(f"{dtype}: {listed_names(found)}" for dtype, found in
                        sorted(by_dtype.items())) + "): cast the model to one dtype "
            "(model.float() or model.double()), or analyse one dtype's parameters (params=)")
    dtype = next(iter(dtypes))
    if dtype not in SUPPORTED_DTYPES:
        advice = ("half precision loses too many digits for second derivatives"
                  if dtype in (torch.float16, torch.bfloat16)
                  else "the curvature of a real loss needs real parameters")
        raise ValueError(
            f"the model's parameters are {dtype}: {advice}. Analyse a float32 copy: "
            "hessrank.effective_rank(copy.deepcopy(model).float(), ...) with float32 inputs"
        )
    devices = {p.device for p in selected}
    if len(devices) > 1:
        raise ValueError(f"parameters live on several devices {devices}; move the model to one")
    device = next(iter(devices))
    if device.type == "meta":
        raise ValueError(
            "the model's parameters are on the meta device: they have shapes but no values, "
            "so there is no curvature to measure. Materialise the model first "
            "(model.to_empty(device='cpu'), then load its weights)")
    _check_placement(labelled, device)
    for name, finite in zip(names, each_all_finite([p.detach() for p in selected])):
        if not finite:
            raise ValueError(f"parameter {name!r} contains NaN or Inf: the curvature is undefined")
    notes.extend(_mode_notes(model, mode))
    notes.extend(_embedding_notes(model, {id(p) for p in selected}))
    if isinstance(loss_fn, nn.Module):  # (left out without a word; probe 138)
        # (not the model's own, which a regulariser holding the model reaches too; probe 139)
        own = {id(p) for p in model.parameters()}
        held = [name for name, p in loss_fn.named_parameters()
                if p.requires_grad and id(p) not in own]
        if held:
            notes.append(f"loss_fn's own trainable parameters ({listed_names(held)}) are held "
                         "fixed: the curvature is w.r.t. the model's parameters alone; to "
                         "include them, move them into the model")
    if mode == "train":
        active_dropout = [name for name, m in model.named_modules()
                          if m.training and _drops_out(m)]
        if active_dropout:
            raise ValueError(
                f"mode='train' with active dropout ({', '.join(active_dropout)}) makes the loss "
                "random and its curvature undefined: use mode='eval' (the default)"
            )
        frozen_statistics = [f"{type(m).__name__} {name!r}" for name, m in model.named_modules()
                             if isinstance(m, _NORM_WITH_STATISTICS) and not m.training
                             and m.track_running_stats]
        if frozen_statistics:
            notes.append(
                f"mode='train' keeps the training flags as set: {listed_names(frozen_statistics)} "
                "in eval mode normalise with their running statistics, not the batch's; call "
                "model.train() first for batch statistics"
            )
    return CurvatureProblem(model=model, loss_fn=loss_fn, names=names, params=selected,
                            excluded=excluded, mode=mode, notes=notes,
                            state_bytes=state_bytes(model),
                            loss_state_bytes=loss_copy_bytes(loss_fn, dtype),
                            **_batch_fields(args, kwargs, targets))


#: How far, against the largest output, an output the loss reads may move between torch's
#: nested-tensor fast path and the standard path before the two count as other functions
#: (their kernels' rounding: 2.4e-7 of a float32 encoder's features, measured).
FAST_PATH_AGREEMENT = 1e-3


def refuse_the_nested_fast_path(problem: CurvatureProblem,
                                standard: Callable[[], object] | None = None) -> None:
    """Refuse a model whose forward, run as its caller runs it (gradients on, torch's attention
    fast path as the caller set it), computes other outputs than the standard path a call
    differentiates, where the loss reads them: an ``nn.TransformerEncoder`` in eval mode whose
    parameters and input need no gradient (a frozen encoder under a linear probe) given a
    ``src_key_padding_mask`` runs as nested tensors and returns zeros at the padded positions,
    where the standard path computes values; pooled over every position, the probe's Hessian
    had come out 80 % off, with no note (probe 233). Only for a model holding such an encoder
    while the caller's fast path is on: a forward without a graph (unless ``standard`` gives
    its outputs: the call's own probing pass, or a data set's survey) and one with, no more
    than the work's own forward holds (run after the budget's check: before it, a prompt-tuned
    encoder's two graphs had doubled the peak before a refusal; probe 236), on every batch of
    a data set (its survey's).

    Raises:
        ValueError: naming the encoders and the fixes.
    """
    encoders = [name or "(root)" for name, module in problem.model.named_modules()
                if isinstance(module, nn.TransformerEncoder)
                and getattr(module, "use_nested_tensor", False)]
    if not encoders or not CALLER_FAST_PATH.get():
        return
    with evaluation_mode(problem.model, problem.mode):
        if standard is None:
            with torch.no_grad():
                outputs = run_model(problem.model, problem.args, problem.kwargs, problem.mode)
        else:
            outputs = standard()  # type: ignore[assignment]
        with torch.enable_grad(), attention_fast_path(True):
            fast = run_model(problem.model, problem.args, problem.kwargs, problem.mode)
    if (not isinstance(outputs, Tensor) or not isinstance(fast, Tensor)
            or fast.shape != outputs.shape or not outputs.is_floating_point()):
        return  # (what the call's own checks refuse)
    outputs, fast = outputs.detach(), fast.detach()
    read = output_gradient(problem.loss_fn, outputs, problem.targets) != 0
    scale = float(outputs.abs().max())
    moved = float(((fast - outputs).abs() * read).max()) if outputs.numel() else 0.0
    if moved > FAST_PATH_AGREEMENT * scale:
        raise ValueError(
            f"the model's forward, run as in training, takes torch's nested-tensor fast path "
            f"through {listed_names(encoders)} (an nn.TransformerEncoder in eval mode whose "
            "parameters and input need no gradient, given src_key_padding_mask), which "
            "returns zeros at the padded positions, where the standard path that derivatives "
            f"go through computes values; the loss reads outputs that move by {moved:.3g} "
            f"(largest output {scale:.3g}) between the two, so their curvatures differ. Pool "
            "over the unpadded positions only (a masked mean), so that both paths give the "
            "same loss, or build the encoder with enable_nested_tensor=False (training then "
            "runs the standard path too)")


def _batch_fields(args: tuple[Tensor, ...], kwargs: dict[str, Tensor], targets: Tensor
                  ) -> dict[str, Any]:
    """The fields of a :class:`CurvatureProblem` that the caller's batch sets: its tensors as
    the analysis uses them (:func:`_usable_batch`), whether the caller's inputs require grad,
    and the bytes the call copied."""
    usable = _usable_batch(args, kwargs, targets)
    return {"args": usable[0], "kwargs": usable[1], "targets": usable[2],
            "inputs_require_grad": any(x.requires_grad for x in (*args, *kwargs.values())),
            "batch_copy_bytes": _copied_bytes((*args, *kwargs.values(), targets),
                                             (*usable[0], *usable[1].values(), usable[2]))}


def _copied_bytes(given: Sequence[Tensor], usable: Sequence[Tensor]) -> int:
    """Bytes of the ``usable`` tensors that are copies of the ``given`` ones (each once)."""
    copies = {id(copy): copy for tensor, copy in zip(given, usable)
              if copy.numel() and copy.untyped_storage().data_ptr()
              != tensor.untyped_storage().data_ptr()}
    return sum(copy.numel() * copy.element_size() for copy in copies.values())


#: Copies of a loss module's state its guard holds (the values it puts back, the evaluations'
#: copies), and those of its floating buffers and parameters below float64 a float64 twin
#: holds (its deep copy, widened: twice their bytes): 64 MiB of a float32 model's loss
#: buffers had peaked 320 MiB above a prediction without them (probe 206); a float64 model's,
#: or an integer buffer, are not widened (a prediction of all five had refused calls at twice
#: their peak; probe 208).
LOSS_GUARD_COPIES, LOSS_TWIN_COPIES = 2, 3


def loss_copy_bytes(loss_fn: object, dtype: torch.dtype) -> tuple[int, int]:
    """``(its guard's, a float64 twin's)`` bytes of the copies a call holds of ``loss_fn``'s
    state, for a model of ``dtype`` (none for a loss that is not a module)."""
    if not isinstance(loss_fn, nn.Module):
        return 0, 0
    # (its parameters too: a loss module holding the model had its float64 copy unpredicted)
    widened = 0 if dtype == torch.float64 else sum(
        tensor.numel() * tensor.element_size()
        for tensor in [*loss_fn.buffers(), *loss_fn.parameters()]
        if tensor.is_floating_point() and tensor.dtype != torch.float64)
    return LOSS_GUARD_COPIES * sum(state_bytes(loss_fn)), LOSS_TWIN_COPIES * widened


#: Names under which a dict of inputs may hold the targets (HuggingFace's ``labels``).
_LABEL_NAMES = frozenset({"labels", "label", "targets", "target", "y"})


def _check_inputs_fit(model: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Tensor]
                      ) -> None:
    """Raise a TypeError, before any forward pass, where the batch leaves out an input that
    ``model.forward`` requires by its own signature. The forward's own error named the missing
    argument but not how the batch had been read (a tuple of two pairs is a data set of two
    batches, so ``((x1, x2), (y, w))`` gave ``forward`` ``x1`` alone; the call adds how it read
    the data, :func:`hessrank.api._said_of_the_reading`).

    Nothing is said where something between the call and ``forward`` may supply inputs: a
    forward pre-hook (the module's or a global one), an overridden ``__call__``, or a decorated
    ``forward`` (its wrapper's signature is read, not the wrapped one's: a decorator that
    supplies a default had been refused; probe 93), and where the signature takes ``*args``."""
    if (model._forward_pre_hooks or nn.modules.module._global_forward_pre_hooks
            or type(model).__call__ is not nn.Module.__call__):
        return
    try:
        parameters = list(inspect.signature(model.forward, follow_wrapped=False)
                          .parameters.values())
    except (TypeError, ValueError):  # a builtin or C-implemented forward: nothing to read
        return
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return
    positional = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    required = [p for p in parameters if p.default is inspect.Parameter.empty
                and p.name not in kwargs]
    missing = [p for p in positional[len(args):] if p in required]
    by_name = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p in required]
    given = f"{len(args)} positional input{'s' if len(args) != 1 else ''}" + (
        f" and {', '.join(kwargs)} by name" if kwargs else "")
    if missing or by_name:
        advice = ("pass several inputs as a tuple, ((x1, x2), targets), or by name as a dict, "
                  "({'x1': x1, 'x2': x2}, targets)") if missing else (
            "pass inputs by name as a dict, ({'x': x, 'mask': mask}, targets)")
        raise TypeError(
            f"the batch gives {type(model).__name__}.forward {given} and leaves out "
            f"{', '.join(p.name for p in missing + by_name)}: {advice}")
    # inputs forward does not take (torch's own error had named no fix; probe 133)
    named = [p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       inspect.Parameter.KEYWORD_ONLY)]
    unknown = ([] if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
               else [name for name in kwargs if name not in named])
    if unknown:
        labels = [name for name in unknown if name in _LABEL_NAMES]
        advice = (f"the targets go beside the inputs, not among them: "
                  f"({{{', '.join(repr(k) for k in kwargs if k not in labels)}: ...}}, "
                  f"{labels[0]})" if labels else
                  f"it takes {', '.join(named) or 'no input by name'}: leave the others out")
        raise TypeError(f"the batch gives {type(model).__name__}.forward {given}, and it takes "
                        f"no {', '.join(unknown)}: {advice}")
    if len(args) > len(positional):
        raise TypeError(
            f"the batch gives {type(model).__name__}.forward {given}, and it takes "
            f"{len(positional)} ({', '.join(p.name for p in positional)}): a batch is "
            f"(inputs, targets), its inputs a tensor or a tuple of the forward's inputs")


def read_batch(batch: object, device: torch.device) -> dict[str, Any]:
    """A batch checked as :func:`build_problem` checks one, for a model on ``device``: the
    problem's fields it sets, as :func:`build_problem` sets them
    (:func:`_batch_fields`).

    Raises:
        TypeError, ValueError: naming the tensor at fault and the fix.
    """
    args, kwargs, targets, labelled = _read_batch(batch)
    _check_placement(labelled, device)
    return _batch_fields(args, kwargs, targets)


def _usable_batch(args: tuple[Tensor, ...], kwargs: dict[str, Tensor], targets: Tensor
                  ) -> tuple[tuple[Tensor, ...], dict[str, Tensor], Tensor]:
    """Every tensor of a batch as the analysis uses it (:func:`_usable`): copied, but for one
    given twice (the same copy serves both), one that shares its memory with another (views
    of one tensor: copies would break what an in-place change of one does to the other), and
    an expanded one (a stride of 0: nothing can write to it in place, and a copy would
    materialise every repeat)."""
    tensors = [*args, *kwargs.values(), targets]
    owners: dict[int, set[int]] = {}
    for tensor in tensors:
        if tensor.numel():
            owners.setdefault(tensor.untyped_storage().data_ptr(), set()).add(id(tensor))
    made: dict[int, Tensor] = {}

    def usable(tensor: Tensor) -> Tensor:
        if id(tensor) not in made:
            alone = not tensor.numel() or len(
                owners[tensor.untyped_storage().data_ptr()]) == 1
            made[id(tensor)] = _usable(tensor, copy=alone and 0 not in tensor.stride())
        return made[id(tensor)]

    return (tuple(usable(x) for x in args), {k: usable(x) for k, x in kwargs.items()},
            usable(targets))


def check_batch(batch: object) -> None:
    """One batch's form, sample counts and values, as :func:`build_problem` checks them, for a
    model not at hand yet (its dtype and device are checked with it).

    Raises:
        TypeError, ValueError: naming the tensor at fault and the fix.
    """
    _read_batch(batch)


def _read_batch(batch: object) -> tuple[tuple[Tensor, ...], dict[str, Tensor], Tensor,
                                        list[tuple[str, Tensor]]]:
    """The batch's form, sizes and values: ``(args, kwargs, targets, labelled tensors)``."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        labels = ([key for key in batch if key in _LABEL_NAMES]
                  if isinstance(batch, Mapping) else [])
        # (a HuggingFace-style batch, its labels among its inputs; probe 141)
        split = (f": take the targets out, ({{k: v for k, v in batch.items() if k != "
                 f"{labels[0]!r}}}, batch[{labels[0]!r}])" if labels else "")
        raise TypeError(
            "batch must be a pair (inputs, targets); inputs may be a tensor, a tuple of tensors "
            f"or a dict of tensors, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "") + split
        )
    raw_inputs, targets = batch
    args, kwargs = _batch_tensors(raw_inputs)
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"targets must be a tensor, got {type(targets).__name__}: pass the one target tensor "
            "the loss takes second (labels or regression targets, shape [n, ...]); inputs the "
            "model needs go with the inputs (a tuple or dict), and a loss that needs more "
            "than one target tensor can be a function of the outputs and one tensor that holds "
            "them all (stacked or concatenated along a dimension past the first)")
    if targets.dim() == 0:
        raise ValueError("targets must have a batch dimension first (shape [n, ...]), got a "
                         "scalar")
    n = targets.shape[0]
    if n == 0:
        raise ValueError("the batch is empty: pass at least one sample (with process_group: "
                         "in every process's shard, which data-parallel calls need non-empty)")
    labelled = [*labelled_inputs(args, kwargs), ("targets", targets)]
    for label, tensor in labelled:
        if tensor.dim() == 0 or tensor.shape[0] != n:
            raise ValueError(
                f"mismatched batch sizes: {label} has shape {tuple(tensor.shape)} but targets has "
                f"{n} samples; the batch dimension must come first in every tensor"
            )
        # (NaN and infinite entries pass: an input's -inf can be an additive attention mask's,
        # a NaN a missing value the model replaces (torch.where(x.isnan(), fill, x)), a NaN
        # target a missing label the loss masks; refused, a model built for them had been
        # refused too (probe 220). Where they reach the loss or the derivatives, the error
        # names the first: nonfinite_entry.)
        if tensor.is_complex():
            raise ValueError(f"{label} is complex ({tensor.dtype}): the curvature of a loss is "
                             "defined for real data; pass real tensors")
    return args, kwargs, targets, labelled


def nonfinite_entry(labelled: Iterable[tuple[str, Tensor]]) -> str | None:
    """Where the floating tensors of ``labelled`` (``(label, tensor)`` pairs, the batch's
    inputs and targets) hold a NaN or infinite entry, the first such tensor and entry
    (``inputs[0] holds inf at [2, 1] (1 entry)``), else None: the likely cause of a non-finite
    loss or of NaN derivatives (a finite loss can follow an infinite input through ``tanh``,
    whose backward multiplies 0 by it, or a NaN one through an unselected branch of
    ``torch.where``)."""
    for label, tensor in labelled:
        if not tensor.is_floating_point() or all_finite(tensor):
            continue
        odd = ~torch.isfinite(tensor)
        count = int(odd.sum())
        index = [int(i) for i in odd.nonzero()[0]]
        return (f"{label} holds {float(tensor[tuple(index)])} at {index} ({count} "
                f"{'entry' if count == 1 else 'entries'})")
    return None




def _mode_notes(model: nn.Module, mode: str) -> list[str]:
    """Under ``mode='eval'``, what the layers whose training and evaluation differ compute in
    this call (the result had not said which statistics a model left in training mode was
    measured with; probe 138): those in training mode switched to evaluation (running
    statistics, dropout off), and BatchNorm without running statistics, which normalises with
    the batch's all the same."""
    if mode != "eval":
        return []

    def plural(names: list[str], one: str, many: str) -> str:
        return f"{listed_names(names)} {one if len(names) == 1 else many}"

    modules = [(f"{type(m).__name__} {name!r}", m) for name, m in model.named_modules()]
    notes = []
    normalising = [name for name, m in modules if isinstance(m, _NORM_WITH_STATISTICS)
                   and m.training and m.track_running_stats]
    dropping = [name for name, m in modules if m.training and _drops_out(m)]
    iterating = [repr(f"{name}.{tensor}" if name else tensor)
                 for name, m in model.named_modules() for tensor in _power_iterated(m)]
    random_slopes = [name for name, m in modules if m.training and isinstance(m, nn.RReLU)]
    # modules of the user's own classes whose methods read self.training (a DropPath,
    # F.dropout(x, p, self.training), a norm of its own): had gone unnamed (probe 216)
    reading = [name for name, m in modules if m.training and _reads_training(m)]
    switched = []
    if normalising:
        switched.append(plural(normalising, "normalises", "normalise") + " with running "
                        "statistics, not the batch's (mode='train' for the batch's)")
    if dropping:
        switched.append(plural(dropping, "is", "are") + " off")
    if random_slopes:
        switched.append(plural(random_slopes, "uses its", "use their") + " mean slope, not "
                        "random ones")
    if reading:
        switched.append(plural(reading, "reads", "read") + " self.training, False for the "
                        "call")
    if iterating:
        switched.append(f"the spectral norm of {listed_names(iterating)} divides by its stored "
                        "singular vectors' estimate, with no power-iteration step "
                        "(mode='train' for the step)")
    if switched:
        notes.append("mode='eval' (the default) measures the model as evaluated, though it is "
                     f"in training mode: {'; '.join(switched)}")
    batch_only = [name for name, m in modules
                  if isinstance(m, _BATCHNORM) and not m.track_running_stats]
    if batch_only:
        notes.append(plural(batch_only, "keeps", "keep") + " no running statistics "
                     "(track_running_stats=False): evaluated, it normalises with the batch's "
                     "statistics all the same, so each sample's output depends on the whole "
                     "batch")
    return notes


def parameter_holders(model: nn.Module) -> dict[int, int]:
    """How many modules of ``model`` register each parameter (by id): more than one where a
    weight is tied."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    return holders


#: The autograd nodes of an embedding's lookup, which mask its ``padding_idx`` row.
_LOOKUPS = frozenset({"EmbeddingBackward0", "EmbeddingBagBackward0"})


def _embedding_notes(model: nn.Module, analysed: set[int],
                     used_otherwise: Collection[int] = ()) -> list[str]:
    """Embeddings whose ``padding_idx`` row gets no gradient: autograd masks it, as in training,
    so every method holds it fixed, its entries counted in P with zero curvature (not said
    before; probe 144). Not where another module holds the weight too, or the graph shows
    another use of it (``used_otherwise``, :func:`weights_used_otherwise`): a tied output head
    gives that row gradient and curvature, which the note had denied (probe 219)."""
    holders = parameter_holders(model)
    padded = [f"{type(module).__name__} {name!r} (padding_idx={module.padding_idx})"
              for name, module in model.named_modules()
              if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
              and id(module.weight) in analysed and module.padding_idx is not None
              and holders.get(id(module.weight)) == 1 and id(module.weight) not in used_otherwise]
    if not padded:
        return []
    return [f"the padding_idx row of {listed_names(padded)} gets no gradient, as in training: "
            "held fixed, its entries count in P with zero curvature"]


def weights_used_otherwise(outputs: Tensor, model: nn.Module) -> set[int]:
    """The ids of the padded embeddings' weights of ``model`` that the graph of ``outputs`` uses
    otherwise than by a lookup (a tied head's ``h @ weight.T``)."""
    padded = {id(module.weight) for module in model.modules()
              if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
              and module.padding_idx is not None}
    return {id(child.variable) for node in graph_nodes([outputs.grad_fn])
            if type(node).__name__ not in _LOOKUPS
            for child, _ in node.next_functions
            if id(getattr(child, "variable", None)) in padded}


def _check_placement(labelled: list[tuple[str, Tensor]], device: torch.device) -> None:
    """Every batch tensor on the model's device. (Floating inputs in another dtype than the
    parameters are the model's to cast, ``x.to(weight.dtype)``: a forward that fails on them
    names them, :func:`run_model`; refused here, a float64 NumPy batch that the model casts
    had been; probe 212.)"""
    for label, tensor in labelled:
        if tensor.device != device:
            raise ValueError(
                f"{label} is on {tensor.device} but the model is on {device}: move the batch "
                f"with .to({str(device)!r})"
            )


def _select_parameters(
    model: nn.Module, params: Iterable[Tensor | str] | None
) -> tuple[list[str], list[Tensor], tuple[str, ...]]:
    """Names and tensors of the trainable parameters to analyse, and the frozen ones left out."""
    wanted = named_selection(model, params)
    names: list[str] = []
    selected: list[Tensor] = []
    excluded: list[str] = []
    for name, p in model.named_parameters():
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
            + ": set requires_grad=True on the parameters of interest"
            + ("" if wanted is None else ", or name trainable ones in params=")
        )
    return names, selected, tuple(excluded)


#: The prefixes a wrapper :func:`unwrap_model` analyses through puts before its module's
#: parameter names (``torch.compile``'s, ``DistributedDataParallel``'s and ``DataParallel``'s).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _unwrapped_name(name: str, names: Collection[str]) -> str:
    """``name`` as the unwrapped module calls it: a name from a wrapper's
    ``named_parameters()`` (``_orig_mod.0.weight``) without the wrappers' prefixes, where the
    module has no parameter of the name itself (it had been refused as unknown; probe 131)."""
    inner = name
    while inner not in names and inner.startswith(_WRAPPER_PREFIXES):
        inner = inner.split(".", 1)[1]
    return inner if inner in names else name


def named_selection(model: nn.Module, params: Iterable[Tensor | str] | None) -> set[str] | None:
    """The names of the parameters ``params`` selects (None: all), checked against the model
    without a batch (a :class:`hessrank.Tracker` checks them when it is made). A tied weight's
    every name selects it, under the name ``model.named_parameters()`` gives it.

    Raises:
        TypeError, ValueError: ``params`` is not a list of the model's parameters or their
            names, or is empty.
    """
    if params is None:
        return None
    if isinstance(params, (Tensor, str)):
        raise TypeError(
            f"params must be a list of parameters or names, got a single "
            f"{'name' if isinstance(params, str) else 'tensor'}: write params=[...] "
            "around it"
        )
    if not isinstance(params, Iterable):
        raise TypeError(f"params must be a list of parameters or names, got "
                        f"{type(params).__name__}")
    named = list(model.named_parameters())
    by_name = dict(named)
    by_id = {id(p): name for name, p in named}
    # every registration, a tied weight's second name too (lm_head.weight for wte.weight),
    # which named_parameters() leaves out: the same tensor, analysed under its first name
    aliases = {name: by_id[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    wanted = set()
    for item in params:
        if isinstance(item, str):
            item = aliases.get(item, _unwrapped_name(item, by_name))
            if item not in by_name:
                # a parametrized tensor's originals (0.weight: 0.parametrizations.weight.original;
                # probe 209), else names that contain it or that it contains
                owner, _, local = item.rpartition(".")
                originals = f"{owner}{'.' if owner else ''}parametrizations.{local}."
                close = ([n for n in by_name if n.startswith(originals)]
                         or [n for n in by_name if item in n or n in item])[:3]
                raise ValueError(
                    f"unknown parameter name {item!r}; valid names come from "
                    "model.named_parameters()" + (f" (did you mean {close}?)" if close else "")
                )
            wanted.add(item)
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ValueError("params contains a tensor that is not a parameter of model "
                                 "(pass the model's own nn.Parameter objects or their names)")
            wanted.add(by_id[id(item)])
        else:
            # the usual slips (probe 141): an optimizer's groups, a module
            fix = (": an optimizer's param_groups hold them under 'params', "
                   "params=optimizer.param_groups[0]['params']" if isinstance(item, dict)
                   and "params" in item else
                   f": pass its parameters, params=list(module.parameters()) for that "
                   f"{type(item).__name__}" if isinstance(item, nn.Module) else "")
            raise TypeError(f"params must contain parameters or their names, got "
                            f"{type(item).__name__}{fix}")
    if not wanted:
        raise ValueError("params is empty: pass at least one parameter, or params=None for "
                         "all trainable ones")
    return wanted



def selected_size(model: nn.Module, params: Iterable[Tensor | str] | None) -> int | None:
    """The number of parameter entries an analysis of ``model`` with ``params`` covers (a
    result's ``num_params``): those of the selection (:func:`named_selection`; all where None)
    that require their gradient (frozen ones are left out); a tied weight once. None where one
    of them is not initialised yet (a lazy module before its first forward pass).

    Raises:
        TypeError, ValueError: as :func:`named_selection`.
    """
    selected = named_selection(model, params)
    chosen = [p for name, p in model.named_parameters()
              if p.requires_grad and (selected is None or name in selected)]
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in chosen):
        return None
    return sum(p.numel() for p in chosen)

def has_active_batchnorm(model: nn.Module) -> list[str]:
    """Names of BatchNorm modules that would use batch statistics (training flag set)."""
    return [name for name, m in model.named_modules() if isinstance(m, _BATCHNORM) and m.training]


class UnrepeatableForward(ValueError):
    """Two forward passes of a call over one batch computed different outputs."""


class BatchNotFirst(ValueError):
    """The model's outputs for ``samples`` samples run alone have ``rows`` rows."""

    def __init__(self, samples: int, rows: int) -> None:
        self.samples, self.rows = samples, rows
        super().__init__(
            f"the model's output for {samples} samples run alone (the first {samples} rows of "
            f"every input) has {rows} rows, not {samples}: the batch dimension is not first in "
            "its inputs (a sequence-first RNN or transformer given [T, n, d]); pass every input "
            "batch first and transpose inside the model")


def repeat_pass(problem: CurvatureProblem) -> None:
    """One more forward pass over ``problem``'s batch, without a graph: where outputs computed
    another way differ from the batch's (samples run alone), a forward that does not repeat
    itself is the likelier cause, and this names it.

    Raises:
        UnrepeatableForward: the pass differs from the call's first over the batch.
    """
    with torch.no_grad():
        problem.forward()


@dataclass(frozen=True)
class OutputsPrint:
    """A model's outputs in brief: their shape, the sum of their magnitudes and up to
    :attr:`ENTRIES` entries evenly spaced over them (float64; a few kilobytes whatever the
    outputs' size), to tell whether two passes over one batch computed the same function."""

    ENTRIES = 1024

    shape: torch.Size
    magnitude: float
    entries: Tensor
    dtype: torch.dtype

    @classmethod
    def of(cls, outputs: Tensor) -> OutputsPrint:
        """The print of ``outputs``, without a copy of them (a reduction and a gather: token
        logits can be gigabytes)."""
        with torch.no_grad():
            outputs = outputs.detach()
            step = max(outputs.numel() // cls.ENTRIES, 1)
            indices = torch.arange(0, outputs.numel(), step, device=outputs.device)
            return cls(outputs.shape, float(torch.linalg.vector_norm(outputs, 1)),
                       torch.take(outputs, indices[: cls.ENTRIES]).to(torch.float64),
                       outputs.dtype)

    def refuse_other(self, later: OutputsPrint) -> None:
        """Raise where ``later``, a later pass over the same batch, computed another function:
        its shape differs, or its entries or magnitude differ by more than rounding
        (:func:`agreement_tolerance`) of the largest entry and of the magnitude.

        The call sets the model's state, the global generators and the module's own generators
        back before every pass, so two passes differ only where the forward reads something
        it cannot set back: a random generator held in a closure or a global variable (every
        pass draws on from it; the passes of ``ggn`` and of eigenvectors would mix their
        draws).

        Raises:
            UnrepeatableForward: naming the difference, its likely cause and the fix.
        """
        if later.shape != self.shape:
            measured = f"outputs of shape {tuple(later.shape)} against {tuple(self.shape)}"
        elif not self.entries.numel():  # empty outputs: nothing to compare
            return
        else:
            tolerance = agreement_tolerance(self.dtype)
            scale = max(float(self.entries.nan_to_num(0.0, 0.0, 0.0).abs().max()),
                        torch.finfo(self.dtype).tiny)
            difference = finite_difference(later.entries, self.entries) / scale
            if difference <= tolerance and (
                    later.magnitude == self.magnitude
                    or (math.isnan(later.magnitude) and math.isnan(self.magnitude))
                    or abs(later.magnitude - self.magnitude)
                    <= tolerance * max(self.magnitude, torch.finfo(self.dtype).tiny)):
                return
            measured = (f"outputs that differ by {difference:.1e} of the largest entry"
                        if difference > tolerance else "outputs of another total magnitude ("
                        f"{later.magnitude:.6g} against {self.magnitude:.6g})")
        raise UnrepeatableForward(
            f"two forward passes of the call over the same batch gave {measured}, though the "
            "parameters, the buffers, the inputs and the random generators hessrank can reach "
            "(the global ones, those a module holds as an attribute) were the same: the forward "
            "reads something that changes from pass to pass, most likely a random generator "
            "held elsewhere (in a closure, a global variable, a nested object), so the loss is "
            "random and its curvature undefined; hold the generator as a module attribute "
            "(self.generator = torch.Generator(); every pass of the call then sees the draws "
            "the model's next forward would, and it is left as it was), or make the forward "
            "deterministic for the call (a forward that computes otherwise without gradients, "
            "by torch.is_grad_enabled(), differs the same way: some passes run without them)")


def finite_difference(first: Tensor, second: Tensor) -> float:
    """The largest ``|first - second|`` of two equally shaped tensors where they are finite; inf
    where their NaN or infinite entries differ (a model that is NaN on one sample, as one that
    standardises over its batch, is NaN there in every pass and every process)."""
    # (detached: outputs a forward computed with a graph under no_grad, taking a gradient
    # inside enable_grad, had torch warn of converting a tensor that requires grad; probe 194)
    first, second = first.detach().double(), second.detach().double()
    for odd in (torch.isnan, torch.isposinf, torch.isneginf):
        if not torch.equal(odd(first), odd(second)):
            return math.inf
    finite = torch.isfinite(first)
    return float((first - second)[finite].abs().max()) if bool(finite.any()) else 0.0


def difference_text(relative: float, largest: str) -> str:
    """``relative`` (a :func:`finite_difference` over ``largest``, the entry it is relative to)
    in words: "by 1.2e-03 of <largest>", or where NaN or infinite entries differ (inf)."""
    if math.isinf(relative):
        return "in which of their entries are NaN or infinite"
    return f"by {relative:.1e} of {largest}"


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: a dtype as messages name it."""
    return str(dtype).removeprefix("torch.")


def agreement_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for two computations of the same quantity that differ only by rounding
    (different summation orders): about ``10^3`` units of rounding of ``dtype``."""
    return 1024 * float(torch.finfo(dtype).eps)


#: A float32 batch gradient summed over ``L`` terms an entry (a convolution's weight: the
#: samples times the output positions) differs from its per-sample gradients' sum by up to
#: about ``12 sqrt(L)`` units of rounding against its size (oneDNN's convolutions, measured: 262
#: eps at L = 32,768 and 1,949 at 524,288 on 2 threads, 6,000 at 262,144 on one; 2 in float64):
#: a group's check allows ``ROUNDING_GROWTH sqrt(L)`` of them where that is above the agreement
#: tolerance's 1024, and a note says where only that let it pass.
ROUNDING_GROWTH = 32.0

#: The Lanczos products' checks (symmetric, linear) measured a float32 model's sums of ``L``
#: terms at up to about ``L / 100`` units of rounding (17 at L = 8,192; 1,260 to 4,870 at
#: 524,288, a ReLU CNN over 256 x 256 images): they allow ``L / PRODUCTS_SHARE`` where that is
#: above the agreement tolerance. (``ROUNDING_GROWTH sqrt(L)`` allowed 170 times the measured
#: rounding at L = 8,192: a custom Function rounding through float16 passed; probe 189.)
PRODUCTS_SHARE = 32

#: Operations whose parameter is contracted with the input (each entry of a weight meets every
#: position of one output feature): the terms are the output's entries per output feature;
#: any other operation's (broadcast, elementwise) are its output's entries per parameter entry.
_CONTRACTIONS = frozenset({
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm",
    "addmv", "mv", "einsum", "tensordot", "embedding", "embedding_bag", "lstm", "gru",
    "rnn_tanh", "rnn_relu", "multi_head_attention_forward"})


def sum_terms(entries: int, params: Sequence[Tensor]) -> int:
    """The terms a layer's batch gradient sums an entry, ``L``, for a layer whose output
    (``[n, ...]``, all its calls) has ``entries`` entries and whose parameters are ``params``:
    the output's entries per output feature, the first dimension of the largest parameter (a
    transposed convolution's is its input channels, and its ``L`` the more generous by its
    stride squared and channel ratio)."""
    features = max((p.shape[0] for p in params if p.dim() > 0), default=1)
    return entries // max(1, features)


def sums_tolerance(tolerance: float, terms: int, dtype: torch.dtype) -> float:
    """The tolerance of a check of a layer's sums of ``terms`` terms computed in two orders,
    the layer's parameters of ``dtype`` (not its outputs': under bfloat16 autocast those had
    given 23, and a half-precision model passed; probe 189): ``tolerance``, or
    :data:`ROUNDING_GROWTH` ``sqrt(L)`` units of rounding where that is larger.

    The fixed tolerance had refused a convolution over 128 x 128 positions, n = 32, as mixing
    its samples (relative error 2.3e-4 in float32, 2e-16 in float64; probe 108), and with it
    every model with large feature maps in float32 (``fisher`` and ``ggn`` of an upsampling
    CNN); and, for the layers no rule covers, a decoder's ``ConvTranspose2d`` over 96 x 96
    positions (4 of 6 seeds at n = 32; probe 176)."""
    return max(tolerance, ROUNDING_GROWTH * math.sqrt(terms) * float(torch.finfo(dtype).eps))


def long_sums_allowance(problem: CurvatureProblem, tolerance: float) -> tuple[float, int]:
    """The Lanczos products' checks' allowance for the model's longest sums, ``L /``
    :data:`PRODUCTS_SHARE` units of rounding where that beats ``tolerance``, and ``L`` (0
    where it does not), from one forward pass without a graph (:class:`OutputSizes`). A float32
    ReLU CNN over 256 x 256 positions had been refused as a wrong second derivative or noisy
    products (probe 185). A forward that fails leaves ``tolerance``."""
    groups = problem.modules_with_params()
    named = dict(zip(problem.names, problem.params))
    sizes = OutputSizes(problem, groups)
    try:
        with torch.no_grad(), sizes.operations:
            problem.forward()
    except Exception as failure:  # noqa: BLE001 - an allowance must not replace the check's error
        raise_if_signalled(failure)
        return tolerance, 0
    finally:
        sizes.remove()
    terms = max((sizes.terms(group, [named[name] for name in names]) or 0
                 for group, names in groups.items()), default=0)
    allowance = terms / PRODUCTS_SHARE * float(torch.finfo(problem.dtype).eps)
    return (allowance, terms) if allowance > tolerance else (tolerance, 0)


def first_floating(output: Any) -> Tensor | None:
    """The first floating tensor among ``output``'s leaves, or None."""
    return next((leaf for leaf in tree_flatten(output)[0]
                 if isinstance(leaf, Tensor) and leaf.is_floating_point()), None)


#: torch's test of a ``torch.func`` transform's wrapper (None where torch has none)
_WRAPPED: Callable[[Tensor], bool] | None = getattr(
    getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def transformed(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.func`` transform's wrapper (inside ``vmap``, ``grad``,
    ``jacrev``), which must not escape its transform."""
    return _WRAPPED is not None and bool(_WRAPPED(tensor))


def all_entries(tensor: Tensor) -> int:
    """A tensor's entries over every ``vmap`` level it is batched at (inside ``vmap`` a tensor's
    ``numel`` is one example's: a per-token MLP under ``vmap`` over 65,536 tokens had its sums
    counted 8 long, their float32 check kept the fixed tolerance, and ``fisher`` was refused as
    mixing the samples; probe 194)."""
    while transformed(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor.numel()


class OperationSizes(OwnMode):
    """Records, for each of ``params`` (by id), the terms its gradient sums an entry in the
    operations that take it (outermost: an operation's own inner calls are not seen; the
    output's entries per output feature for a contraction, per parameter entry for any other
    operation: a positional embedding ``[1, T, D]`` added to the inputs sums ``n`` terms, not
    the ``n T D`` that had let a model mixing its samples pass, probe 189), summed over them:
    the length of the sums of a parameter used outside its module's call (a convolution's weight
    passed to ``F.conv2d`` in another module's forward, a tied weight), whose module's output
    records none. Without it, such a layer's check had the fixed tolerance, and a float32
    convolution over 256 x 256 positions written that way was refused as mixing its samples
    (probe 185)."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        super().__init__()
        self.ids = {id(p) for p in params}
        self.terms: dict[int, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        taken = [param for param in tree_flatten((args, kwargs))[0]
                 if isinstance(param, Tensor) and id(param) in self.ids]
        leaf = first_floating(result) if taken else None  # (most operations take none)
        if leaf is not None:
            contraction = getattr(func, "__name__", "") in _CONTRACTIONS
            entries = all_entries(leaf)
            for param in taken:
                terms = (sum_terms(entries, [param]) if contraction
                         else entries // max(1, param.numel()))
                self.terms[id(param)] = self.terms.get(id(param), 0) + terms
        return result


class OutputSizes:
    """Forward hooks recording each module's output entries over its calls (the first floating
    tensor of each output; no tensor is kept), and each parameter's operations' terms
    (:attr:`operations`, a mode to enter around the forward), for :meth:`terms`."""

    def __init__(self, problem: CurvatureProblem, groups: Iterable[str]) -> None:
        """Hooks on the problem's modules named in ``groups`` (those it has), a mode for all
        its analysed parameters."""
        self.entries: dict[str, int] = {}
        self.operations = OperationSizes(problem.params)
        modules = dict(problem.model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name))
                        for name in dict.fromkeys(groups) if name in modules]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            leaf = first_floating(output)
            if leaf is not None:
                self.entries[name] = self.entries.get(name, 0) + all_entries(leaf)
        return hook

    def terms(self, group: str, params: Sequence[Tensor]) -> int | None:
        """The terms a group's gradients sum an entry (:func:`sum_terms`): the more of its
        module's output's and of its parameters' operations' (None where neither was seen). (A
        module that pools inside its forward returns fewer entries than its operations sum: by
        its output alone, a float32 ggn over 65,536 tokens was refused as mixing its samples;
        probe 194.)"""
        by_operations = max((self.operations.terms[id(p)] for p in params
                             if id(p) in self.operations.terms), default=None)
        if group not in self.entries:
            return by_operations
        return max(sum_terms(self.entries[group], params), by_operations or 0)

    def forget(self) -> None:
        """Forget every size recorded so far (a pass restarted)."""
        self.entries.clear()
        self.operations.terms.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _LowerPrecision(OwnMode):
    """Records the operations whose floating results, which autograd differentiates, have
    fewer digits than ``dtype``'s: where each ran (``stack`` holds the names of the modules
    whose forward is running), its dtype and its result's ``grad_fn``, in ``found``.
    :meth:`least_precise` then picks, among those the computed values' backward reaches, the
    first of the fewest digits (the least precise, not the first: a loss that casts to float32
    and then runs under bfloat16 autocast is explained by the bfloat16; probe 121). A float16
    constant or mask, or a straight-through estimator's rounding (``w + (w.half().float() -
    w).detach()``), rounds nothing the curvature is taken of, and had been refused (probes
    171, 173)."""

    def __init__(self, dtype: torch.dtype, stack: list[str]) -> None:
        super().__init__()
        self.eps = torch.finfo(dtype).eps
        self.stack = stack
        self.found: list[tuple[str, torch.dtype, Any]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        values = result if isinstance(result, (tuple, list)) else (result,)
        for value in values:
            if (isinstance(value, Tensor) and value.is_floating_point() and value.requires_grad
                    and value.grad_fn is not None and torch.finfo(value.dtype).eps > self.eps):
                where = self.stack[-1] if self.stack else "the model's forward"
                name = getattr(func, "__name__", str(func))
                self.found.append((f"{value.dtype} from {name} in {where}", value.dtype,
                                   value.grad_fn))
                break
        return result

    def least_precise(self, computed: object, params: list[Tensor]
                      ) -> tuple[str, torch.dtype | None]:
        """Where and in what dtype the least precise operation ran that lies on the backward
        from ``computed`` to one of ``params`` (``("", None)`` where none): a backbone under
        autocast before a float32 head rounds nothing of the head's curvature, and had been
        refused with ``params=`` the head's (probe 175)."""
        if not self.found:
            return "", None
        analysed = {id(param) for param in params}
        parents: dict[int, list[Any]] = {}
        sinks = []
        for node in graph_nodes(leaf.grad_fn for leaf in tree_leaves(computed)
                                if isinstance(leaf, Tensor)):
            if id(getattr(node, "variable", None)) in analysed:  # an AccumulateGrad
                sinks.append(node)
            for child, _ in node.next_functions:
                if child is not None:
                    parents.setdefault(id(child), []).append(node)
        leading: set[int] = set()  # the nodes from which an analysed parameter is reached
        while sinks:
            node = sinks.pop()
            if id(node) not in leading:
                leading.add(id(node))
                sinks.extend(parents.get(id(node), ()))
        chosen: tuple[str, torch.dtype | None] = ("", None)
        for where, dtype, node in self.found:
            if id(node) in leading and (chosen[1] is None or torch.finfo(dtype).eps
                                        > torch.finfo(chosen[1]).eps):
                chosen = (where, dtype)
        return chosen


def _explained(dtype: torch.dtype) -> float:
    """The largest relative error that computing in ``dtype`` explains: the checks' tolerance
    for it (about ``10^3`` units of its rounding) for float32, and 4 units for half precision,
    whose rounding is already 1e-3 to 1e-2 (its tolerance, 8 for bfloat16, had named it for an
    asymmetry of 0.2 that a wrong custom Function made; probe 139)."""
    eps = float(torch.finfo(dtype).eps)
    return 4 * eps if _at_most_half(dtype) else agreement_tolerance(dtype)


def _at_most_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` keeps no more digits than half precision (float16, bfloat16, the
    float8 formats: float8 had passed the factor methods' half-precision refusal, and its
    doubled eigenvalues their symmetry check; probe 171)."""
    return torch.finfo(dtype).bits <= 16


def lower_precision_cause(problem: CurvatureProblem, error: float,
                          with_loss: bool = False, half_only: bool = False) -> str:
    """Why two computations that should agree (a sample alone and in the batch, a Hessian and
    its transpose) can differ by ``error`` (relative) beyond the checks' tolerance, with nothing
    else wrong: part of the forward runs at a lower precision than the parameters (a float64
    model's norm layer that computes in float32, as HuggingFace's ``LlamaRMSNorm`` does; a
    float32 model's ``torch.autocast`` to bfloat16 inside its forward, whose outputs it casts
    back, refused as a wrong second derivative, its Gram rules failing on torch's dtype error;
    probe 138), or, with ``with_loss`` (the computations ran the loss as given), part of its
    loss (``F.cross_entropy(f.float(), y)``, which had been refused as a wrong derivative
    without a word of it; probe 119; a loss widened to float64 is no cause, and was named as
    one, probe 120). One forward pass and its loss, watched operation by operation; an empty
    string when nothing runs at a lower precision, or when ``error`` is beyond what that
    precision's rounding explains (:func:`_explained`), or with ``half_only`` where that
    precision is above half precision's (:func:`_at_most_half`)."""
    stack: list[str] = []

    def entered(label: str) -> Callable[..., None]:
        return lambda *args: stack.append(label)

    def left(*args: object) -> None:
        stack.pop()

    handles = []
    for name, module in problem.model.named_modules():
        handles.append(module.register_forward_pre_hook(
            entered(f"{name} ({type(module).__name__})" if name else "the model's forward")))
        handles.append(module.register_forward_hook(left, always_call=True))
    watcher = _LowerPrecision(problem.dtype, stack)
    try:
        with torch.enable_grad(), watcher:  # (which results are differentiated)
            computed = problem.forward()
            if with_loss:
                stack.append("loss_fn")
                computed = problem.loss_fn(computed, problem.targets)
        found, dtype = watcher.least_precise(computed, problem.params)
    except Exception as failure:  # noqa: BLE001 - a diagnosis must not replace the error it explains
        raise_if_signalled(failure)
        return ""
    finally:
        for handle in handles:
            handle.remove()
    if dtype is None:
        return ""
    half = _at_most_half(dtype)
    if error > _explained(dtype) or (half_only and not half):
        return ""
    if half:
        precision, digits = (("half precision", "about 3 digits")
                             if torch.finfo(dtype).bits == 16
                             else (str(dtype), "about 1 digit"))
        return (f"the model or its loss computes in {precision} (first: {found}), "
                f"which keeps {digits}: its curvature would carry errors of 1e-4 to 1e-2 of its "
                "largest eigenvalue, or more. Analyse it in its "
                f"parameters' precision, {dtype_name(problem.dtype)}: turn the autocast (or "
                "the cast) off for the call")
    return (f"the model or its loss computes at a lower precision than its float64 parameters "
            f"(first: {found}), so its results carry that precision's rounding, beyond "
            "what the float64 checks allow (and what the float64 rank tolerances assume). "
            "Analyse a float32 copy (copy.deepcopy(model).float() with float32 inputs), whose "
            "checks and tolerances allow float32 rounding")


def mixed_samples_difference(problem: CurvatureProblem, outputs: object,
                             first: int | None = None, in_place: bool = False) -> float | None:
    """How far the model's outputs for the batch's two halves, each run alone (one forward pass
    without a graph), are from ``outputs``, the whole batch's, relative to their largest entry;
    None where the model's output for a sample depends on that sample alone (to rounding), and
    where the outputs cannot be compared row by row (a single sample, outputs not batch first
    or shaped by the batch; a part whose outputs are shaped otherwise is left out). With
    ``first``, only the batch's ``first`` samples, its middle ``first`` and its last ``first``
    are run alone, each group a forward of that size (overlapping where the batch has fewer
    than three times as many; the halves where it has no more): a model that mixes samples in
    batch order (a mixture of experts whose capacity drops the tokens past it, a running
    statistic over the batch) spares the first ones, and had passed with them alone (probe
    222); one whose capacity ranks the tokens over the batch (batch-prioritised routing) had
    dropped the middle samples' only, and passed with the first and last (probe 238).

    ``in_place``: each part is run in a batch of the whole's size, at its own rows, the other
    rows holding other samples of the batch, for a model that draws from its own generator:
    every pass starts its draws again (:func:`run_model`), so a part run alone would draw other
    noise for its samples than the whole batch, and run in place it draws the same. (Skipped,
    a batch standardised over itself had given ``fisher`` each sample's gradient in the batch,
    2.6 times the Fisher's top eigenvalue; probe 152.)

    Raises:
        UnrepeatableForward: where the halves differ because the forward does not repeat
            itself (:func:`repeat_pass`), not because the samples interact.
        BatchNotFirst: where a part's outputs have another number of rows than it has samples.
    """
    count = int(problem.targets.shape[0])
    if (count < 2 or not isinstance(outputs, Tensor) or not outputs.is_floating_point()
            or outputs.shape[0] != count):  # not batch first: the loss's own checks name it
        return None
    # (first and last may overlap: a batch of 3 split 1 + 2 had a model that cannot run one
    # sample go unchecked; probe 226)
    middle = max(0, count // 2 - (first or 0) // 2)
    spans = ([(0, count // 2), (count // 2, count)] if first is None or count <= first
             else list(dict.fromkeys([(0, first), (middle, middle + first),
                                      (count - first, count)])))
    parts = []
    with torch.no_grad():
        for start, stop in spans:
            # copies: a forward that modifies its input in place would change the call's batch
            # under the rules' captured inputs (a fisher of a net that doubles its input was
            # computed at four times two of its samples)
            if in_place:
                args, kwargs = _others_around(problem, start, stop)
                targets = problem.targets
            else:
                args, kwargs = problem.sample_slice(start, stop)
                args = tuple(arg.clone() for arg in args)
                kwargs = {key: value.clone() for key, value in kwargs.items()}
                targets = problem.targets[start:stop]
            part = replace(problem, args=args, kwargs=kwargs, targets=targets).forward()
            parts.append(part[start:stop] if in_place and isinstance(part, Tensor) else part)
            del args, kwargs, part  # (one half's copy at a time)
    # outputs shaped by the batch (sequences cut to the batch's longest): a part whose are
    # shaped otherwise is not comparable row by row, the others are (the shortest sequences,
    # last in a sorted packed batch, had left the first ones unchecked too; probe 226)
    compared = [(span, part) for span, part in zip(spans, parts)
                if isinstance(part, Tensor) and part.shape[1:] == outputs.shape[1:]]
    if not compared:
        return None
    spans, parts = [span for span, _ in compared], [part for _, part in compared]
    for (start, stop), part in zip(spans, parts):
        if part.shape[0] != stop - start:  # (their difference had read "NaN or infinite
            # entries" where every output is finite: a sequence-first LSTM given [T, n, d]
            # with T = n; probe 196)
            raise BatchNotFirst(stop - start, part.shape[0])
    alone = torch.cat(parts).to(outputs.dtype)
    whole = torch.cat([outputs[start:stop] for start, stop in spans]).detach()
    finite = whole[torch.isfinite(whole)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    # inf where NaN or Inf entries differ: a half of one sample standardised over itself is NaN
    # (its std), which a plain max over the difference had passed as no difference (probe 98)
    difference = finite_difference(alone, whole)
    # the rounding of the coarser of the outputs' and the model's dtypes: a float32 model's
    # float64 outputs (a float64 readout, a tensor made in a float64 default dtype) differed by
    # float32's rounding and were refused as mixing the samples (probe 212)
    computed = max(outputs.dtype, problem.dtype, key=lambda dtype: torch.finfo(dtype).eps)
    if difference > agreement_tolerance(computed) * max(scale, torch.finfo(outputs.dtype).tiny):
        repeat_pass(problem)
        return difference / max(scale, 1e-300)
    return None


def _others_around(problem: CurvatureProblem, start: int, stop: int
                   ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """Copies of the batch's inputs whose rows outside ``start:stop`` hold other samples of the
    batch (each row ``i`` there the sample ``(i + stop - start) mod n``, a shift by the part's
    size, so that none keeps its own), floating ones doubled, for
    :func:`mixed_samples_difference` ``in_place``: copies alone of the part's own samples kept
    a statistic they hold (a batch maximum), so a model scaling by it passed (probe 154)."""
    count = int(problem.targets.shape[0])
    order = torch.arange(count)
    outside = torch.cat([order[:start], order[stop:]])
    source = order.clone()
    source[outside] = (outside + (stop - start)) % count

    def replaced(x: Tensor) -> Tensor:
        copy = x[source.to(x.device)]  # (advanced indexing: a copy)
        if copy.is_floating_point():
            copy[outside.to(x.device)] *= 2
        return copy

    return (tuple(replaced(x) for x in problem.args),
            {key: replaced(x) for key, x in problem.kwargs.items()})


def refuse_not_sample_first(outputs: object, samples: int) -> None:
    """Raise unless ``outputs`` hold ``samples`` rows along their first dimension, as the
    per-sample factors need (a sequence-first model's ``[T, n, V]``, whose loss permutes it,
    had ``fisher_lanczos`` blame the loss; probe 201). Other outputs are not judged here.

    Raises:
        ValueError: naming the shape, the fix and the methods that take such outputs.
    """
    if isinstance(outputs, Tensor) and (outputs.dim() == 0 or outputs.shape[0] != samples):
        raise ValueError(
            f"the model's output has shape {tuple(outputs.shape)} for a batch of {samples} "
            "samples: per-sample EF/GGN factors need the samples along the output's first "
            "dimension ([n, ...]); return a sample-first output (a sequence-first model's "
            "output.transpose(0, 1), with the loss to match) or use method='exact', 'lanczos' "
            "or 'ggn_lanczos'")


def untested_mixing(error: Exception, runs: str) -> str:
    """The start of a note where the samples' mixing could not be tested: the forward raised
    ``error`` on ``runs`` (``"half of the batch"``, ``"two samples alone"``)."""
    reason = " ".join(str(error).split())
    if len(reason) > 120:  # (cut mid-sentence, "the batch dimension is not first" had read
        # "the batch dimension is n"; probe 196)
        reason = reason[:120].rsplit(" ", 1)[0] + " ..."
    return ("whether the model's output for a sample depends on the other samples of the batch "
            f"was not tested: it does not run on {runs} ({type(error).__name__}: {reason})")


def refuse_mixed_samples(problem: CurvatureProblem, outputs: Tensor, part: str) -> None:
    """Raise if the model's output for a sample depends on the other samples of its batch
    (statistics over the batch computed in the forward, attention across samples): each
    ``part`` (a batch of a data set, a process's shard) would then be computed on its own, not
    with all the samples at once (:func:`mixed_samples_difference`).

    Raises:
        ValueError: naming the relative difference and the fix.
    """
    difference = mixed_samples_difference(problem, outputs)
    if difference is not None:
        places = ModuleGenerators.read(problem.model).places
        # every pass draws from the generators' state at the call (run_model): a part run alone
        # draws what the first samples of a whole batch would
        drawn = (f", or the draws of the model's own random generator ({', '.join(places)}), "
                 "which every pass starts again, so a sample's noise follows its position in "
                 "its batch" if places else "")
        raise ValueError(
            f"the model's output for a sample depends on the other samples of its batch (each "
            f"half of the batch run alone differs from the whole batch's outputs "
            f"{difference_text(difference, 'their largest entry')}: statistics over the "
            f"batch, or attention across samples{drawn}), so each {part} would be computed on "
            "its own, not with all the samples at once, and the result would not be that of the "
            "whole data; pass the data as one batch in one process"
        )


def refuse_split_batch_statistics(problem: CurvatureProblem, part: str) -> None:
    """Raise if ``mode='train'`` would normalise each ``part`` (a process's shard, a batch of a
    data set) with its own BatchNorm statistics instead of those of all the samples at once.

    Raises:
        ValueError: naming the BatchNorm modules and the fix.
    """
    active = has_active_batchnorm(problem.model) if problem.mode == "train" else []
    synced = [name for name, module in problem.model.named_modules()
              if name in active and isinstance(module, nn.SyncBatchNorm)]
    if synced:  # (its statistics are the global batch's: the reason is another; probe 242)
        raise ValueError(
            f"mode='train' with SyncBatchNorm on batch statistics ({', '.join(synced)}): its "
            "forward exchanges the statistics with the other processes at every pass, and the "
            f"call's passes over parts of a {part} cannot take part in those exchanges; use "
            "mode='eval' (running statistics)"
        )
    if active:
        raise ValueError(
            f"mode='train' with BatchNorm on batch statistics ({', '.join(active)}): each {part} "
            "would be normalised with its own statistics, not those of all the samples at once, "
            "so the result would not be that of the whole data; use mode='eval' (running "
            "statistics)"
        )


def listed_names(names: Sequence[str], shown: int = 4) -> str:
    """``"a, b, c, d and 2 more"``: the first ``shown`` names, for a message."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def unused_parameters(pieces: Sequence[Tensor | None]) -> frozenset[int]:
    """The indices of the analysed parameters no gradient reaches: those whose piece of
    autograd's gradient (``allow_unused=True``) is None."""
    return frozenset(index for index, piece in enumerate(pieces) if piece is None)


def unused_in_every(batches: Sequence[frozenset[int]]) -> frozenset[int]:
    """The parameters no gradient reaches on any of a data set's ``batches`` (each batch's
    :func:`unused_parameters`; one a batch uses is used); empty for no batch."""
    return frozenset.intersection(*batches) if batches else frozenset()


def unused_parameters_note(problem: CurvatureProblem, unused: Collection[int],
                           data_set: bool = False) -> str | None:
    """The note for analysed parameters that the loss does not depend on, or None.

    Args:
        problem: the problem whose parameters ``unused`` indexes (:func:`unused_parameters`).
        unused: the indices of the parameters no gradient reaches (on a data set: on any of
            its batches).
        data_set: the indices hold for every batch of a data set, not one batch.

    Returns:
        A note naming them, what it means for the result and what to check; None when every
        parameter is used.
    """
    if not unused:
        return None
    names = [name for index, name in enumerate(problem.names) if index in unused]
    size = sum(param.numel() for index, param in enumerate(problem.params) if index in unused)
    return (f"{size:,} of the {problem.num_params:,} parameters ({listed_names(names)}) get "
            f"no gradient from the loss on {'any batch of the data' if data_set else 'this batch'}"
            ": their rows and columns of the curvature are zero and they count in P; check the "
            "forward (an unused layer; torch.no_grad() or .detach() around their use, or "
            "torch.utils.checkpoint(use_reentrant=True) on inputs that do not require grad, "
            "cuts them off the graph), or leave them out with params=")


def probe_outputs(problem: CurvatureProblem, check_loss: bool = True,
                  graph: bool = False) -> Tensor:
    """One forward pass without a graph (``graph``: with one), and (``check_loss``) the checked
    loss on it (see :meth:`CurvatureProblem.loss`, :func:`check_target_dtype`): the model's
    outputs, for predictions before the work. A data set's batch skips the check: the survey
    has checked every batch's loss (one whose targets are all ignored has a NaN mean of its
    own, and adds nothing)."""
    with torch.set_grad_enabled(graph):
        outputs = problem.forward()
    with torch.no_grad():
        if check_loss:
            problem.loss(outputs)
    if check_loss:
        check_target_dtype(problem.loss_fn, tensor_outputs(outputs), problem.targets)
    return outputs


#: The fix for floating targets whose dtype the loss does not take with the outputs'.
_TARGET_DTYPE_FIX = ("The targets' floating dtype is not the outputs': cast them to it "
                     "(targets.to({dtype}))")


def _other_target_dtype(outputs: Tensor, targets: Tensor) -> bool:
    """Whether the targets are floating point in another dtype than the outputs."""
    return targets.is_floating_point() and targets.dtype != outputs.dtype


def refuse_target_dtype(error: RuntimeError, loss_fn: LossFn, outputs: Tensor,
                        targets: Tensor) -> None:
    """Raise the refusal of floating targets in another dtype than the outputs where ``error``,
    raised differentiating the loss w.r.t. ``outputs``, is torch's refusal of them (the
    backward of ``nn.HuberLoss`` takes one dtype, though its forward promotes), verified by
    differentiating the loss once more with the targets cast to the outputs' dtype; return for
    any other error, and where the cast targets fail too (a constant of another dtype inside
    the loss: the cast would not fix it), leaving ``error`` to the caller.

    Raises:
        ValueError: the refusal, naming the cast.
    """
    if not (_other_target_dtype(outputs, targets) and "Found dtype" in str(error)):
        return
    try:
        with torch.enable_grad():
            output_gradient(loss_fn, outputs, targets.to(outputs.dtype))
    except Exception as failure:  # noqa: BLE001 - not the targets' dtype: the error stands as it is
        raise_if_signalled(failure)
        return
    raise ValueError(
        f"loss_fn's backward fails on {targets.dtype} targets with {outputs.dtype} outputs "
        f"({str(error).rstrip('. ')}; a plain loss.backward() fails too). "
        + _TARGET_DTYPE_FIX.format(dtype=outputs.dtype)) from error


def refuse_target_dtype_of(problem: CurvatureProblem, error: RuntimeError) -> None:
    """:func:`refuse_target_dtype` for ``error`` raised by the work on one batch, with the
    outputs of a forward pass: where the outputs' dtype is not the parameters' (a forward that
    returns ``.double()`` of a float32 model's), :func:`probe_for_target_dtype`, which goes by
    the parameters' before the work, had not run.

    Raises:
        ValueError: the refusal, naming the cast.
    """
    if problem.targets.is_floating_point() and "Found dtype" in str(error):
        outputs = tensor_outputs(probe_outputs(problem, check_loss=False))
        refuse_target_dtype(error, problem.loss_fn, outputs, problem.targets)


def probe_for_target_dtype(problem: CurvatureProblem, outputs: Callable[[], object]) -> None:
    """Before the work, call ``outputs`` (:func:`probe_outputs`, whose loss check includes
    :func:`check_target_dtype`) where the batch's targets are floating point in another dtype
    than the parameters, whatever the method's prediction needs: a method that predicts its cost
    without a forward pass (``exact``) had met such targets' failing backward deep inside."""
    if problem.targets.is_floating_point() and problem.targets.dtype != problem.dtype:
        outputs()


def check_target_dtype(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> None:
    """Where the targets are floating point in another dtype than ``outputs``, differentiate
    the loss w.r.t. the outputs once (a loss backward on output-sized tensors; nothing for
    targets in the outputs' dtype or integer ones): ``nn.HuberLoss`` evaluates float32 targets
    with float64 outputs but fails in its backward, which every method had met deep inside,
    ``exact`` and ``fisher`` passing torch's bare "Found dtype Float but expected Double".

    Raises:
        ValueError: :func:`refuse_target_dtype`'s refusal.
    """
    if _other_target_dtype(outputs, targets):
        with torch.enable_grad():
            output_gradient(loss_fn, outputs, targets)


def output_gradient(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """``dL/df`` on detached outputs (zeros where the loss does not use them, or returns a
    constant without a graph: ``outputs.new_zeros(())`` for a batch whose targets are all
    ignored).

    Raises:
        ValueError: :func:`refuse_target_dtype`'s refusal.
        TypeError, ValueError, RuntimeError, IndexError: the loss cannot be evaluated on the
            outputs and the targets (with the fix, as :func:`evaluate_loss` says it).
    """
    return output_gradient_and_product(loss_fn, outputs, targets)[0]


def output_gradient_and_product(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                                direction: Tensor | None = None
                                ) -> tuple[Tensor, Tensor | None]:
    """:func:`output_gradient`, and from the same evaluation of the loss, where ``direction``
    (shaped as the outputs) is given, ``d^2L/df^2`` times it: None where it is not given, the
    loss is linear in the outputs, or some operation of the loss has no double backward.

    Raises:
        as :func:`output_gradient`.
    """
    leaf = outputs.detach().requires_grad_(True)
    curved = direction is not None
    with torch.enable_grad() if curved else nullcontext():
        value = _loss_with_advice(loss_fn, leaf, targets)
        if not value.requires_grad:
            return torch.zeros_like(leaf), None
        try:
            (gradient,) = torch.autograd.grad(value, leaf, allow_unused=True,
                                              create_graph=curved)
        except RuntimeError as error:
            refuse_target_dtype(error, loss_fn, leaf, targets)
            raise
    if gradient is None:
        return torch.zeros_like(leaf), None
    product = None
    if curved and gradient.requires_grad:
        with suppress(RuntimeError):  # (no double backward for some operation of the loss)
            (product,) = torch.autograd.grad(gradient, leaf, grad_outputs=direction,
                                             allow_unused=True)
    return gradient.detach(), product


def batch_modified_error(label: str) -> ValueError:
    """The error for a pass that modified the batch's tensor ``label`` (``targets``,
    ``inputs[0]``) in place."""
    who = ("loss_fn (or the model's forward) modifies the targets" if label == "targets"
           else f"the model's forward modifies its input {label}")
    return ValueError(
        f"{who} in place (x.mul_(...), x.relu_(), x /= 255, nn.ReLU(inplace=True) on "
        "the input), so every pass after the first would see other values, and a "
        "training step changes your batch: make those operations out of place "
        "(x = x * 2, torch.relu(x)); your tensors are unchanged")


def _modified_in_place_error(culprit: str, tensor: str) -> ValueError:
    """The error for ``culprit`` modifying in place a tensor autograd saved (``tensor``
    describes it)."""
    return ValueError(
        f"{culprit} modifies in place a tensor that autograd saved to differentiate an earlier "
        f"operation ({tensor}: h = torch.sigmoid(z); h *= 2, say), so its derivatives would be "
        "wrong (a plain loss.backward() raises too): write that operation out of place "
        "(h = h * 2)")


def loss_modified_in_place_error(error: RuntimeError) -> ValueError | None:
    """:func:`_modified_in_place_error` for the loss where ``error`` is autograd's own check of
    a saved tensor (raised differentiating the loss alone), else None."""
    words = str(error)
    if "modified by an inplace operation" not in words:
        return None
    tensor = words.split("operation: ", 1)[-1].split("; expected", 1)[0]
    return _modified_in_place_error("loss_fn", tensor)


class GraphBytes:
    """Bytes of the tensors autograd saves for the backward passes of a block (``counting()``),
    each storage counted once, leaving out the parameters', buffers' and the batch's own (they
    exist before the call): what the block's graph holds, for the memory budget. The saved tensors
    themselves are kept as they are."""

    def __init__(self, problem: CurvatureProblem) -> None:
        # (a loss module's own too: a slice of its 100 MB buffer saved by the loss had its
        # whole storage counted as graph, in every product's graphs; probe 208)
        loss = problem.loss_fn if isinstance(problem.loss_fn, nn.Module) else None
        #: the batch's tensors' storages, named: a loss that writes the targets in place had
        #: been blamed on the model's forward (probe 210)
        self._batch = {_storage(tensor)[0]: label for label, tensor in
                       [*labelled_inputs(problem.args, problem.kwargs),
                        ("targets", problem.targets)]}
        owned = [*problem.params, *held_tensors(problem.model),
                 *([] if loss is None else [*loss.parameters(), *held_tensors(loss)])]
        self._known = {_storage(tensor)[0] for tensor in owned} | set(self._batch)
        self._found: dict[int, int] = {}
        self._largest_differentiable = 0

    def _pack(self, tensor: Tensor) -> _Saved:
        pointer, size = _storage(tensor)
        if pointer not in self._known:
            self._found[pointer] = size
            if tensor.requires_grad:
                self._largest_differentiable = max(self._largest_differentiable, size)
        return _detached(tensor, self._batch.get(pointer))

    @staticmethod
    def _unpack(packed: _Saved) -> Tensor:
        """A saved tensor back, checked unchanged since it was saved (the detached tensor shares
        its version counter): where the forward or the loss modified it in place, autograd's
        own check raises, and under these hooks, which it does not check, every method had
        differentiated through the modified value and returned a wrong spectrum without a word
        (``h = sigmoid(z); h *= 2``: ``exact``'s trace 5.08 for 5.78; probe 111).

        Raises:
            ValueError: the saved tensor was modified in place after it was saved (a tensor of
                the batch named as such).
        """
        tensor, version, label = packed
        if tensor._version != version:
            if label is not None:
                raise batch_modified_error(label)
            raise _modified_in_place_error(
                "the model's forward (or the loss)",
                f"a {list(tensor.shape)} {dtype_name(tensor.dtype)} tensor, modified "
                f"{tensor._version - version} time(s) after it was saved")
        return tensor

    def leave_out(self, tensors: Iterable[Tensor]) -> None:
        """Count no more the storages of ``tensors``, state the call made once and counts as
        such (a float64 twin's copies of a loss module's tensors)."""
        for tensor in tensors:
            self._found.pop(_storage(tensor)[0], None)

    def counting(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The block whose saved tensors are counted. (The hooks' own context manager, not a
        generator's: a Ctrl-C landing at a generator's exit left it suspended, and its hooks
        were popped when it was collected, after the call, the caller's in their place;
        probe 200. Hooks a Ctrl-C leaves on the stack go at the call's exit,
        :func:`~hessrank.guard.saved_tensor_hooks_off`.)"""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @classmethod
    def uncounted(cls) -> torch.autograd.graph.saved_tensors_hooks:
        """Within :meth:`counting`, passes that are no part of the graph counted (a trial):
        their saved tensors kept as :meth:`counting` keeps them, not counted (kept as they are,
        the float64 widening's trial leaked its graph at every operator build: 1.1 MiB a call
        of a four-batch ``lanczos``, 8 GB over a long GPT run)."""
        return torch.autograd.graph.saved_tensors_hooks(_detached, cls._unpack)

    @property
    def total(self) -> int:
        return sum(self._found.values())

    @property
    def largest_activation(self) -> int:
        """Bytes of the largest saved tensor's storage among those gradients flow through
        (activations; not a fused kernel's workspace, such as an LSTM's gates); 0 if none."""
        return self._largest_differentiable


#: A saved tensor as :class:`GraphBytes` keeps it: detached, its version, and the batch's
#: label for it where it is a tensor of the batch (``targets``, ``inputs[0]``).
_Saved = tuple[Tensor, int, str | None]


def _detached(tensor: Tensor, label: str | None = None) -> _Saved:
    """A saved tensor as :class:`GraphBytes` keeps it: detached (autograd restores what it needs
    on unpacking: a saved output kept as it is holds its own grad_fn, a cycle through C++ that no
    garbage collection frees where the graph is never backpropagated or is retained; Lanczos over
    a data set grew by 6 KiB a sample a product, to 7 GB at 65,536 samples; probe 63), with its
    version, which autograd checks only of the tensors it packs itself
    (:meth:`GraphBytes._unpack`); ``label``: the batch's name for it."""
    return tensor.detach(), tensor._version, label


def _storage(tensor: Tensor) -> tuple[int, int]:
    """``(data pointer, bytes)`` of a tensor's storage; ``(0, 0)`` for one without storage."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return 0, 0
    return storage.data_ptr(), storage.nbytes()


#: How to avoid an operation that torch cannot differentiate twice (torch 2.14.1), by the name
#: torch gives in its error.
_TWICE_DIFFERENTIABLE_SWAPS = {
    "aten::hardsigmoid_backward": "replace nn.Hardsigmoid / F.hardsigmoid (as in MobileNetV3's "
                                  "squeeze-excitation blocks) by F.relu6(x + 3) / 6, the same "
                                  "function, which torch differentiates twice",
}


#: What the Hessian needs, and what to use where the operation without a second derivative is
#: the loss's (``ggn`` differentiates the loss twice too): the Hessian methods' message.
HESSIAN_NEEDS = ("the Hessian needs second derivatives of every operation of the model and the "
                 "loss")
FOR_THE_LOSS_S = ("the operation is the loss's, which 'ggn' differentiates twice too: use "
                  "method='fisher' or 'fisher_lanczos' (first derivatives only)")


def without_second_derivative(error: RuntimeError, needs: str, instead: str) -> Exception:
    """A clear error for an operation without a second derivative; other errors unchanged.

    A Hessian-vector product differentiates the backward pass (of the model and the loss; a GGN's
    output Hessian, of the loss), so each operation there needs a derivative of its own backward;
    torch lacks a few (its message: "derivative for aten::<op> is not implemented").

    Args:
        error: the error torch raised.
        needs: what needs the second derivatives (the start of the message).
        instead: the methods that would work instead.

    Returns:
        A ``ValueError`` naming the operation, what to use instead and how to replace the
        operation; ``error`` itself when it is about something else.
    """
    if "does not currently support double backward" in str(error):  # aot_autograd's code
        # (torch.compile'd modules and functions run eagerly for the call, guard.py
        # compiled_modules_eager; what aot_autograd compiled without dynamo does not)
        return ValueError(
            f"{needs}, and code compiled by aot_autograd (functorch.compile.aot_function or "
            f"aot_module) has no second derivative: {instead}, or call the function "
            "uncompiled (torch.compile'd modules and functions are run eagerly for the call "
            "already)")
    if "must have a storage_offset divisible by 2" in str(error):
        # torch.view_as_complex of a real parameter's slice (a Fourier neural operator's
        # spectral weights): its double backward views a real gradient at an odd offset as
        # complex, and torch's bare error had named neither (probe 239)
        return ValueError(
            f"{needs}, and torch {torch.__version__.split('+')[0]}'s double backward of "
            f"torch.view_as_complex fails on a real tensor's slice ({error}): {instead}, or "
            "build the complex tensor as torch.complex(w[..., 0], w[..., 1]), the same values, "
            "which torch differentiates twice")
    found = re.search(r"derivative for (\S+) is not implemented", str(error))
    if found is None:
        return error
    operation = found.group(1)
    swap = _TWICE_DIFFERENTIABLE_SWAPS.get(
        operation, "replace that operation by one that torch can differentiate twice")
    return ValueError(f"{needs}, and torch {torch.__version__.split('+')[0]} has none for "
                      f"{operation}: {instead}, or {swap}")
