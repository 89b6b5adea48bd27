"""A Hugging Face causal language model as it is: a tiny GPT-2, randomly initialised (nothing is downloaded).

    pip install "backward-lab[examples]"        # transformers, an optional extra
    python -m runner.experiments.examples.stdlib_corpus stdlib.txt
    python -m runner -m experiment=tokens model=custom \\
        model._target_=runner.experiments.examples.gpt2_tiny.tiny_gpt2 model.vocab=256 \\
        data=text data.path=stdlib.txt

GPT2LMHeadModel takes a GPT2Config, not keyword arguments, so `model._target_` names this factory.
Its output is a CausalLMOutputWithCrossAttentions (a ModelOutput, a mapping): the runner hands loss=lm
its `logits` and says so in the summary (outputs_from: logits). It takes input_ids of shape (B, T), as
data=seq and data=text give them: right-padded with 0, with no attention mask. Causal attention keeps a
real token from seeing the padding after it, and the padded positions' labels are -100, so the loss is
the one an attention mask would give.
"""
from torch import nn


def tiny_gpt2(vocab: int = 16, hidden: int = 32, depth: int = 1, heads: int = 2, positions: int = 256,
              dropout: float = 0.0) -> nn.Module:
    """GPT2LMHeadModel(GPT2Config(...)): `vocab`, `hidden` and `depth` are the runner's model.vocab,
    model.hidden and model.depth (the runner passes a key only where it differs from its default, so the
    defaults here are the runner's: model.vocab=16, data=text's bytes need model.vocab=256). Dropout is off by default, so that micro-batches can give the full
    batch's gradient (with dropout on, the runner's probe reports the run as stochastic)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=depth, n_head=heads, n_positions=positions,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False,
                        bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside a small vocabulary
    return GPT2LMHeadModel(config)
