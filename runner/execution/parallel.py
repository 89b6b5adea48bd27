"""The engine: how one training's passes and updates run, on one process or over ranks.

    trainer.parallel=ddp|fsdp with trainer.processes=N (or under torchrun); one process: none

An engine owns the update path, with precision (runner.execution.precision) as its policy: a
strategy and the update rule (runner.training.update) call the same few methods whichever engine
they hold, and never ask which one it is:

    module              what the strategy trains (the model, its DDP wrapper, the fully_shard-ed model)
    autocast()          the context of a forward and its loss (torch.autocast under trainer.autocast)
    sync(i, k)          the context of micro-batch i of k and its backward: gradients synchronise in the
                        micro-batch backward.sync picks (DDP's no_sync, FSDP2's set_requires_gradient_sync)
    backward(loss, w)   backward of loss x w, w the exact weight the caller computed (this rank's share
                        of the batch under DDP and FSDP, runner.training.weighting.rank_shard)
    unscale, clip, grad_norm, step, after_step, zero_grad
                        the optimizer side: GradScaler's unscale_ and update, clip_grad_norm_, step
    optimizer_states()  the optimizers' state for checkpoints (an engine that owns its optimizer says)
    gather(...)         the logged loss, parts and token count of the whole batch (one all-reduce)
    full_state()        full tensors for the records (params.pt, param_sha256, first_grad.pt)
    figures(steps)      summary figures: parallel, communication rounds per step, peak gradient bytes
    agree(sha)          whether every rank ends with bit-identical parameters

An engine that owns the optimizer step (DeepSpeed, Lightning Fabric) is one more class that overrides
the optimizer side, registered in ENGINES or named by its import path (trainer.parallel=package.module.Class);
`needs_ranks = False` lets it run in one process too.
Execution imports no component: what a loss or a data set knows reaches an engine as a number.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from runner.config.registry import Registry
from runner.execution.precision import Precision
from runner.execution.processes import local_rank
from runner.recording.record import ADDITIVE_COLUMNS


def synced(policy: str, index: int, count: int) -> bool:
    """Does micro-batch `index` of `count` synchronise gradients under backward.sync=policy?"""
    return {"last": index == count - 1, "every": True, "first": index == 0}[policy]


class Single:
    """One process: every method is the plain call."""

    name = "none"
    rank, world = 0, 1
    needs_ranks = False  # registered engines that do (DDP, FSDP) fall back to this one in one process

    def __init__(self, model: nn.Module, device: Optional[torch.device] = None, sync: str = "last"):
        """Every engine is built alike: (model, device, backward.sync); its precision comes with `use`."""
        self.module = model
        self.precision = Precision()

    def use(self, precision: Precision) -> "Single":
        """The precision policy, built once the optimizers are (sharding replaces the parameters first)."""
        self.precision = precision
        return self

    # The passes.
    def autocast(self):
        return self.precision.forward()

    def sync(self, index: int, count: int):
        return nullcontext()

    def backward(self, loss: torch.Tensor, weight=None, retain_graph: bool = False) -> None:
        """backward() of loss x weight (None: the loss as it is), scaled for the precision."""
        self.precision.backward(loss if weight is None else loss * weight, retain_graph=retain_graph)

    def backward_from(self, outputs: torch.Tensor, grad: torch.Tensor) -> None:
        """backward() of `outputs` given their gradient (backward=gradcache's cached embedding gradient)."""
        self.precision.backward_from(outputs, grad)

    # The optimizer side, in the order the update rule calls it.
    def unscale(self, optimizers, params: Sequence[nn.Parameter]) -> None:
        """True gradients in .grad: float32 buffers copied back, GradScaler's unscale_."""
        self.precision.before_step(optimizers, list(params))

    def clip(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        """clip_grad_norm_; the norm before clipping, as the whole model's."""
        return self.plain(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.precision.step(optimizer)

    def after_step(self) -> None:
        """Once per optimizer step: GradScaler's update."""
        self.precision.after_step()

    def zero_grad(self, optimizers) -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    def columns(self) -> Dict[str, torch.Tensor]:
        """This step's metrics.csv columns of the engine (grad_scale, step_skipped under fp16)."""
        return self.precision.columns()

    def optimizer_states(self, optimizers) -> List[Dict]:
        return [opt.state_dict() for opt in optimizers]

    def load_optimizer_states(self, optimizers, states: List[Dict]) -> None:
        for optimizer, saved in zip(optimizers, states, strict=True):
            optimizer.load_state_dict(saved)

    def gather(self, result, share: float):
        return result

    def grad_norm(self, params: Sequence[nn.Parameter]) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        # One fused kernel for the per-tensor norms where torch has it (as clip_grad_norm_ does).
        norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
        return torch.linalg.vector_norm(torch.stack(norms))

    def plain(self, tensor: torch.Tensor) -> torch.Tensor:
        """A value computed from this rank's tensors, as the whole model's (0-dim, on this rank)."""
        return tensor

    def param_sums(self, params: Sequence[nn.Parameter]) -> List[torch.Tensor]:
        """Each parameter's sum (metrics.csv's param_sum), without a host sync."""
        return [p.detach().sum() for p in params]

    def full_state(self, model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """(parameters by name, the state_dict), as full tensors on every rank."""
        return dict(model.named_parameters()), model.state_dict()

    def full(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return tensors

    def figures(self, steps: int) -> Dict[str, object]:
        return {"parallel": self.name}

    def agree(self, sha256: Optional[str]) -> Optional[bool]:
        return None

    def hint(self, error: BaseException) -> Optional[str]:
        """A known cause of `error` in this engine, in a line, or None."""
        return None

    def done(self) -> None:
        """The run's records are written: with several ranks, wait for the others (a rank that
        exits 1 first would have torch.distributed.run stop the rest mid-record)."""


class Ranks(Single):
    """What DDP and FSDP share: joining the ranks, sharding a batch, weighting, gathering, and
    the figures: the engine's own hook counts its collective calls (`calls`), `calls_per_round`
    of them make one synchronised backward, reported per optimizer step as `rounds_key`."""

    rounds_key = ""  # the summary key of the rounds per optimizer step

    needs_ranks = True

    def __init__(self, model: nn.Module, device: torch.device, sync: str):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device, self.policy = device, sync
        self.precision = Precision()
        self.calls = [0]  # the engine's collective calls, counted by its own communication hook
        self._peak_grad_bytes = 0
        self._measuring = True  # gradient bytes are measured on the first optimizer step
        self.module = self.wrap(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def held_grad_bytes(self) -> int:
        """Bytes of gradients this rank holds now."""
        return sum(p.grad.nbytes for p in self.module.parameters() if p.grad is not None)

    def calls_per_round(self) -> int:
        return 1

    def _measure(self) -> None:
        if self._measuring:
            self._peak_grad_bytes = max(self._peak_grad_bytes, self.held_grad_bytes())

    def gather(self, result, share: float):
        """The batch's loss, parts and counts from every rank's share of them (one all-reduce)."""
        import torch.distributed as dist

        self._measure()
        self._measuring = False
        counts = [k for k in result.extras if k in ADDITIVE_COLUMNS]
        names = list(result.parts) + counts
        values = [result.loss * share] + [result.parts[n] * share for n in result.parts] + \
                 [result.extras[k] for k in counts]
        stacked = torch.stack([v.reshape(()).to(result.loss.dtype) for v in values])
        dist.all_reduce(stacked)
        result.loss = stacked[0]
        for i, name in enumerate(names, start=1):
            if name in result.parts:
                result.parts[name] = stacked[i]
            else:
                result.extras[name] = stacked[i]
        return result

    def agree(self, sha256: Optional[str]) -> Optional[bool]:
        """Do all ranks end with bit-identical parameters? None when a rank is gone."""
        import torch.distributed as dist

        hashes: List[Optional[str]] = [None] * self.world
        try:
            dist.all_gather_object(hashes, sha256)
        except RuntimeError:
            return None
        return len(set(hashes)) == 1

    def done(self) -> None:
        import torch.distributed as dist

        try:
            dist.barrier()
        except RuntimeError:  # a rank is gone: nothing to wait for
            pass

    def figures(self, steps: int) -> Dict[str, object]:
        rounds = self.calls[0] / self.calls_per_round() / steps if steps > 0 else None
        return {"parallel": self.name, "peak_grad_bytes": self._peak_grad_bytes or None, self.rounds_key: rounds}


def _counting_allreduce(calls: List[int], bucket):  # no annotation: DDP checks it literally
    """DDP's own all-reduce hook, counting rounds: one per synchronised backward, however many
    buckets the gradients fill."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if bucket.is_last():
        calls[0] += 1
    return default_hooks.allreduce_hook(None, bucket)


class DDP(Ranks):
    """DistributedDataParallel: every rank holds the whole model and its whole gradient."""

    name = "ddp"
    rounds_key = "allreduce_calls_per_step"

    def wrap(self, model: nn.Module) -> nn.Module:
        cuda = self.device.type == "cuda"
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index if self.device.index is not None else local_rank()] if cuda else None)
        ddp.register_comm_hook(self.calls, _counting_allreduce)
        return ddp

    @contextmanager
    def sync(self, index: int, count: int):
        """DDP synchronises only in the micro-batch backward.sync picks; the others run under
        no_sync and add up locally."""
        with nullcontext() if synced(self.policy, index, count) else self.module.no_sync():
            yield
        self._measure()


# The parallel units by trainer.parallel (one process is always Single).
ENGINES = Registry("trainer.parallel")
ENGINES.register("ddp")(DDP)


def register(cls):
    return ENGINES.register(cls.name)(cls)


def engine_class(name: str) -> type:
    """The engine trainer.parallel names: a registered one (ddp, fsdp), or the import path of your own
    class (package.module.Class) with Single's methods. ValueError names what is allowed."""
    if name in ENGINES or "." not in name:
        return ENGINES.get(name)
    import importlib

    module, _, attribute = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"trainer.parallel={name} cannot be imported ({type(exc).__name__}: {exc}): expected "
                         f"one of {sorted(ENGINES)} or the import path of an engine class") from None
    if not (isinstance(cls, type) and issubclass(cls, Single)):
        raise ValueError(f"trainer.parallel={name} is not an engine: expected a subclass of "
                         "runner.execution.parallel.Single")
    return cls


def build_parallel(name: str, model: nn.Module, device: torch.device, world: int, sync: str = "last"):
    """The engine trainer.parallel names, joined to the ranks torchrun started (world > 1); in one
    process the plain one, unless the named engine runs without ranks."""
    cls = engine_class(name)
    if world <= 1 and cls.needs_ranks:
        return Single(model, device, sync)
    return cls(model, device, sync)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
