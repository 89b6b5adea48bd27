"""FSDP2 (`torch.distributed.fsdp.fully_shard`) as a parallel unit: trainer.parallel=fsdp.

Each block (the blocks activation checkpointing uses, runner.execution.recompute.blocks_of) and then the root
are sharded over a 1-D mesh of every rank (gloo on CPU, nccl on CUDA): each rank keeps 1/world of
every parameter, its optimizer state and, after a reduce-scatter, its gradient.

Under accumulation, backward.sync says when gradients are reduce-scattered:
- last: `set_requires_gradient_sync(False)` for all micro-batches but the last; FSDP keeps the
  unsharded gradient between them (torchtitan PR #1710), one reduce-scatter round per step.
- every: a reduce-scatter after every micro-batch, k rounds (W x the traffic of `last`), and only
  the sharded gradient held between micro-batches (about 1/W of the bytes).
- first (the off-by-one): the later micro-batches' unsharded gradients are never reduced into the
  step. Unlike DDP the ranks cannot disagree: each rank owns its shard of the parameters.

Rounds are counted by a reduce-scatter that counts its calls (FSDPModule.set_custom_reduce_scatter):
one round is one reduce-scatter per sharded block. Gradient bytes are what this rank holds after
each micro-batch of the first optimizer step: sharded gradients plus unsharded ones kept for later.
Mixed precision: with bf16 parameters (trainer.dtype=bfloat16) the blocks compute in bf16 and
reduce in float32 (MixedPrecisionPolicy), as FSDP2 intends. There, a parameter that sits out a
deferred micro-batch (first used on the last one) crashes FSDP2 itself in torch 2.13 (pytorch
#196996; the AttributeError of never-gathered parameters, pytorch PR #194058): the run records the
error with that reference as its hint.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from torch import nn

from runner.execution.parallel import Ranks, register, synced
from runner.execution.recompute import blocks_of


def _counting_reduce_scatter(calls: List[int]):
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
        DefaultReduceScatter,
    )

    class Counting(DefaultReduceScatter):
        def __call__(self, *args, **kwargs):
            calls[0] += 1
            return super().__call__(*args, **kwargs)

    return Counting()


@register
class FSDP(Ranks):
    name = "fsdp"
    rounds_key = "reduce_scatter_calls_per_step"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        dtype = next(model.parameters()).dtype
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if dtype == torch.bfloat16 else MixedPrecisionPolicy()
        for block in blocks_of(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.sharded = [m for m in model.modules() if isinstance(m, FSDPModule)
                        and any(True for _ in m.parameters(recurse=False))]
        for module in self.sharded:
            module.set_custom_reduce_scatter(_counting_reduce_scatter(self.calls))
        return model

    @contextmanager
    def sync(self, index: int, count: int):
        """Reduce-scatter only in the micro-batch backward.sync picks. Restored afterwards, so a
        backward after every micro-batch's forward (backward=sum) synchronises as full does."""
        self.module.set_requires_gradient_sync(synced(self.policy, index, count))
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)
        self._measure()

    def held_grad_bytes(self) -> int:
        held = 0
        for module in self.sharded:
            for group in module._get_fsdp_state()._fsdp_param_groups:
                for param in group.fsdp_params:  # unsharded gradients kept for a later reduce-scatter
                    grad = param.unsharded_accumulated_grad
                    if grad is None and hasattr(param, "_unsharded_param"):
                        grad = param._unsharded_param.grad
                    held += grad.nbytes if grad is not None else 0
        return held + sum(p.grad.to_local().nbytes for p in self.module.parameters() if p.grad is not None)

    def grad_norm(self, params) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        return self.plain(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())

    def plain(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    def param_sums(self, params) -> List[torch.Tensor]:
        """One all-reduce of every shard's sums per step (the shards add up to the parameter's)."""
        import torch.distributed as dist

        sums = torch.stack([p.detach().to_local().sum() for p in params])
        dist.all_reduce(sums)
        return list(sums.unbind())

    def full_state(self, model: nn.Module):
        params = {name: self.plain(p.detach()) for name, p in model.named_parameters()}
        return params, {name: self.plain(t) for name, t in model.state_dict().items()}

    def full(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: self.plain(t) for name, t in tensors.items()}

    def hint(self, error: BaseException) -> Optional[str]:
        text = str(error)
        if "_unsharded_param" in text or "uniform gradient dtype" in text:
            return ("a known FSDP2 bug: a parameter that sits out a micro-batch under a bf16 MixedPrecisionPolicy "
                    "with deferred gradient sync (pytorch #196996, PR #194058); use backward.sync=every or "
                    "float32 parameters")
        return None

    def calls_per_round(self) -> int:
        return max(1, len(self.sharded))  # one reduce-scatter per sharded block
