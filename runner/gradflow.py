"""Which module receives gradient from which loss component, on the first step.

The table replays the strategy's forward (so backward=detach shows its cut) on the first batch
and asks autograd for each component's gradient with torch.autograd.grad. Like the loss probe it
leaves no trace: the RNG is restored, BatchNorm runs in eval mode, and no .grad is touched.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from runner.losses import loss_parts


def top_level_modules(model: nn.Module) -> List[tuple]:
    """(name, module) of the model's direct children that hold parameters, else the model."""
    children = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
    return children or [("model", model)]


def gradient_flow(strategy, model: nn.Module, loss_fn, inputs, targets) -> List[Dict]:
    modules = top_level_modules(model)
    params = [p for _, m in modules for p in m.parameters()]
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
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            by_param = dict(zip(map(id, params), grads))
            for name, module in modules:
                received = [by_param[id(p)] for p in module.parameters() if by_param[id(p)] is not None]
                norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in received])) if received else None
                rows.append({"module": name, "component": component,
                             "receives_gradient": bool(received),
                             "grad_norm": float(norm) if norm is not None else 0.0})
    return rows
