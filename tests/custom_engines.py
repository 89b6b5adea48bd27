"""An engine of a user's own (trainer.parallel=tests.custom_engines.OwnsItsStep): one that owns
the optimizer step, as DeepSpeed's engine.step() and Lightning Fabric do, so the lab's strategies
must reach the update only through the engine's methods."""
import torch

from runner.execution.parallel import Single


class OwnsItsStep(Single):
    """Applies plain SGD itself, from each group's learning rate, and never calls optimizer.step();
    keeps its own step count, which its optimizer state is (the checkpoint's)."""

    name = "owns_its_step"
    needs_ranks = False  # it runs in one process

    def __init__(self, model, device=None, sync="last"):
        super().__init__(model, device, sync)
        self.steps = 0

    @torch.no_grad()
    def step(self, optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        self.steps += 1

    def zero_grad(self, optimizers):
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None

    def optimizer_states(self, optimizers):
        return [{"own_steps": self.steps}]

    def load_optimizer_states(self, optimizers, states):
        self.steps = states[0]["own_steps"]
