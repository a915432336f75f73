"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (any number of layers, one or both directions, padded
or packed sequences, zero initial state, no LSTM projection): per-sample gradients from the
gates' pre-activation gradients, without per-sample backward passes.

For one layer and direction, with the input's pre-activations ``a_t = W_ih x_t + b_ih`` and the
state's ``b_t = W_hh h_{t-1} + b_hh`` (``h_{-1} = 0``), sample ``i``'s gradients are Kronecker
sums over the time steps: ``W_ih``: ``sum_t da_it x_it^T``, ``b_ih``: ``sum_t da_it``, ``W_hh``:
``sum_t db_it h_i,t-1^T``, ``b_hh``: ``sum_t db_it``. An LSTM's and a plain RNN's gates take
``a_t + b_t``, so ``da = db`` and the four parameters are column blocks of one Kronecker layer
``[x_t, h_t-1, 1, 1]`` (:class:`ColumnFactors`); a GRU's new gate multiplies the state's part by
the reset gate, so ``da`` and ``db`` differ there and its input and state sides are two Kronecker
layers. The layers and directions hold disjoint parameters: their Grams add up
(:class:`SummedFactors`).

The top layer's hidden states are the module's output (captured); a lower layer's are recomputed
by the cell's recurrence, a loop over the time steps like the module's own forward. The
gradients run the other way: the top layer's from the captured gradient of the output, a lower
layer's from the layer above (the gradient of that layer's input, ``da W_ih``), each direction's
with the captured gradient of its final state(s), through a hand-written backward recurrence (all
samples and cotangents at once, one ``[K n, G H] x [G H, H]`` product per step). The reverse
direction is the forward recurrence on the time-reversed sequence.

A packed sequence (``pack_padded_sequence``) is padded first. A sample's steps past its length
keep its state unchanged, so there its pre-activation gradients are zero and its state's
gradient passes through; the reverse direction reverses each sample's own steps.

Assumes: the module is called on a batched input with no initial state (or an all-zero one) and
runs as in evaluation (no dropout between layers). A nonzero initial state is declined before
anything is computed (a small one would be wrong by less than a float32 check resolves); anything
else (a recurrence that differs from these) fails the gradient check, which compares with
autograd's gradient through the module's own kernel, and the general path takes the module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils._pytree import tree_flatten

from hessrank.curvature.rules import Call, GramRule, register_rule
from hessrank.curvature.rules.factors import ColumnFactors, Factors, LayerFactors, SummedFactors


@dataclass
class CellWeights:
    """One layer and direction's parameters (detached) and their local names; ``G`` is the
    number of gates (LSTM 4, GRU 3, RNN 1)."""

    w_ih: Tensor  # [G H, F]
    w_hh: Tensor  # [G H, H]
    b_ih: Tensor | None  # [G H]
    b_hh: Tensor | None
    names: dict[str, str]  # "w_ih", "w_hh", "b_ih", "b_hh" -> the module's parameter name

    def input_side(self, inputs: Tensor, with_state_bias: bool = False) -> Tensor:
        """``W_ih x + b_ih`` (``+ b_hh`` too, ``with_state_bias``) at every position:
        ``[..., F]`` in, ``[..., G H]`` out, the biases added inside the GEMM."""
        return _affine(inputs, self.w_ih, self.b_ih, self.b_hh if with_state_bias else None)

    def state_side(self, hidden: Tensor) -> Tensor:
        """``W_hh h + b_hh``: ``[..., G H]``."""
        return _affine(hidden, self.w_hh, self.b_hh)

    def pre_activations(self, inputs: Tensor, previous: Tensor) -> Tensor:
        """``W_ih x + b_ih + W_hh h + b_hh`` (``[..., F]`` and ``[..., H]`` in, ``[..., G H]``
        out) as two accumulating GEMMs: no pass over the result beyond the GEMMs' own."""
        out = self.input_side(inputs, with_state_bias=True)
        out.view(-1, out.shape[-1]).addmm_(previous.reshape(-1, previous.shape[-1]), self.w_hh.T)
        return out


def _affine(inputs: Tensor, weight: Tensor, *biases: Tensor | None) -> Tensor:
    """``inputs W^T`` plus the biases given (not None), as one GEMM: ``[..., d_in]`` in,
    ``[..., d_out]`` out (contiguous)."""
    present = [b for b in biases if b is not None]
    flat = inputs.reshape(-1, inputs.shape[-1])
    out = (torch.addmm(sum(present[1:], present[0]), flat, weight.T) if present
           else flat @ weight.T)
    return out.view(*inputs.shape[:-1], -1)


def _previous(hidden: Tensor, time_dim: int = 1) -> Tensor:
    """``h_{t-1}`` for every step ``t`` (``h_{-1} = 0``), time along ``time_dim`` of
    ``hidden`` (``[n, T, H]`` by default, ``[T, n, H]`` with ``time_dim=0``)."""
    steps = hidden.shape[time_dim]
    return torch.cat([torch.zeros_like(hidden.narrow(time_dim, 0, 1)),
                      hidden.narrow(time_dim, 0, steps - 1)], dim=time_dim)


def _time_major(*tensors: Tensor) -> list[Tensor]:
    """``[n, T, ...]`` -> contiguous ``[T, n, ...]``: every step of a loop reads one block."""
    return [t.transpose(0, 1).contiguous() for t in tensors]


def _kept(valid: Tensor | None, t: int, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where step ``t`` of a sample is valid, ``old`` (the state kept) where not."""
    return new if valid is None else torch.where(valid[t], new, old)


def _passed(valid: Tensor | None, t: int, through_step: Tensor, d_step: Tensor,
            d_later: Tensor, k: int) -> Tensor:
    """The gradient of ``h_t`` (``[K n, H]``): ``through_step`` (the output's gradient plus what
    flows back through step ``t + 1``) where that step is valid; where it is not, the state was
    passed on unchanged, and so is its gradient ``d_later`` (plus the output's, ``d_step``)."""
    if valid is None:
        return through_step
    n, size = valid.shape[1], through_step.shape[-1]
    return torch.where(valid[t + 1], through_step.view(k, n, size),
                       (d_step + d_later).view(k, n, size)).view(k * n, size)


class Cell(ABC):
    """A recurrence: its forward (for lower layers) and its backward to the pre-activations."""

    #: how many final states the module returns (LSTM: ``h_n`` and ``c_n``)
    states: int = 1
    #: whether the state side's bias simply adds to the input side's (not a GRU's: its reset
    #: gate scales part of it), so that :meth:`step` gets both in ``driven``
    folds_state_bias: bool = True

    def __init__(self, module: nn.RNNBase) -> None:
        """The recurrence of ``module`` (its configuration, not its weights)."""
        self.size = module.hidden_size

    def run(self, weights: CellWeights, inputs: Tensor, valid: Tensor | None) -> Tensor:
        """Hidden states ``[n, T, H]`` from inputs ``[n, T, F]`` and a zero initial state; a
        sample's state stays as it is at the steps ``valid [T, n, 1]`` marks False."""
        (driven,) = _time_major(weights.input_side(inputs, self.folds_state_bias))
        n = inputs.shape[0]
        state = tuple(inputs.new_zeros(n, self.size) for _ in range(self.states))
        out = inputs.new_empty(len(driven), n, self.size)
        for t in range(len(driven)):
            state = tuple(_kept(valid, t, new, old)
                          for new, old in zip(self.step(weights, driven[t], state), state))
            out[t] = state[0]
        return out.transpose(0, 1)

    @abstractmethod
    def step(self, weights: CellWeights, driven: Tensor, state: tuple[Tensor, ...]
             ) -> tuple[Tensor, ...]:
        """The state after one step (``(h,)``, an LSTM's ``(h, c)``, each ``[n, H]``) from the
        input's pre-activations ``driven [n, G H]`` (with the state side's bias where
        :attr:`folds_state_bias`) and the state before it."""

    @abstractmethod
    def backward(self, weights: CellWeights, inputs: Tensor, hidden: Tensor, d_out: Tensor,
                 d_final: tuple[Tensor, ...], valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(da, db)``, each ``[K, n, T, G H]``: gradients of the input's and the state's
        pre-activations, from the gradients of the hidden states ``d_out [K, n, T, H]`` and of
        the final state(s) ``[K, n, H]``; zero at the steps ``valid`` marks False, through which
        the state's gradient passes unchanged."""

    def factors(self, weights: CellWeights, inputs: Tensor, previous: Tensor, da: Tensor,
                db: Tensor, analysed: frozenset[str]) -> list[Factors]:
        """The Kronecker layers of one layer and direction (only the analysed parameters)."""
        ones = inputs.new_ones(*inputs.shape[:2], 1)
        sides = [("w_ih", inputs, da), ("w_hh", previous, db), ("b_ih", ones, da),
                 ("b_hh", ones, db)]
        present = [(weights.names[key], source, grads) for key, source, grads in sides
                   if key in weights.names and weights.names[key] in analysed]
        if da is db:  # one Kronecker layer: the four parameters side by side
            groups = [present] if present else []
        else:
            groups = [[side for side in present if side[2] is grads] for grads in (da, db)]
        parts: list[Factors] = []
        for group in groups:
            if not group:
                continue
            activations = torch.cat([source for _, source, _ in group], dim=-1)
            grads = group[0][2]
            shapes = {name: torch.Size((grads.shape[-1], source.shape[-1]))
                      if source is not ones else torch.Size((grads.shape[-1],))
                      for name, source, _ in group}
            parts.append(ColumnFactors(LayerFactors(activations, grads, torch.Size(
                (grads.shape[-1], activations.shape[-1])), with_bias=False), shapes))
        return parts


class LSTMCell(Cell):
    """Gates ``i, f, g, o`` of ``a_t + b_t``; ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``."""

    states = 2

    def step(self, weights: CellWeights, driven: Tensor, state: tuple[Tensor, ...]
             ) -> tuple[Tensor, ...]:
        hidden, cell = state
        i, f, g, o = torch.addmm(driven, hidden, weights.w_hh.T).chunk(4, dim=-1)
        cell = f.sigmoid() * cell + i.sigmoid() * g.tanh()
        return o.sigmoid() * cell.tanh(), cell

    def backward(self, weights: CellWeights, inputs: Tensor, hidden: Tensor, d_out: Tensor,
                 d_final: tuple[Tensor, ...], valid: Tensor | None) -> tuple[Tensor, Tensor]:
        d_h, d_c = d_final
        k, n, steps, size = d_out.shape
        # Time-major [T, n, ...] throughout, each factor written in place: the step loops read
        # contiguous blocks, and the elementwise passes over [T, n, H] are few (they, not the
        # GEMMs, dominated this function).
        inputs_t, hidden_t = _time_major(inputs, hidden)
        gates = weights.pre_activations(inputs_t, _previous(hidden_t, 0))  # [T, n, 4 H]
        g = gates[..., 2 * size:3 * size].contiguous().tanh_()
        gates.sigmoid_()  # i, f, o (g's block unused)
        i, f, o = gates[..., :size], gates[..., size:2 * size], gates[..., 3 * size:]
        update = i * g
        cells = update.new_zeros(steps + 1, n, size)  # cells[t + 1] = c_t, c_{-1} = 0
        for t in range(steps):
            torch.addcmul(update[t], f[t], cells[t], out=cells[t + 1])
        tanh_c = cells[1:].tanh()
        one = tanh_c.new_ones(())
        # dc_t += dh_t * to_cell; dz_o = dh_t * to_o; (dz_i, dz_f, dz_g) = dc_t * to_ifg.
        to_cell = torch.addcmul(one, tanh_c, tanh_c, value=-1).mul_(o)  # o (1 - tanh^2 c)
        to_o = torch.addcmul(o, o, o, value=-1).mul_(tanh_c)  # o (1 - o) tanh c
        to_ifg = update.new_empty(steps, n, 3, size)
        torch.addcmul(i, i, i, value=-1, out=to_ifg[:, :, 0]).mul_(g)  # g i (1 - i)
        torch.addcmul(f, f, f, value=-1, out=to_ifg[:, :, 1]).mul_(cells[:-1])  # c f (1 - f)
        torch.addcmul(one, g, g, value=-1, out=to_ifg[:, :, 2]).mul_(i)  # i (1 - g^2)
        d_steps = d_out.permute(2, 0, 1, 3).reshape(steps, k * n, size)
        dz = d_out.new_empty(steps, k * n, 4 * size)
        d_hidden = (d_h + d_out[:, :, -1]).reshape(k * n, size)
        d_cell = d_c.reshape(k * n, size).clone()
        for t in reversed(range(steps)):
            if t < steps - 1:
                d_hidden = _passed(valid, t, torch.addmm(d_steps[t], dz[t + 1], weights.w_hh),
                                   d_steps[t], d_hidden, k)
            kept_cell = None if valid is None else d_cell.clone()
            d_cell.view(k, n, size).addcmul_(d_hidden.view(k, n, size), to_cell[t])
            torch.mul(d_hidden.view(k, n, size), to_o[t],
                      out=dz[t, :, 3 * size:].view(k, n, size))
            torch.mul(d_cell.view(k, n, 1, size), to_ifg[t].view(n, 3, size),
                      out=dz[t, :, :3 * size].view(k, n, 3, size))
            d_cell.view(k, n, size).mul_(f[t])
            if valid is not None and kept_cell is not None:
                dz[t].view(k, n, -1).mul_(valid[t])
                d_cell = _kept(valid, t, d_cell.view(k, n, size),
                               kept_cell.view(k, n, size)).reshape(k * n, size)
        dz_batch = dz.view(steps, k, n, 4 * size).permute(1, 2, 0, 3)
        return dz_batch, dz_batch


class GRUCell(Cell):
    """``r, z = sigmoid(a + b)`` (their blocks), ``m = tanh(a_n + r b_n)``,
    ``h_t = (1 - z) m + z h_{t-1}``."""

    folds_state_bias = False

    def step(self, weights: CellWeights, driven: Tensor, state: tuple[Tensor, ...]
             ) -> tuple[Tensor, ...]:
        (hidden,) = state
        a_r, a_z, a_n = driven.chunk(3, dim=-1)
        b_r, b_z, b_n = weights.state_side(hidden).chunk(3, dim=-1)
        z = (a_z + b_z).sigmoid()
        new = (a_n + (a_r + b_r).sigmoid() * b_n).tanh()
        return (new + z * (hidden - new),)

    def backward(self, weights: CellWeights, inputs: Tensor, hidden: Tensor, d_out: Tensor,
                 d_final: tuple[Tensor, ...], valid: Tensor | None) -> tuple[Tensor, Tensor]:
        (d_h,) = d_final
        k, n, steps, size = d_out.shape
        # time-major [T, n, ...] from the start, as the LSTM's
        inputs_t, hidden_t = _time_major(inputs, hidden)
        previous = _previous(hidden_t, 0)
        a_r, a_z, a_n = weights.input_side(inputs_t).chunk(3, dim=-1)
        b_r, b_z, b_n = weights.state_side(previous).chunk(3, dim=-1)
        r, z = (a_r + b_r).sigmoid_(), (a_z + b_z).sigmoid_()
        new = torch.addcmul(a_n, r, b_n).tanh_()
        one = new.new_ones(())
        # da_n = dh (1 - z)(1 - m^2); da_z = dh (h_{t-1} - m) z (1 - z); da_r = da_n b_n r (1-r);
        # db_n = da_n r; the other blocks of db equal da's; dh_{t-1} = dh z + db W_hh.
        slope = torch.addcmul(one, new, new, value=-1)
        to_n = torch.addcmul(slope, z, slope, value=-1)
        to_z = (previous - new).mul_(torch.addcmul(z, z, z, value=-1))
        to_r = torch.addcmul(r, r, r, value=-1).mul_(b_n)
        reset, keep = r, z
        d_steps = d_out.permute(2, 0, 1, 3).reshape(steps, k * n, size)
        da = d_out.new_empty(steps, k * n, 3 * size)
        db = d_out.new_empty(steps, k * n, 3 * size)
        d_hidden = (d_h + d_out[:, :, -1]).reshape(k * n, size)
        for t in reversed(range(steps)):
            if t < steps - 1:
                carried = (d_hidden.view(k, n, size) * keep[t + 1]).view(k * n, size)
                d_hidden = _passed(valid, t, torch.addmm(d_steps[t], db[t + 1], weights.w_hh)
                                   .add_(carried), d_steps[t], d_hidden, k)
            blocks = d_hidden.view(k, n, size)
            a_view, b_view = da[t].view(k, n, 3, size), db[t].view(k, n, 3, size)
            torch.mul(blocks, to_n[t], out=a_view[:, :, 2])
            torch.mul(blocks, to_z[t], out=a_view[:, :, 1])
            torch.mul(a_view[:, :, 2], to_r[t], out=a_view[:, :, 0])
            b_view[:, :, :2] = a_view[:, :, :2]
            torch.mul(a_view[:, :, 2], reset[t], out=b_view[:, :, 2])
            if valid is not None:
                a_view.mul_(valid[t].unsqueeze(-1))
                b_view.mul_(valid[t].unsqueeze(-1))
        return (da.view(steps, k, n, 3 * size).permute(1, 2, 0, 3),
                db.view(steps, k, n, 3 * size).permute(1, 2, 0, 3))


class PlainCell(Cell):
    """``h_t = tanh(a_t + b_t)`` or ``relu(a_t + b_t)``."""

    def __init__(self, module: nn.RNNBase) -> None:
        super().__init__(module)
        self.tanh = module.nonlinearity == "tanh"

    def step(self, weights: CellWeights, driven: Tensor, state: tuple[Tensor, ...]
             ) -> tuple[Tensor, ...]:
        pre = torch.addmm(driven, state[0], weights.w_hh.T)
        return (pre.tanh_() if self.tanh else pre.relu_(),)

    def backward(self, weights: CellWeights, inputs: Tensor, hidden: Tensor, d_out: Tensor,
                 d_final: tuple[Tensor, ...], valid: Tensor | None) -> tuple[Tensor, Tensor]:
        (d_h,) = d_final
        k, n, steps, size = d_out.shape
        (hidden_t,) = _time_major(hidden)
        slopes = (torch.addcmul(hidden_t.new_ones(()), hidden_t, hidden_t, value=-1) if self.tanh
                  else (hidden_t > 0).to(hidden.dtype))  # relu's, as autograd's
        d_steps = d_out.permute(2, 0, 1, 3).reshape(steps, k * n, size)
        dz = d_out.new_empty(steps, k * n, size)
        d_hidden = (d_h + d_out[:, :, -1]).reshape(k * n, size)
        for t in reversed(range(steps)):
            if t < steps - 1:
                d_hidden = _passed(valid, t, torch.addmm(d_steps[t], dz[t + 1], weights.w_hh),
                                   d_steps[t], d_hidden, k)
            torch.mul(d_hidden.view(k, n, size), slopes[t], out=dz[t].view(k, n, size))
            if valid is not None:
                dz[t].view(k, n, size).mul_(valid[t])
        dz_batch = dz.view(steps, k, n, size).permute(1, 2, 0, 3)
        return dz_batch, dz_batch


def _weights(module: nn.RNNBase, layer: int, direction: int) -> CellWeights:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    names = {key: f"{kind}_{side}{suffix}" for key, kind, side in (
        ("w_ih", "weight", "ih"), ("w_hh", "weight", "hh"), ("b_ih", "bias", "ih"),
        ("b_hh", "bias", "hh")) if module.bias or kind == "weight"}
    # (an attribute: torch.nn.utils.weight_norm's makes a weight a plain tensor computed from
    # two parameters, whose gradient check the rule's claims then fail, as a linear layer's do;
    # get_parameter had raised, noted as a bug in the rule; probe 186)
    values = {key: getattr(module, name).detach() for key, name in names.items()}
    return CellWeights(values["w_ih"], values["w_hh"], values.get("b_ih"), values.get("b_hh"),
                       names)


def recurrent_factors(module: nn.RNNBase, cell: Cell, inputs: Tensor, output: Tensor,
                      d_out: Tensor, d_finals: tuple[Tensor, ...], lengths: Tensor | None,
                      analysed: frozenset[str]) -> list[Factors]:
    """The factors of every layer and direction.

    Args:
        module: the recurrent module.
        cell: its recurrence.
        inputs: ``[n, T, F]``.
        output: ``[n, T, D H]``: the top layer's hidden states (both directions side by side).
        d_out: ``[K, n, T, D H]``: the gradients of ``output``.
        d_finals: gradients of the final states, each ``[K, L D, n, H]``.
        lengths: ``[n]`` steps of each sample (a packed sequence's), None: all ``T``.
        analysed: the module's parameters under analysis (local names).
    """
    directions = 2 if module.bidirectional else 1
    size = module.hidden_size
    steps = torch.arange(inputs.shape[1], device=inputs.device)
    valid = None if lengths is None else (steps[:, None] < lengths[None, :])[..., None]
    reverse = _Reversal(steps, lengths)
    weights_of = [[_weights(module, layer, d) for d in range(directions)]
                  for layer in range(module.num_layers)]
    layer_inputs, hiddens = [inputs], []
    with torch.no_grad():
        for layer in range(module.num_layers):
            top = layer == module.num_layers - 1
            states = [output[..., d * size:(d + 1) * size] if top else
                      reverse(cell.run(weights_of[layer][d], reverse(layer_inputs[-1], d),
                                       valid), d)
                      for d in range(directions)]
            hiddens.append(states)
            layer_inputs.append(torch.cat(states, dim=-1))
        parts: list[Factors] = []
        d_above = d_out
        for layer in reversed(range(module.num_layers)):
            d_below = None
            for d in range(directions):
                weights = weights_of[layer][d]
                x, hidden = (reverse(t, d) for t in (layer_inputs[layer], hiddens[layer][d]))
                d_hidden = reverse(d_above[..., d * size:(d + 1) * size], d, dim=2)
                finals = tuple(g[:, layer * directions + d] for g in d_finals)
                da, db = cell.backward(weights, x, hidden, d_hidden, finals, valid)
                parts += cell.factors(weights, x, _previous(hidden), da, db, analysed)
                if layer > 0:
                    d_input = reverse(da @ weights.w_ih, d, dim=2)
                    d_below = d_input if d_below is None else d_below + d_input
            if d_below is not None:
                d_above = d_below
    return parts


class _Reversal:
    """Each sample's steps in reverse order for the reverse direction (``direction`` 1), its
    padding (steps past its length) left in place; unchanged for the forward direction."""

    def __init__(self, steps: Tensor, lengths: Tensor | None) -> None:
        self.order = None if lengths is None else torch.where(  # [n, T]
            steps[None, :] < lengths[:, None], lengths[:, None] - 1 - steps[None, :],
            steps[None, :])

    def __call__(self, tensor: Tensor, direction: int, dim: int = 1) -> Tensor:
        """``tensor`` with time along ``dim`` and the samples along ``dim - 1``."""
        if not direction:
            return tensor
        if self.order is None:
            return tensor.flip(dim)
        shape = [1] * (dim - 1) + list(self.order.shape) + [1] * (tensor.dim() - dim - 1)
        return tensor.gather(dim, self.order.view(shape).expand_as(tensor))


class RecurrentRule(GramRule):
    """A recurrent module whose output and final states are captured (a tuple)."""

    #: the module's recurrence
    cell_type: ClassVar[type[Cell]]
    #: ``[T n, H]`` tensors of a layer's forward gates a recurrence holds beside its gradients
    GATE_TENSORS: ClassVar[int] = 10

    def working_bytes(self, module: nn.Module, layer_output: Tensor | tuple[Tensor, ...],
                      num_cotangents: int, num_samples: int, num_params: int) -> int:
        """The default (per-sample gradients in blocks) and each layer's and direction's
        recurrence, all kept until the Gram is formed: its gates' gradients for every
        cotangent column (two ``[T, K n, gates H]``) and about :data:`GATE_TENSORS`
        ``[T, n, H]`` tensors of its forward gates (a 2-layer GRU's ggn at T = 400 had
        peaked at 2.4 times a prediction without them; probe 108)."""
        default = super().working_bytes(module, layer_output, num_cotangents, num_samples,
                                        num_params)
        output = layer_output[0] if isinstance(layer_output, tuple) else layer_output
        data = output.data if isinstance(output, PackedSequence) else output
        if not isinstance(module, nn.RNNBase) or not isinstance(data, Tensor):
            return default
        steps = data.numel() // data.shape[-1]  # T n: every sample's steps
        gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
        per_layer = ((2 * num_cotangents * gates + self.GATE_TENSORS) * steps
                     * module.hidden_size * data.element_size())
        directions = 2 if module.bidirectional else 1
        return default + module.num_layers * directions * per_layer

    def factors(self, module: nn.Module, layer_input: Tensor | PackedSequence,
                layer_output: Tensor | tuple[Tensor, ...],
                output_grads: Tensor | tuple[Tensor, ...], num_samples: int,
                analysed: frozenset[str], call: Call = ((), {})) -> Factors | None:
        if not isinstance(module, nn.RNNBase) or _nonzero_initial_state(call):
            return None
        cell = self.cell_type(module)
        if (not isinstance(output_grads, tuple) or not isinstance(layer_output, tuple)
                or len(output_grads) != 1 + cell.states):
            return None
        output, d_out, d_finals = layer_output[0], output_grads[0], output_grads[1:]
        lengths = None
        if isinstance(layer_input, PackedSequence):  # padded, batch first, in the batch's order
            packed = layer_input

            def padded(data: Tensor) -> Tensor:
                return pad_packed_sequence(PackedSequence(data, *packed[1:]), batch_first=True)[0]

            layer_input, lengths = pad_packed_sequence(packed, batch_first=True)
            lengths = lengths.to(layer_input.device)
            output, d_out = padded(output), torch.stack([padded(d) for d in d_out])
        elif layer_input.dim() != 3:
            return None
        elif not module.batch_first:  # [T, n, F]: the samples are the second dimension
            layer_input, output, d_out = (layer_input.transpose(0, 1), output.transpose(0, 1),
                                          d_out.transpose(1, 2))
        if layer_input.shape[0] != num_samples or output.shape[:2] != layer_input.shape[:2]:
            return None
        parts = recurrent_factors(module, cell, layer_input, output, d_out, tuple(d_finals),
                                  lengths, analysed)
        return SummedFactors(parts) if parts else None


def _nonzero_initial_state(call: Call) -> bool:
    """Whether the module was called with an initial state that is not all zero (``hx``, the
    second argument: a tensor, or an LSTM's pair). The recurrence here starts from zero; a small
    state would make it wrong by less than the gradient check resolves in float32, so it is
    declined outright (one reduction)."""
    args, kwargs = call
    state = args[1] if len(args) > 1 else kwargs.get("hx")
    return any(bool(torch.count_nonzero(part)) for part in tree_flatten(state)[0]
               if isinstance(part, Tensor))


@register_rule
class LSTMRule(RecurrentRule):
    name = "lstm"
    module_types = (nn.LSTM,)
    cell_type = LSTMCell

    def supports(self, module: nn.Module) -> bool:
        return bool(super().supports(module) and module.proj_size == 0)


@register_rule
class GRURule(RecurrentRule):
    name, module_types, cell_type = "gru", (nn.GRU,), GRUCell


@register_rule
class RNNRule(RecurrentRule):
    name, module_types, cell_type = "rnn", (nn.RNN,), PlainCell
