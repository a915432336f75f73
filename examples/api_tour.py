"""The README's API tour: run it to reproduce the output shown there."""

import torch
from torch import nn

import hessrank

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
inputs, targets = torch.randn(64, 20), torch.randint(0, 5, (64,))
loss_fn = nn.CrossEntropyLoss()

for method in hessrank.METHODS:
    res = hessrank.effective_rank(model, loss_fn, (inputs, targets), method=method)
    print(res)

res = hessrank.effective_rank(model, loss_fn, (inputs, targets), method="fisher", per_layer=True)
print({name: layer.rank for name, layer in res.layers.items()})
print({name: round(value, 1) for name, value in res.ranks.items()})
print(res.notes)
