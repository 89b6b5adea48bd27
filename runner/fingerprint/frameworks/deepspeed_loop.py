"""loop=deepspeed: DeepSpeed's engine in one CPU process over gloo (DS_ACCELERATOR=cpu), as its docs write the
loop: deepspeed.initialize with gradient_accumulation_steps=k, gradient_clipping=clip and ZeRO stage
loop.zero_stage, then engine(inputs), engine.backward(loss), engine.step() for every micro-batch. The engine
scales each loss by 1/k and steps where its micro-step count reaches a multiple of k, whatever the epoch.

DeepSpeed is a source package: pip install --no-build-isolation deepspeed, after the CPU torch. Stages 1 and 2
move the gradient into flat partitions before their optimizer steps: the observed .grad is then empty, and the
fingerprint says it saw no gradient rather than guessing."""
from __future__ import annotations

import logging
import os
import socket

from runner.fingerprint.loops import Loop, Session, installed_version


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Adapter(Loop):
    name = "deepspeed"

    def __init__(self, zero_stage: int = 0):
        self.zero_stage = zero_stage

    def version(self) -> str:
        return f"deepspeed {installed_version('deepspeed')} ZeRO-{self.zero_stage}"

    def train(self, session: Session) -> None:
        for key, value in (("DS_ACCELERATOR", "cpu"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
        import deepspeed

        for name in ("DeepSpeed", "compilers"):  # its set-up lines, and the C compiler's when it builds its comm op
            logging.getLogger(name).setLevel(logging.ERROR)
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo")
        size = max(mb.rows for mb in session.loader.stream.epoch(0))
        config = {"train_micro_batch_size_per_gpu": size, "gradient_accumulation_steps": session.accumulation,
                  "gradient_clipping": session.clip_norm, "zero_optimization": {"stage": self.zero_stage},
                  "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
                  "zero_allow_untested_optimizer": True}  # the lab's torch.optim.SGD under ZeRO-1/2
        engine, _, _, _ = deepspeed.initialize(model=session.model, optimizer=session.optimizer,
                                               lr_scheduler=session.scheduler, config=config)
        for _ in range(session.epochs):
            for inputs, targets in session.loader:
                loss = session.loss_fn(engine(inputs), targets)
                engine.backward(loss)
                engine.step()
