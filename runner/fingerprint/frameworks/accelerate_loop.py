"""loop=accelerate: Accelerate's gradient accumulation as its docs write the loop: Accelerator(
gradient_accumulation_steps=k), the model, optimizer, loader and schedule through prepare(), each micro-batch
under `with accelerator.accumulate(model)`, accelerator.backward(loss), clip_grad_norm_ where
accelerator.sync_gradients, then optimizer.step(), scheduler.step() and optimizer.zero_grad() (which the
prepared optimizer and schedule skip until the window's last micro-batch, or the loader's end)."""
from __future__ import annotations

import torch

from runner.fingerprint.loops import EpochsDataset, Loop, Session, installed_version


class Adapter(Loop):
    name = "accelerate"

    def version(self) -> str:
        return f"accelerate {installed_version('accelerate')}"

    def train(self, session: Session) -> None:
        from accelerate import Accelerator

        accelerator = Accelerator(gradient_accumulation_steps=session.accumulation, cpu=True)
        loader = torch.utils.data.DataLoader(EpochsDataset(session.loader), batch_size=None)
        prepared = [session.model, session.optimizer, loader] + ([session.scheduler] if session.scheduler else [])
        model, optimizer, loader, *scheduler = accelerator.prepare(*prepared)
        for _ in range(session.epochs):
            for inputs, targets in loader:
                with accelerator.accumulate(model):
                    loss = session.loss_fn(model(inputs), targets)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and session.clip_norm:
                        accelerator.clip_grad_norm_(model.parameters(), session.clip_norm)
                    optimizer.step()
                    for s in scheduler:
                        s.step()
                    optimizer.zero_grad()
        accelerator.free_memory()
