"""``nn.LSTM`` (one layer, one direction, no projection, zero initial state): per-sample
gradients from the gates' pre-activation gradients, without per-sample backward passes.

With gate pre-activations ``z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh`` (``h_{-1} = 0``), sample
``i``'s gradients are Kronecker sums over the time steps: ``G(W_ih) = sum_t dz_it x_it^T``,
``G(W_hh) = sum_t dz_it h_i,t-1^T`` and ``G(b_ih) = G(b_hh) = sum_t dz_it``
(:class:`LayerFactors` for each). ``dz`` comes from recomputing the recurrence from the captured
input with the module's weights and backpropagating the captured gradients of the output and of
the final states through it (one batched backward pass, all samples at once).

Assumes: the module is called on a batched input and no initial state (an initial state, or a
recurrence that differs from the recomputation, fails the gradient check).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hessrank.curvature.rules import GramRule, register_rule
from hessrank.curvature.rules.factors import CombinedFactors, Factors, LayerFactors


def gate_gradients(module: nn.LSTM, inputs: Tensor, output_grads: tuple[Tensor, Tensor, Tensor]
                   ) -> tuple[Tensor, Tensor]:
    """``dz [K, n, T, 4H]`` and the previous hidden states ``[n, T, H]`` of the recurrence.

    Args:
        module: the LSTM.
        inputs: ``[n, T, F]``.
        output_grads: gradients of the output ``[K, n, T, H]`` and of the final hidden and cell
            states ``[K, 1, n, H]``.
    """
    n, steps, _ = inputs.shape
    hidden = module.hidden_size
    params = {name: p.detach() for name, p in module.named_parameters()}
    w_ih, w_hh = params["weight_ih_l0"], params["weight_hh_l0"]
    with torch.enable_grad():
        projected = inputs @ w_ih.T
        if module.bias:
            projected = projected + params["bias_ih_l0"] + params["bias_hh_l0"]
        projected.requires_grad_(True)
        h = torch.zeros(n, hidden, dtype=inputs.dtype, device=inputs.device)
        c = torch.zeros_like(h)
        pre, previous, outputs = [], [], []
        for t in range(steps):
            previous.append(h.detach())
            z = projected[:, t] + h @ w_hh.T
            pre.append(z)
            i, f, g, o = z.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        d_out, d_h, d_c = output_grads
        grads = torch.autograd.grad([torch.stack(outputs, dim=1), h, c], pre,
                                    grad_outputs=[d_out, d_h[:, 0], d_c[:, 0]],
                                    is_grads_batched=True, allow_unused=True)
    dz = torch.stack([torch.zeros(d_out.shape[0], n, 4 * hidden, dtype=inputs.dtype,
                                  device=inputs.device) if g is None else g for g in grads], dim=2)
    return dz, torch.stack(previous, dim=1)


@register_rule
class LSTMRule(GramRule):
    name = "lstm"
    module_types = (nn.LSTM,)

    def supports(self, module: nn.Module) -> bool:
        return bool(super().supports(module) and module.num_layers == 1
                    and not module.bidirectional and module.proj_size == 0)

    def factors(self, module: nn.Module, layer_input: Tensor,
                output_grads: Tensor | tuple[Tensor, ...], num_samples: int,
                analysed: frozenset[str]) -> Factors | None:
        if (not isinstance(module, nn.LSTM) or not isinstance(output_grads, tuple)
                or len(output_grads) != 3 or layer_input.dim() != 3):
            return None
        d_out, d_h, d_c = output_grads
        if not module.batch_first:  # [T, n, F]: the samples are the second dimension
            layer_input, d_out = layer_input.transpose(0, 1), d_out.transpose(1, 2)
        if layer_input.shape[0] != num_samples:
            return None
        dz, previous = gate_gradients(module, layer_input, (d_out, d_h, d_c))
        parts: list[tuple[Factors, dict[str, str]]] = []
        for source, kind in ((layer_input, "ih"), (previous, "hh")):
            weight, bias = f"weight_{kind}_l0", f"bias_{kind}_l0"
            if weight in analysed or bias in analysed:
                shape = module.get_parameter(weight).shape if weight in analysed else None
                parts.append((LayerFactors(source, dz, shape, bias in analysed),
                              {"weight": weight, "bias": bias}))
        return CombinedFactors(parts) if parts else None
