"""loop=hf_trainer: the transformers Trainer with gradient_accumulation_steps=k and max_grad_norm=clip, the
lab's model returning its logits and the lab's loss as compute_loss_func: a loss that counts tokens is handed
the Trainer's num_items_in_batch (the window's label count), any other returns its micro-batch mean, which
the Trainer never divides by k (its compute_loss_func path, PR #34511)."""
from __future__ import annotations

import logging
import tempfile

import torch
from torch import nn

from runner.components.data import labels_of
from runner.components.losses import TokenLoss, offers
from runner.fingerprint.loops import EpochsDataset, Loop, Session, installed_version


class _LogitsModel(nn.Module):
    """The lab's model as the Trainer calls it: model(**inputs) -> {"logits": ...} (the lab's model is hooked).
    Targets with more than labels (rollouts' advantages, packed rows' documents) ride along as `targets`, and come
    back with the logits for the loss: the Trainer sees a label tensor, which it counts num_items_in_batch from."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs, labels=None, targets=None):
        return {"logits": self.model(inputs), "targets": targets}


class Adapter(Loop):
    name = "hf_trainer"

    def version(self) -> str:
        return f"transformers {installed_version('transformers')}"

    def train(self, session: Session) -> None:
        from transformers import PrinterCallback, Trainer, TrainingArguments
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        logging.getLogger("accelerate").setLevel(logging.ERROR)
        tokens = offers(session.loss_fn, TokenLoss)

        def compute_loss(outputs, labels, num_items_in_batch=None):
            targets = outputs["targets"] if outputs["targets"] is not None else labels
            if tokens:
                return session.loss_fn(outputs["logits"], targets, num_items_in_batch=num_items_in_batch)
            return session.loss_fn(outputs["logits"], targets)

        def item(inputs, targets):
            if isinstance(targets, dict):
                return {"inputs": inputs, "labels": labels_of(targets), "targets": targets}
            return {"inputs": inputs, "labels": targets}

        # Without a schedule of the lab's, a constant one: the Trainer's own default decays linearly.
        scheduler = session.scheduler or torch.optim.lr_scheduler.LambdaLR(session.optimizer, lambda step: 1.0)
        dataset = EpochsDataset(session.loader, item)
        with tempfile.TemporaryDirectory() as output_dir:
            args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=1,
                                     gradient_accumulation_steps=session.accumulation, num_train_epochs=session.epochs,
                                     max_grad_norm=session.clip_norm, logging_strategy="no", save_strategy="no",
                                     report_to=[], use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
                                     dataloader_num_workers=0, log_level="error")
            trainer = Trainer(model=_LogitsModel(session.model), args=args, train_dataset=dataset,
                              data_collator=lambda items: items[0], optimizers=(session.optimizer, scheduler),
                              compute_loss_func=compute_loss)
            trainer.remove_callback(PrinterCallback)  # its end-of-training dict on stdout
            trainer.train()
