"""A model of the user's whose output is a mapping with `logits` (a Hugging Face `ModelOutput`, such as
GPT2LMHeadModel's CausalLMOutputWithCrossAttentions) under a built-in loss, which wants a tensor.

Before this, `model=custom data=seq loss=lm` on a transformers causal LM ended in "loss=lm raised
AttributeError: 'CausalLMOutputWithCrossAttentions' object has no attribute 'flatten'" (issue 19).
A forward hook, not a wrapping module, hands the loss `outputs["logits"]`: the model's parameter
names, its state_dict and checkpoints stay the user's own. transformers is not imported: its
ModelOutput subclasses OrderedDict, so it is a Mapping (transformers' modeling_outputs.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch

LOGITS = "logits"


class LogitsFromMapping:
    """A forward hook: a Mapping output with a `logits` entry becomes that entry; anything else passes
    through. `used` says whether it ever took one (the summary's outputs_from)."""

    def __init__(self):
        self.used = False

    def __call__(self, module: torch.nn.Module, args, output):
        if isinstance(output, Mapping) and output.get(LOGITS) is not None:
            self.used = True
            return output[LOGITS]
        return None  # the output as it is


def take_logits(model: torch.nn.Module) -> LogitsFromMapping:
    """Register the hook on `model` (once, at build time) and return it."""
    hook = LogitsFromMapping()
    model.register_forward_hook(hook)
    return hook


def outputs_from(hook: Optional[LogitsFromMapping]) -> Optional[str]:
    """The summary's outputs_from: "logits" where the loss read a mapping's logits, else None."""
    return LOGITS if hook is not None and hook.used else None
