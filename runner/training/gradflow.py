"""Which module receives gradient from which loss component, on the first step.

The table replays the strategy's forward (so backward=detach shows its cut) on the first batch
and asks autograd for each component's gradient with torch.autograd.grad. Like the loss probe it
leaves no trace: the RNG is restored, BatchNorm and dropout run in eval mode (so no running
statistics change; the norms are those of the eval-mode forward), and no .grad is touched.

Rows: one per (module, component), for the model's top-level modules that hold parameters and,
when the loss has learnable parameters (loss.weighting=uncertainty), the loss itself as `loss`.
A component is a named part of a multi-part loss (`cls`/`reg`, `stage1`/`stage2`), else `loss`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from runner.components.losses import loss_parts

COLUMNS = ("module", "component", "receives_gradient", "grad_norm")


def top_level_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of the model's direct children that hold parameters, else the model."""
    children = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
    return children or [("model", model)]


def _norm(grads: List[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def gradient_flow(strategy, model: nn.Module, loss_fn, inputs, targets) -> List[Dict]:
    modules = top_level_modules(model)
    if isinstance(loss_fn, nn.Module) and any(True for _ in loss_fn.parameters()):
        modules.append(("loss", loss_fn))
    params = [p for _, m in modules for p in m.parameters() if p.requires_grad]
    was_training = model.training
    with torch.random.fork_rng(devices=[inputs.device] if inputs.device.type == "cuda" else []):
        model.eval()
        try:
            outputs = strategy.forward(model, inputs)
        finally:
            model.train(was_training)
        components = loss_parts(loss_fn, outputs, targets) or {"loss": loss_fn(outputs, targets)}
        rows = []
        for component, loss in components.items():
            if params and isinstance(loss, torch.Tensor) and loss.requires_grad:
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            else:  # a constant component (e.g. a part with no grad_fn) reaches no parameter
                grads = [None] * len(params)
            by_param = dict(zip(map(id, params), grads))
            for name, module in modules:
                received = [by_param[id(p)] for p in module.parameters() if by_param.get(id(p)) is not None]
                rows.append({"module": name, "component": component,
                             "receives_gradient": bool(received),
                             "grad_norm": _norm(received) if received else 0.0})
    return rows
