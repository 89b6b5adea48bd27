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
