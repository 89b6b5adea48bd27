"""A user's model for a table of numeric features, written as a user would write it.

    python -m runner -m experiment=audit model=custom \
        model._target_=runner.experiments.examples.tabular.TabularNet +model.in_features=30 \
        data=csv data.path=breast_cancer.csv data.target=malignant [model.batchnorm=true] [+model.dropout=0.2]

The runner knows nothing of this class: it is built from `model._target_` with the `+model.KEY`
arguments (and `model.hidden` / `model.batchnorm`, keys the built-in models share). The optional
BatchNorm makes an example's output depend on the other examples of its batch; the optional
Dropout draws a random mask each forward. The audit says so before training, and why the
micro-batched runs then differ from the full batch.
"""
import torch
from torch import nn


class TabularNet(nn.Module):
    def __init__(self, in_features: int, out_features: int = 1, hidden: int = 32, batchnorm: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn1(self.fc1(x)))))
