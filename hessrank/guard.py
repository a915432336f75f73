"""Leave a training loop exactly as it was: snapshot and restore everything a call could touch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore, on exit (normal or by exception), the model's observable state.

    Covers: every module's ``training`` flag (restored as attributes, never through ``train()``),
    parameters' ``requires_grad`` and ``.grad`` (the same tensor objects), buffers (values copied
    back in place, so BatchNorm statistics and ``num_batches_tracked`` are untouched), the module
    hook dictionaries, and the global CPU and CUDA random number generator states.
    Parameters themselves are never written by hessrank; they are not copied.
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    hooks = [{name: dict(getattr(m, name)) for name in _HOOK_DICTS if hasattr(m, name)}
             for m in modules]
    parameters = list(model.parameters())
    requires_grad = [p.requires_grad for p in parameters]
    grads = [p.grad for p in parameters]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for module, flag, module_hooks in zip(modules, training, hooks):
            module.training = flag
            for name, saved in module_hooks.items():
                current = getattr(module, name)
                if current.keys() != saved.keys():
                    current.clear()
                    current.update(saved)
        for param, flag, grad in zip(parameters, requires_grad, grads):
            param.requires_grad_(flag)
            param.grad = grad
        with torch.no_grad():
            for buffer, saved in buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


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
