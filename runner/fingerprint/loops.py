"""The loop under test (config group `loop`): one adapter per name, each driving a loop on the lab's model,
optimizer and micro-batches (a `Session`); the fingerprint only observes what it does.

    runner       the lab's own strategy, with the modes the other keys choose (the self-test)
    custom       loop._target_=mymodule.train: your function, called as
                 train(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None, clip_norm=0.0)
    lightning, accelerate, hf_trainer, deepspeed
                 the framework's own loop (runner.fingerprint.frameworks), imported when chosen; they are
                 the optional extra `frameworks` (pip install ".[frameworks]")

`loader` is re-iterable with a len: each pass is the next epoch's micro-batches, (inputs, targets). A
token loss also takes num_items_in_batch= (the window's scored tokens, as the transformers Trainer hands it).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from runner.config.components import class_of
from runner.fingerprint.observe import Stream


class LoopError(ValueError):
    """A loop that cannot run: one line naming the key and what is allowed (exit 2)."""


class ProbeLoader:
    """The loop's loader: re-iterable, `len` micro-batches an epoch; each pass draws the next epoch."""

    def __init__(self, stream: Stream):
        self.stream, self.passes = stream, 0

    def __len__(self) -> int:
        return self.stream.micro_batches_per_epoch

    def __iter__(self):
        """A pass takes its epoch when its first micro-batch is drawn: a framework that opens an iterator
        it never reads (Lightning does) does not skip an epoch."""
        def epoch_pass():
            epoch, self.passes = self.passes, self.passes + 1
            yield from ((mb.inputs, mb.targets) for mb in self.stream.epoch(epoch))
        return epoch_pass()


class EpochsDataset(torch.utils.data.IterableDataset):
    """A probe loader as the dataset a framework's DataLoader takes: each pass is the next epoch's micro-batches
    (`item` shapes each one: a tuple, or the dict a Trainer hands the model)."""

    def __init__(self, loader: ProbeLoader, item=lambda inputs, targets: (inputs, targets)):
        self.loader, self.item = loader, item

    def __iter__(self):
        return (self.item(inputs, targets) for inputs, targets in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


@dataclass
class Session:
    """What a loop under test is handed for one probe."""

    training: Any  # runner.training.build.Training: the lab's model, loss, optimizer and (runner) strategy
    loader: ProbeLoader
    epochs: int
    accumulation: int
    clip_norm: float
    tokens: bool  # the loss counts tokens (num_items_in_batch)

    @property
    def model(self) -> torch.nn.Module:
        return self.training.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.training.optimizers[0]

    @property
    def loss_fn(self):
        return self.training.loss_fn

    @property
    def scheduler(self):
        return self.training.schedulers[0] if self.training.schedulers else None


class Loop:
    """A loop under test. `modes`: whether the lab's own keys (backward.*, loss.normalize, optim.*_every)
    choose what it does (only the lab's own loop)."""

    name = "loop"
    modes = False

    def version(self) -> str:
        return ""

    def train(self, session: Session) -> None:
        raise NotImplementedError


class Runner(Loop):
    """The lab's own strategy on the probe's windows (runner.components.loader), as runner.training.train
    steps it, without its records."""

    name, modes = "runner", True

    def version(self) -> str:
        return f"backward-lab {installed_version('backward-lab')}"

    def train(self, session: Session) -> None:
        t = session.training
        windows = t.batches
        if windows.carry:  # windows run across epochs; a trailing short one is never stepped
            steps = windows.micro_batches_per_epoch * session.epochs // windows.k
        else:
            steps = windows.windows_per_epoch * session.epochs
        for step in range(steps):
            window = windows.window(step)
            t.strategy.step(t.engine.module, t.loss_fn, t.optimizers, window.inputs, window.targets, window.sizes)


class Custom(Loop):
    """loop._target_=module.function: your own loop (see the module's doc for its signature)."""

    name = "custom"
    SIGNATURE = ("train(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None, "
                 "clip_norm=0.0)")

    def __init__(self, target: Optional[str]):
        if not target or target == "???":
            raise LoopError(f"loop._target_ is missing: expected loop._target_=module.function, a function "
                            f"called as {self.SIGNATURE}")
        function = class_of(target)
        if function is None or not callable(function):
            raise LoopError(f"loop._target_={target} cannot be imported: expected an importable function called "
                            f"as {self.SIGNATURE}")
        try:
            inspect.signature(function).bind(None, None, None, None, epochs=1, accumulation=1, scheduler=None,
                                             clip_norm=0.0)
        except TypeError as exc:
            raise LoopError(f"loop._target_={target} does not take the loop's arguments ({exc}): expected "
                            f"{self.SIGNATURE}") from None
        self.target, self.function = target, function

    def version(self) -> str:
        return self.target

    def train(self, session: Session) -> None:
        self.function(session.model, session.optimizer, session.loader, session.loss_fn, epochs=session.epochs,
                      accumulation=session.accumulation, scheduler=session.scheduler, clip_norm=session.clip_norm)


# The frameworks' adapters: name -> (module under runner.fingerprint.frameworks, the packages it needs).
FRAMEWORKS: Dict[str, tuple] = {
    "lightning": ("lightning_loop", ("lightning",)),
    "accelerate": ("accelerate_loop", ("accelerate",)),
    "hf_trainer": ("hf_trainer_loop", ("transformers", "accelerate")),
    "deepspeed": ("deepspeed_loop", ("deepspeed",)),
}
NAMES = ("runner", "custom", *FRAMEWORKS)


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def missing_packages(name: str) -> List[str]:
    """The packages loop=NAME needs that are not installed (checked without importing them)."""
    return [p for p in FRAMEWORKS.get(name, ((), ()))[1] if not installed_version(p)]


def build(name: Optional[str], target: Optional[str] = None, zero_stage: int = 0) -> Loop:
    """The loop loop=NAME chooses; LoopError (one line) when it cannot run here."""
    if name == "runner":
        return Runner()
    if name == "custom":
        return Custom(target)
    if name not in FRAMEWORKS:
        raise LoopError(f"loop={name} is unknown: expected one of {', '.join(NAMES)}")
    missing = missing_packages(name)
    if missing:
        raise LoopError(f"loop={name} needs {', '.join(missing)}, which is not installed: pip install "
                        f"\".[frameworks]\" (DeepSpeed: see docs/fingerprint.md)")
    module = importlib.import_module(f"runner.fingerprint.frameworks.{FRAMEWORKS[name][0]}")
    return module.Adapter(zero_stage=zero_stage) if name == "deepspeed" else module.Adapter()

