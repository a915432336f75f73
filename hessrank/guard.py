"""Leave a training loop exactly as it was: snapshot and restore everything a call could touch."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

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


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) inside the block and deliver it once the block has finished.

    Makes a restore atomic: a ``KeyboardInterrupt`` can land before or after it, never half-way.
    Only the main thread receives signals; elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore, on exit (normal, by exception or by Ctrl-C), the model's observable state.

    Covers, for every submodule: the ``training`` flag (restored as an attribute, never through
    ``train()``), the hook dictionaries, the parameter and buffer *registrations* (so a buffer that
    forward rebinds, ``self.steps = self.steps + 1``, and a parameter that a functional call left
    swapped come back as the caller's objects), buffer values (copied back in place), and for
    every parameter ``requires_grad`` and ``.grad`` (the same tensor objects); plus the global CPU
    and CUDA random number generator states. The restore runs with Ctrl-C held back, so it is
    atomic. Parameter values are never written by hessrank; they are not copied.
    """
    with deferred_interrupts():
        modules = list(model.modules())
        training = [m.training for m in modules]
        hooks = [{name: dict(getattr(m, name)) for name in _HOOK_DICTS if hasattr(m, name)}
                 for m in modules]
        registered_params = [dict(m._parameters) for m in modules]
        registered_buffers = [dict(m._buffers) for m in modules]
        parameters = list(model.parameters())
        requires_grad = [p.requires_grad for p in parameters]
        grads = [p.grad for p in parameters]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with deferred_interrupts():
            for module, flag, module_hooks, params, module_buffers in zip(
                modules, training, hooks, registered_params, registered_buffers
            ):
                module.training = flag
                for name, saved in module_hooks.items():
                    current = getattr(module, name)
                    if current.keys() != saved.keys():
                        current.clear()
                        current.update(saved)
                _restore_registry(module._parameters, params)
                _restore_registry(module._buffers, module_buffers)
            for param, flag, grad in zip(parameters, requires_grad, grads):
                param.requires_grad_(flag)
                param.grad = grad
            with torch.no_grad():
                for buffer, value in buffers:
                    if not torch.equal(buffer, value):
                        buffer.copy_(value)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


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


@contextmanager
def differentiable(model: nn.Module) -> Iterator[None]:
    """Kernels that differentiate ``model`` exactly, whatever the caller had set.

    - Gradients on, inference mode off: a call made under ``torch.no_grad()`` or
      ``torch.inference_mode()`` still differentiates.
    - Full float32 matrix products and convolutions (no TF32, no bfloat16 passes): on a GPU,
      cuDNN convolutions default to TF32, whose 10-bit mantissa is about 1e-3 off; the per-sample
      gradient check would refuse that, and it would blur every eigenvalue below 1e-3 of the top.
    - cuDNN off for a model with recurrent layers: cuDNN's RNN kernels have no backward in
      evaluation mode, torch's own CUDA kernels are twice differentiable.

    The caller's settings return on exit.
    """
    cudnn = torch.backends.cudnn
    recurrent = any(isinstance(module, nn.RNNBase) for module in model.modules())
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            cudnn.flags(enabled=cudnn.enabled and not recurrent, benchmark=cudnn.benchmark,
                        deterministic=cudnn.deterministic, allow_tf32=False),
        ):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
