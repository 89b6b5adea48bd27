"""Components of a user's own, outside the package, each one class (its keys declared beside it)
with one YAML in tests/own_conf/: the house's rule that a new component costs nothing else."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from runner.config.keys import above, at_least, key
from runner.recording.events import Subscriber


class MarginLoss(torch.nn.Module):
    """A hinge on each label's logit: mean(relu(margin - (2y - 1) * logit))."""

    @dataclass
    class Keys:
        margin: float = key(1.0, "how far past zero each label's logit must be", allowed=above(0))

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = margin

    def forward(self, logits, targets):
        return F.relu(self.margin - (2 * targets - 1) * logits).mean()


class WideMLP(torch.nn.Module):
    """One hidden layer of `width` units on the synthetic 3x10x10 inputs."""

    @dataclass
    class Keys:
        width: int = key(16, "hidden units", allowed=at_least(1, integer=True))

    def __init__(self, width: int = 16, outputs: int = 5):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(300, width), torch.nn.ReLU(),
                                       torch.nn.Linear(width, outputs))

    def forward(self, x):
        return self.net(x)


class RowCollector(Subscriber):
    """A sink of a user's own, needing no YAML (trainer.loggers=[csv,tests.own_components.RowCollector]):
    what it heard of the run, written to heard.json in the run's folder at the run's end."""

    FILE = "heard.json"

    def __init__(self, run_dir, config):
        self.path = Path(run_dir) / self.FILE
        self.heard = {"steps": config.trainer.steps, "events": [], "rows": []}

    def run_start(self, run):
        self.heard["events"].append("run_start")
        self.heard["start"] = {"resumed": run.resumed, "start_step": run.start_step}

    def rows(self, rows):
        self.heard["events"].append("rows")
        self.heard["rows"].extend(rows)

    def run_end(self, summary, failed):
        self.heard["events"].append("run_end")
        self.heard["end"] = {"status": summary.status, "failed": failed, "steps_done": summary.steps_done}
        self.path.write_text(json.dumps(self.heard))

    def close(self):
        self.heard["events"].append("close")
