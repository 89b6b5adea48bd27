"""Models of a user's own, for tests that need one (model=custom model._target_=tests.custom_models.X)."""
import math
import os
import signal

import torch


class DiesOnRankOne(torch.nn.Module):
    """A small MLP whose process is killed on rank 1 at its 3rd forward in train mode (the loss
    probe takes the first, so it dies in the second step): a rank lost mid-run, as an
    out-of-memory kill does."""

    def __init__(self, outputs: int = 5, die: bool = True):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod((3, 10, 10)), 16),
                                       torch.nn.ReLU(), torch.nn.Linear(16, outputs))
        self.die, self.forwards = die, 0

    def forward(self, x):
        self.forwards += self.training
        if self.die and os.environ.get("RANK") == "1" and self.forwards >= 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.net(x)


class LateParameter(torch.nn.Module):
    """A small MLP with a second head that only every `every`-th forward in train mode uses: with
    accumulate k = every, a parameter first used on the last micro-batch (pytorch #196996)."""

    def __init__(self, outputs: int = 5, every: int = 4):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod((3, 10, 10)), 16),
                                         torch.nn.ReLU())
        self.head = torch.nn.Linear(16, outputs)
        self.late = torch.nn.Linear(16, outputs)
        self.every, self.forwards = every, 0

    def forward(self, x):
        hidden = self.trunk(x)
        if not self.training:
            return self.head(hidden)
        self.forwards += 1
        late = self.forwards % self.every == 0
        return self.head(hidden) + (self.late(hidden) if late else 0)
