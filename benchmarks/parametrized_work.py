"""What the Gram methods' general path holds per sample to differentiate a parametrization.

    python benchmarks/parametrized_work.py

The general path computes each sample's VJP under ``torch.func.vmap``; a parametrized layer's
weight (``torch.nn.utils.parametrize``) is computed again in it, once per batched call (the
originals are not batched), and differentiated for every sample and cotangent column. This
measures, with torch's profiler (tensor allocations, the operations' own temporaries included),
the peak of one batched VJP at 4 and at 16 samples; the slope is a sample's share. Less the
sample's factor (its gradient, counted with the factors), over the parametrization's forward's
saved tensors and output, it is the multiple ``hessrank.curvature.gram`` allows
(``PARAMETRIZATION_WORK``, and ``HEAVY_BACKWARDS`` for matrix_exp). The profiler prints its own
start and stop lines on stderr.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrizations
from torch.profiler import ProfilerActivity, profile

from hessrank.curvature.gram import parametrization_work

#: (name, how the layer's weight is parametrized)
CASES = [("orthogonal (matrix_exp)", lambda layer: parametrizations.orthogonal(layer)),
         ("orthogonal (cayley)",
          lambda layer: parametrizations.orthogonal(layer, orthogonal_map="cayley")),
         ("orthogonal (householder)",
          lambda layer: parametrizations.orthogonal(layer, orthogonal_map="householder")),
         ("weight_norm", parametrizations.weight_norm),
         ("spectral_norm", parametrizations.spectral_norm)]


def batched_peak(model: nn.Module, width: int, samples: int, columns: int) -> int:
    """Peak bytes of one batched VJP of ``samples`` samples, ``columns`` columns each."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def sample_vjp(p: dict[str, torch.Tensor], cotangent: torch.Tensor,
                   x: torch.Tensor) -> dict[str, torch.Tensor]:
        _, pullback = vjp(lambda q: functional_call(model, q, (x[None],))[0], p)
        return vmap(pullback)(cotangent)[0]

    def run() -> None:
        vmap(sample_vjp, in_dims=(None, 1, 0))(params, torch.randn(columns, samples, 10),
                                               torch.randn(samples, width))

    run()  # (code and lazily imported modules, once)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((event.start_ns(), event.nbytes())
                    for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    now = peak = 0
    for _, change in events:
        now += change
        peak = max(peak, now)
    return peak


def main() -> None:
    print(f"{'parametrization':26} {'d':>4} {'K':>2} {'saved+out KiB':>13} "
          f"{'per sample KiB':>14} {'multiple':>8} {'allowed':>7}")
    for name, parametrize in CASES:
        for width in (64, 256):
            torch.manual_seed(0)
            layer = nn.Linear(width, width)
            parametrize(layer)
            model = nn.Sequential(layer, nn.Tanh(), nn.Linear(width, 10))
            weight = layer.weight.numel() * layer.weight.element_size()
            allowed = parametrization_work(layer.parametrizations["weight"])
            for columns in (1, 4):
                share = (batched_peak(model, width, 16, columns)
                         - batched_peak(model, width, 4, columns)) / 12
                saved = _saved_and_output(layer)
                multiple = (share - columns * weight) / (columns * saved)
                print(f"{name:26} {width:4} {columns:2} {saved / 1024:13.0f} "
                      f"{share / 1024:14.0f} {multiple:8.2f} "
                      f"{allowed / saved:7.2f}", flush=True)


def _saved_and_output(layer: nn.Module) -> int:
    """Bytes of the parametrization's forward's saved tensors and its output."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = layer.parametrizations["weight"]()
    return sum(saved.values()) + value.numel() * value.element_size()


if __name__ == "__main__":
    main()
