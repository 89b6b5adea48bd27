"""loop=lightning: PyTorch Lightning's automatic optimisation, as its docs set accumulation up:
Trainer(accumulate_grad_batches=k, gradient_clip_val=clip), the schedule stepped per optimizer step
("interval": "step"), training_step returning each micro-batch's loss. The last micro-batch of a window
runs inside optimizer.step(closure) (runner.fingerprint.observe observes after the closure)."""
from __future__ import annotations

import logging
import warnings

from runner.fingerprint.loops import Loop, Session, installed_version


def _module(session: Session):
    import lightning.pytorch as pl

    class LabModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = session.model

        def training_step(self, batch, batch_index):
            inputs, targets = batch
            return session.loss_fn(self.model(inputs), targets)

        def configure_optimizers(self):
            if session.scheduler is None:
                return session.optimizer
            return {"optimizer": session.optimizer, "lr_scheduler": {"scheduler": session.scheduler, "interval": "step"}}

    return LabModule()


class Adapter(Loop):
    name = "lightning"

    def version(self) -> str:
        return f"lightning {installed_version('lightning')}"

    def train(self, session: Session) -> None:
        import lightning.pytorch as pl

        for name in ("lightning.pytorch", "lightning.fabric"):  # its banner lines: "GPU available: False", ...
            logging.getLogger(name).setLevel(logging.ERROR)
        trainer = pl.Trainer(max_epochs=session.epochs, accumulate_grad_batches=session.accumulation,
                             gradient_clip_val=session.clip_norm or None, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0)
        with warnings.catch_warnings():  # lightning's own deprecations of torch's pytree API, not the user's
            warnings.filterwarnings("ignore", message=".*is deprecated")
            trainer.fit(_module(session), train_dataloaders=session.loader)
