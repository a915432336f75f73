"""Peak memory against the budgets' prediction: the figures of README.md's "Budgets" list.

    python benchmarks/working_memory.py                 # tests/test_errors.py's cases
    python benchmarks/working_memory.py --recurrent     # a product's graphs and sequence length
    python benchmarks/working_memory.py --first-call    # what a process's first call loads once
    python benchmarks/working_memory.py --softmax       # a product through softmax nodes

Default: every case of ``tests/test_errors.py::test_budget_counts_what_the_model_holds`` (and
beside them a transformer layer's ``lanczos``, ``fisher`` on a wide first layer, P = 64M, and on
a model holding a 200 MB tensor), its peak measured as the
suite measures it (``measure_memory=True`` in a fresh process warmed on tiny models,
``tests/fresh.py``) and the refined prediction (the budget's refusal once the first pass has run,
``peak_memory.py``). For ``lanczos`` also the gradient's graph (the bytes its tensors save,
counted as the budget counts them) and how many graphs a product's double backward held beyond
it: the allowance the prediction makes plus what the peak exceeded the prediction by, in graphs.

``--recurrent``: the same for ``lanczos`` on recurrent layers over sequences of 48-200 steps,
whose products hold more graphs the longer the sequences (the allowance ``2.5 + steps / 28``),
and an LSTM over packed sequences of different lengths, which the budgets do not cover.

``--softmax``: the same for ``lanczos`` on attention over 32-512 tokens (an encoder layer,
causal or not, and attention written out) and on token models over 500 and 2,000 classes,
whose products form temporaries the size of what their softmax nodes saved: beside the graphs,
how many times those bytes a product held (the allowance
:data:`~hessrank.curvature.operator.SOFTMAX_TEMPORARIES`, plus what the peak exceeded the
prediction by).

``--first-call``: a tiny model's call twice in a new process that has run nothing before; the
first call's peak less the second's is what the process loads once (code, lazily imported
modules, the allocator's pools), which no prediction counts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hessrank
from hessrank.curvature.hessian import HessianOperator
from hessrank.curvature.operator import SOFTMAX_TEMPORARIES
from hessrank.problem import build_problem

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1] / "tests"))

import test_errors as cases  # noqa: E402  (tests/test_errors.py: the suite's own cases)
from fresh import in_fresh_processes, unruled_model  # noqa: E402  (tests/fresh.py)
from peak_memory import refined_prediction  # noqa: E402  (benchmarks/peak_memory.py)

MiB = 2**20
#: A Lanczos call's peak is one product's: a few steps reach it.
STEPS = 8


class Recurrent(nn.Module):
    """A recurrent layer over ``[n, T, 4]`` sequences, a linear head on the last step's output
    (or, over packed sequences, on each sequence's last hidden state)."""

    def __init__(self, kind: str, hidden: int, layers: int = 1) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(4, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            return self.head(self.rnn(x)[0][:, -1])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        state = self.rnn(packed)[1]
        return self.head((state[0] if isinstance(state, tuple) else state)[-1])


#: (name, kind, hidden size, layers, steps; 0 steps: packed lengths 50-200)
RECURRENT = [("LSTM h=8, 48 steps", "LSTM", 8, 1, 48),
             ("LSTM h=64, 50 steps", "LSTM", 64, 1, 50),
             ("LSTM h=32, 100 steps", "LSTM", 32, 1, 100),
             ("LSTM h=8, 200 steps", "LSTM", 8, 1, 200),
             ("LSTM h=64, 200 steps", "LSTM", 64, 1, 200),
             ("GRU h=32, 200 steps", "GRU", 32, 1, 200),
             ("RNN h=32, 200 steps", "RNN", 32, 1, 200),
             ("3-layer LSTM h=16, 200 steps", "LSTM", 16, 3, 200),
             ("LSTM h=32, packed 50-200", "LSTM", 32, 1, 0)]


def recurrent_case(index: int) -> tuple[nn.Module, tuple[Any, torch.Tensor], str, dict[str, int]]:
    """``RECURRENT[index]`` built, 32 sequences, as ``test_errors._working_memory_case``."""
    _, kind, hidden, layers, steps = RECURRENT[index]
    torch.manual_seed(0)
    model = Recurrent(kind, hidden, layers)
    labels = torch.randint(0, 3, (32,))
    if steps:
        return model, (torch.randn(32, steps, 4), labels), "lanczos", {"lanczos_steps": STEPS}
    lengths = torch.randint(50, 201, (32,))
    return (model, ((torch.randn(32, int(lengths.max()), 4), lengths), labels), "lanczos",
            {"lanczos_steps": STEPS})


def recurrent_peak(index: int) -> int | None:
    """The peak of a ``RECURRENT`` case's call (run it in a fresh process)."""
    model, batch, method, options = recurrent_case(index)
    return hessrank.effective_rank(model, cases.CE, batch, method=method, measure_memory=True,
                                   **options).peak_memory


class HeldTable(nn.Module):
    """A small MLP beside a 200 MB tensor it holds as an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))
        self.table = torch.zeros(50_000_000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.table[:3]


#: Cases beside the suite's: (name, method, the model and its batch).
EXTRA = [("attention over 128 tokens", "lanczos",
          lambda: (cases._LongAttention(), torch.randn(48, 128, 5), torch.randint(0, 3, (48,)))),
         # the gradient check's tensors on a wide layer (probe 204)
         ("wide first layer, P = 64M", "fisher",
          lambda: (nn.Sequential(nn.Linear(4_000_000, 16), nn.Tanh(), nn.Linear(16, 10)),
                   torch.randn(16, 4_000_000), torch.randint(0, 10, (16,)))),
         # the state's copies (probe 205)
         ("200 MB tensor attribute", "fisher",
          lambda: (HeldTable(), torch.randn(64, 20), torch.randint(0, 3, (64,)))),
         # a per-token GGN whose Gram holds only the weighed positions (probe 219)
         ("per-token GGN, 28 of 32 positions padded", "ggn", lambda: padded_tokens(32, 32, 4)),
         # not covered (README.md): a float64 convolution's double backward unfolds its input
         # several times over, attention's holds more than 4 graphs (probe 239)
         *((f"{dtype} conv, 3 to 2 channels, 40x40", method,
            lambda dtype=dtype: few_channels(getattr(torch, dtype)))
           for dtype in ("float64", "float32") for method in ("lanczos", "exact")),
         ("attention over 256 tokens", "lanczos",
          lambda: (cases._LongAttention(), torch.randn(16, 256, 5), torch.randint(0, 3, (16,))))]


def few_channels(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 3x3 convolution from 3 channels to 2 over 32 images of 40x40, pooled, a linear head:
    its input's unfolded patches are 13.5 times its output."""
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 3)).to(dtype)
    return model, torch.randn(32, 3, 40, 40, dtype=dtype), torch.randint(0, 3, (32,))


def padded_tokens(samples: int, positions: int, weighed: int) -> tuple[nn.Module, torch.Tensor,
                                                                        torch.Tensor]:
    """``tests/test_errors.py``'s per-token model (V = 30) on ``samples`` sequences of
    ``positions`` tokens whose targets past the first ``weighed`` are padding (-100, the
    cross-entropy's ``ignore_index``)."""
    targets = torch.randint(0, 30, (samples, positions))
    targets[:, weighed:] = -100
    return cases._TokenHead(), torch.randint(0, 30, (samples, positions)), targets


def extra_case(index: int) -> tuple[nn.Module, tuple[Any, torch.Tensor], str, dict[str, int]]:
    """``EXTRA[index]`` built."""
    torch.manual_seed(0)
    _, method, make = EXTRA[index]
    model, x, y = make()
    return model, (x, y), method, {"lanczos_steps": STEPS} if method == "lanczos" else {}


def extra_peak(index: int) -> int | None:
    """The peak of an ``EXTRA`` case's call (run it in a fresh process)."""
    model, batch, method, options = extra_case(index)
    return hessrank.effective_rank(model, cases.CE, batch, method=method, measure_memory=True,
                                   **options).peak_memory


class CausalAttention(nn.Module):
    """``tests/test_errors.py``'s encoder layer under a causal mask."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = cases._LongAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        hidden = self.inner.layer(self.inner.embed(x), src_mask=mask, is_causal=True)
        return self.inner.head(hidden.mean(dim=1))


class TokenModel(nn.Module):
    """Per-token logits over ``classes`` (``[n, classes, T]``) from an embedding, a tanh layer
    and a linear head: its loss's log-softmax saves ``[n, T, classes]``."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.embedding, self.hidden = nn.Embedding(classes, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embedding(tokens)))).transpose(1, 2)


def _tokens(classes: int, samples: int, steps: int) -> tuple[nn.Module, torch.Tensor,
                                                               torch.Tensor]:
    return (TokenModel(classes), torch.randint(0, classes, (samples, steps)),
            torch.randint(0, classes, (samples, steps)))


def _sequences(model: nn.Module, samples: int, steps: int) -> tuple[nn.Module, torch.Tensor,
                                                                     torch.Tensor]:
    return model, torch.randn(samples, steps, 5), torch.randint(0, 3, (samples,))


#: Products through softmax nodes: (name, method, the model and its batch).
SOFTMAX = [*((f"encoder layer, T = {steps}, n = {samples}", "lanczos",
              lambda steps=steps, samples=samples: _sequences(cases._LongAttention(), samples,
                                                              steps))
             for steps, samples in ((32, 192), (64, 96), (128, 48), (256, 16), (512, 4))),
           ("causal encoder layer, T = 128, n = 48", "lanczos",
            lambda: _sequences(CausalAttention(), 48, 128)),
           ("written out, 1 head, T = 128, n = 48", "lanczos",
            lambda: _sequences(cases._WrittenAttention(16, 1), 48, 128)),
           ("written out, 4 heads, T = 96, n = 32", "lanczos",
            lambda: _sequences(cases._WrittenAttention(32, 4), 32, 96)),
           ("token model, C = 500, T = 64, n = 32", "lanczos", lambda: _tokens(500, 32, 64)),
           ("token model, C = 2000, T = 32, n = 16", "lanczos", lambda: _tokens(2000, 16, 32)),
           *(("encoder layer, T = 128, n = 48", method,
              lambda: _sequences(cases._LongAttention(), 48, 128))
             for method in ("ggn_lanczos", "fisher_lanczos")),
           # exact's batched columns (P = 963, 291)
           ("written out, 1 head, T = 128, n = 16", "exact",
            lambda: _sequences(cases._WrittenAttention(16, 1), 16, 128)),
           ("written out, 2 heads, T = 256, n = 8", "exact",
            lambda: _sequences(cases._WrittenAttention(8, 2), 8, 256))]


def softmax_case(index: int) -> tuple[nn.Module, tuple[Any, torch.Tensor], str, dict[str, int]]:
    """``SOFTMAX[index]`` built."""
    torch.manual_seed(0)
    _, method, make = SOFTMAX[index]
    model, x, y = make()
    return model, (x, y), method, {"lanczos_steps": STEPS} if "lanczos" in method else {}


def softmax_peak(index: int) -> int | None:
    """The peak of a ``SOFTMAX`` case's call (run it in a fresh process)."""
    model, batch, method, options = softmax_case(index)
    return hessrank.effective_rank(model, cases.CE, batch, method=method, measure_memory=True,
                                   **options).peak_memory


def graphs(model: nn.Module, batch: tuple[Any, torch.Tensor]) -> tuple[int, int, float]:
    """The gradient's graph and the part of it softmax nodes saved (bytes) as the ``lanczos``
    budget counts them, and the graphs beyond it its prediction allows a product."""
    operator = HessianOperator(build_problem(model, cases.CE, batch, None, "eval"))
    return (operator.graph_bytes, operator.softmax_bytes,
            operator.held_by_products() / operator.graph_bytes - 1)


def report(rows: list[tuple[str, Any, str, dict[str, Any], int | None]]) -> None:
    """One line a case: peak, prediction, their ratio; for ``lanczos`` the graphs held, and
    through softmax nodes the multiple of what they saved held beside the other graphs."""
    print(f"{'case':40} {'method':15} {'peak MiB':>9} {'predicted':>9} {'pred/peak':>9} "
          f"{'graph MiB':>9} {'allowed':>7} {'held':>5} {'softmax MiB':>11} {'held':>5}")
    for name, make, method, options, peak in rows:
        model, batch = make()
        predicted = refined_prediction(model, batch, method, options)
        line = f"{name:40} {method:15} "
        line += (f"{peak / MiB:9.1f} {predicted / MiB:9.1f} {predicted / peak:9.2f}"
                 if peak else f"{'-':>9} {predicted / MiB:9.1f} {'-':>9}")
        if method == "lanczos" and peak:
            graph, softmax, allowed = graphs(model, batch)
            held = allowed + (peak - predicted) / graph
            line += f" {graph / MiB:9.2f} {allowed:7.1f} {held:5.1f}"
            if softmax > graph / 20:  # (a small classifier's loss: its share is noise)
                line += (f" {softmax / MiB:11.2f} "
                         f"{SOFTMAX_TEMPORARIES + (peak - predicted) / softmax:5.1f}")
        print(line, flush=True)


#: (method, whether its model has a layer no rule claims)
FIRST_CALLS = [*((method, False) for method in hessrank.ESTIMATORS),
               ("fisher", True), ("ggn", True)]


def first_call_child(case: int) -> None:
    """Subprocess entry: a tiny model's call of ``FIRST_CALLS[case]`` twice; prints the two
    peaks as JSON."""
    method, unruled = FIRST_CALLS[case]
    torch.manual_seed(0)
    batch = torch.randn(6, 3), torch.randint(0, 3, (6,))
    model = (unruled_model() if unruled
             else nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    options = {"lanczos_steps": 4} if "lanczos" in method else {}
    print(json.dumps([hessrank.effective_rank(model, nn.CrossEntropyLoss(), batch, method,
                                              measure_memory=True, **options).peak_memory
                      for _ in range(2)]))


def first_call() -> None:
    """Each method's first call in a new process, against its second."""
    print(f"{'method':29} {'first call MiB':>14} {'second MiB':>10} {'loaded once':>11}")
    for case, (method, unruled) in enumerate(FIRST_CALLS):
        done = subprocess.run([sys.executable, __file__, "--_first-call-child", str(case)],
                              capture_output=True, text=True, check=True)
        first, second = json.loads(done.stdout.strip().splitlines()[-1])
        name = f"{method}{' (no rule: torch.func)' if unruled else ''}"
        print(f"{name:29} {first / MiB:14.1f} {second / MiB:10.1f} "
              f"{(first - second) / MiB:11.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recurrent", action="store_true",
                        help="lanczos on recurrent layers over 48-200 steps")
    parser.add_argument("--softmax", action="store_true",
                        help="lanczos through softmax nodes (attention, token models)")
    parser.add_argument("--first-call", action="store_true",
                        help="what a process's first call loads once")
    parser.add_argument("--_first-call-child", dest="child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        first_call_child(args.child)
        return
    if args.first_call:
        first_call()
        return
    # by reference, for the fresh processes (``__main__`` there is tests/fresh.py)
    from working_memory import (
        EXTRA,
        RECURRENT,
        SOFTMAX,
        extra_case,
        extra_peak,
        recurrent_case,
        recurrent_peak,
        softmax_case,
        softmax_peak,
    )

    if args.recurrent:
        made = [(name, recurrent_case, index) for index, (name, *_) in enumerate(RECURRENT)]
        peaks = in_fresh_processes([(recurrent_peak, (index,)) for index in range(len(RECURRENT))])
    elif args.softmax:
        made = [(name, softmax_case, index) for index, (name, *_) in enumerate(SOFTMAX)]
        peaks = in_fresh_processes([(softmax_peak, (index,)) for index in range(len(SOFTMAX))])
    else:
        made = [*((name, cases._working_memory_case, index)
                  for index, (name, *_) in enumerate(cases._WORKING_MEMORY_CASES)),
                *((name, extra_case, index) for index, (name, *_) in enumerate(EXTRA))]
        peaks = in_fresh_processes(
            [*((cases._working_memory_peak, (index,))
               for index in range(len(cases._WORKING_MEMORY_CASES))),
             *((extra_peak, (index,)) for index in range(len(EXTRA)))])
    rows = []
    for (name, build, index), peak in zip(made, peaks):
        method, options = build(index)[2:]
        rows.append((name, lambda build=build, index=index: build(index)[:2], method, options,
                     peak))
    report(rows)


if __name__ == "__main__":
    main()
