"""Leave a training loop exactly as it was: snapshot and restore everything a call could touch."""

from __future__ import annotations

import contextvars
import copy
import functools
import importlib
import inspect
import math
import operator
import pickle
import random
import signal
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import (
    AbstractContextManager,
    ExitStack,
    _GeneratorContextManager,
    contextmanager,
    suppress,
)
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeGuard, TypeVar, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from hessrank.host import host_floats


class OwnMode(TorchFunctionMode):
    """A torch function mode of hessrank's: its exit pops it only where it is on top of torch's
    mode stack, as it was pushed. A Ctrl-C as a generator context manager that holds one is
    entered or exited (``second_order``'s) leaves that generator suspended; the call puts the
    stack back as it found it, and the generator's exit, when collected after the caller's
    ``except``, had popped whatever was then on top: the caller's own ``TorchFunctionMode`` or
    ``torch.device``, whose own exit then failed on an empty stack (probe 187)."""

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        depth = torch._C._len_torch_function_stack()
        if depth and torch._C._get_function_stack_at(depth - 1) is self:
            super().__exit__(exc_type, exc_value, traceback)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


#: A module's own bookkeeping in its ``__dict__`` (parameter, buffer and submodule registries,
#: hook dictionaries, the ``training`` flag), which :func:`preserved_state` restores on its own:
#: every other entry is a plain attribute, state a forward pass may rebind or mutate.
_MODULE_BOOKKEEPING = frozenset(vars(nn.Module()))
_MISSING = object()
#: Code: objects whose attributes are not state.
CODE_TYPES = (type, types.ModuleType, types.FunctionType, types.MethodType,
              types.BuiltinFunctionType)
#: What a plain attribute may hold without its contents being state: code, types, modules.
_NOT_CONTAINERS = (nn.Module, Tensor, *CODE_TYPES)


@dataclass
class _Attributes:
    """One module's plain attributes: the objects (by reference), and a shallow copy of what the
    mutable ones hold (a list's items, a dict's or a set's entries, a plain object's
    ``__dict__``, such as a configuration), so that appending to a list or setting a
    configuration's field can be undone too."""

    module: nn.Module
    objects: dict[str, Any]
    contents: dict[str, Any]
    #: values held in ``__slots__`` (a module class that declares them keeps them outside its
    #: ``__dict__``)
    slots: dict[str, Any]


def _contents(value: Any) -> Any:
    """A shallow copy of what ``value`` holds, ``_MISSING`` where it is not a container."""
    if isinstance(value, list | dict | set):
        return copy.copy(value)
    if not isinstance(value, _NOT_CONTAINERS) and hasattr(value, "__dict__"):
        return dict(vars(value))
    return _MISSING


def _put_back(value: Any, contents: Any) -> None:
    """Make ``value`` hold ``contents`` again (in place), where it changed."""
    if isinstance(value, list):
        if len(value) != len(contents) or any(a is not b for a, b in zip(value, contents)):
            value[:] = contents
    elif isinstance(value, set):
        if value != contents:
            value.clear()
            value.update(contents)
    else:
        current = value if isinstance(value, dict) else vars(value)
        if current.keys() != contents.keys() or any(
                current[key] is not item for key, item in contents.items()):
            current.clear()
            current.update(contents)


def plain_attributes(model: nn.Module) -> list[_Attributes]:
    """Every submodule's plain attributes (``__dict__`` beyond the bookkeeping)."""
    saved = []
    for module in model.modules():
        objects = {key: value for key, value in vars(module).items()
                   if key not in _MODULE_BOOKKEEPING}
        contents = {key: copied for key, value in objects.items()
                    if (copied := _contents(value)) is not _MISSING}
        slots = {name: getattr(module, name) for name in _slot_names(type(module))
                 if hasattr(module, name)}
        saved.append(_Attributes(module, objects, contents, slots))
    return saved


def _slot_names(cls: type) -> list[str]:
    """The ``__slots__`` entries of a class and its bases (but ``__dict__``, ``__weakref__``)."""
    names = []
    for klass in cls.__mro__:
        declared = klass.__dict__.get("__slots__", ())
        names += [declared] if isinstance(declared, str) else [
            name for name in declared if name not in ("__dict__", "__weakref__")]
    return names


def rebind_attributes(saved: list[_Attributes]) -> None:
    """Put back the attributes of :func:`plain_attributes`: the same objects, holding what they
    held (a list's items, a dict's entries, a plain object's fields), and remove those added
    since. Deeper changes (a tensor inside a list modified in place) are not seen here
    (:func:`preserved_state` copies such tensors' values back when a call ends)."""
    for entry in saved:
        current = vars(entry.module)
        for key in [key for key in current
                    if key not in entry.objects and key not in _MODULE_BOOKKEEPING]:
            del current[key]
        for key, value in entry.objects.items():
            if current.get(key, _MISSING) is not value:
                current[key] = value
        for key, contents in entry.contents.items():
            _put_back(entry.objects[key], contents)
        for name, value in entry.slots.items():
            if getattr(entry.module, name, _MISSING) is not value:
                object.__setattr__(entry.module, name, value)


def _is_state(value: object) -> TypeGuard[Tensor]:
    """Whether ``value`` is a tensor a forward may update as state: not a parameter, without a
    gradient to carry, not an inference tensor."""
    return (isinstance(value, Tensor) and not isinstance(value, nn.Parameter)
            and not value.requires_grad and not value.is_inference())


def _plain_tensors(model: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """Tensors held as plain attributes (not buffers) without a gradient to carry: state a
    forward may update in place, as it would a buffer's."""
    return [(module, key, value) for module in model.modules()
            for key, value in vars(module).items()
            if key not in _MODULE_BOOKKEEPING and _is_state(value)]


def _storage_key(tensor: Tensor) -> tuple[torch.device, int] | None:
    """The memory a strided tensor's values live in (None for other layouts, quantized, meta
    and lazy tensors, empty storages and a tensor without one of its own): tensors with one
    key are views of one memory."""
    if (tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta"
            or is_lazy(tensor)):
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a wrapper subclass's (no storage of its own)
        return None
    return (tensor.device, storage.data_ptr()) if storage.nbytes() else None


def _covered_bytes(tensor: Tensor) -> tuple[torch.device, int, int] | None:
    """The bytes a plain strided tensor's entries span in memory, ``(device, start, end)``
    (None for a subclass, an empty tensor and what :func:`_storage_key` leaves out)."""
    key = _storage_key(tensor) if type(tensor) is Tensor else None  # (subclasses: alone)
    if key is None or tensor.numel() == 0:
        return None
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    first = key[1] + int(tensor.storage_offset()) * tensor.element_size()
    return key[0], first, first + int(extent) * tensor.element_size()


def shared_clones(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Detached copies of ``tensors`` that share memory among themselves as the tensors do:
    one copy for a tensor listed twice, and tensors whose entries span overlapping memory (a
    buffer and a view of it held as another buffer or attribute, ``self.mean =
    self.stats[0]``; two tensors over one NumPy array; an expanded tensor, overlapping
    itself) views of one copy of the memory they span, conjugate and negative views as such,
    so that a write through one still reaches the others. (Cloned one by one, a forward that
    wrote through the view and read the buffer computed another function: a top eigenvalue
    0.724 for 0.711, unnoted; probe 203. Grouped by their storages' addresses alone, two over
    one array had the larger rebuilt on the smaller's copy, its tail uninitialised, and the
    views' conjugate bits were lost: probe 205.) A tensor subclass is copied by itself."""
    spans = sorted(((covered, tensor) for tensor in {id(t): t for t in tensors}.values()
                    if (covered := _covered_bytes(tensor)) is not None),
                   key=lambda item: (str(item[0][0]), item[0][1]))
    groups: list[list[tuple[tuple[torch.device, int, int], Tensor]]] = []
    for covered, tensor in spans:
        if (groups and groups[-1][0][0][0] == covered[0]
                and covered[1] < max(span[2] for span, _ in groups[-1])):
            groups[-1].append((covered, tensor))
        else:
            groups.append([(covered, tensor)])
    copies: dict[int, Tensor] = {}
    for group in groups:
        (device, start, _), lone = group[0]
        if len(group) == 1 and torch._debug_has_internal_overlap(lone) == 0:
            continue  # alone in its memory: cloned below
        end = max(span[2] for span, _ in group)
        # aligned for every dtype's view, as the allocator aligns (a float64 view at byte 4 of
        # a float32 buffer's group had been copied alone, its aliasing lost; probe 206)
        start -= start % 16
        memory = torch.empty(end - start, dtype=torch.uint8, device=device)
        for (_, first, beyond), tensor in group:
            storage = tensor.untyped_storage()
            raw = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
            memory[first - start:beyond - start].copy_(
                raw[first - storage.data_ptr():beyond - storage.data_ptr()])
        for (_, first, _), tensor in group:
            offset, misaligned = divmod(first - start, tensor.element_size())
            if misaligned:  # (another dtype's view at an odd address: copied alone)
                continue
            copied = torch.empty(0, dtype=tensor.dtype, device=device).set_(
                memory.untyped_storage(), offset, tensor.size(), tensor.stride())
            if tensor.is_conj():
                copied = copied.conj()
            if tensor.is_neg():
                copied = torch._neg_view(copied)
            copies[id(tensor)] = copied
    return [copies[id(tensor)] if id(tensor) in copies else copies.setdefault(
        id(tensor), tensor.detach().clone()) for tensor in tensors]


#: Copies of a model's buffers and plain tensor attributes a call holds: the caller's values
#: for the restore and the passes' copies (:func:`preserved_state`), and the state as the
#: first pass found it (:class:`PassState`).
STATE_COPIES = 3


def held_tensors(module: nn.Module) -> list[Tensor]:
    """The buffers and plain tensor attributes of ``module`` and its submodules: state that
    exists before a call (its copies are counted by :func:`state_bytes`, not as a graph's)."""
    return [*module.buffers(), *(tensor for _, _, tensor in _plain_tensors(module))]


def state_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of one copy of ``model``'s buffers and plain tensor attributes, of which a call
    holds :data:`STATE_COPIES`, and of the tensors inside its containers, of which it holds
    one (a model holding a 200 MB tensor attribute had peaked 3 copies above a prediction
    without them; probe 205)."""
    def total(tensors: Iterable[Tensor]) -> int:
        unique = {id(tensor): tensor for tensor in tensors if tensor.layout == torch.strided}
        return sum(tensor.numel() * tensor.element_size() for tensor in unique.values())

    return total(held_tensors(model)), total(_contained_tensors(model))


def _contained_tensors(model: nn.Module) -> list[Tensor]:
    """Tensors one level inside the list, tuple or dict attributes (of at most
    :data:`HELD_ITEMS` items) of the submodules and of the hook objects registered on them,
    and the hook objects' tensor attributes: statistics a hook accumulates in place (dormant
    neurons' activity in a dict on the model had grown by every forward pass of a call; probe
    109). Without a gradient to carry, as :func:`_plain_tensors`."""
    found: dict[int, Tensor] = {}
    owners = [*model.modules(), *(owner for _, owner in _hook_objects(model))]
    for owner in owners:
        for key, value in vars(owner).items():
            if isinstance(owner, nn.Module) and key in _MODULE_BOOKKEEPING:
                continue
            items = ([value] if isinstance(value, Tensor) and not isinstance(owner, nn.Module)
                     else list(value.values()) if isinstance(value, dict)
                     else list(value) if isinstance(value, list | tuple) else [])
            if len(items) > HELD_ITEMS:
                continue
            for item in items:
                if _is_state(item):
                    found.setdefault(id(item), item)
    return list(found.values())


def _module_prefixes(model: nn.Module) -> dict[int, str]:
    """Each submodule's (by id) dotted name as the start of its attributes' (``"block.0."``;
    ``""`` for the model)."""
    return {id(module): f"{name}." if name else "" for name, module in model.named_modules()}


def container_views(model: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """Tensors inside a list, tuple or dict attribute of a submodule whose memory overlaps a
    buffer's or a tensor attribute's, each with ``"'module.attribute' and 'module.buffer'"``
    and that buffer or attribute.
    A call runs on copies of buffers and tensor attributes, views of one memory as views of one
    copy (:func:`shared_clones`), but such a tensor keeps the caller's memory: a forward that
    wrote through one and read the other had computed another function (exact's top
    eigenvalue 1.08 for 3.02), and its writes had moved the caller's buffer's version (probe
    206). :func:`preserved_state` refuses a call whose passes write one."""
    names = _module_prefixes(model)
    items = []
    for module in model.modules():
        for key, value in vars(module).items():
            if key in _MODULE_BOOKKEEPING:
                continue
            values = (list(value.values()) if isinstance(value, dict)
                      else list(value) if isinstance(value, list | tuple) else [])
            if len(values) <= HELD_ITEMS:  # (as _contained_tensors)
                items += [(f"{names[id(module)]}{key}", item, covered) for item in values
                          if _is_state(item) and (covered := _covered_bytes(item)) is not None]
    if not items:
        return []
    held = [(covered, name, tensor) for name, tensor in model.named_buffers()
            if (covered := _covered_bytes(tensor)) is not None]
    held += [(covered, f"{names[id(module)]}{key}", tensor)
             for module, key, tensor in _plain_tensors(model)
             if (covered := _covered_bytes(tensor)) is not None]
    found = []
    for where, item, covered in items:
        shared = next(((other, tensor) for span, other, tensor in held
                       if span[0] == covered[0] and span[1] < covered[2]
                       and covered[1] < span[2]), None)
        if shared is not None:
            found.append((f"'{where}' and '{shared[0]}'", item, shared[1]))
    return found


def written_container_views_error(found: list[str]) -> ValueError:
    """The refusal of a forward that wrote memory a buffer or tensor attribute shares with a
    tensor the call does not copy (:func:`container_views`; one nested deeper, or held by a
    closure, shows as a write to the caller's buffer itself)."""
    return ValueError(
        f"the forward writes memory a buffer or tensor attribute shares with a tensor the call "
        f"does not copy, inside a list, tuple or dict attribute (nested or not) or held "
        f"elsewhere ({', '.join(dict.fromkeys(found[:3]))}): a call runs on copies of buffers "
        "and tensor attributes, keeping their views of one memory as views of one copy, but "
        "not such a tensor, so the write would not reach the other; hold it as an attribute or "
        "buffer of its own (self.mean = self.stats[0]) for the call")


class PassState:
    """The model's state as a call's first forward pass found it, put back before every later
    pass: the buffers' values, the registries of buffers, parameters and submodules, and the
    modules' plain attributes (the objects, what a list, dict, set or configuration object
    among them holds, and the values of tensors among them).

    A forward that updates its own state (a step counter or a running average it then reads, a
    hidden state carried over from the previous batch, a tensor cached on ``self``, a buffer or
    submodule created on first use) would otherwise make each pass of a call a different
    function, and the curvature of a method that runs several passes a mix of them; a
    per-sample pass under ``torch.func`` would leave its transformed tensors in the attributes.
    Buffers and tensor attributes are put back by rebinding a fresh copy of their first values,
    never in place, so that a graph an earlier pass saved stays valid; only those that changed
    (their version counter or their values moved, or the module rebound them). Parameters are
    never written. The state is taken at the first pass, after anything the call sets up
    (evaluation mode, process 0's buffers in a data-parallel call).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._attributes: list[_Attributes] | None = None
        #: [module, name, the tensor now held, its version then, its first value, registry]:
        #: buffers (registry ``module._buffers``) and plain tensor attributes (``vars(module)``)
        self._tensors: list[list[Any]] = []
        #: each module's registered buffer, parameter and submodule names at the first pass
        self._registered: list[tuple[nn.Module, set[str], set[str], set[str]]] = []
        #: buffers registered as None at the first pass
        self._empty: list[tuple[nn.Module, str]] = []
        #: the states of the generators the model holds at the first pass
        self._generators = ModuleGenerators(())

    @property
    def recorded(self) -> bool:
        """Whether the first pass has recorded the state (and copied it)."""
        return self._attributes is not None

    def before_pass(self) -> None:
        """Record the state (first pass) or put it back (every later one)."""
        if self._attributes is None:
            self._attributes = plain_attributes(self.model)
            self._registered = [(module, set(module._buffers), set(module._parameters),
                                 set(module._modules)) for module in self.model.modules()]
            # (ordinary tensors: a call runs outside inference mode, :func:`differentiable`;
            # a torch.inference_mode(False) block here, interrupted as it closed, had its guard
            # restore a stale grad mode when collected, after the call's restores; probe 79)
            self._tensors = [
                [module, name, tensor, tensor._version, None, module._buffers]
                for module in self.model.modules()
                for name, tensor in module._buffers.items() if tensor is not None]
            self._tensors += [[module, name, tensor, tensor._version, None, vars(module)]
                              for module, name, tensor in _plain_tensors(self.model)]
            for slot, value in zip(self._tensors, shared_clones([s[2] for s in self._tensors])):
                slot[4] = value  # views of one memory stay views of one copy of it
            # a buffer registered as None that a pass fills (state carried from the last
            # batch): every later pass had seen the first one's (probe 203)
            self._empty = [(module, name) for module in self.model.modules()
                           for name, tensor in module._buffers.items() if tensor is None]
            # a generator the model holds: every pass draws what the first did, a per-sample
            # pass outside run_model too (fisher/ggn's general path had refused such a model as
            # one whose passes differ; probe 203)
            self._generators = ModuleGenerators.read(self.model)
            return
        for module, buffers, parameters, submodules in self._registered:
            for registry, names in ((module._buffers, buffers), (module._parameters, parameters),
                                    (module._modules, submodules)):
                for name in [name for name in registry if name not in names]:
                    del registry[name]  # registered on first use in a later pass
        for module, name in self._empty:
            if name in module._buffers:
                module._buffers[name] = None
        self._generators.restore()
        rebind_attributes(self._attributes)
        # (a write through .data moves no version counter: the values tell)
        in_place = [slot[5].get(slot[1]) is slot[2] and slot[2]._version == slot[3]
                    for slot in self._tensors]
        unchanged = iter(_same_values([(slot[2], slot[4]) for slot, same in zip(
            self._tensors, in_place) if same], sparse_compared=False))
        stale = [not (same and next(unchanged)) for same in in_place]
        # the views of a memory one of them changed are copied again together
        memories = {_storage_key(slot[4]) for slot, old in zip(self._tensors, stale) if old}
        memories.discard(None)
        stale = [old or _storage_key(slot[4]) in memories
                 for slot, old in zip(self._tensors, stale)]
        renewed = [slot for slot, old in zip(self._tensors, stale) if old]
        for slot, copied in zip(renewed, shared_clones([slot[4] for slot in renewed])):
            module, name, _, _, _, registry = slot
            registry[name] = slot[2] = copied
            slot[3] = copied._version
            if registry is not module._buffers:  # an attribute: rebound to the copy from now on
                for entry in self._attributes:
                    if entry.module is module:
                        entry.objects[name] = copied


#: Signals whose delivery :func:`deferred_interrupts` can hold back: all but those a process
#: cannot block or that report a fault of the instruction itself.
_DEFERRABLE = frozenset(signal.valid_signals()) - {
    getattr(signal, name) for name in ("SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE",
                                       "SIGILL", "SIGINT") if hasattr(signal, name)}
#: The C function under ``signal.pthread_sigmask`` (None where the system has none), whose
#: wrapper turns the returned mask into enum members: 0.1 ms a block-and-restore against 3 us,
#: eight of them in a call. ``signal`` imports it from ``_signal``.
_SIGMASK = getattr(sys.modules.get("_signal"), "pthread_sigmask", None)


#: Signals whose Python handler :func:`deferred_interrupts` swaps for a recorder: all that a
#: process can catch (only those with a Python handler are swapped).
_CATCHABLE = tuple(sorted(frozenset(signal.valid_signals()) - {
    getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)}))
#: Tries to put a handler back while handlers of pending signals raise in ``signal.signal``.
_PUT_BACK_TRIES = 16
#: The C functions under ``signal.getsignal`` and ``signal.signal``, without their wrappers'
#: enum conversions (a block reads every catchable signal's handler).
_GETSIGNAL = getattr(sys.modules.get("_signal"), "getsignal", signal.getsignal)
_SETSIGNAL = getattr(sys.modules.get("_signal"), "signal", signal.signal)


def _python_handlers() -> dict[int, Callable[[int, Any], Any]]:
    """The signals whose handler is a Python callable (only those can raise in Python), with
    it."""
    handlers: dict[int, Callable[[int, Any], Any]] = {}
    for number in _CATCHABLE:
        handler = _GETSIGNAL(number)
        if callable(handler):
            handlers[number] = handler
    return handlers


def _handlers_put_back(handlers: dict[int, Callable[[int, Any], Any]]) -> BaseException | None:
    """Install ``handlers`` again, each to the end: ``signal.signal`` first runs the handlers of
    pending signals, and one that raises (a timeout whose handler was put back already) had
    left Ctrl-C's recorder installed for good (probe 124). Returns the first such exception,
    for the caller to raise once everything is back."""
    raised: BaseException | None = None
    # Ctrl-C's last: it can raise from the moment it is back, and the others are back by then
    order = sorted(handlers.items(), key=lambda item: item[0] == signal.SIGINT)
    done = tries = 0
    while done < len(order) and tries < _PUT_BACK_TRIES:
        # the loop's own steps inside the try: a handler put back runs at the next step (a
        # backward jump), and one that raised there, outside it, had left Ctrl-C's recorder
        # installed (3 in 251 blocks under timers; probe 223)
        try:
            while done < len(order):
                _SETSIGNAL(*order[done])
                done += 1
        except BaseException as error:  # noqa: BLE001 - a pending signal's handler's
            raised = raised or error
            tries += 1
    return raised


def _delivered(received: list[int], handlers: dict[int, Callable[[int, Any], Any]],
               raised: BaseException | None) -> BaseException | None:
    """Run the handler of each signal ``received`` (once a kind, in order of arrival, as the
    system delivers pending signals), as Python would have; the first exception of
    ``raised`` and theirs. Called directly, not raised again: a handler that an asyncio loop
    reads through its wakeup file gets one write, the signal's own."""
    frame = sys._getframe()
    for number in dict.fromkeys(received):
        try:
            handlers[number](number, frame)
        except BaseException as error:  # noqa: BLE001 - raised once every handler has run
            raised = raised or error
    return raised


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back every signal with a Python handler (Ctrl-C's, a timeout's) inside the block
    and run its handler once the block has finished.

    Makes a restore atomic: a ``KeyboardInterrupt`` or a timeout's exception can land before or
    after it, never half-way. Each Python handler is swapped for a recorder: Python runs
    handlers in the main thread wherever the system delivered the signal, and a process-directed
    one (a timer's, ``kill``) goes to any thread that does not block it, torch's own threads
    among them, so blocking signals in the main thread (``pthread_sigmask``, kept for what the
    main thread receives) had not held a timeout back: it raised inside restores, leaving every
    module in evaluation mode on the call's copies of its buffers (probe 124). Only the main
    thread runs handlers; elsewhere the block runs as is.

    The caller's handlers and mask are read before anything changes, and every change is made
    inside the ``try`` that undoes it: a signal whose handler raises while the block is entered
    or left finds the handlers and the mask put back (landing between a handler's swap and the
    mask, a ``SIGALRM`` had left Ctrl-C recorded for good; between the handler's restore and
    the mask's, a Ctrl-C had left 55 signals blocked; probe 79). A restore that must not be
    skipped by a signal landing before the block holds it back runs inside
    :class:`ExitsHeldBack`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    handlers = _python_handlers()
    mask = _SIGMASK(signal.SIG_BLOCK, ()) if _SIGMASK is not None else None  # reads it
    swapped: dict[int, Callable[[int, Any], Any]] = {}

    def record(number: int, _: Any) -> None:
        received.append(number)

    try:
        if _SIGMASK is not None:
            _SIGMASK(signal.SIG_BLOCK, _DEFERRABLE)
        for number, handler in handlers.items():
            swapped[number] = handler  # first: one that lands in the swap is put back too
            _SETSIGNAL(number, record)
        yield
    finally:
        # The mask first, while every handler is still a recorder (the signals it held back
        # are recorded), then the handlers, Ctrl-C's last: a Ctrl-C can raise only once its
        # own handler is back, and it had landed there with the mask still set, leaving 55
        # signals blocked (probe 145).
        raised: BaseException | None = None
        try:
            if mask is not None and _SIGMASK is not None:
                _SIGMASK(signal.SIG_SETMASK, mask)
        finally:
            try:
                raised = _handlers_put_back(swapped)
            finally:
                raised = _delivered(received, handlers, raised)
                if raised is not None:
                    raise raised


Params = ParamSpec("Params")
Returned = TypeVar("Returned")


def _handler_codes() -> set[types.CodeType]:
    """The code of each Python signal handler installed now (a function's, a method's, a
    partial's function's, a callable object's ``__call__``)."""
    codes = set()
    for handler in _python_handlers().values():
        function = getattr(handler, "func", handler)  # a functools.partial's
        function = getattr(function, "__func__", function)  # a bound method's
        code = getattr(function, "__code__", None)
        if code is None:
            call = inspect.getattr_static(type(function), "__call__", None)
            code = getattr(call, "__code__", None)
        if isinstance(code, types.CodeType):
            codes.add(code)
    return codes


#: The devices whose autocast the running call turned off (the caller had it on), for the
#: message of a forward that runs only under it (:func:`autocast_turned_off`).
_AUTOCAST_OFF: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "autocast_off", default=())


def autocast_turned_off() -> tuple[str, ...]:
    """The device types whose ``torch.autocast`` the running call turned off (the caller's was
    on); empty outside the calls."""
    return _AUTOCAST_OFF.get()


#: The exceptions the caller was handling as the innermost running call began (ids;
#: :func:`signalled` leaves them to the caller); None outside the calls, where an exception's
#: chain holds a ``KeyboardInterrupt`` only as the caller's (the calls send theirs out as such:
#: a Tracker recording failures inside the caller's ``except KeyboardInterrupt:`` had raised
#: them; probe 181).
_HANDLED_AT_ENTRY: contextvars.ContextVar[frozenset[tuple[int, int]] | None] = (
    contextvars.ContextVar("handled_at_entry", default=None))


_Node = TypeVar("_Node")


def each_once(roots: Iterable[_Node | None],
              following: Callable[[_Node], Iterable[_Node | None]]) -> Iterator[_Node]:
    """Every node reached from ``roots`` through ``following`` (None ones skipped), each once by
    identity, depth first: a walk over a graph that may hold cycles or shared nodes."""
    seen: set[int] = set()
    pending = list(roots)
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(following(current))


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and its causes and contexts, each once: both followed (an error raised from
    itself, ``raise error from error``, had hidden the interrupt in its context; probe 181)."""
    return each_once([error], lambda current: [current.__context__, current.__cause__])


def signalled(error: BaseException, handled: frozenset[tuple[int, int]] | None = None
              ) -> BaseException | None:
    """The exception that a signal's Python handler raised (a job's timeout from a ``SIGALRM``
    handler), or inside a call a ``KeyboardInterrupt`` (Python's own Ctrl-C handler is C code:
    no frame of it shows), where ``error`` is it or comes from it (its cause or context); None
    otherwise. Such an exception passed through the handler's frame, which its traceback holds.
    A Ctrl-C that torch's own code turned into a ``RuntimeError`` (an interrupt as
    ``torch.func.vmap`` leaves a level: "INTERNAL ASSERT layerId == dynamic_layer.layerId()")
    had been taken for the loss's failure in float64, and the call returned a result (probe
    179). Those the caller was handling when the call began (``handled``, :func:`handled_now`;
    default the running call's) are the caller's, whichever handler raised them: a call in the
    caller's ``except`` of its own timeout had raised that timeout again (probe 182)."""
    codes: set[types.CodeType] | None = None
    handled = _HANDLED_AT_ENTRY.get() if handled is None else handled
    for current in _chain(error):
        if handled is not None and _raised(current) in handled:
            continue
        if isinstance(current, KeyboardInterrupt) and handled is not None:
            return current
        trace = current.__traceback__
        while trace is not None:
            codes = _handler_codes() if codes is None else codes
            if trace.tb_frame.f_code in codes:
                return current
            trace = trace.tb_next
    return None


class GroupFailure(RuntimeError):
    """Another process of the group failed; this one stops at its next exchange with it, with
    this error, whose message names the failing process and its error (a data-parallel call,
    ``effective_rank(..., process_group=...)``; :mod:`hessrank.distributed`). Sent out of the
    call past its handlers of the loss's failures, as a signal's exception is
    (:func:`raise_if_signalled`)."""


class _Signalled(BaseException):
    """A signal handler's exception on its way out of a call: a ``BaseException``, which no
    handler of the call's own that catches ``Exception`` (or ``ValueError``, where a float64
    evaluation's failure is read) takes for a failure of the loss or the model; raised as the
    original at the call's edge (:func:`surfacing_signals`)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


def raise_if_signalled(error: BaseException) -> None:
    """Send ``error``'s exception that a signal's handler raised (:func:`signalled`) out of the
    call, past every handler of the call's own: called first wherever the call catches an
    exception of the loss or the model to take another route.

    A timeout that landed inside one of the call's evaluations of the loss in float64 had been
    taken for the loss failing there: the call went on and returned a result, the caller's
    timeout lost (probe 132: 19 of 60 ``fisher`` calls under a random timer); re-raised as it
    was, a handler's ``ValueError`` was caught again one level up (probe 134).

    A :class:`GroupFailure` (another process of a data-parallel call failed), ``error`` itself
    or its explicit cause, goes out the same way: a float64 trial of the loss that met it had
    taken it for the loss failing in float64, gone on, and waited for the failed process until
    gloo closed the connection (probe 161). Not one in ``error``'s context: a call made while
    the caller handles an earlier call's had raised that one (probe 164).

    Raises:
        _Signalled: carrying that exception.
    """
    found = signalled(error)
    current: BaseException | None = error
    seen: set[int] = set()
    while found is None and current is not None and id(current) not in seen:
        seen.add(id(current))
        found = current if isinstance(current, GroupFailure) else None
        current = current.__cause__
    if found is not None:
        raise _Signalled(found) from None


#: Modules torch imports inside the calls hessrank makes, the first time: its gradient
#: (``torch.autograd.grad``'s ``_make_grads``) imports ``symbolic_shapes``, and with it sympy.
LAZY_IMPORTS = ("torch.fx.experimental.symbolic_shapes",)


def _imported_whole() -> None:
    """Import :data:`LAZY_IMPORTS` with interrupts held back (:func:`deferred_interrupts`): a
    Ctrl-C that landed inside torch's own lazy import, during a process's first call, had left
    sympy half-imported, and every later call in the process failed ("module 'sympy' has no
    attribute 'logic'"; probe 149). Once a process; the first call would import them anyway."""
    missing = [name for name in LAZY_IMPORTS if name not in sys.modules]
    if missing:
        with deferred_interrupts():
            for name in missing:
                importlib.import_module(name)


def underflow_ignored(function: Callable[Params, Returned]) -> Callable[Params, Returned]:
    """``function`` with NumPy's underflow to zero ignored, benign in every computation of
    hessrank's, whatever the caller's ``np.seterr`` (``all="raise"``, a debugging setting, had
    lanczos fail on 14 of 20 seeds of a small MLP, and ``spectral_ranks`` raise on an
    eigenvalue of 1e-300 squared; probe 223)."""

    @functools.wraps(function)
    def call(*args: Params.args, **kwargs: Params.kwargs) -> Returned:
        with np.errstate(under="ignore"):
            return function(*args, **kwargs)

    return call


def surfacing_signals(function: Callable[Params, Returned]) -> Callable[Params, Returned]:
    """``function`` (a public entry point), raising a signal handler's exception that
    :func:`raise_if_signalled` sent out of its work as the handler raised it; torch's lazy
    imports made first, whole (:func:`_imported_whole`); NumPy's underflow ignored."""

    quiet = underflow_ignored(function)

    @functools.wraps(function)
    def call(*args: Params.args, **kwargs: Params.kwargs) -> Returned:
        _imported_whole()
        modes, numpy_errors = _function_modes(), dict(np.geterr())
        transforms, default_device = _transform_depth(), _default_device_context()
        entered = None
        try:  # (set inside: a Ctrl-C just after it had left it set for good; probe 182)
            entered = _HANDLED_AT_ENTRY.set(handled_now())
            return quiet(*args, **kwargs)
        except _Signalled as carried:
            _exit_abandoned(carried)
            raise carried.original from carried.original.__cause__
        except BaseException as failure:
            _exit_abandoned(failure)
            # a Ctrl-C that torch's code turned into its own error on its way out (probe 179)
            interrupt = signalled(failure) if isinstance(failure, Exception) else None
            if isinstance(interrupt, KeyboardInterrupt):
                raise interrupt from None
            raise
        finally:
            if entered is not None:
                _HANDLED_AT_ENTRY.reset(entered)
            _global_modes_put_back(modes, numpy_errors, transforms, default_device)

    return call


def _function_modes() -> list[Any]:
    """Torch's function-mode stack, bottom first."""
    return [torch._C._get_function_stack_at(index)
            for index in range(torch._C._len_torch_function_stack())]


def _default_device_context() -> Any:
    """The device context ``torch.set_default_device`` put at the bottom of torch's mode stack,
    or None (``with torch.device(...)`` pushes its own on top, and leaves this one alone)."""
    return getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)


def _global_modes_put_back(modes: list[Any], numpy_errors: dict[str, Any],
                           transforms: int, default_device: Any) -> None:
    """Torch's function-mode stack as the call found it (``modes``, by identity) with what the
    forward added and left but none of hessrank's modes, NumPy's error handling as
    ``numpy_errors``, and ``torch.func``'s transforms down to ``transforms``
    (:func:`_transform_depth`): a Ctrl-C that lands inside the ``__enter__`` of a torch mode
    (after its push), ``np.errstate``'s ``__exit__`` or as ``vmap`` leaves a level skips the
    exit that undoes it, and had left the mode on the stack for every later torch call of the
    training loop (a call counter that grew by 40 entries a step), NumPy's warnings off (probe
    145), or the process inside ``vmap`` for good, its next ``loss.backward()`` refused (probe
    179). One landing as torch puts a mode it set aside back had lost hessrank's, whose exit
    then popped the caller's own (probe 184): the stack found is restored by identity."""
    # Rebuilt by identity where it differs: the modes found, and those the forward added and
    # left (by position, a default device the forward set had pushed the caller's mode twice,
    # probe 190; a mode it entered and never left kept hessrank's under it, probe 191), in
    # their order, none of hessrank's. The default device's context, the one set_default_device
    # keeps at the bottom, is torch's current one (the forward's set_default_device over the
    # caller's had left two, and its set_default_device(None) had been undone, probe 191); a
    # `with torch.device(...)` block's keeps its place (moved to the bottom, it had outlived the
    # caller's block; probe 192).
    now, current = _function_modes(), _default_device_context()
    others = [mode for mode in now if not any(mode is found for found in modes)
              and not isinstance(mode, OwnMode)]
    wanted = [*([current] if current is not None else []),
              *(mode for mode in [*modes, *others]
                if mode is not current and mode is not default_device)]
    if len(wanted) != len(now) or any(mode is not found for mode, found in zip(wanted, now)):
        while torch._C._len_torch_function_stack():
            torch._C._pop_torch_function_stack()
        for mode in wanted:
            torch._C._push_on_torch_function_stack(mode)
    if np.geterr() != numpy_errors:
        np.seterr(**numpy_errors)
    functorch = torch._C._functorch
    leave = {functorch.TransformType.Vmap: functorch._vmap_decrement_nesting,
             functorch.TransformType.Grad: functorch._grad_decrement_nesting,
             functorch.TransformType.Jvp: functorch._jvp_decrement_nesting,
             functorch.TransformType.Functionalize: functorch._func_decrement_nesting}
    while _transform_depth() > transforms:
        leave[functorch.peek_interpreter_stack().key()]()


#: The frames in which a generator context manager is caught entering or exiting.
_ENTER_EXIT = {_GeneratorContextManager.__enter__.__code__,
               _GeneratorContextManager.__exit__.__code__}


def _exit_abandoned(error: BaseException) -> None:
    """Exit now the context managers of torch's own code that ``error`` left suspended on its
    way out of the call: generator-based, caught in their ``__enter__`` or ``__exit__`` (a frame
    of its traceback; a Ctrl-C at the entry of the ``__exit__`` of ``handle_torch_function``'s
    ``_pop_mode_temporarily`` left its generator to push hessrank's mode back onto torch's stack
    when collected, after the call had put the stack back, for every later torch call of the
    training loop; probe 179). Each is closed (its ``finally`` runs), errors ignored. Only those
    frames are read (every local of every frame had been: a config whose ``__getattr__`` raises
    ``KeyError`` replaced the call's error, and a caller's ``fork_rng`` named in the loss was
    closed; probe 182), not the caller's handled exceptions' (probe 181)."""
    root = torch.__path__[0]
    handled = _HANDLED_AT_ENTRY.get() or frozenset()
    for current in _chain(error):
        if _raised(current) in handled:
            continue
        trace = current.__traceback__
        while trace is not None:
            frame, trace = trace.tb_frame, trace.tb_next
            if frame.f_code not in _ENTER_EXIT:
                continue
            manager = frame.f_locals.get("self")
            if type(manager) is _GeneratorContextManager:
                generator = manager.gen
                if (isinstance(generator, types.GeneratorType)
                        and inspect.getgeneratorstate(generator) == inspect.GEN_SUSPENDED
                        and generator.gi_code.co_filename.startswith(root)):
                    with suppress(Exception):  # (its own failure to exit is torch's)
                        generator.close()


def handled_now() -> frozenset[tuple[int, int]]:
    """The exceptions being handled where this is called, and their causes and contexts, for
    :func:`signalled`: each by itself and its traceback (one raised again has another: a
    handler that raises one prebuilt timeout had its timeout inside a call, made in the
    caller's ``except`` of the last, taken for the caller's; probe 184)."""
    return frozenset(_raised(error) for error in _chain(sys.exc_info()[1]))


def _raised(error: BaseException) -> tuple[int, int]:
    """An exception as raised: itself and its traceback."""
    return id(error), id(error.__traceback__)


def _transform_depth() -> int:
    """How many ``torch.func`` transforms (vmap, grad, jvp) the running code is inside."""
    stack = torch._C._functorch.get_interpreter_stack()
    return 0 if stack is None else len(stack)


#: The :class:`ExitsHeldBack` of the call in progress in this context, if any.
_CALL_EXITS: contextvars.ContextVar[ExitsHeldBack | None] = contextvars.ContextVar(
    "hessrank_call_exits", default=None)


def also_at_call_exit(restore: Callable[[], None]) -> None:
    """Have the call in progress run ``restore`` (idempotent: it puts a saved state back) again
    as it exits, with signals held back (:class:`ExitsHeldBack`): a signal landing as the
    block that runs it begins would skip it. Nothing outside a call."""
    exits = _CALL_EXITS.get()
    if exits is not None:
        exits.also_at_exit(restore)


#: torch's warning that ``vmap`` runs an operator that has no batching rule one sample at a
#: time: about torch's internals, raised inside the library's own transforms, nothing the
#: caller called (``nn.MultiMarginLoss``'s, ``nn.Bilinear``'s; probe 240).
VMAP_FALLBACK_WARNING = "There is a performance drop because we have not yet implemented"


@contextmanager
def warnings_ignored(message: str) -> Iterator[None]:
    """Warnings whose message matches ``message`` ignored inside the block
    (``warnings.catch_warnings``), the filters put back on exit, and again as the call exits
    where a signal skipped that (:func:`also_at_call_exit`): only while they are still the
    block's own copy (put back whatever they were, filters another thread's ``catch_warnings``
    had set were restored for good, every later warning silenced; probe 226)."""
    saved = warnings.filters
    with warnings.catch_warnings():
        own = warnings.filters

        def put_back() -> None:
            if warnings.filters is own:
                warnings.filters = saved
                warnings._filters_mutated()  # type: ignore[attr-defined]

        also_at_call_exit(put_back)
        warnings.filterwarnings("ignore", message=message)
        yield


class ExitsHeldBack:
    """Signals held back (:func:`deferred_interrupts`) from the end of a call's work until the
    call's guards have all exited: the outermost context manager of a call, whose
    :meth:`from_here` is the innermost.

    Each guard's restore holds signals back itself, but a signal whose handler raises (Ctrl-C,
    a ``SIGALRM`` timeout) could land between two of them, at the entry of the Python function
    that runs the next one, and skip it: every module left in evaluation mode and on the call's
    copies of its buffers, torch's attention fast path left off (probe 79). Held from the end
    of the work, such a signal is delivered once every restore has run; one that lands before
    (at the entry of :meth:`from_here`'s exit) leaves the restores unprotected as before.

    A restore inside the work, which a signal landing as it begins skips (before it holds
    signals back itself), is registered with :func:`also_at_call_exit` and run again here (a
    ``catch_warnings`` exit skipped had left the call's filters in place, a recording's restore
    a Function class its recording ``forward``; probe 223).
    """

    def __init__(self) -> None:
        self._held = ExitStack()
        self._restores: list[Callable[[], None]] = []
        self._token: contextvars.Token[ExitsHeldBack | None] | None = None

    def __enter__(self) -> ExitsHeldBack:
        self._token = _CALL_EXITS.set(self)
        return self

    def __exit__(self, *exception: object) -> None:
        if self._token is not None:
            _CALL_EXITS.reset(self._token)
        # (signals held back by from_here's exit)
        for restore in reversed(self._restores):  # each idempotent: run already, or not
            restore()
        self._held.close()  # the held-back signals are delivered here

    def also_at_exit(self, restore: Callable[[], None]) -> None:
        """Run ``restore`` (idempotent) again when the call exits."""
        self._restores.append(restore)

    @contextmanager
    def from_here(self) -> Iterator[None]:
        """The innermost context manager of the call: signals are held back from its exit on."""
        try:
            yield
        finally:
            self._held.enter_context(deferred_interrupts())


@dataclass(frozen=True)
class GlobalGenerators:
    """The global random generators' states: torch's CPU and (once initialised) CUDA ones,
    Python's, and NumPy's whatever bit generator it holds. Reading them takes about 80 us, most
    of it NumPy's."""

    torch_states: tuple[Tensor, ...]  # CPU, then each CUDA device's
    python: Any
    numpy: dict[str, Any]

    @classmethod
    def read(cls) -> GlobalGenerators:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls((torch.get_rng_state(), *cuda), random.getstate(),
                   np.random.get_state(legacy=False))

    def restore(self) -> None:
        """Set every generator back to these states."""
        torch.set_rng_state(self.torch_states[0])
        if len(self.torch_states) > 1:
            torch.cuda.set_rng_state_all(list(self.torch_states[1:]))
        random.setstate(self.python)
        np.random.set_state(self.numpy)

    def same_as(self, other: GlobalGenerators) -> bool:
        """Whether no generator moved between the two readings; CUDA's only where both hold it
        (a forward that initialises CUDA creates its generators, which is no draw to be seen).
        NumPy's state nests arrays: compared pickled."""
        return (all(torch.equal(a, b) for a, b in zip(self.torch_states, other.torch_states))
                and self.python == other.python
                and pickle.dumps(self.numpy) == pickle.dumps(other.numpy))


#: How to read and set the state of each kind of random generator a model or a loader may
#: hold (NumPy's ``Generator`` goes through its bit generator's ``state``).
_STATE_OF: tuple[tuple[type, str, str], ...] = (
    (torch.Generator, "get_state", "set_state"),
    (random.Random, "getstate", "setstate"),
    (np.random.RandomState, "get_state", "set_state"),
)


@dataclass(frozen=True)
class HeldGenerator:
    """A random generator an object holds, with its state at the reading."""

    where: str  # the attribute's path ("block.noise.generator", "block.streams[1]")
    generator: object
    read: Callable[[], Any]
    write: Callable[[Any], None]
    state: Any

    def moved(self) -> bool:
        """Whether it drew since the reading (NumPy's and Python's states compared pickled)."""
        now = self.read()
        if isinstance(now, Tensor):
            return not torch.equal(now, self.state)
        return pickle.dumps(now) != pickle.dumps(self.state)

    def restore(self) -> None:
        """Set it back to its state at the reading."""
        self.write(self.state)


def _state_access(value: object) -> tuple[Callable[[], Any], Callable[[Any], None]] | None:
    """How to read and write ``value``'s state where it is a random generator of a known kind
    (``torch.Generator``, ``random.Random``, NumPy's ``Generator`` and ``RandomState``); None
    for anything else, and for ``random.SystemRandom`` (the system's entropy: no state)."""
    if isinstance(value, np.random.Generator):
        bits = value.bit_generator
        return functools.partial(getattr, bits, "state"), functools.partial(setattr, bits, "state")
    if isinstance(value, random.SystemRandom):
        return None
    for kind, getter, setter in _STATE_OF:
        if isinstance(value, kind):
            return getattr(value, getter), getattr(value, setter)
    return None


#: The most items of a list, tuple or dict attribute searched for generators: reading one
#: is part of every forward pass of a call (a vocabulary held as a list of 10^6 words had cost
#: 3.4 s a reading; probe 74).
HELD_ITEMS = 64


def held_generators(owners: Iterable[tuple[str, object]], depth: int = 0
                    ) -> list[HeldGenerator]:
    """The random generators ``owners`` hold as attributes, directly or as an item of a list,
    tuple or dict attribute of at most :data:`HELD_ITEMS` items, each once (the first place it
    is found), with their states. A module's own registries are not searched.

    Args:
        owners: ``(path, object)`` pairs (``model.named_modules()``); the path prefixes the
            attribute's name where it is not empty.
        depth: how many levels further to search, through what plain objects (not modules,
            tensors or code) hold as attributes, containers as items, a ``functools.partial``
            as its function and arguments, a function in its closure and a bound method as
            its object: a data set's transform holding its generator, a ``Compose`` of such,
            a collate function bound to one by ``partial`` (each had been left advanced by a
            call's passes, the caller's next epoch changed; probes 232, 235, 237). An owner
            that is a ``partial`` is searched through its function and arguments.
    """
    found: dict[int, HeldGenerator] = {}
    searched: dict[int, int] = {}  # the most levels below each object searched

    def search(value: object, where: str, levels: int) -> None:
        if id(value) not in found and (access := _state_access(value)) is not None:
            read, write = access
            found[id(value)] = HeldGenerator(where, value, read, write, read())
        if levels > searched.get(id(value), -1):
            searched[id(value)] = levels
            for place, item in _members(value, where, objects=levels > 0):
                search(item, place, levels - 1)

    for prefix, owner in owners:
        attributes = (_members(owner, prefix, objects=True)
                      if isinstance(owner, functools.partial) else
                      [(f"{prefix}.{key}" if prefix else key, value)
                       for key, value in _own_attributes(owner).items()
                       if not (key in _MODULE_BOOKKEEPING and isinstance(owner, nn.Module))])
        for place, value in attributes:
            search(value, place, depth)
    return list(found.values())


def _members(value: object, where: str, objects: bool) -> list[tuple[str, object]]:
    """``(place, item)`` for what ``value`` holds, for :func:`held_generators`: a list's,
    tuple's or dict's items (at most :data:`HELD_ITEMS`); where ``objects``, also a
    ``functools.partial``'s function and arguments, a bound method's object, a function's
    closure and a plain object's attributes."""
    if isinstance(value, list | tuple | dict):
        if len(value) > HELD_ITEMS:
            return []
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return [(f"{where}[{index!r}]", item) for index, item in items]
    if not objects:
        return []
    if isinstance(value, functools.partial):  # (its function too: partial(obj.method); probe 237)
        return [(f"{where}.func", value.func),
                *((f"{where}.args[{index}]", item) for index, item in enumerate(value.args)),
                *((f"{where}.keywords[{key!r}]", item) for key, item in value.keywords.items())]
    # a function's closure and a bound method's object (a lambda transform drawing from a
    # generator it captured had been left advanced; probe 235)
    if isinstance(value, types.MethodType):
        return [(f"{where}.__self__", value.__self__)]
    if isinstance(value, types.FunctionType):
        return [(f"{where}.<{name}>", cell.cell_contents)
                for name, cell in zip(value.__code__.co_freevars, value.__closure__ or ())
                if _filled(cell)]
    if isinstance(value, _NOT_CONTAINERS):
        return []
    return [(f"{where}.{key}", item) for key, item in _own_attributes(value).items()]


def _filled(cell: types.CellType) -> bool:
    """Whether a closure's cell holds a value (one not yet assigned raises on reading)."""
    try:
        cell.cell_contents  # noqa: B018 - read for its error only
    except ValueError:
        return False
    return True


def _own_attributes(value: object) -> dict[str, Any]:
    """``value.__dict__`` read past any ``__getattr__`` (a delegating proxy whose target is not
    set recursed without end on ``hasattr``; probe 235), empty where it has none."""
    try:
        attributes = object.__getattribute__(value, "__dict__")
    except Exception:  # noqa: BLE001 - no __dict__ of its own (slots, a C type)
        return {}
    return attributes if isinstance(attributes, dict) else {}


#: A module's hook registries whose callables may be objects holding state of their own.
_HOOK_REGISTRIES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                    "_backward_pre_hooks")


def _hook_objects(model: nn.Module) -> list[tuple[str, object]]:
    """``(place, object)`` for each hook registered on a submodule that is an object of its own
    (a callable instance, or the instance a bound method belongs to): what its generators are
    held by (a noise-injecting hook's ``torch.Generator`` had been left advanced; probe 109)."""
    objects = []
    for name, module in model.named_modules():
        for registry in _HOOK_REGISTRIES:
            for key, hook in getattr(module, registry, {}).items():
                owner = getattr(hook, "__self__", hook)
                if not isinstance(owner, _NOT_CONTAINERS) and hasattr(owner, "__dict__"):
                    objects.append((f"{name or '(root)'}.{registry}[{key}]", owner))
    return objects


@dataclass(frozen=True)
class ModuleGenerators:
    """The states of the private random generators a model's submodules hold (noise a forward
    draws for itself, seeded apart from the global generators): :func:`held_generators`."""

    states: tuple[HeldGenerator, ...]

    @classmethod
    def read(cls, model: nn.Module) -> ModuleGenerators:
        return cls(tuple(held_generators([*model.named_modules(), *_hook_objects(model)])))

    @property
    def places(self) -> list[str]:
        """Where the generators are held (``"block.noise.generator"``)."""
        return [held.where for held in self.states]

    def moved(self) -> list[str]:
        """Where a generator drew since the reading."""
        return [held.where for held in self.states if held.moved()]

    def restore(self) -> None:
        """Set every generator back to its state at the reading."""
        for held in self.states:
            held.restore()


@contextmanager
def preserved_state(model: nn.Module, refuse_writes: bool = True
                    ) -> Iterator[Callable[[], None]]:
    """Restore, on exit (normal, by exception or by Ctrl-C), the model's observable state.

    Covers, for every submodule: the ``training`` flag (restored as an attribute, never through
    ``train()``), the hook dictionaries, the parameter, buffer and submodule *registrations* (so
    a buffer that forward rebinds, ``self.steps = self.steps + 1``, a parameter that a functional
    call left swapped and a submodule created on first use come back as the caller's), buffers
    and plain tensor attributes (the call runs on copies of them; values written through
    another reference are copied back in place), the plain attributes (a counter, a carried
    hidden state or a cached tensor that forward rebinds come back as the caller's objects,
    what a list, dict, set or configuration object among them holds is put back, and
    attributes it added are removed), the values of tensors one level inside them or held by
    hook objects (:func:`_contained_tensors`), ``__slots__`` values, and for
    every parameter ``requires_grad`` and ``.grad`` (the same tensor objects); plus the global
    random number generators: torch's CPU and CUDA ones, Python's and NumPy's (a forward may
    draw from any of them), and the generators submodules hold (:func:`held_generators`). The
    restore runs with Ctrl-C held back, so it is atomic. Parameter values are not copied: hessrank
    writes them only through :func:`renormalised_embeddings`, which restores what it wrote
    itself. A forward that writes its own parameters in place is refused instead
    (:func:`written_parameters_error`): the block yields a check to run once the work's first
    forward pass has (version counters), and the check runs again on a normal exit (version
    counters and values); with ``refuse_writes=False`` (a loss module's guard: a learned
    temperature it clamps in place is its own business) neither runs.

    Yields:
        ``check()``: raises ``ValueError`` if a parameter was written in place since entry.
    """
    armed = False  # whether the snapshot is complete, so that the restore may run
    try:
        with deferred_interrupts():  # a Ctrl-C held here lands after ``armed``, in the try
            modules = list(model.modules())
            training = [m.training for m in modules]
            hooks = [{name: dict(getattr(m, name)) for name in _HOOK_DICTS if hasattr(m, name)}
                     for m in modules]
            registered_params = [dict(m._parameters) for m in modules]
            registered_buffers = [dict(m._buffers) for m in modules]
            registered_modules = [dict(m._modules) for m in modules]
            attributes = plain_attributes(model)
            parameters = list(model.parameters())
            names = [name for name, _ in model.named_parameters()]
            versions = [p._version for p in parameters]
            fingerprints = _fingerprints(parameters) if refuse_writes else []

            def written(values: bool = False) -> list[str]:
                """The parameters written since entry: by their version counters, and with
                ``values`` by their values too (a write through ``.data`` moves no counter;
                not read mid-call, where :func:`renormalised_embeddings` has rescaled rows)."""
                if not refuse_writes:
                    return []
                moved = ([not _same_print(now, then)
                          for now, then in zip(_fingerprints(parameters), fingerprints)]
                         if values else [False] * len(parameters))
                return [name for name, p, version, changed in zip(
                    names, parameters, versions, moved) if p._version != version or changed]

            # What a write would make another function of: a container's view of a buffer
            # (written through, or the buffer's copy written while the view keeps the
            # caller's memory: probes 206, 208), and the caller's buffers and tensor
            # attributes themselves, which the call never writes (a view nested deeper, or
            # held by a closure, writes them)
            contained = container_views(model)
            watched = [(where, item, item._version) for where, item, _ in contained]

            def written_views() -> list[str]:
                """What of ``watched`` was written since entry."""
                return [where for where, item, version in watched if item._version != version]

            def check(values: bool = False) -> None:
                if found := written(values):
                    raise written_parameters_error(found)
                if moved := written_views():
                    raise written_container_views_error(moved)

            requires_grad = [p.requires_grad for p in parameters]
            grads = [p.grad for p in parameters]
            generators = GlobalGenerators.read()
            private_generators = ModuleGenerators.read(model)
            # Clones made under the caller's inference_mode would be inference tensors, which
            # autograd cannot differentiate through: the copies are ordinary tensors.
            with torch.inference_mode(False):
                # each tensor once (one held by several modules had been cloned for each:
                # 8 references to a 64 MiB cache peaked at 704 MiB; probe 206)
                held = {id(t): t for t in [*held_tensors(model), *_contained_tensors(model)]}
                buffers = [(t, t.detach().clone()) for t in held.values()]
                armed = True
                # The call's forward passes see copies of the buffers: a training-mode
                # BatchNorm's running statistics or a counter updated in place then leave the
                # caller's tensors untouched, version counters included (a graph the caller
                # still holds, which saved a buffer, must stay differentiable). Plain tensor
                # attributes too (one updated in place had its version moved by the first pass
                # and the restore, and the caller's graph that saved it refused its backward;
                # probe 203), but views of a parameter's memory (a forward that writes through
                # one writes the parameter, which is refused). Views of one memory stay views
                # of one copy (:func:`shared_clones`).
                weights = {_storage_key(p) for p in parameters} - {None}
                slots = [(module, module._buffers, name, buffer) for module in modules
                         for name, buffer in module._buffers.items() if buffer is not None]
                slots += [(module, vars(module), key, tensor) for module, key, tensor
                          in _plain_tensors(model) if _storage_key(tensor) not in weights]
                copies = shared_clones([tensor for *_, tensor in slots])
                for (_, registry, name, _), copied in zip(slots, copies):
                    registry[name] = copied
                copy_of = {id(tensor): copied for (*_, tensor), copied in zip(slots, copies)}
                watched += [(where, copy_of[id(shared)], copy_of[id(shared)]._version)
                            for where, _, shared in contained if id(shared) in copy_of]
                prefix = _module_prefixes(model)
                watched += [(f"'{prefix[id(module)]}{name}'", tensor, tensor._version)
                            for module, _, name, tensor in slots]
        try:
            yield check
        except Exception as error:  # a write explains the failure (a mixing check, say) first
            if found := written(values=True):
                raise written_parameters_error(found) from error
            if moved := written_views():
                raise written_container_views_error(moved) from error
            raise
        check(values=True)
    finally:
        if armed:
            with deferred_interrupts():
                for module, flag, module_hooks, params, module_buffers, submodules in zip(
                    modules, training, hooks, registered_params, registered_buffers,
                    registered_modules
                ):
                    module.training = flag
                    for name, saved in module_hooks.items():
                        current = getattr(module, name)
                        if current.keys() != saved.keys():
                            current.clear()
                            current.update(saved)
                    _restore_registry(module._parameters, params)
                    _restore_registry(module._buffers, module_buffers)
                    _restore_registry(module._modules, submodules)
                rebind_attributes(attributes)
                for param, flag, grad in zip(parameters, requires_grad, grads):
                    param.requires_grad_(flag)
                    param.grad = grad
                with torch.no_grad():  # a buffer written through another reference
                    same = _same_values(buffers, sparse_compared=True)
                    for (buffer, value), unchanged in zip(buffers, same):
                        if not unchanged:
                            buffer.copy_(value)
                generators.restore()
                private_generators.restore()


def _fingerprints(parameters: Sequence[Tensor]) -> list[tuple[int, float]]:
    """Two numbers per parameter that a change of its values changes (but for rare
    cancellations): its bytes read as int32 words and summed in int32 (wrapping), and the sum
    of its values in its own dtype (which the words' sum misses for sign flips in pairs: each
    adds 2^31), on one CPU thread so that its order of summation is always the same (a forward
    that set torch's thread count was refused as writing its parameters); none for dtypes
    without a sum (float8). A parameter without values (a lazy one) gives zeros. In place, at
    memory speed (50M float32 in 30 ms; an int64 sum had made a copy: 1.4 s and 384 MB), but
    for a parameter that is not one contiguous, word-aligned block (a view), which is
    copied. The sums are read together (:func:`~hessrank.host.host_floats`: one wait for a
    GPU, not two per parameter)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sums = [_fingerprint_sums(parameter) for parameter in parameters]
    finally:
        torch.set_num_threads(threads)
    read = iter(host_floats([value for pair in sums for value in pair]))
    return [(int(next(read)), next(read)) if pair else (0, 0.0) for pair in sums]


def _same_print(now: tuple[int, float], then: tuple[int, float]) -> bool:
    """Whether two :func:`_fingerprints` readings agree (a NaN sum agrees with a NaN sum)."""
    return now[0] == then[0] and (now[1] == then[1]
                                  or (math.isnan(now[1]) and math.isnan(then[1])))


def _fingerprint_sums(parameter: Tensor) -> tuple[Tensor, ...]:
    """:func:`_fingerprints` of one parameter, as tensors ``(words' sum, values' sum)``; none
    for a parameter without values."""
    if isinstance(parameter, nn.parameter.UninitializedParameter):
        return ()
    data = parameter.detach()
    if data.is_meta or data.layout != torch.strided or not data.numel():
        return ()
    if data.is_complex():
        data = torch.view_as_real(data)
    if not data.is_contiguous() or data.storage_offset() * data.element_size() % 4:
        data = data.clone(memory_format=torch.contiguous_format)
    raw = data.reshape(-1).view(torch.uint8)
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw.to(torch.int32)
    summed = not data.is_floating_point() or data.element_size() > 1  # float8 has no sum
    return words.sum(dtype=torch.int32), data.sum() if summed else words.new_zeros(())


def written_parameters_error(names: list[str]) -> ValueError:
    """The error for a forward that writes the model's parameters in place."""
    return ValueError(
        f"the model's forward writes to its parameters in place ({', '.join(names[:5])}"
        f"{', ...' if len(names) > 5 else ''}: their values or version counters moved during "
        "the call, as weight clipping with clamp_ or .data.clamp_ inside forward does): the "
        "curvature of a function that "
        "changes its parameters as it is evaluated is not defined, and hessrank cannot undo "
        "the write (the values are as your forward left them, as after one training forward). "
        "Move the write out of forward (clip after optimizer.step()); or, where another "
        "thread trains the model during the call, measure and train in turn (probe 132)")


def _same_values(pairs: Sequence[tuple[Tensor, Tensor]], sparse_compared: bool) -> list[bool]:
    """Whether each tensor still holds its saved value (``torch.equal``). A meta or nested one
    counts as the same (no values, or none ``torch.equal`` compares: a meta buffer had failed
    every call's restore, before the generators were put back; probe 147). A sparse one is
    compared densely where ``sparse_compared`` (``torch.equal`` does not take it), else counts
    as the same (its version counter tells, and a dense copy of a sparse buffer could be
    large); saved sparse and now strided, it differs."""
    kinds = ["uncompared" if tensor.is_meta or tensor.is_nested
             else "strided" if tensor.layout == value.layout == torch.strided else "sparse"
             for tensor, value in pairs]
    equal = iter(_each_equal([pair for pair, kind in zip(pairs, kinds) if kind == "strided"]))
    return [next(equal) if kind == "strided" else kind == "uncompared" or (
        tensor.layout == value.layout and torch.equal(tensor.to_dense(), value.to_dense())
        if sparse_compared else tensor.layout != torch.strided)
        for kind, (tensor, value) in zip(kinds, pairs)]


def _each_equal(pairs: Sequence[tuple[Tensor, Tensor]]) -> list[bool]:
    """``torch.equal`` of each pair of strided tensors. Those of the same shape on one
    accelerator are compared there and read together (:func:`~hessrank.host.host_floats`: one
    wait for a GPU, not one a buffer); on the CPU ``torch.equal`` compares without a copy."""
    batched = [tensor.device == value.device and tensor.device.type not in ("cpu", "meta")
               and tensor.shape == value.shape and not tensor.is_nested
               and not (tensor.is_quantized or value.is_quantized) for tensor, value in pairs]
    read = iter(host_floats([(tensor == value).all()
                             for (tensor, value), together in zip(pairs, batched) if together]))
    return [bool(next(read)) if together else torch.equal(tensor, value)
            for (tensor, value), together in zip(pairs, batched)]


def _restore_registry(registry: dict[str, Any], saved: dict[str, Any]) -> None:
    """Put back a module's ``_parameters`` or ``_buffers`` entries (the same objects)."""
    if registry.keys() != saved.keys() or any(registry[k] is not v for k, v in saved.items()):
        registry.clear()
        registry.update(saved)


@contextmanager
def evaluation_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Set the ``training`` flags for measurement without calling ``train()``/``eval()``.

    ``mode="eval"``: every module evaluates (dropout off, BatchNorm on running statistics).
    ``mode="train"``: flags are left as the user set them. :func:`preserved_state` restores them.
    """
    if mode == "eval":
        for module in model.modules():
            module.training = False
    yield


#: The embeddings whose lookups :func:`renormalised_embeddings` rescales while its block runs.
_RESCALING: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def rescales_lookups(model: nn.Module) -> bool:
    """Whether a forward of ``model`` rescales embedding rows now (:func:`renormalised_embeddings`):
    a data set then needs one plain pass over its batches before any pass that compares them,
    so that every batch sees every batch's rows rescaled (a tied head reads them all)."""
    return any(module in _RESCALING for module in model.modules())


@contextmanager
def renormalised_embeddings(model: nn.Module) -> Iterator[list[str]]:
    """Embedding lookups with ``max_norm`` as pure functions of the parameters, for the block.

    ``nn.Embedding`` and ``nn.EmbeddingBag`` with ``max_norm`` rescale, in place and without
    gradient, every row they look up whose norm exceeds ``max_norm``
    (``torch.embedding_renorm_``), on every forward: a forward would change the caller's
    parameters, and a functional or per-sample forward cannot write to them at all. Inside the
    block ``max_norm`` is off, and a forward pre-hook rescales the rows each plain (not
    ``torch.func``-transformed) call looks up, as the forward would, with
    ``torch.embedding_renorm_`` itself (after which a lookup leaves them as they are): the
    curvature is the model's at the weights its forward uses, the rows the batch does not look
    up untouched (a tied output head reads them as they are), and autograd differentiates the
    lookups as in training (the rescaling has no gradient). A call's first forward pass over a
    batch is a plain one, so a transformed pass over it finds its rows rescaled. The rescaled
    rows are saved and written back on exit, the hooks removed and ``max_norm`` restored, with
    Ctrl-C held back; the writes go through ``.data``, so a graph the caller holds sees no
    version change.

    Yields:
        Notes, one per module once its forward has rescaled a row.
    """
    originals: list[tuple[Tensor, dict[int, Tensor]]] = []  # weight, row -> its values
    restored: list[tuple[nn.Embedding | nn.EmbeddingBag, float]] = []
    handles: list[Any] = []
    notes: list[str] = []

    def rescaling(name: str, module: nn.Embedding | nn.EmbeddingBag, max_norm: float,
                  saved: dict[int, Tensor]) -> Callable[..., None]:
        weight = module.weight.data  # the caller's storage, whatever a functional call swaps in

        def rescale_looked_up(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                              ) -> None:
            indices = args[0] if args else kwargs.get("input")
            if (not isinstance(indices, Tensor)
                    or torch._C._functorch.is_functorch_wrapped_tensor(indices)):
                return
            rows = torch.unique(indices.detach().reshape(-1))
            norms = torch.linalg.vector_norm(weight[rows], ord=module.norm_type, dim=1)
            over = rows[norms > max_norm]
            if not len(over):
                return
            with deferred_interrupts():
                for row in over.tolist():
                    if row not in saved:
                        saved[row] = weight[row].clone()
                torch.embedding_renorm_(weight, over, max_norm, module.norm_type)
            note = (f"{name or type(module).__name__} (max_norm={max_norm}): analysed with the "
                    "rows its lookups reach above max_norm rescaled, as its forward rescales "
                    "them; your parameters are unchanged")
            if note not in notes:
                notes.append(note)

        return rescale_looked_up

    try:  # a Ctrl-C held back below lands inside the try: what was saved is written back
        with deferred_interrupts():
            for name, module in model.named_modules():
                if (not isinstance(module, nn.Embedding | nn.EmbeddingBag)
                        or module.max_norm is None):
                    continue
                saved: dict[int, Tensor] = {}
                originals.append((module.weight.data, saved))
                restored.append((module, module.max_norm))
                handles.append(module.register_forward_pre_hook(
                    rescaling(name, module, module.max_norm, saved), with_kwargs=True))
                module.max_norm = None
                _RESCALING.add(module)
        yield notes
    finally:
        with deferred_interrupts():
            for module, _ in restored:
                _RESCALING.discard(module)
            for handle in handles:
                handle.remove()
            for weight, saved in originals:
                for row, values in saved.items():
                    weight[row] = values
            for module, max_norm in restored:
                module.max_norm = max_norm


@contextmanager
def backward_hooks_off(model: nn.Module) -> Iterator[list[str]]:
    """The caller's backward hooks do not run inside the block.

    A backward hook can change the gradients autograd returns (gradient scaling, clipping or
    masking hooks, ``register_hook`` on a parameter) and can have side effects (gradient logging):
    the curvature would then silently not be the loss's, and every one of hessrank's backward
    passes would run the caller's logging. Off inside the block: every submodule's full backward
    hooks and backward pre-hooks (and the deprecated ``register_backward_hook`` ones), the global
    module backward hooks (``register_module_full_backward_hook``, for all threads while the block
    runs), and the hooks on parameters (``param.register_hook``). The hook dictionaries
    themselves are put back on exit (Ctrl-C held back), so the caller's handles still remove
    them. Forward hooks stay: they are part of the function the model computes. Hooks that the
    model's own ``forward`` registers on intermediate tensors, and custom ``autograd.Function``
    backward passes, are part of its code and run.

    Yields:
        One note naming the hooks that did not run, if there were any.
    """
    module_globals = torch.nn.modules.module
    swapped: list[tuple[Any, str, Any]] = []
    names: list[str] = []
    try:  # a Ctrl-C held back below lands inside the try: what was swapped is put back
        with deferred_interrupts():
            for name, module in model.named_modules():
                for attribute in ("_backward_hooks", "_backward_pre_hooks"):
                    if getattr(module, attribute, None):
                        swapped.append((module, attribute, getattr(module, attribute)))
                        setattr(module, attribute, type(swapped[-1][2])())
                        names.append(f"{name or type(module).__name__} ({attribute[1:-1]})")
            for name, param in model.named_parameters():
                if param._backward_hooks:
                    swapped.append((param, "_backward_hooks", param._backward_hooks))
                    param._backward_hooks = None
                    names.append(f"{name} (tensor hooks)")
            for attribute in ("_global_backward_hooks", "_global_backward_pre_hooks"):
                if getattr(module_globals, attribute):
                    swapped.append((module_globals, attribute,
                                    getattr(module_globals, attribute)))
                    setattr(module_globals, attribute, type(swapped[-1][2])())
                    names.append(f"global module {attribute[8:-1].replace('_', ' ')}")
        yield ([f"your backward hooks did not run during the call, so that the curvature is the "
                f"loss's and your hooks see none of hessrank's backward passes: "
                f"{', '.join(names)}"] if names else [])
    finally:
        with deferred_interrupts():
            for owner, attribute, value in reversed(swapped):
                setattr(owner, attribute, value)


def forward_hooks_note(model: nn.Module) -> list[str]:
    """A note naming the caller's forward hooks and pre-hooks (on ``model``'s submodules, and
    the global module ones), which run in every forward pass of the call: they are part of the
    function the model computes, and a hook that records activations or statistics (dormant
    neurons, ReDo's resets) sees the call's passes too, some over one or two of the batch's
    samples (the probes of the checks; probe 149). None run unnoticed."""
    def callers(hooks: dict[int, Any] | None) -> bool:
        # (not torch's own, weight_norm's; nor the call's own, which an Embedding's max_norm
        # registers before this note is made: it had been named as the caller's; probe 186)
        return any(not (getattr(hook, "__module__", None) or "").startswith(
            ("torch.", "hessrank.")) for hook in (hooks or {}).values())

    def named(name: str) -> str:  # as the caller names it: without torch.compile's wrapper
        return ".".join(part for part in name.split(".") if part != "_orig_mod")

    kinds = {"_forward_hooks": "forward hook", "_forward_pre_hooks": "forward pre-hook"}
    names = [f"{named(name) or type(module).__name__} ({kind})"
             for name, module in model.named_modules() for attribute, kind in kinds.items()
             if callers(getattr(module, attribute, None))]
    module_globals = torch.nn.modules.module
    names += [f"global module {kind}" for attribute, kind in kinds.items()
              if callers(getattr(module_globals, f"_global{attribute}"))]
    if not names:
        return []
    return [f"your forward hooks ran in each of hessrank's forward passes, as part of the "
            f"model's function: a hook that records activations saw those passes too, some "
            f"over one or two of the batch's samples: {', '.join(names)}"]


@contextmanager
def _set_for_the_call(read: Callable[[], Any], write: Callable[[Any], object],
                      value: Any) -> Iterator[None]:
    """A global setting at ``value`` inside the block (``write``), the caller's (``read``
    before) back on exit; written inside the ``try``, so that a Ctrl-C that lands as it is
    written still finds the restore."""
    saved = read()
    try:
        write(value)
        yield
    finally:
        write(saved)


def _attribute_for_the_call(owner: Any, name: str, value: Any) -> AbstractContextManager[None]:
    """``owner.<name> = value`` inside the block, the caller's value back on exit."""
    return _set_for_the_call(lambda: getattr(owner, name),
                             lambda saved: setattr(owner, name, saved), value)


#: The kernels whose float32 precision torch lets a caller lower (TF32 on a GPU, bfloat16 passes
#: in oneDNN on a CPU): ``torch.backends.<path>.fp32_precision``.
_PRECISION_KERNELS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv",
                      "mkldnn.rnn")


@contextmanager
def full_float32_precision() -> Iterator[None]:
    """IEEE float32 in every matrix product, convolution and recurrent kernel inside the block;
    the caller's settings back, exactly, on exit.

    Through torch's per-kernel settings only (``torch.backends.<backend>.<op>.fp32_precision``):
    each overrides its parents' (``torch.backends.fp32_precision``, ``cudnn.fp32_precision``),
    and the older switches (``allow_tf32``, ``set_float32_matmul_precision``) write these same
    settings, so a caller may have used either interface. The older ones are never called: once
    a process has used both, torch raises on their getters ("a mix of the legacy and new APIs"),
    and inside the block they may raise for the same reason; the per-kernel settings say what
    the kernels do.
    """
    with ExitStack() as settings:
        # entered with signals held back: one landing between a setting's entry and its exit's
        # registration on the stack had left the setting for the garbage collector to put back
        # (4 in 1,500 interrupted calls; probe 223)
        with deferred_interrupts():
            for path in _PRECISION_KERNELS:
                settings.enter_context(_attribute_for_the_call(
                    operator.attrgetter(path)(torch.backends), "fp32_precision", "ieee"))
        yield


def is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper (dynamo's ``OptimizedModule``). Read
    only where dynamo is loaded, which making one loads: ``hasattr(torch, "_dynamo")`` imports it,
    2-5 s at a process's first call (probe 78)."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and isinstance(module, dynamo.eval_frame.OptimizedModule)


@contextmanager
def compiled_modules_eager(model: nn.Module) -> Iterator[list[str]]:
    """The model's compiled code run eagerly inside the block, as it was on exit.

    ``module.compile()`` compiles a module in place (its ``_compiled_call_impl``), and a
    ``torch.compile`` wrapper held as a submodule runs its ``forward`` through dynamo: compiled
    code has no second derivative, and hooks and ``torch.func`` need the eager module. (A
    compiled *top-level* wrapper is taken apart before, :func:`hessrank.problem.unwrap_model`.)
    Inside the block, each such module calls its eager code: the same function of the same
    parameters.

    Yields:
        A note naming the compiled modules, none where there are none.
    """
    compiled = []
    with ExitStack() as for_the_call:
        # Every other compiled callable too (a compiled loss, a function compiled and called in
        # forward), which dynamo would trace with the call's own function modes: a compiled
        # loss's double backward had returned no curvature of the loss (exact's Hessian
        # without J^T H_out J, silently), one traced under vmap had been marked skipped, and so
        # run eagerly for good, with every compiled module sharing its code, and a helper was
        # recompiled at each call (probe 193). Dynamo's stance is process-wide: other threads'
        # compiled code runs eagerly while the call does (calls themselves run one at a time,
        # one_call_at_a_time).
        with deferred_interrupts():  # (full_float32_precision's reason)
            for_the_call.enter_context(_dynamo_eager())
            for name, module in model.named_modules():
                if getattr(module, "_compiled_call_impl", None) is not None:
                    for_the_call.enter_context(
                        _attribute_for_the_call(module, "_compiled_call_impl", None))
                    compiled.append(name or "the model")
                elif is_compile_wrapper(module):
                    for_the_call.enter_context(_attribute_for_the_call(
                        module, "forward", module._orig_mod.__call__))
                    if name:  # (a top-level wrapper's note: hessrank.problem.unwrap_model)
                        compiled.append(name)
        yield [f"compiled modules ({', '.join(compiled)}) were run eagerly for the call (same "
               "parameters, same function)"] if compiled else []


#: Held by the call in progress (:func:`one_call_at_a_time`).
_CALL_LOCK = threading.RLock()


@contextmanager
def one_call_at_a_time() -> Iterator[None]:
    """Calls from several threads run one after the other (a thread's nested call, from a hook
    inside its own call, runs at once). A call sets process-wide settings (the attention fast
    path, cuDNN, float32 precision, dynamo's stance, the random generators) for its time and
    restores the values it found: two calls that overlapped had each restored what it found,
    the last one out the first one's, and left the attention fast path off for the process
    (test_calls_overlapping_in_two_threads_...; probe 197)."""
    with _CALL_LOCK:
        yield


@contextmanager
def _dynamo_eager() -> Iterator[None]:
    """Dynamo's stance "force_eager" inside the block (compiled callables run their original
    code, nothing is compiled, no frame is marked skipped); before torch 2.6, which has no
    stances, ``torch._dynamo.config.disable``, which does the same. Nothing where dynamo is not
    loaded: nothing is compiled then, and loading it takes seconds (probe 78). Set inside the
    ``try`` that restores it, signals held back (torch's ``set_stance`` sets it as it is made:
    a Ctrl-C before its restore was registered had left the process eager; probe 200)."""
    if "torch._dynamo" not in sys.modules:
        yield
        return
    restore: AbstractContextManager[object] | None = None
    try:
        with deferred_interrupts():
            set_stance = getattr(torch.compiler, "set_stance", None)
            entered = (cast(AbstractContextManager[object], set_stance("force_eager"))
                       if set_stance is not None else _attribute_for_the_call(
                           importlib.import_module("torch._dynamo").config, "disable", True))
            entered.__enter__()
            restore = entered
        yield
    finally:
        if restore is not None:
            with deferred_interrupts():
                restore.__exit__(None, None, None)


@contextmanager
def parametrization_cache_off() -> Iterator[list[str]]:
    """``torch.nn.utils.parametrize.cached()`` off inside the block, its cache back on exit.

    Inside ``cached()`` a parametrized weight is computed once, at its first use, and reused:
    the graph of one forward pass then serves every later one, so the weights' gradients are
    those of a pass made under whatever grad mode it ran in (none, after a pass without
    gradients: a silently wrong GGN) or a graph already freed ("backward through the graph a
    second time"). Off, every forward pass computes its weights, as outside ``cached()``.

    Yields:
        A note when the cache was on.
    """
    if not parametrize._cache_enabled:
        yield []
        return
    with (_attribute_for_the_call(parametrize, "_cache_enabled", 0),
          _attribute_for_the_call(parametrize, "_cache", {})):
        yield ["torch.nn.utils.parametrize.cached() was turned off for the call (every forward "
               "pass computes the parametrized weights); it is back on after"]


@contextmanager
def saved_tensor_hooks_off() -> Iterator[list[str]]:
    """The caller's saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``, and what
    is built on them: ``save_on_cpu``, activation compression) do not apply inside the block.

    A hook that packs what autograd saves in lower precision (bfloat16 activations) makes every
    backward pass of the call approximate: ``fisher`` was off by 4e-4 of its top eigenvalue,
    unnoted, and ``ggn`` blamed the loss. The hooks are taken off the thread's stack of default
    hooks for the block and put back, in order, on exit (Ctrl-C held back), so the caller's own
    ``with`` blocks close as they opened. Memory is then what the call needs without them.
    Where the caller disabled such hooks (``torch.autograd.graph.disable_saved_tensors_hooks``),
    they are enabled for the block and disabled again, with the caller's message, on exit:
    hessrank measures its graphs' memory through a hook of its own (every method failed with
    the caller's bare message).

    Yields:
        A note when hooks were taken off.
    """
    hooks = torch._C._autograd
    taken: list[tuple[Callable[..., Any], Callable[..., Any]]] = []
    enabled = hooks._saved_tensors_hooks_is_enabled()  # type: ignore[attr-defined]
    disabled = None if enabled else hooks._saved_tensors_hooks_get_disabled_error_message()
    try:
        with deferred_interrupts():
            if disabled is not None:
                hooks._saved_tensors_hooks_enable()
            while (top := hooks._top_saved_tensors_default_hooks(False)) is not None:
                hooks._pop_saved_tensors_default_hooks()
                taken.append(top)
        yield ([] if not taken else [
            "your saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks, save_on_cpu) "
            "were off for the call: hooks that pack activations in lower precision would make "
            "every backward pass approximate; they are back in place"])
    finally:
        with deferred_interrupts():
            # the call's own hooks that a Ctrl-C left on the stack first (landing before a
            # block's exit popped them, they had stayed under the caller's; probe 200)
            while hooks._top_saved_tensors_default_hooks(False) is not None:
                hooks._pop_saved_tensors_default_hooks()
            for pack, unpack in reversed(taken):
                hooks._push_saved_tensors_default_hooks(pack, unpack)
            if disabled is not None:
                hooks._saved_tensors_hooks_disable(disabled)


def attention_fast_path(enabled: bool) -> AbstractContextManager[None]:
    """Torch's attention fast path (``torch.backends.mha``) ``enabled`` inside the block, the
    setting before back on exit."""
    return _set_for_the_call(torch.backends.mha.get_fastpath_enabled,
                             torch.backends.mha.set_fastpath_enabled, enabled)


#: The caller's setting of torch's attention fast path, while :func:`differentiable` holds it
#: off (:func:`~hessrank.problem.refuse_the_nested_fast_path` runs the forward the caller's way).
CALLER_FAST_PATH: contextvars.ContextVar[bool] = contextvars.ContextVar("caller_fast_path",
                                                                        default=False)


def _flushes_denormals() -> bool:
    """Whether the CPU flushes subnormal numbers to zero (``torch.set_flush_denormal(True)``,
    which has no getter): a subnormal float32 doubled comes out zero."""
    return bool(float(torch.full((1,), 2.0**-140) * 2) == 0.0)


@contextmanager
def _caller_fast_path_kept() -> Iterator[None]:
    """:data:`CALLER_FAST_PATH` at the caller's setting inside the block."""
    token = CALLER_FAST_PATH.set(torch.backends.mha.get_fastpath_enabled())
    try:
        yield
    finally:
        CALLER_FAST_PATH.reset(token)


@contextmanager
def differentiable(model: nn.Module) -> Iterator[list[str]]:
    """Kernels that differentiate ``model`` exactly, whatever the caller had set.

    - Gradients on, inference mode off: a call made under ``torch.no_grad()`` or
      ``torch.inference_mode()`` still differentiates.
    - Full float32 matrix products and convolutions (no TF32, no bfloat16 passes): on a GPU,
      cuDNN convolutions default to TF32, whose 10-bit mantissa is about 1e-3 off; the per-sample
      gradient check would refuse that, and it would blur every eigenvalue below 1e-3 of the top.
    - Autocast off: a call from inside a mixed-precision training step (``torch.autocast``)
      would otherwise run the model in bfloat16 or float16.
    - cuDNN off for a model with recurrent layers: cuDNN's RNN kernels have no backward in
      evaluation mode, torch's own CUDA kernels are twice differentiable.
    - Torch's attention fast path off: in a forward without gradients (the predictions'
      probing pass) ``nn.MultiheadAttention`` and the transformer layers would run native
      inference kernels that compute differently, NaN where a query row has every key masked
      (left padding under a causal mask) instead of the differentiable path's zeros. (A
      forward the caller runs with gradients can take it too, where nothing in a module needs
      a gradient: :func:`~hessrank.problem.refuse_the_nested_fast_path`.)
    - Subnormal numbers kept, where the caller had the CPU flush them
      (``torch.set_flush_denormal(True)``, a speed switch): a curvature below float32's
      normal range had come out zero, blamed on a saturated softmax, where the refusal that
      names the power of two to scale the loss by belongs (probe 229).
    - Embeddings with ``max_norm`` as pure lookups (:func:`renormalised_embeddings`).
    - Embeddings with ``sparse=True`` give dense gradients: sparsity is how a gradient is stored,
      not what it is, and second derivatives and per-sample factors need them dense.
    - The caller's backward hooks off (:func:`backward_hooks_off`).
    - ``torch.nn.utils.parametrize.cached()`` off (:func:`parametrization_cache_off`).
    - The caller's saved-tensor hooks off (:func:`saved_tensor_hooks_off`).
    - Anomaly detection off: it is for the caller's training, and the call's batched backward
      passes, which it cannot batch, would print torch's "Error detected in ..." tracebacks
      for each before their plain fallback.
    - Compiled code run eagerly (:func:`compiled_modules_eager`).

    The caller's settings, hooks and parameter values return on exit.

    Yields:
        Notes for the result (embedding rows that a forward would rescale, hooks not run),
        one list, which the embeddings' notes join while the block runs.
    """
    recurrent = any(isinstance(module, nn.RNNBase) for module in model.modules())
    devices = {"cpu", "cuda", *(p.device.type for p in model.parameters())}
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        _caller_fast_path_kept(),
        attention_fast_path(False),
        _set_for_the_call(_flushes_denormals, torch.set_flush_denormal, False),
        full_float32_precision(),
        _attribute_for_the_call(torch.backends.cudnn, "enabled",
                                torch.backends.cudnn.enabled and not recurrent),
        ExitStack() as for_the_call,
        renormalised_embeddings(model) as notes,
        backward_hooks_off(model) as hook_notes,
        parametrization_cache_off() as cache_notes,
        saved_tensor_hooks_off() as saved_notes,
        _set_for_the_call(lambda: (torch.is_anomaly_enabled(),
                                   torch.is_anomaly_check_nan_enabled()),
                          lambda saved: torch.set_anomaly_enabled(*saved), (False, True)),
        compiled_modules_eager(model) as compiled_notes,
    ):
        # The attention kernels' switches keep the caller's values; put back on exit, they
        # stay so where an interruption skipped the exit of a block that set them inside
        # the call (second_order's sdpa_kernel).
        # Every backend sdpa_kernel sets, read and written through torch._C as it does
        # ("overrideable" has no torch.backends switch, and an interrupted restore had left
        # it off; probe 200).
        with deferred_interrupts():  # (full_float32_precision's reason)
            for kernel in ("flash", "mem_efficient", "math", "cudnn", "overrideable"):
                read = getattr(torch._C, f"_get_{kernel}_sdp_enabled", None)
                if read is not None:
                    for_the_call.enter_context(_set_for_the_call(
                        read, getattr(torch._C, f"_set_sdp_use_{kernel}"), read()))
            autocast_off = []
            for device in sorted(devices):
                try:
                    enabled = torch.is_autocast_enabled(device)
                except RuntimeError:  # a device type without autocast (meta): nothing to turn off
                    continue
                if enabled:
                    for_the_call.enter_context(torch.autocast(device, enabled=False))
                    autocast_off.append(device)
            for_the_call.callback(_AUTOCAST_OFF.reset, _AUTOCAST_OFF.set(tuple(autocast_off)))
            scaled = []
            for name, module in model.named_modules():
                # flags of how a table's gradient is stored or scaled, not of what it is: the
                # curvature is the loss's (scale_grad_by_freq divides each row's gradient by its
                # token's count, which autograd's second derivatives would carry; probe 66), and a
                # note says so for the scaling, which training follows (probe 144)
                if isinstance(module, nn.Embedding | nn.EmbeddingBag):
                    if module.scale_grad_by_freq:
                        scaled.append(f"{type(module).__name__} {name!r}")
                    for flag in ("sparse", "scale_grad_by_freq"):
                        if getattr(module, flag):
                            for_the_call.enter_context(_attribute_for_the_call(module, flag, False))
        if scaled:
            notes.append(f"scale_grad_by_freq=True on {', '.join(scaled)}: training divides "
                         "each row's gradient by its token's count in the batch; the curvature "
                         "is the loss's, without that scaling")
        notes.extend(forward_hooks_note(model) + hook_notes + cache_notes + saved_notes
                     + compiled_notes)
        yield notes  # the embeddings' notes come with their first rescaling
