"""``nn.LSTM`` (one layer, one direction, no projection, zero initial state): per-sample
gradients from the gates' pre-activation gradients, without per-sample backward passes.

With gate pre-activations ``z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh`` (``h_{-1} = 0``), sample
``i``'s gradient of every parameter is one Kronecker sum over the time steps,
``sum_t dz_it [x_it, h_i,t-1, 1, 1]^T``: the columns of ``W_ih``, ``W_hh``, ``b_ih`` and ``b_hh``
side by side (:class:`ColumnFactors` over one :class:`LayerFactors`). The gates follow from the
captured input and hidden states (the module's own output) in one product for all steps, the cell
states from their elementwise recurrence; ``dz`` from a hand-written backward recurrence that
takes the captured gradients of the output and of the final states (all samples and cotangents
at once, one ``[K n, 4H] x [4H, H]`` product per step).

Assumes: the module is called on a batched input and no initial state (an initial state, or a
recurrence that differs from this one, fails the gradient check, which compares with autograd's
gradient through the module's own kernel).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hessrank.curvature.rules import GramRule, register_rule
from hessrank.curvature.rules.factors import ColumnFactors, LayerFactors


def gate_gradients(module: nn.LSTM, inputs: Tensor, hidden: Tensor,
                   output_grads: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``dz [K, n, T, 4H]``: gradients of the gate pre-activations (gate order ``i, f, g, o``).

    Args:
        module: the LSTM.
        inputs: ``[n, T, F]``.
        hidden: ``[n, T, H]``: the hidden states ``h_t`` (the module's output).
        output_grads: gradients of the output ``[K, n, T, H]`` and of the final hidden and cell
            states ``[K, n, H]``.
    """
    d_out, d_h, d_c = output_grads
    k, n, steps, size = d_out.shape
    params = {name: p.detach() for name, p in module.named_parameters()}
    w_ih, w_hh = params["weight_ih_l0"], params["weight_hh_l0"]
    with torch.no_grad():
        previous = torch.cat([hidden.new_zeros(n, 1, size), hidden[:, :-1]], dim=1)
        gates = inputs @ w_ih.T + previous @ w_hh.T
        if module.bias:
            gates += params["bias_ih_l0"] + params["bias_hh_l0"]
        i, f, g, o = gates.chunk(4, dim=-1)
        i, f, o = i.sigmoid(), f.sigmoid(), o.sigmoid()
        g = g.tanh()
        update = i * g
        cells = update.new_zeros(n, steps + 1, size)  # cells[:, t + 1] = c_t, c_{-1} = 0
        for t in range(steps):
            torch.addcmul(update[:, t], f[:, t], cells[:, t], out=cells[:, t + 1])
        tanh_c = cells[:, 1:].tanh()
        # dc_t += dh_t * to_cell; dz_o = dh_t * to_o; (dz_i, dz_f, dz_g) = dc_t * to_ifg.
        # Time-major copies ([T, ...]): every step below reads and writes contiguous blocks.
        to_cell = (o * (1 - tanh_c * tanh_c)).transpose(0, 1).contiguous()
        to_o = (tanh_c * o * (1 - o)).transpose(0, 1).contiguous()
        to_ifg = torch.cat([g * i * (1 - i), cells[:, :-1] * f * (1 - f), i * (1 - g * g)],
                           dim=-1).transpose(0, 1).contiguous()  # [T, n, 3H]
        forget = f.transpose(0, 1).contiguous()
        d_steps = d_out.permute(2, 0, 1, 3).reshape(steps, k * n, size)
        dz = d_out.new_empty(steps, k * n, 4 * size)
        d_hidden = (d_h + d_out[:, :, -1]).reshape(k * n, size)
        d_cell = d_c.reshape(k * n, size).clone()
        for t in reversed(range(steps)):
            if t < steps - 1:
                d_hidden = torch.addmm(d_steps[t], dz[t + 1], w_hh)
            d_cell.view(k, n, size).addcmul_(d_hidden.view(k, n, size), to_cell[t])
            torch.mul(d_hidden.view(k, n, size), to_o[t],
                      out=dz[t, :, 3 * size:].view(k, n, size))
            torch.mul(d_cell.view(k, n, 1, size), to_ifg[t].view(n, 3, size),
                      out=dz[t, :, :3 * size].view(k, n, 3, size))
            d_cell.view(k, n, size).mul_(forget[t])
    return dz.view(steps, k, n, 4 * size).permute(1, 2, 0, 3)


@register_rule
class LSTMRule(GramRule):
    name = "lstm"
    module_types = (nn.LSTM,)

    def supports(self, module: nn.Module) -> bool:
        return bool(super().supports(module) and module.num_layers == 1
                    and not module.bidirectional and module.proj_size == 0)

    def factors(self, module: nn.Module, layer_input: Tensor,
                layer_output: Tensor | tuple[Tensor, ...],
                output_grads: Tensor | tuple[Tensor, ...], num_samples: int,
                analysed: frozenset[str]) -> ColumnFactors | None:
        if (not isinstance(module, nn.LSTM) or not isinstance(output_grads, tuple)
                or not isinstance(layer_output, tuple) or len(output_grads) != 3
                or layer_input.dim() != 3):
            return None
        hidden, d_out, d_h, d_c = layer_output[0], *output_grads
        if not module.batch_first:  # [T, n, F]: the samples are the second dimension
            layer_input, hidden, d_out = (layer_input.transpose(0, 1), hidden.transpose(0, 1),
                                          d_out.transpose(1, 2))
        if layer_input.shape[0] != num_samples or hidden.shape[:2] != layer_input.shape[:2]:
            return None
        dz = gate_gradients(module, layer_input, hidden, (d_out, d_h[:, 0], d_c[:, 0]))
        n, steps = layer_input.shape[:2]
        ones = layer_input.new_ones(n, steps, 1)
        previous = torch.cat([hidden.new_zeros(n, 1, hidden.shape[2]), hidden[:, :-1]], dim=1)
        sources = {"weight_ih_l0": layer_input, "weight_hh_l0": previous,
                   "bias_ih_l0": ones, "bias_hh_l0": ones}
        names = [name for name in sources if name in analysed]
        if not names:
            return None
        activations = torch.cat([sources[name] for name in names], dim=-1)
        shapes = {name: module.get_parameter(name).shape for name in names}
        return ColumnFactors(LayerFactors(activations, dz, torch.Size(
            (dz.shape[-1], activations.shape[-1])), with_bias=False), shapes)
